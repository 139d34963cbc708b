"""`--optimizer-offload cpu`: AdamW's fp32 master weights and moments in host memory, stepped on the CPU.

The device keeps only what forward and backward need: the trained weights in the precision's dtype
and their gradients, 4 bytes a trained weight under `--precision bf16` against 16 for fp32 masters
and moments on the device. Each step copies the gradients to the host, runs torch's AdamW on the
fp32 masters there and copies the updated weights back, rounded to the device's dtype. Because the
masters are fp32, no update is lost to bf16 rounding and none needs stochastic rounding: the masters
follow fp32 AdamW exactly. Host buffers are pinned when the weights are on CUDA, so the copies are
DMA. The masters are part of `state_dict`: a resumed run continues from them, not from the rounded
device weights. It costs a copy of the gradients and weights over PCIe each step and the CPU's time
for the update (torch's multi-tensor kernel).
"""

import torch
import torch.nn as nn


class HostAdamW(torch.optim.AdamW):
    """torch's AdamW over host fp32 copies of `groups`' parameters, which it keeps updated."""

    def __init__(self, groups: list[dict], **settings):
        self.cuda = any(p.is_cuda for group in groups for p in group["params"])  # then pinned host copies
        self.pairs = [(param, _host_master(param, self.cuda)) for group in groups for param in group["params"]]
        masters = iter(master for _, master in self.pairs)
        super().__init__([dict(group, params=[next(masters) for _ in group["params"]]) for group in groups],
                         foreach=True, **settings)

    @torch.no_grad()
    def step(self, closure=None):
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.to(master.device, torch.float32, non_blocking=True)
        if self.cuda:
            torch.cuda.synchronize()  # the gradients' copies have landed
        super().step()
        for param, master in self.pairs:
            param.copy_(master, non_blocking=True)
            master.grad = None  # host memory: the copy is not needed past the update

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The device weights' gradients: the ones backward accumulates into (the masters have none)."""
        super().zero_grad(set_to_none)
        for param, _ in self.pairs:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), masters=[master.detach() for _, master in self.pairs])

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        with torch.no_grad():
            for (param, master), saved in zip(self.pairs, state_dict.pop("masters"), strict=True):
                master.copy_(saved)
                param.copy_(master)
        super().load_state_dict(state_dict)


def _host_master(param: nn.Parameter, pin: bool) -> nn.Parameter:
    master = param.detach().to("cpu", torch.float32, copy=True)
    return nn.Parameter(master.pin_memory() if pin else master)
