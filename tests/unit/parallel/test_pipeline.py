"""Pipeline stages on real gloo groups of 2 and 3 processes, against one process on the whole batch.

The harness, toy model and data are tests/harness.py's; here each rank keeps a contiguous slice
of the toy. Spawning ranks costs seconds, so one spawn per world size runs every (micro-batches,
schedule) configuration and the tests below share its results. The ranks obey NCCL's
point-to-point rules (tests/conftest.py sets MUSEFT_NCCL_RULES; parallel/p2p.py), so a schedule
that would deadlock on GPUs fails here instead of passing on gloo's buffered sends.
"""

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.loss import answer_loss, summed_token_loss
from harness import IGNORE, Toy, assert_close, spawn, toy_data
from models.stages import create_causal_mask, split_points, stage
from models.tiny import PAD_TOKEN_ID
from parallel import p2p
from parallel.clip import clip_grad_norm_
from parallel.pipeline import Pipeline, bubble

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
    result["evaluated"] = pipeline.evaluate(_micro_batches(STEPS, micro)[0])
    mine = {id(p) for p in params}
    result["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in mine}
    return result


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


def _all_configurations(rank: int, world: int) -> dict:
    """Every (micro-batches, schedule) on all ranks, and the naive split around a slow last stage;
    with 3 ranks also a 2-stage pipeline on the subgroup {0, 2}, whose neighbours are not
    neighbouring global ranks (rank 1 only creates the group, as every rank must)."""
    results = {(micro, schedule): _train(rank, world, micro, schedule) for micro in MICRO for schedule in SCHEDULES}
    results["slow last stage"] = _around_a_slow_last_stage(rank, world)
    results["nccl rules"] = os.environ.get(p2p.RULES)
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
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-5)
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
