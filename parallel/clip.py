"""Gradient clipping by the global norm when each rank holds different parameters (FSDP shards, pipeline stages)."""

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn


@torch.no_grad()
def clip_grad_norm_(params: Iterable[nn.Parameter], max_norm: float,
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scales the gradients so that the norm over every rank's `params` is at most `max_norm`;
    returns the norm before, on the device (read it and the host waits for the device), as
    torch.nn.utils.clip_grad_norm_ does, with the same scale rule.

    The ranks' parameters must be disjoint (FSDP padding has zero gradient), so the global squared
    norm is the sum of the local ones. A rank without gradients still joins the all-reduce.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    # The rank's own device even without gradients: NCCL all-reduces device tensors only, never a CPU one.
    device = params[0].device if params else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        squares += grad.float().pow(2).sum()
    dist.all_reduce(squares, group=group)
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return norm
