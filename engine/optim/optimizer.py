"""The original project's optimisation: AdamW and a cosine schedule with linear warm-up (as HF Trainer)."""

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from engine.config import TrainConfig
from engine.optim.adamw import AdamW
from engine.optim.offload import HostAdamW
from engine.precision import Precision


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> LambdaLR:
    warmup = warmup_steps(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def scaled_lr(lr: float, scaling: str, global_batch: int, reference_batch: int) -> float:
    """`lr` was tuned for `reference_batch` rows a step; the original scaled it for bigger global
    batches by the square root (or linearly) of the ratio in some multi-GPU runs. None by default."""
    ratio = global_batch / reference_batch
    return lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[scaling]


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Parameter groups as HF Trainer makes them: matrices decay, biases and norm scales (1-D) do not."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(parameters: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float,
          moments: str = "fp32", seed: int = 0, offload: bool = False,
          fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable ones of `parameters`; biases and norm scales (1-D) are not decayed, as in HF Trainer.

    fp32 moments of fp32 weights: torch's AdamW. Moments in bf16 or 8 bits, or bf16 weights (which need
    stochastic rounding): engine/optim/adamw.py, seeded with `seed`. `offload`: torch's AdamW on fp32 masters
    in host memory (engine/optim/offload.py). `fused`: torch's fused kernel (default: on a GPU; a plan of a
    GPU run asks for it on fake CPU tensors, engine/plan/ranks.py).
    """
    trainable = [p for p in parameters if p.requires_grad]
    groups = decay_groups(trainable, weight_decay)
    if offload:
        return HostAdamW(groups, lr=lr, betas=betas)
    if moments != "fp32" or any(p.dtype != torch.float32 for p in trainable):
        return AdamW(groups, lr=lr, betas=betas, moments=moments, seed=seed)
    # On a GPU, the fused kernel: the default foreach one allocates a temporary as large as all the
    # second moments (31 GB for the 7.7B weights `full` trains on Idefics2-8B), on top of the state.
    if fused is None:
        fused = bool(trainable) and all(p.is_cuda for p in trainable)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def optimizer_for(config: TrainConfig, precision: Precision, parameters: Iterable[torch.nn.Parameter],
                  lr: float, fused: bool | None = None) -> torch.optim.Optimizer:
    """The run's AdamW: `--optimizer adamw8bit` keeps both moments in 8-bit blocks; plain adamw keeps
    them in the trained weights' dtype (bf16 under --precision bf16), or with `--optimizer-offload cpu`
    in fp32 on the host, beside fp32 masters."""
    moments = "8bit" if config.optimizer == "adamw8bit" else \
        "bf16" if precision.trained_dtype == torch.bfloat16 else "fp32"
    return adamw(parameters, lr, config.betas, config.weight_decay, moments, config.seed,
                 offload=config.optimizer_offload == "cpu", fused=fused)
