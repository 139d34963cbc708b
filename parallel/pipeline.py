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

Communication (parallel/p2p.py states NCCL's rules). NCCL completes a rank's point-to-point groups
in the order posted, and an op only once its peer runs the matching one. In 1F1B's steady state
neighbours send to each other at the same moment (an activation forward, a gradient back): had
each posted its send before the receive that the other's send matches, both would wait forever.
So each step's output goes out in one group with the next step's input (`batch_isend_irecv`, as
Megatron-LM and torch.distributed.pipelining pair them): neighbours post matching groups, such as
{send activation i, receive gradient j} against {send gradient j, receive activation i}. Each
direction between two neighbours carries one kind of tensor in the same micro-batch order on both
ends, so messages match in FIFO order without tags. The tests hold gloo, which would let a
deadlock pass, to NCCL's rules (MUSEFT_NCCL_RULES).

Receives go out as early as that order allows, and a rank waits for one only when the step about
to run needs its tensor. A step that sends nothing (the last stage's forwards, the first stage's
backwards) leaves the next step's receive nothing to pair with, so that receive goes out before
the step runs, and overlaps it: GPipe's last stage posts all its receives as the step starts.
Every op keeps its place in the order, so this is as safe as posting after the step. A receive
cannot go out before the send that precedes it, whether in a group of its own posted before the
step, or in the group of the send before that one (two steps ahead): in 1F1B's steady state, and
at GPipe's turn from forwards to backwards, two neighbours would each post first the receive that
the other's next send matches, {receive gradient j} then {send activation i} against {receive
activation i} then {send gradient j}, and wait for each other (under MUSEFT_NCCL_RULES both
variants fail for 2 to 4 stages, M = 1, 4, 8, both schedules). Nor would it overlap anything on
balanced stages: the tensor a receive waits for is made while this rank runs its own step.

A wait makes this rank's compute wait and is timed as idle: on CUDA without stopping the host,
so that the host queues the next steps while the GPU computes and NCCL transfers
(parallel/idle.py).

The loss is known on the last stage only; it reaches every rank through an all-reduce to which
the other ranks add zero, rather than a broadcast, so that every rank leaves the step together
and the pipeline's tail counts as idle on the ranks that finished early. `train_step` leaves it
on the device: reading it is the host's one wait for the step, which is the caller's to make.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel import p2p
from parallel.idle import IdleClock

