"""Layer-split model parallelism with micro-batch pipelining, by hand on torch.distributed send/recv.

Rank i of the group runs stage i of N: a contiguous slice of the model's layers, an `nn.Module`
called as `stage(hidden, micro_batch)`. The first stage gets `hidden=None` and reads its inputs from
the micro-batch, the others get the previous stage's output activation; the last returns the
micro-batch's SUMMED loss. Every rank has every micro-batch (masks, labels), so only activations
travel forward and their gradients backward, one tensor each between neighbours. Their shapes are
not sent: the caller's `activation_shape(micro_batch)` sizes the receive buffers.

Schedules (M micro-batches, N stages). "gpipe" runs every forward, then every backward, last first:
with M=1 it is the naive split, one stage busy at a time. "1f1b" (PipeDream-flush) warms up with
N-rank-1 forwards, then alternates one forward and one backward, then cools down: the same
micro-batches summed into the same gradients, but a stage holds the activations of at most N-rank
micro-batches instead of all M. Both leave each stage idle (N-1)/(M+N-1) of the step (`bubble`),
so more micro-batches shrink the bubble; 1F1B is what makes many micro-batches affordable.

Communication. A gloo send completes only once its peer has posted the matching receive, and in
1F1B's steady state neighbours send to each other at the same moment (an activation forward, a
gradient back), so blocking sends deadlock: sends are `isend`, and each one's Work and tensor are
kept until it completes (the step ends by waiting on all). Each direction between two neighbours
carries one kind of tensor in the same micro-batch order on both ends, so messages match in FIFO
order without tags.

The loss is known on the last stage only; it reaches every rank through an all-reduce to which
the other ranks add zero, rather than a broadcast, so that every rank leaves the step together
and the pipeline's tail counts as idle on the ranks that finished early.
"""

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

# Shape and dtype of the activation between any two stages for a micro-batch.
ActivationShape = Callable[[dict], tuple[torch.Size, torch.dtype]]

SCHEDULES = ("gpipe", "1f1b")


def bubble(stages: int, micro_batches: int) -> float:
    """The fraction of a step each stage waits, in theory: (N-1)/(M+N-1) for equal stages."""
    return (stages - 1) / (micro_batches + stages - 1)


