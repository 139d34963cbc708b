"""A frozen linear layer whose weight is stored as NF4 (QLoRA's 4-bit NormalFloat).

Built on `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`: blocks of 64 weights share
one absmax, and the absmaxes are themselves quantized to 8 bits in blocks of 256 (bitsandbytes'
"compress_statistics", a.k.a. double quantization), about 4.13 bits per weight in all.

Every tensor of the quant state is a buffer of this module, so `.to(device)`, `state_dict()`
and safetensors work as for any module. The two lookup tables (the 16 NF4 values and the
256-entry dynamic map of the nested absmax) are constants of the format, so they are not stored
per layer.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.bnb import bnbf

BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256  # what bitsandbytes uses for compress_statistics=True

_dynamic_maps: dict[torch.device, torch.Tensor] = {}


# Run as it is, even inside a block that --compile compiles: the compiled graph keeps the table it returns as a
# constant, where tracing would fail at its first call (building the table calls tolist() on a float tensor) and store
# nothing after it.
@torch.compiler.assume_constant_result
def _dynamic_map(device: torch.device) -> torch.Tensor:
    """bitsandbytes' 8-bit code of the nested absmax, one copy per device."""
    if device not in _dynamic_maps:
        _dynamic_maps[device] = bnbf.create_dynamic_map().to(device)
    return _dynamic_maps[device]


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor,
                   offset: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype`, from the packed NF4 codes and the double-quantized absmax."""
    nested = bnbf.QuantState(absmax=nested_absmax, code=_dynamic_map(packed.device),
                             blocksize=NESTED_BLOCK_SIZE, dtype=torch.float32)
    state = bnbf.QuantState(absmax=absmax, shape=shape, blocksize=BLOCK_SIZE, quant_type="nf4",
                            dtype=dtype, offset=offset, state2=nested)
    return bnbf.dequantize_4bit(packed, state)


QUANT_STATE = ("weight", "absmax", "nested_absmax", "offset")  # a Linear4bit's buffers, in its state dict


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The buffers of `QUANT_STATE` for the float `weight`, quantized on its own device."""
    packed, state = bnbf.quantize_4bit(weight, blocksize=BLOCK_SIZE, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8)
    return dict(zip(QUANT_STATE, (packed, state.absmax, state.state2.absmax, state.offset), strict=True))


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T that saves only the packed weight and dequantizes it again in backward.

    Keeping the dequantized W for backward would hold a full-precision copy of every layer
    between forward and backward, which is the memory QLoRA exists to save.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, offset, shape, dtype):
        ctx.save_for_backward(packed, absmax, nested_absmax, offset)
        ctx.shape, ctx.dtype = shape, dtype
        return F.linear(x, dequantize_nf4(packed, absmax, nested_absmax, offset, shape, dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight = dequantize_nf4(*ctx.saved_tensors, ctx.shape, ctx.dtype)
        # Under autocast grad_out may be bf16 while the compute dtype is fp32.
        return grad_out @ weight.to(grad_out.dtype), None, None, None, None, None, None


class Linear4bit(nn.Module):
    """y = x @ dequantize(W).T + b, with W frozen in NF4; only the input gets a gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        """An empty layer of the right shapes, to be filled by `from_linear` or `load_state_dict`."""
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        numel = in_features * out_features
        blocks = math.ceil(numel / BLOCK_SIZE)
        self.register_buffer("weight", torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.empty(math.ceil(blocks / NESTED_BLOCK_SIZE), device=device))
        self.register_buffer("offset", torch.empty((), device=device))
        # Frozen like the weight: a QLoRA base trains nothing of its own.
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize `linear` on its own device; a meta linear gives an empty layer to load into. The
        compute dtype defaults to the linear's own: the precision the caller loaded it in."""
        device = linear.weight.device
        compute_dtype = compute_dtype or linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device)
        if device.type == "meta":
            return layer
        with torch.no_grad():
            for name, tensor in quantize_nf4(linear.weight).items():
                layer._buffers[name].copy_(tensor)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight, (out_features, in_features), in the compute dtype."""
        return dequantize_nf4(self.weight, self.absmax, self.nested_absmax, self.offset,
                              torch.Size((self.out_features, self.in_features)), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self.weight, self.absmax, self.nested_absmax,
                             self.offset, shape, self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # A cast such as model.to(torch.bfloat16) must change the compute dtype, never the float
        # tensors of the quant state, which would lose precision; they only follow the device.
        state = {name: self._buffers[name] for name in ("nested_absmax", "offset")}
        super()._apply(fn, recurse)
        for name, tensor in state.items():
            self._buffers[name] = tensor.to(self.weight.device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, nf4 block={BLOCK_SIZE}")
