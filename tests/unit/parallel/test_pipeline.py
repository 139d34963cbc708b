"""Pipeline stages on real gloo groups of 2 and 3 processes, against one process on the whole batch.

The harness, toy model and data are tests/harness.py's; here each rank keeps a contiguous slice
of the toy. Spawning ranks costs seconds, so one spawn per world size runs every (micro-batches,
schedule) configuration and the tests below share its results. The ranks obey NCCL's
point-to-point rules (tests/conftest.py sets MUSEFT_NCCL_RULES; parallel/p2p.py), so a schedule
that would deadlock on GPUs fails here instead of passing on gloo's buffered sends; all but the
timing of equal stages (`_equal_stages`), which the rules' emulation would slow.
"""

import math
import os
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from bench.pipeline_idle import idle_fractions
from engine.loss import answer_loss, summed_token_loss
from harness import IGNORE, Toy, assert_close, spawn, toy_data
from models.stages import create_causal_mask, split_points, stage
from models.tiny import PAD_TOKEN_ID
from parallel import p2p
from parallel.clip import clip_grad_norm_
from parallel.pipeline import Pipeline, Step, bubble

STEPS = 3
MAX_NORM = 0.05  # below every step's norm, so clipping needs the right global norm
MICRO = (1, 4, 8)
SCHEDULES = ("gpipe", "1f1b")
SLOW_S, SHORT_S = 0.3, 0.03  # the sleep in each forward of the last stage, and of every other stage
SLACK_S = 0.05  # a stage's own time between sending its activation and waiting for the gradient back