def _order(schedule: str, stages: int, rank: int, micro_batches: int) -> list[tuple[bool, int]]:
    """(forward?, micro-batch index) in the order stage `rank` runs them."""
    if schedule == "gpipe":
        return [(True, i) for i in range(micro_batches)] + [(False, i) for i in reversed(range(micro_batches))]
    # 1F1B: stage r runs ahead by as many forwards as there are stages after it (the last by none).
    warmup = min(stages - rank - 1, micro_batches)
    order = [(True, i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [(True, warmup + i), (False, i)]
    return order + [(False, i) for i in range(micro_batches - warmup, micro_batches)]


class Pipeline:
    """This rank's stage of a pipeline over `group`; call `train_step`/`evaluate` on every rank together.

    Attributes after each `train_step`: `last_idle_fraction`, the share of its wall time this rank
    spent blocked (waiting on receives, on its sends' completion and on the final loss), and
    `last_peak_in_flight`, the most micro-batches whose activations it held at once.
    """

    def __init__(self, stage: nn.Module, activation_shape: ActivationShape, schedule: str = "gpipe",
                 group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.stage, self.activation_shape, self.schedule = stage, activation_shape, schedule
        self.group, self.device = group, torch.device(device)
        self.rank, self.stages = dist.get_rank(group), dist.get_world_size(group)
        # send/recv address global ranks, even within a subgroup.
        self.previous = self._global(self.rank - 1) if self.rank > 0 else None
        self.next = self._global(self.rank + 1) if self.rank < self.stages - 1 else None
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []
        self.blocked = 0.0  # seconds spent waiting since the step began
        self.last_idle_fraction = 0.0
        self.last_peak_in_flight = 0

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def train_step(self, micro_batches: list[dict], divisor: float) -> float:
        """Forward and backward of every micro-batch under the schedule; each micro-batch's summed loss
        is divided by `divisor` before backward (so gradients are the mean over the whole batch).

        Returns the total loss / divisor, the same number on every rank. Gradients accumulate in the
        stage's parameters; the caller clips (parallel.clip over the stage's parameters) and steps.
        """
        started, self.blocked = time.perf_counter(), 0.0
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        live: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # index -> (received input, output)
        peak = 0
        for forward, index in _order(self.schedule, self.stages, self.rank, len(micro_batches)):
            batch = micro_batches[index]
            if forward:
                hidden = self._receive(self.previous, batch)
                if hidden is not None:
                    hidden.requires_grad_()  # so backward leaves the gradient to send back in hidden.grad
                output = self.stage(hidden, batch)
                if self.next is None:
                    total += output.detach()
                else:
                    self._send(output, self.next, batch)
                live[index] = (hidden, output)
                peak = max(peak, len(live))
            else:
                # Popped and deleted, so its activations die with its backward, not with the next
                # forward that rebinds these names: 1F1B's cap is real.
                hidden, output = live.pop(index)
                if self.next is None:
                    (output / divisor).backward()
                else:
                    torch.autograd.backward(output, grad_tensors=self._receive(self.next, batch))
                if hidden is not None:
                    self._send(hidden.grad, self.previous, batch)
                del hidden, output
            self._reap()
        loss = self._finish(total / divisor)
        self.last_idle_fraction = self.blocked / (time.perf_counter() - started)
        self.last_peak_in_flight = peak
        return loss

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict]) -> float:
        """Forward only: the summed loss over the micro-batches, the same number on every rank."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            output = self.stage(self._receive(self.previous, batch), batch)
            if self.next is None:
                total += output
            else:
                self._send(output, self.next, batch)
            self._reap()
        return self._finish(total)

    def _receive(self, source: int | None, batch: dict) -> torch.Tensor | None:
        """The activation (or its gradient) for `batch` from rank `source`; None on an end of the pipeline."""
        if source is None:
            return None
        shape, dtype = self.activation_shape(batch)
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        self._wait([dist.irecv(buffer, source, group=self.group)])
        return buffer

    def _send(self, tensor: torch.Tensor, destination: int, batch: dict) -> None:
        shape, dtype = self.activation_shape(batch)
        # The receiver allocated exactly this; a mismatch would corrupt or hang it, so fail here instead.
        if tensor.shape != shape or tensor.dtype != dtype:
            raise ValueError(f"stage {self.rank} sends a {tuple(tensor.shape)} {tensor.dtype} tensor where "
                             f"activation_shape says {tuple(shape)} {dtype}")
        tensor = tensor.detach().contiguous()
        self.sends.append((dist.isend(tensor, destination, group=self.group), tensor))

    def _reap(self) -> None:
        """Drops the sends that have completed, so their tensors can be freed."""
        self.sends = [(work, tensor) for work, tensor in self.sends if not work.is_completed()]

    def _finish(self, loss: torch.Tensor) -> float:
        """Waits for every send, then gives every rank the last stage's `loss`."""
        self._wait([work for work, _ in self.sends])
        self.sends = []
        if self.next is not None:
            loss = torch.zeros_like(loss)
        self._wait([dist.all_reduce(loss, group=self.group, async_op=True)])
        return float(loss)

    def _wait(self, works: list[dist.Work]) -> None:
        """Waits on `works`, counting the time as idle."""
        cuda = self.device.type == "cuda"
        if cuda:  # compute still queued on the GPU is work, not waiting: let it finish before the clock starts
            torch.cuda.current_stream(self.device).synchronize()
        start = time.perf_counter()
        for work in works:
            work.wait()
        if cuda:  # NCCL's wait only makes the stream wait; the data is here once the stream has caught up
            torch.cuda.current_stream(self.device).synchronize()
        self.blocked += time.perf_counter() - start
