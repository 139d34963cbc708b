"""Swap a model's nn.Linear layers for NF4 Linear4bit layers, and measure what that saves."""

import re
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from quant.linear4bit import QUANT_STATE, Linear4bit, quantize_nf4

# (name, start, stop) -> elements [start, stop) of a weight, flattened (models/lazy.py's SliceReader)
Read = Callable[[str, int, int], torch.Tensor]


def _skip_predicate(model: nn.Module, skip: Callable[[str], bool] | list[str] | None) -> Callable[[str], bool]:
    """A list is regular expressions searched in module paths; each must match some linear."""
    if skip is None:
        return lambda path: False
    if callable(skip):
        return skip
    regexes = [re.compile(pattern) for pattern in skip]
    paths = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for pattern, regex in zip(skip, regexes, strict=True):
        if not any(regex.search(path) for path in paths):
            raise ValueError(f"skip pattern {pattern!r} matches no nn.Linear in the model")
    return lambda path: any(regex.search(path) for regex in regexes)


def quantize(model: nn.Module, skip: Callable[[str], bool] | list[str] | None = None,
             device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every nn.Linear not skipped by a Linear4bit, in place; returns how many were replaced.

    Each linear is moved to `device` just before it is quantized, so a model loaded on the CPU
    never has more than one full-precision layer on the accelerator. On a meta-device model the
    layers are empty Linear4bit shells, ready for `load_state_dict(..., assign=True)` from a
    cached quantized state dict. The compute dtype defaults to each linear's own dtype.
    """
    is_skipped = _skip_predicate(model, skip)
    # Exactly nn.Linear: subclasses such as nn.MultiheadAttention's out_proj are read by weight
    # elsewhere, which a packed weight would break.
    # Paths, not modules: holding the replaced linears would keep every moved copy alive.
    paths = [path for path, module in model.named_modules() if type(module) is nn.Linear and not is_skipped(path)]
    for path in paths:
        linear = model.get_submodule(path)
        # (A plan's fake tensors cannot be moved; a meta linear becomes an empty layer, for QuantizingReader.)
        if device is not None and linear.weight.device != device and not linear.weight.is_meta:
            linear.to(device)
        model.set_submodule(path, Linear4bit.from_linear(linear, compute_dtype))
    return len(paths)


class QuantizingReader:
    """A weights reader for a model whose NF4 layers are still empty (quantized on the meta device):
    such a layer's tensors (`<path>.weight`, the packed codes, `.absmax`, ...) are read by quantizing
    the float `<path>.weight` of the files whole, on `device`, as `quantize` would have; every other
    name is read as it is. The last layer's quantization is kept, so a rank reading that layer's
    tensors a slice at a time (FSDP) quantizes it once.
    """

    def __init__(self, read: Read, layers: dict[str, Linear4bit], device: torch.device):
        self.read, self.layers, self.device = read, layers, device
        self.path, self.state = "", {}

    def __call__(self, name: str, start: int, stop: int) -> torch.Tensor:
        path, _, tensor = name.rpartition(".")
        layer = self.layers.get(path)
        if layer is None or tensor not in QUANT_STATE:
            return self.read(name, start, stop)
        if path != self.path:
            shape = torch.Size((layer.out_features, layer.in_features))
            weight = self.read(f"{path}.weight", 0, shape.numel()).view(shape)
            self.path, self.state = path, quantize_nf4(weight.to(self.device, layer.compute_dtype))
        return self.state[tensor].reshape(-1)[start:stop]


def quantized_bytes(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(bytes of every NF4 weight among `modules` with its quant state, bytes the same weights take in bf16).

    `modules` is usually `model.modules()`; a caller whose wrappers hide a layer (LoRA keeps its
    base out of the module tree) passes the layers themselves.
    """
    stored = bf16 = 0
    for module in modules:
        if isinstance(module, Linear4bit):
            stored += sum(t.numel() * t.element_size() for t in
                          (module.weight, module.absmax, module.nested_absmax, module.offset))
            bf16 += module.in_features * module.out_features * 2
    return stored, bf16


def dequantize(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every Linear4bit by an nn.Linear holding its dequantized weight; returns the count.

    Merging a QLoRA adapter goes through this: the adapter was trained against the NF4 weights,
    so it is folded into their dequantized values, not into the original bf16 ones.
    """
    paths = [path for path, module in model.named_modules() if isinstance(module, Linear4bit)]
    for path in paths:
        quantized = model.get_submodule(path)
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                           device=quantized.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(quantized.dequantize())
            if quantized.bias is not None:
                linear.bias.copy_(quantized.bias)
        model.set_submodule(path, linear)
    return len(paths)
