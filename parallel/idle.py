"""The share of each step a rank spends waiting for other ranks, measured without stopping the host on CUDA.

On the CPU (gloo) `wait()` blocks the host until the data is there, so the host's clock times it.
On CUDA `wait()` blocks nothing: it makes the compute stream wait for the communication, and the
host runs ahead queuing work. Synchronising the stream around each wait to time it on the host
would stall the GPU at every wait and keep communication from overlapping compute. So there a step
records CUDA events on the compute stream, at its start, around each wait and at its end: the time
between the events around a wait is how long the stream stalled on it. They are read only once the
GPU has passed the step's last event: when it already has as the next step starts, or else when
the fractions are asked for.
"""

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

from parallel import p2p

Mark = float | torch.cuda.Event  # a moment: host seconds, or an event on the compute stream


class _Step:
    """One step's marks: its start, each wait's (before, after), and its end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device, self.waits, self.end = device, [], None
        self.start = self.mark()

    def mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def passed(self) -> bool:
        """Whether the device has passed the end, so that reading the marks waits for nothing."""
        return not self.cuda or self.end.query()

    def fraction(self) -> float:
        """The waits' share of the step; waits for the device to pass the end."""
        if self.cuda:
            self.end.synchronize()
        return sum(self._span(before, after) for before, after in self.waits) / self._span(self.start, self.end)

    def _span(self, earlier: Mark, later: Mark) -> float:
        return earlier.elapsed_time(later) if self.cuda else later - earlier


class IdleClock:
    """Times steps (`start`, `wait` on other ranks' work, `stop`); `fractions` is each step's share spent waiting."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step: _Step | None = None
        self.unread: list[_Step] = []  # stopped, their marks maybe not yet passed on the device
        self.read: list[float] = []

    def start(self) -> None:
        self._read(waiting=False)  # (on CUDA) the steps whose events are complete: frees them, blocks nothing
        self.step = _Step(self.device)

    def wait(self, works: Iterable[dist.Work | p2p.Handle]) -> None:
        """Waits on `works`; within a step, the time counts as waiting."""
        before = self.step.mark() if self.step else None
        for work in works:
            work.wait()
        if before is not None:
            self.step.waits.append((before, self.step.mark()))

    def stop(self) -> None:
        self.step.end = self.step.mark()
        self.unread.append(self.step)
        self.step = None

    @property
    def fractions(self) -> list[float]:
        """Every stopped step's share of time spent waiting; on CUDA, waits for the GPU to finish the last step."""
        self._read(waiting=True)
        return self.read

    def _read(self, waiting: bool) -> None:
        while self.unread and (waiting or self.unread[0].passed()):
            self.read.append(self.unread.pop(0).fraction())