class _Stage(nn.Module):
    """Blocks [rank, rank + 1) * len(blocks) // stages of the toy; the first also embeds, the last
    also applies the head and returns the summed cross-entropy."""

    def __init__(self, model: Toy, rank: int, stages: int):
        super().__init__()
        bounds = [len(model.blocks) * r // stages for r in (rank, rank + 1)]
        self.blocks = model.blocks[bounds[0]:bounds[1]]
        self.embed = model.embed if rank == 0 else None
        self.head = model.head if rank == stages - 1 else None
        self.scale = model.scale

    def forward(self, hidden: torch.Tensor | None, batch: dict) -> torch.Tensor:
        if self.embed is not None:
            hidden = self.embed(batch["x"]) * self.scale
        for block in self.blocks:
            hidden = block(hidden)
        if self.head is None:
            return hidden
        return F.cross_entropy(self.head(hidden), batch["y"], ignore_index=IGNORE, reduction="sum")


class _Sleepy(nn.Module):
    """A stage that first sleeps `seconds` in every forward: known work, timed with Pipeline's own clock."""

    def __init__(self, stage: nn.Module, seconds: float):
        super().__init__()
        self.stage, self.seconds, self.slept = stage, seconds, 0.0

    def forward(self, hidden: torch.Tensor | None, batch: dict) -> torch.Tensor:
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.slept += time.perf_counter() - start
        return self.stage(hidden, batch)


def _shape(batch: dict) -> tuple[torch.Size, torch.dtype]:
    return torch.Size((len(batch["x"]), 16)), torch.float32


def _micro_batches(step: int, micro: int) -> tuple[list[dict], int]:
    """The global batch of `step` cut into `micro` micro-batches, and its label count."""
    x, y = toy_data(step)
    return [{"x": xb, "y": yb} for xb, yb in zip(x.chunk(micro), y.chunk(micro), strict=True)], int((y != IGNORE).sum())


def _train(rank: int, stages: int, micro: int, schedule: str, group: dist.ProcessGroup | None = None) -> dict:
    """Clipped AdamW steps of stage `rank`; its losses, norms, weights, pipeline statistics, and
    the evaluated loss of the next batch."""
    model = Toy(seed=0)  # every rank builds the whole toy alike and keeps its stage
    stage = _Stage(model, rank, stages)
    pipeline = Pipeline(stage, _shape, schedule, group)
    params = list(stage.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    result = {"losses": [], "norms": [], "idle": [], "peaks": []}
    for step in range(STEPS):
        result["losses"].append(pipeline.train_step(*_micro_batches(step, micro)))
        result["norms"].append(clip_grad_norm_(params, MAX_NORM, group))
        result["idle"].append(pipeline.last_idle_fraction)
        result["peaks"].append(pipeline.last_peak_in_flight)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result["evaluated"] = float(pipeline.evaluate(_micro_batches(STEPS, micro)[0]))
    mine = {id(p) for p in params}
    result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in mine}
    return result


class _Logged(Pipeline):
    """Logs, in order, each group it posts ("send", "recv", "send+recv") and each step it runs ("F0", "B3")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[str] = []

    def _exchange(self, send: tuple[torch.Tensor, int] | None, receive: tuple[int, dict] | None) \
            -> tuple[p2p.Handle, torch.Tensor] | None:
        if send is not None or receive is not None:
            self.log.append("+".join(what for what, op in (("send", send), ("recv", receive)) if op is not None))
        return super()._exchange(send, receive)

    def _run(self, steps: list[tuple[bool, int]], micro_batches: list[dict], step: Step) -> None:
        def logged(forward: bool, index: int, received: torch.Tensor | None) -> torch.Tensor | None:
            self.log.append(f"{'F' if forward else 'B'}{index}")
            return step(forward, index, received)

        super()._run(steps, micro_batches, logged)


def _posting_order(rank: int, stages: int) -> dict[str, list[str]]:
    """By schedule: what this rank posts and runs, in order, in a step of 4 micro-batches."""
    logs = {}
    for schedule in SCHEDULES:
        pipeline = _Logged(_Stage(Toy(seed=0), rank, stages), _shape, schedule)
        pipeline.train_step(*_micro_batches(0, 4))
        logs[schedule] = pipeline.log
    return logs


def _around_a_slow_last_stage(rank: int, stages: int) -> dict:
    """The naive split (GPipe, one micro-batch) whose last stage sleeps SLOW_S in its forward and the
    others SHORT_S: per step, this rank's idle fraction, the step's wall time on a stopwatch around
    `train_step`, and the time this rank slept."""
    stage = _Sleepy(_Stage(Toy(seed=0), rank, stages), SLOW_S if rank == stages - 1 else SHORT_S)
    pipeline = Pipeline(stage, _shape, "gpipe")
    result = {"idle": [], "wall": [], "slept": []}
    for step in range(STEPS):
        stage.slept = 0.0
        started = time.perf_counter()
        pipeline.train_step(*_micro_batches(step, 1))
        result["wall"].append(time.perf_counter() - started)
        result["idle"].append(pipeline.last_idle_fraction)
        result["slept"].append(stage.slept)
    return result


def _equal_stages(rank: int, world: int) -> dict[tuple[str, int], list[float]]:
    """bench/pipeline_idle.py's equal stages (10 ms a forward, 20 ms a backward): this rank's idle fraction in
    3 steps of each schedule and M. On plain gloo: NCCL's rules as parallel/p2p.py emulates them cost every
    group a store round trip and a poll (2 ms) that NCCL does not, and M=8 waits on 16 groups a step; the
    traffic is the same as in the other configurations, which obey the rules."""
    rules = os.environ.pop(p2p.RULES)
    try:
        return idle_fractions(rank, world, steps=3, warmup=0)
    finally:
        os.environ[p2p.RULES] = rules


def _all_configurations(rank: int, world: int) -> dict:
    """Every (micro-batches, schedule) on all ranks, and the naive split around a slow last stage; with
    2 ranks also the timing of equal stages; with 3 ranks a 2-stage pipeline on the subgroup {0, 2}, whose
    neighbours are not neighbouring global ranks (rank 1 only creates the group, as every rank must)."""
    results = {(micro, schedule): _train(rank, world, micro, schedule) for micro in MICRO for schedule in SCHEDULES}
    results["slow last stage"] = _around_a_slow_last_stage(rank, world)
    results["nccl rules"] = os.environ.get(p2p.RULES)
    if world == 2:
        results["equal stages"] = _equal_stages(rank, world)
        results["posting order"] = _posting_order(rank, world)
    if world == 3:
        group = dist.new_group([0, 2])
        results["subgroup"] = _train(rank // 2, 2, 4, "1f1b", group) if rank != 1 else None
    return results


def _one_process() -> dict:
    """The toy's clipped AdamW steps on the whole batch; the same keys as `_train`'s."""
    model = Toy(seed=0)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    result = {"losses": [], "norms": []}
    for step in range(STEPS + 1):
        x, y = toy_data(step)
        summed = F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum")
        if step == STEPS:
            result["evaluated"] = summed.item()
            break
        loss = summed / (y != IGNORE).sum()
        loss.backward()
        result["losses"].append(loss.item())
        result["norms"].append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # `unused` never gets a gradient, so AdamW never moves it and no stage holds it.
    result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("unused.")}
    return result


@pytest.fixture(scope="module")
def expected() -> dict:
    return _one_process()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """`ranks(world)`: every rank's results of `_all_configurations`, spawned once per world size."""
    spawned = {}

    def get(world: int) -> list[dict]:
        if world not in spawned:
            spawned[world] = spawn(world, _all_configurations, tmp_path_factory.mktemp(f"world{world}"))
        return spawned[world]

    return get


def _assert_equals_one_process(stages: list[dict], expected: dict) -> None:
    """Stages of one pipeline together hold each weight once, and match the one process everywhere."""
    weights = {}
    for result in stages:
        assert [float(loss) for loss in result["losses"]] == pytest.approx(expected["losses"], rel=1e-5)
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-5)
        assert result["evaluated"] == pytest.approx(expected["evaluated"], rel=1e-5)
        assert not weights.keys() & result["weights"].keys()
        weights.update(result["weights"])
    assert_close(weights, expected["weights"])


