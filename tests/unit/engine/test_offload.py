"""--optimizer-offload cpu stepped chunk by chunk (engine/optim/offload.py) against the serial version it replaced:
the same results bit for bit, old checkpoints resumed, copies issued in the order that lets them overlap the CPU's
update, and the host memory it keeps, as the plan counts it."""

import io

import pytest
import torch
import torch.nn as nn

import engine.plan.ranks
from engine.config import from_approach
from engine.optim.offload import HostAdamW
from engine.plan.fit import WidestBatch
from engine.plan.memory_trace import MemoryTrace
from engine.precision import PRECISIONS

# In 1 KiB chunks, fp32 or bf16: [(300, 7)], [(5, 3), (4, 4)], [(40, 40)] of the decayed group, then [(64,), ()],
# [(1000,)]; 5 chunks, so the two slots are each used more than once, and three weights larger than a chunk.
SHAPES = [(300, 7), (5, 3), (4, 4), (40, 40), (64,), (), (1000,)]
NO_GRAD_EVER, NO_GRAD_AT_STEP_1 = 5, 2  # the scalar; a (5, 3) that shares its chunk


class SerialHostAdamW(torch.optim.AdamW):
    """HostAdamW before chunking, the reference: every gradient to the host, one step, every weight back."""

    def __init__(self, groups: list[dict], **settings):
        self.pairs = [(param, nn.Parameter(param.detach().float().clone())) for group in groups
                      for param in group["params"]]
        masters = iter(master for _, master in self.pairs)
        super().__init__([dict(group, params=[next(masters) for _ in group["params"]]) for group in groups],
                         foreach=True, **settings)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()
        super().step()
        for param, master in self.pairs:
            param.copy_(master)
            master.grad = None

    def state_dict(self) -> dict:
        return dict(super().state_dict(), masters=[master.detach() for _, master in self.pairs])


