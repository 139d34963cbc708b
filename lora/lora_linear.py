"""LoRA around an existing linear layer that keeps the layer's own parameter names.

y = base(x) + scale * B(A(dropout(x))), where scale is alpha / r, or alpha / sqrt(r) with
rsLoRA, which keeps the update's size from shrinking as the rank grows.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("gaussian", "kaiming")


class LoRALinear(nn.Module):
    """A trainable low-rank update beside a frozen `base` (nn.Linear, or anything with
    `in_features`, `out_features` and a forward, such as a quantized linear).

    The base is not a child module: the wrapper shares the base's own parameter and buffer
    tables, so the wrapped layer's state dict is the base's (`weight`, `bias`, any quant state)
    plus `lora_A.weight` and `lora_B.weight`, and a base checkpoint loads into a wrapped model.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = True, init: str = "gaussian"):
        super().__init__()
        if r < 1 or init not in INITS:
            raise ValueError(f"LoRA needs a rank >= 1 and an init in {INITS}, got r={r}, init={init!r}")
        if next(base.children(), None) is not None:
            raise ValueError(f"LoRALinear cannot share the tensors of {type(base).__name__}: it has submodules")
        self.__dict__["base"] = base  # bypasses nn.Module.__setattr__, which would register a child
        self._parameters = base._parameters
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora, self.init = r, alpha, rslora, init
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # fp32 on the base's device, whatever the base's dtype (as PEFT's autocast_adapter_dtype).
        # A base without weights yet (meta, FSDP loads them later) gets a real adapter on the CPU:
        # no checkpoint holds a fresh adapter, so it must be initialised here.
        device = next(iter(base.state_dict().values())).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.merged = False
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A as PEFT initialises it, B zero, so a fresh adapter leaves the output unchanged."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        # In the input's dtype: fp32 adapter weights under a bf16 model still run as bf16 matmuls.
        low_rank = F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype))
        return out + self.scale * F.linear(low_rank, self.lora_B.weight.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the change the adapter makes to the base weight."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; forward then skips the adapter."""
        if not self.merged:
            weight = self._float_weight()
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base weight (exact up to the weight's rounding)."""
        if self.merged:
            weight = self._float_weight()
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def _float_weight(self) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
            raise TypeError(f"cannot merge LoRA into {type(self.base).__name__}: its weight is not a float "
                            "tensor (merging into a quantized base is not supported)")
        return weight

    def _apply(self, fn, recurse=True):
        # Casts and moves go through the base's own _apply: a quantized base decides which of
        # its tensors may change dtype. The tables are shared, so the wrapper sees the result.
        self.base._apply(fn, recurse)
        for child in self.children():
            child._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> "LoRALinear":
        self.base.train(mode)  # not a child, so nn.Module.train would not reach it
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"base={self.base!r}, r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"