@pytest.mark.parametrize("world", [2, 3])
def test_stages_reproduce_one_process_clipped_adamw_steps_under_every_schedule(world, ranks, expected):
    assert min(expected["norms"]) > MAX_NORM  # the clip really scales, so its global norm must be right
    results = ranks(world)
    assert all(result["nccl rules"] == "1" for result in results)  # with NCCL's rules, which gloo alone lacks
    for configuration in [(micro, schedule) for micro in MICRO for schedule in SCHEDULES]:
        try:
            _assert_equals_one_process([result[configuration] for result in results], expected)
        except AssertionError as error:
            raise AssertionError(f"{world} stages, (micro-batches, schedule) = {configuration}") from error


def test_a_subgroup_pipeline_addresses_its_neighbours_by_global_rank(ranks, expected):
    results = ranks(3)
    _assert_equals_one_process([results[rank]["subgroup"] for rank in (0, 2)], expected)


def test_a_receive_goes_out_before_a_step_that_sends_nothing(ranks):
    """Worked out by hand for 2 stages and 4 micro-batches. A step's send goes out with the next step's receive;
    after a step that sends nothing (the last stage's forwards, the first stage's backwards) the next receive
    goes out at once, before that step runs: GPipe's last stage posts all four as the step starts."""
    first, last = (result["posting order"] for result in ranks(2))
    assert first["gpipe"] == ["F0", "send", "F1", "send", "F2", "send", "F3", "send+recv", "recv", "recv", "recv",
                              "B3", "B2", "B1", "B0"]
    assert last["gpipe"] == ["recv", "recv", "recv", "recv", "F0", "F1", "F2", "F3",
                             "B3", "send", "B2", "send", "B1", "send", "B0", "send"]
    # 1F1B's cool-down: the first stage's last two backwards receive one after the other
    assert first["1f1b"] == ["F0", "send", "F1", "send+recv", "B0", "F2", "send+recv", "B1", "F3", "send+recv", "recv",
                             "B2", "B3"]
    assert last["1f1b"] == ["recv", "F0", "B0", "send+recv", "F1", "B1", "send+recv", "F2", "B2", "send+recv", "F3",
                            "B3", "send"]


def test_1f1b_holds_at_most_as_many_micro_batches_as_stages_from_here_on(ranks):
    results = ranks(3)
    for rank, result in enumerate(results):
        assert set(result[(8, "gpipe")]["peaks"]) == {8}
        assert set(result[(8, "1f1b")]["peaks"]) == {3 - rank}
        assert set(result[(1, "1f1b")]["peaks"]) == {1}


