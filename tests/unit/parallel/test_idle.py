"""parallel/idle.py's clock on CUDA, with CUDA's events faked (no GPU here): the host records them and goes on,
and reads them only once the GPU has passed them, or when the fractions are asked for; never mid-step.
(On the CPU the pipeline tests measure it: tests/unit/parallel/test_pipeline.py.)"""

import pytest
import torch

from parallel.idle import IdleClock


class _Gpu:
    """A fake GPU's clock (ms): each recorded event is reached at the next of `moments`."""

    def __init__(self, moments: list[float]):
        self.moments, self.now, self.waits = list(moments), 0.0, 0


class _Event:
    def __init__(self, gpu: _Gpu):
        self.gpu, self.at = gpu, None

    def record(self, stream: object) -> None:
        self.at = self.gpu.moments.pop(0)

    def query(self) -> bool:
        return self.gpu.now >= self.at

    def synchronize(self) -> None:
        if not self.query():  # the host waits for the GPU to get here
            self.gpu.waits += 1
            self.gpu.now = self.at

    def elapsed_time(self, end: "_Event") -> float:
        # torch refuses an event the GPU has not reached yet
        assert self.query() and end.query(), "read before the GPU passed it"
        return end.at - self.at


class _Work:
    def __init__(self):
        self.waited = False

    def wait(self) -> None:
        self.waited = True  # on CUDA: the stream waits, the host does not


@pytest.fixture
def gpu(monkeypatch) -> _Gpu:
    gpu = _Gpu([0, 10, 30, 50, 55, 100, 100, 120, 150, 160])  # ms at which the GPU reaches each event

    class Event(_Event):
        def __init__(self, enable_timing: bool = False):
            assert enable_timing  # else CUDA keeps no time
            super().__init__(gpu)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    return gpu


def _step(clock: IdleClock, waits: int) -> list[_Work]:
    clock.start()
    works = [_Work() for _ in range(waits)]
    for work in works:
        clock.wait([work])
    clock.stop()
    return works


def test_a_step_is_read_from_its_events_without_waiting_for_the_gpu_mid_step(gpu):
    clock = IdleClock(torch.device("cuda"))
    works = _step(clock, waits=2)  # events at 0 (start), 10-30 and 50-55 (waits), 100 (end)
    assert all(work.waited for work in works)
    assert gpu.waits == 0  # the host went on: the GPU is still at 0
    assert clock.fractions == [pytest.approx((20 + 5) / 100)]
    assert gpu.waits == 1  # once, on the step's end, when asked


def test_the_next_step_reads_a_passed_step_without_waiting(gpu):
    clock = IdleClock(torch.device("cuda"))
    _step(clock, waits=2)
    gpu.now = 100  # the GPU has finished the first step by the time the second starts
    clock.start()
    assert clock.read == [pytest.approx(0.25)] and gpu.waits == 0
    clock.wait([_Work()])  # 120-150
    clock.stop()  # 160: the step ran from 100
    assert clock.fractions == [pytest.approx(0.25), pytest.approx(30 / 60)]


def test_waits_outside_a_step_are_not_timed(gpu):
    clock = IdleClock(torch.device("cuda"))
    work = _Work()
    clock.wait([work])  # evaluate's and infer's: no step to count them in
    assert work.waited and gpu.moments[0] == 0  # no event recorded