# Shape and dtype of the activation between any two stages for a micro-batch.
ActivationShape = Callable[[dict], tuple[torch.Size, torch.dtype]]
# (forward?, micro-batch index, the tensor received for it) -> the tensor to pass on, if any.
Step = Callable[[bool, int, torch.Tensor | None], torch.Tensor | None]

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

    After each `train_step`: `idle_fractions`, each step's share of time this rank spent waiting (on
    receives, on its sends' completion and on the final loss), the last one `last_idle_fraction`;
    and `last_peak_in_flight`, the most micro-batches whose activations it held at once.
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
        self.posted: list[tuple[p2p.Handle, list[torch.Tensor]]] = []  # groups in flight, with their tensors
        self.clock = IdleClock(self.device)
        self.last_peak_in_flight = 0

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    @property
    def idle_fractions(self) -> list[float]:
        """Every `train_step`'s idle fraction so far; on CUDA reading it waits for the GPU to finish the last step."""
        return self.clock.fractions

    @property
    def last_idle_fraction(self) -> float:
        return self.idle_fractions[-1]

    def train_step(self, micro_batches: list[dict], divisor: float | torch.Tensor) -> torch.Tensor:
        """Forward and backward of every micro-batch under the schedule; each micro-batch's summed loss
        is divided by `divisor` (a number, or a 0-d tensor on the device) before backward, so that gradients
        are the mean over the whole batch.

        Returns the total loss / divisor, the same on every rank, as a 0-d float64 tensor on the
        device. Gradients accumulate in the stage's parameters; the caller clips (parallel.clip over
        the stage's parameters) and steps.
        """
        self.clock.start()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        live: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # index -> (received input, output)
        peak = 0

        def step(forward: bool, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal total, peak
            if forward:
                if received is not None:
                    received.requires_grad_()  # so backward leaves the gradient to send back in received.grad
                output = self.stage(received, micro_batches[index])
                live[index] = (received, output)
                peak = max(peak, len(live))
                if self.next is None:
                    total += output.detach()
                    return None
                return output
            # Popped, so its activations die with its backward, not with a later step: 1F1B's cap is real.
            hidden, output = live.pop(index)
            if self.next is None:
                (output / divisor).backward()
            else:
                torch.autograd.backward(output, grad_tensors=received)
            return None if hidden is None else hidden.grad

        self._run(_order(self.schedule, self.stages, self.rank, len(micro_batches)), micro_batches, step)
        loss = self._from_last(total / divisor)
        self.clock.stop()
        self.last_peak_in_flight = peak
        return loss

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict]) -> torch.Tensor:
        """Forward only: the summed loss over the micro-batches, the same on every rank, as a 0-d float64 tensor on
        the device (as `train_step`'s: reading it is the caller's wait)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)

        def step(forward: bool, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal total
            output = self.stage(received, micro_batches[index])
            if self.next is None:
                total += output
                return None
            return output

        self._run([(True, index) for index in range(len(micro_batches))], micro_batches, step)
        return self._from_last(total)

    @torch.no_grad()
    def infer(self, micro_batch: dict, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Forward only of one micro-batch: the last stage's output, of `shape` and `dtype`, on every rank."""
        output = torch.zeros(shape, dtype=dtype, device=self.device)

        def step(forward: bool, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal output
            result = self.stage(received, micro_batch)
            if self.next is not None:
                return result
            output = result
            return None

        self._run([(True, 0)], [micro_batch], step)
        return self._from_last(output)

    def _run(self, steps: list[tuple[bool, int]], micro_batches: list[dict], step: Step) -> None:
        """Runs `step(forward, index, received)` for each of `steps`; what it returns travels on (to the
        next stage after a forward, the previous after a backward) in one group with the next step's
        input, which a step that sends nothing lets go out before it runs."""
        inputs = [self._input(forward, micro_batches[index]) for forward, index in steps] + [None]
        ahead: dict[int, tuple[p2p.Handle, torch.Tensor] | None] = {}  # by step: its input's group, once posted

        def post(send: tuple[torch.Tensor, int] | None, position: int) -> None:
            """Posts `send` with the input of steps[position], then each next input whose step before sends nothing."""
            ahead[position] = self._exchange(send, inputs[position])
            while position < len(steps) and self._destination(steps[position][0]) is None:
                position += 1
                ahead[position] = self._exchange(None, inputs[position])

        post(None, 0)
        for position, (forward, index) in enumerate(steps):
            outgoing = step(forward, index, self._arrived(ahead.pop(position)))
            destination = self._destination(forward)
            if destination is not None:
                self._check(outgoing, micro_batches[index])
                post((outgoing, destination), position + 1)
            self._reap()

    def _destination(self, forward: bool) -> int | None:
        """The rank a forward (or a backward) sends its output to; None on the stage that sends it nowhere."""
        return self.next if forward else self.previous

    def _input(self, forward: bool, batch: dict) -> tuple[int, dict] | None:
        """The rank that a forward (or a backward) of `batch` receives its input from, and `batch`; None if
        it receives none."""
        source = self.previous if forward else self.next
        return None if source is None else (source, batch)

    def _exchange(self, send: tuple[torch.Tensor, int] | None, receive: tuple[int, dict] | None) \
            -> tuple[p2p.Handle, torch.Tensor] | None:
        """Posts `send` (tensor, destination) and `receive` (source, micro-batch) as one group; the handle and
        the buffer that the receive fills, or None when there is nothing to receive."""
        ops, buffer = [], None
        if send is not None:
            tensor, destination = send
            ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), destination, self.group))
        if receive is not None:
            source, batch = receive
            shape, dtype = self.activation_shape(batch)
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buffer, source, self.group))
        if not ops:
            return None
        handle = p2p.exchange(ops)
        self.posted.append((handle, [op.tensor for op in ops]))
        return None if buffer is None else (handle, buffer)

    def _arrived(self, ahead: tuple[p2p.Handle, torch.Tensor] | None) -> torch.Tensor | None:
        """The received tensor, once its group (and so the sends posted with it) has completed."""
        if ahead is None:
            return None
        handle, buffer = ahead
        self.clock.wait([handle])
        return buffer

    def _check(self, tensor: torch.Tensor | None, batch: dict) -> None:
        shape, dtype = self.activation_shape(batch)
        # The receiver allocated exactly this; a mismatch would corrupt or hang it, so fail here instead.
        if tensor is None or tensor.shape != shape or tensor.dtype != dtype:
            sent = "nothing" if tensor is None else f"a {tuple(tensor.shape)} {tensor.dtype} tensor"
            raise ValueError(f"stage {self.rank} sends {sent} where activation_shape says {tuple(shape)} {dtype}")

    def _reap(self) -> None:
        """Drops the groups that have completed, so their tensors can be freed."""
        self.posted = [(handle, tensors) for handle, tensors in self.posted if not handle.is_completed()]

    def _from_last(self, output: torch.Tensor) -> torch.Tensor:
        """Waits for every group, then gives every rank the last stage's `output`, which is as large on every rank."""
        self.clock.wait([handle for handle, _ in self.posted])
        self.posted = []
        if self.next is not None:
            output = torch.zeros_like(output)
        self.clock.wait([dist.all_reduce(output, group=self.group, async_op=True)])
        return output
