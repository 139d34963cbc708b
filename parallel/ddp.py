"""Data parallelism by hand on torch.distributed: every rank holds the whole model, gradients are summed.

The gradients are SUMMED over ranks, not averaged as torch's DistributedDataParallel does: the
engine divides every rank's loss by the answer-token count of the whole global batch, so the sum
over ranks is already the exact global mean gradient, however unevenly tokens fall on ranks.

Only trainable parameters are synchronised, so a frozen base (LoRA, QLoRA) costs nothing. Their
gradients are packed, in reverse registration order (the order backward produces them), into
buckets of about `bucket_cap_mb`; each bucket's all-reduce is launched as soon as its last gradient
is accumulated, so communication overlaps the rest of backward. At the end of backward the
stragglers are launched, everything is awaited and the sums are copied back into `.grad`.
"""

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn


class _Bucket:
    """One flat buffer: the gradients of `params`, then one "used" flag per parameter.

    The flags travel in the same all-reduce, so a parameter no rank used keeps `grad=None`
    (as in a single process, where the optimizer then skips it) at no extra communication.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        sizes = [p.numel() for p in params]
        # Summed in fp32 even for bf16 gradients (--precision bf16): a bf16 sum over ranks loses small ones.
        self.flat = torch.zeros(sum(sizes) + len(params), dtype=torch.promote_types(params[0].dtype, torch.float32),
                                device=params[0].device)
        *chunks, self.used = self.flat.split([*sizes, len(params)])
        self.views = [chunk.view_as(p) for chunk, p in zip(chunks, params, strict=True)]
        self.ready: set[int] = set()
        self.work: dist.Work | None = None
        self.all_used = True  # every parameter had a gradient here, so has one after the sum

    def launch(self, group: dist.ProcessGroup | None) -> None:
        # A parameter without a gradient (unused in every local backward) contributes zeros.
        for param, view in zip(self.params, self.views, strict=True):
            if param.grad is None:
                view.zero_()
            else:
                view.copy_(param.grad)
        used = [param.grad is not None for param in self.params]
        self.all_used = all(used)
        self.used.copy_(torch.tensor(used, dtype=self.used.dtype), non_blocking=True)
        self.work = dist.all_reduce(self.flat, group=group, async_op=True)

    def finish(self) -> None:
        self.work.wait()
        # Which parameters another rank used is read from the device, a wait for it, only where this rank left
        # some without a gradient: with every one used here, every one is used.
        flags = [True] * len(self.params) if self.all_used else self.used.tolist()
        for param, view, used in zip(self.params, self.views, flags, strict=True):
            if not used:
                continue
            if param.grad is None:
                param.grad = view.clone()
            else:
                param.grad.copy_(view)
        self.ready.clear()
        self.work = None


def _buckets(params: list[nn.Parameter], cap_bytes: float) -> list[_Bucket]:
    """Consecutive parameters up to `cap_bytes` each; a dtype or device change starts a new bucket."""
    groups: list[list[nn.Parameter]] = []
    size = 0
    for param in params:
        last = groups[-1][0] if groups else None
        if last is None or size >= cap_bytes or (param.dtype, param.device) != (last.dtype, last.device):
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += param.numel() * param.element_size()
    return [_Bucket(group) for group in groups]


class DataParallel(nn.Module):
    """Replicates `module` across the ranks of `process_group` and sums trainable gradients in backward.

    Usage is that of torch's DDP: forward through the wrapper, `loss.backward()`, step the
    optimizer on `wrapper.module`'s parameters. Wrap the backward of every micro-batch but the
    last in `no_sync()`. One synchronised backward per optimizer step: a second one would sum
    the already-summed gradients again.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.module = module
        self.process_group = process_group
        self._sync = True
        self._finish_queued = False
        self._order: list[_Bucket] | None = None  # the order every rank sums the buckets in (_launch_in_order)
        self._readied: list[_Bucket] = []  # this backward's buckets in the order they became ready
        self._launched = 0  # how many of `_order` this backward has summed
        self._broadcast_from_first_rank()
        trainable = [p for p in module.parameters() if p.requires_grad]
        self._buckets = _buckets(trainable[::-1], bucket_cap_mb * 2**20)
        self._bucket_of = {id(p): bucket for bucket in self._buckets for p in bucket.params}
        for param in trainable:
            param.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward inside accumulates gradients locally; the next backward outside reduces the total."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    @torch.no_grad()
    def _broadcast_from_first_rank(self) -> None:
        # Ranks may have initialised differently (random seeds, LoRA's random A): rank 0's copy wins.
        source = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
        for tensor in [*self.module.parameters(), *self.module.buffers()]:
            dist.broadcast(tensor.data, src=source, group=self.process_group)

    @torch.no_grad()
    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self._sync:
            return
        if not self._finish_queued:
            # Runs once the whole backward is done, including parameters whose hook never fires.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._finish_queued = True
        bucket = self._bucket_of[id(param)]
        if bucket.work is not None:
            raise RuntimeError(
                f"a parameter of shape {tuple(param.shape)} received a second gradient after its bucket was "
                "reduced in the same backward; use non-reentrant activation checkpointing."
            )
        bucket.ready.add(id(param))
        if len(bucket.ready) == len(bucket.params):
            self._readied.append(bucket)
        self._launch_in_order()

    def _launch_in_order(self) -> None:
        """Sums every ready bucket whose turn has come. Every rank sums the buckets in one order, rank 0's order
        of readiness in the first backward (as torch's DDP rebuilds its buckets after the first step): NCCL
        matches collectives by order alone, and a rank whose batch skipped a module (no picture) readies that
        module's buckets later than the others do. The first backward sums everything as it ends."""
        while self._order is not None and self._launched < len(self._order):
            bucket = self._order[self._launched]
            if len(bucket.ready) < len(bucket.params):
                return
            bucket.launch(self.process_group)
            self._launched += 1

    @torch.no_grad()
    def _finish_backward(self) -> None:
        self._finish_queued = False
        if self._order is None:
            readied = [self._buckets.index(bucket) for bucket in self._readied]
            readied += [index for index in range(len(self._buckets)) if index not in readied]  # never readied
            chosen = [readied]
            dist.broadcast_object_list(chosen, src=dist.get_global_rank(self.process_group, 0)
                                       if self.process_group else 0, group=self.process_group)
            self._order = [self._buckets[index] for index in chosen[0]]
        for bucket in self._order[self._launched:]:  # the rest, in the same order on every rank
            bucket.launch(self.process_group)
        for bucket in self._order:
            bucket.finish()
        self._launched, self._readied = 0, []
