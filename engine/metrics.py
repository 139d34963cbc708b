"""What a run measures of its model: parameter counts, quantized bytes, and per-rank memory bytes."""

import torch
import torch.nn as nn

import lora
from quant import quantized_bytes


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) weights of the whole model; NF4 weights are buffers, not parameters, but count as weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + quantized_bytes(lora.base_layers(model))[1] // 2
    return trainable, total


def quantized_summary(model: nn.Module) -> dict:
    """NF4 bytes against the bf16 bytes of the same weights (QLoRA runs only)."""
    stored, bf16 = quantized_bytes(lora.base_layers(model))
    return {"quantized_weight_bytes": stored, "quantized_weight_bf16_bytes": bf16,
            "quantized_ratio": stored / bf16} if bf16 else {}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_breakdown(parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds in the parameters of its model `parts`, their buffers (NF4 weights, rotary
    tables; each storage once), their gradients and the optimizer: its state and any weights of its
    own (offloaded masters). Call while grads exist."""
    params = [p for part in parts for p in part.parameters()]
    buffers = {b.untyped_storage()._cdata: b for part in parts for b in part.buffers()}
    held = {id(p) for p in params}
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    own = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in held]
    return {
        "param_bytes": _bytes(params),
        "buffer_bytes": _bytes(buffers.values()),
        "grad_bytes": _bytes(p.grad for p in params if p.grad is not None),
        "optimizer_bytes": _bytes(state) + _bytes(own),
    }