def _groups(dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Weights in `dtype` in two groups, as decay_groups makes them: matrices decay, the rest does not."""
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in SHAPES]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _backward(groups: list[dict], step: int) -> None:
    """Gradients as backward leaves them, but none for one weight ever and none for another at step 1."""
    generator = torch.Generator().manual_seed(100 + step)
    for index, param in enumerate(p for group in groups for p in group["params"]):
        grad = torch.randn(param.shape, generator=generator).to(param.dtype)
        skipped = index == NO_GRAD_EVER or (index == NO_GRAD_AT_STEP_1 and step == 1)
        param.grad = None if skipped else grad


def _steps(optimizer: torch.optim.Optimizer, groups: list[dict], steps: range) -> None:
    for step in steps:
        _backward(groups, step)
        optimizer.step()
        optimizer.zero_grad()


def _weights(groups: list[dict]) -> list[torch.Tensor]:
    return [p.detach().clone() for group in groups for p in group["params"]]


def _written(groups: list[dict]) -> int:
    """The device weights' bytes, which the trace counts as it first sees them: when the step writes them."""
    return sum(p.numel() * p.element_size() for group in groups for p in group["params"])


def _assert_same_state(got: dict, expected: dict) -> None:
    """Equal state dicts, tensors bit for bit."""
    assert got.keys() == expected.keys() and got["param_groups"] == expected["param_groups"]
    assert all(torch.equal(a, b) for a, b in zip(got["masters"], expected["masters"], strict=True))
    assert got["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert state.keys() == got["state"][index].keys()
        assert all(torch.equal(got["state"][index][key], value) for key, value in state.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_steps_equal_the_serial_step_bit_for_bit(dtype):
    chunked_groups, serial_groups = _groups(dtype), _groups(dtype)
    chunked = HostAdamW(chunked_groups, chunk_bytes=1024, lr=1e-3, betas=(0.9, 0.95))
    serial = SerialHostAdamW(serial_groups, lr=1e-3, betas=(0.9, 0.95))
    assert len(chunked.chunks) == 5  # more than the two slots: each is reused
    for step in range(4):
        _steps(chunked, chunked_groups, range(step, step + 1))
        _steps(serial, serial_groups, range(step, step + 1))
        assert all(torch.equal(a, b) for a, b in zip(_weights(chunked_groups), _weights(serial_groups), strict=True))
    _assert_same_state(chunked.state_dict(), serial.state_dict())
    assert len(chunked.state) == len(SHAPES) - 1  # the weight that never had a gradient has no state either


def test_a_checkpoint_of_the_serial_version_resumes_bit_identically():
    """A checkpoint written before chunking loads, and the run continues as the serial version's would."""
    serial_groups = _groups(torch.bfloat16)
    serial = SerialHostAdamW(serial_groups, lr=1e-3)
    _steps(serial, serial_groups, range(2))
    buffer = io.BytesIO()
    torch.save(serial.state_dict(), buffer)
    resumed_groups = _groups(torch.bfloat16, seed=1)  # other weights: the masters in the checkpoint win
    resumed = HostAdamW(resumed_groups, chunk_bytes=1024, lr=1e-3)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    _steps(serial, serial_groups, range(2, 4))
    _steps(resumed, resumed_groups, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(_weights(resumed_groups), _weights(serial_groups), strict=True))
    _assert_same_state(resumed.state_dict(), serial.state_dict())


def test_each_chunk_copies_in_ahead_of_its_step_and_back_before_the_next(monkeypatch):
    """What overlaps on a GPU, in the order the host issues it: chunk k+1's gradients are on their way while chunk
    k steps, and chunk k's weights on theirs while chunk k+1 steps (on a CPU every copy is done when issued)."""
    groups = _groups(torch.float32)  # fp32: every update changes the weight it is copied into
    optimizer = HostAdamW(groups, chunk_bytes=1024, lr=1e-3)
    chunk_of = {id(master): k for k, chunk in enumerate(optimizer.chunks) for _, master, _ in chunk}
    log = []
    to_host, adamw_step = HostAdamW._to_host, torch.optim.AdamW.step

    def logged_to_host(self, k: int):
        log.append(("gradients in", k))
        return to_host(self, k)

    def logged_step(self, *args, **kwargs):
        k, = {chunk_of[id(master)] for _, master in self.pairs if master.grad is not None}
        if k:  # the chunk before is back on the device
            assert all(torch.equal(param, master) for param, master, _ in self.chunks[k - 1])
        log.append(("step", k))
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(HostAdamW, "_to_host", logged_to_host)
    monkeypatch.setattr(torch.optim.AdamW, "step", logged_step)
    _backward(groups, step=0)
    optimizer.step()
    assert log == [("gradients in", 0), ("gradients in", 1), ("step", 0), ("gradients in", 2), ("step", 1),
                   ("gradients in", 3), ("step", 2), ("gradients in", 4), ("step", 3), ("step", 4)]
    assert all(torch.equal(param, master) for param, master in optimizer.pairs)


def test_it_keeps_its_masters_moments_and_two_pinned_slots_and_nothing_else():
    """Worked out by hand: 4 bytes of master and 8 of moments a weight, a step count per weight that had a
    gradient, and two slots of the largest chunk's bytes rounded up to a power of two (the (300, 7) weight in
    bf16, 4,200 bytes: 8 KiB), as the caching host allocator would round them; what it allocates and keeps
    while it steps (transients freed), counted by the plan's trace."""
    groups = _groups(torch.bfloat16)
    _backward(groups, step=0)  # before the trace: the gradients are the device's, not the optimizer's
    with MemoryTrace() as trace:
        optimizer = HostAdamW(groups, chunk_bytes=1024, lr=1e-3)
        optimizer.step()
        optimizer.step()
    weights, stepped = sum(p.numel() for g in groups for p in g["params"]), len(SHAPES) - 1
    expected = 4 * weights + 8 * (weights - 1) + 4 * stepped + 2 * 8192  # the scalar weight had no gradient
    assert trace.live - _written(groups) == optimizer.host_bytes() == expected


@pytest.mark.slow  # a plan of the tiny model for a GPU: ~10 s
def test_planned_host_bytes_are_what_the_optimizer_allocates(monkeypatch):
    """The plan's host memory for `--optimizer-offload cpu` on a GPU equals what a real HostAdamW over the same
    trainable weights (the plan's, made real) allocates and keeps through two steps."""
    made, optimizer_for = [], engine.plan.ranks.optimizer_for

    def keeping(*args, **kwargs) -> torch.optim.Optimizer:
        made.append(optimizer_for(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(engine.plan.ranks, "optimizer_for", keeping)
    config = from_approach(approach="lora", model="tiny", batch_size=2, limit_exhibits=4, optimizer_offload="cpu",
                           precision="bf16", device="cpu")
    plan, = engine.plan.ranks.plan_ranks(config, PRECISIONS["bf16"], WidestBatch(config, None)(2), gpu=True)
    planned, = made
    real = iter(nn.Parameter(torch.ones(param.shape, dtype=param.dtype)) for param, _ in planned.pairs)
    groups = [dict(group, params=[next(real) for _ in group["params"]]) for group in planned.param_groups]
    for group in groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    with MemoryTrace() as trace:
        optimizer = HostAdamW(groups)
        optimizer.step()
        optimizer.step()
    assert plan.host_optimizer_bytes == trace.live - _written(groups) > 12 * sum(p.numel() for g in groups
                                                                                  for p in g["params"])