@pytest.mark.parametrize("world", [2, 3])
def test_idle_fraction_is_the_wait_for_a_slow_stage_and_never_a_stages_own_work(world, ranks):
    results = [result["slow last stage"] for result in ranks(world)]
    slowest = results[-1]["slept"]
    for rank, result in enumerate(results):
        assert len(result["idle"]) == STEPS, rank  # measured every step
        for step, (idle, wall, slept) in enumerate(zip(result["idle"], result["wall"], result["slept"], strict=True)):
            # The blocked time and the rank's own sleep are disjoint parts of the step, whose wall time is
            # at most the stopwatch's: so idle <= 1 - slept / stopwatch, exactly.
            assert idle <= 1 - slept / wall + 1e-9, (rank, step, idle, slept, wall)
            if rank < world - 1:
                # The gradient it waits for comes back only after the last stage slept on its activation.
                assert idle * wall >= slowest[step] - SLACK_S, (rank, step, idle, wall, slowest[step])


def test_train_step_leaves_the_loss_on_the_device_for_the_caller_to_read(ranks):
    for result in ranks(2):
        for loss in result[(4, "1f1b")]["losses"]:  # (the values: test_stages_reproduce_one_process_...)
            assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.device.type == "cpu"


def test_equal_stages_wait_the_theoretical_bubble(ranks, tmp_path):
    """Each rank's measured idle fraction within 10% of (N-1)/(M+N-1): the schedules wait for nothing
    but the pipeline's fill and drain, and the measure counts those waits, not the rank's own work or
    the last stage's loss. The median of 3 steps, each of which other load on the cores can slow; a
    measure that is off (seen once in a full suite on 2 cores: 0.124 against 0.111 +- 0.011) is taken
    again on ranks of its own, up to twice. A schedule that waits for more than the bubble is off every
    time. bench/pipeline_idle.py measures 4 stages too."""
    results = [result["equal stages"] for result in ranks(2)]
    for attempt in range(3):
        off = [(rank, schedule, micro, idle) for rank, result in enumerate(results)
               for (schedule, micro), idle in result.items()
               if statistics.median(idle) != pytest.approx(bubble(2, micro), rel=0.1)]
        if not off:
            return
        if attempt < 2:
            folder = tmp_path / str(attempt)
            folder.mkdir()  # (the ranks write their results there)
            results = spawn(2, _equal_stages, folder)
    assert not off, off


def test_theoretical_bubble():
    assert bubble(4, 4) == pytest.approx(3 / 7)
    assert bubble(4, 1) == pytest.approx(3 / 4)  # the naive split: one stage busy at a time
    assert bubble(1, 8) == 0
    assert math.isclose(bubble(2, 8), 1 / 9)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="interleaved"):
        Pipeline(nn.Identity(), _shape, "interleaved")


def _create_causal_mask_of_transformers_5_17(config, inputs_embeds, attention_mask, past_key_values, position_ids=None):
    """create_causal_mask as transformers 5.17 declares it: its cache argument is called past_key_values."""
    return create_causal_mask(config, inputs_embeds, attention_mask, past_key_values, position_ids=position_ids)


@pytest.mark.parametrize("mask", [create_causal_mask, _create_causal_mask_of_transformers_5_17],
                         ids=["installed", "5.17"])
def test_stages_build_their_mask_on_every_transformers_the_pin_allows(mask, monkeypatch, tiny_model):
    monkeypatch.setattr("models.stages.create_causal_mask", mask)
    # Token ids by hand (no processor: 5.17 builds none without torchvision); two rows, the first
    # left-padded, so the mask matters.
    input_ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    input_ids[0, :5] = PAD_TOKEN_ID
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "labels": input_ids.masked_fill(attention_mask == 0, IGNORE)}
    with torch.no_grad():
        logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = None
        for rank in range(2):
            hidden = stage(tiny_model, split_points(tiny_model, 2), rank, answer_loss)(hidden, batch)
    torch.testing.assert_close(hidden, summed_token_loss(logits, batch["labels"]))
