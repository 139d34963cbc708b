"""How tensors are stored and computed: one policy per run, asked by everything that casts.

`fp32`: every weight and every matmul in fp32 (the CPU default). `bf16-mixed`: frozen weights in
bf16, whatever trains keeps an fp32 master (a 1e-5 update to a bf16 weight rounds away), and the
forward runs under bf16 autocast (the CUDA default). `bf16`: what trains is bf16 too, and so are its
gradients and optimizer moments: 8 bytes a trained weight instead of 16; engine/optim/adamw.py rounds every
update stochastically, so small updates land on average instead of rounding away. All three run on
either device: CPU autocast has a bf16 path, so the dtype path of every GPU run is exercised by the
CPU tests.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Precision:
    name: str
    frozen_dtype: torch.dtype  # frozen weights, and the dtype exports and base copies are written in
    autocast_dtype: torch.dtype | None  # None: no autocast
    trained_dtype: torch.dtype = torch.float32  # master weights of whatever trains, and so their optimizer state

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def keep_masters(self, model: nn.Module) -> None:
        """Whatever trains to its master dtype (fp32), whatever the frozen weights' dtype."""
        for param in model.parameters():
            if param.requires_grad and param.dtype != self.trained_dtype:
                param.data = param.data.to(self.trained_dtype)

    def autocast_forward(self, module: nn.Module, device: torch.device) -> None:
        """`module`'s forward runs under autocast, applied from outside like activation
        checkpointing, so every caller (training step, validation, pipeline stage) computes in this
        precision without asking for it."""
        if self.autocast_dtype is None:
            return
        forward = module.forward

        @functools.wraps(forward)
        def autocast_forward(*args, **kwargs):
            with self.autocast(device):
                return forward(*args, **kwargs)

        module.forward = autocast_forward


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, None),
    "bf16-mixed": Precision("bf16-mixed", torch.bfloat16, torch.bfloat16),
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16, trained_dtype=torch.bfloat16),
}


def precision_for(flag: str, device: torch.device) -> Precision:
    """`auto`: bf16-mixed on CUDA, fp32 elsewhere (as TrainConfig.resolved decides it for a run)."""
    if flag == "auto":
        flag = "bf16-mixed" if device.type == "cuda" else "fp32"
    return PRECISIONS[flag]
