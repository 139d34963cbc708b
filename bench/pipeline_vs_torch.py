"""Median training-step time and idle share of our Pipeline vs torch.distributed.pipelining, 2 gloo ranks.

The model is the tiny Idefics2 with images, fully trainable, cut once by `models.stages` (balanced
by parameters) into WORLD stages; both implementations run the very same `Stage` modules on the same
batch (every rank has all of it), split into M micro-batches. A step is forward and backward of every
micro-batch, the loss brought to every rank, and AdamW over the rank's own stage.

Torch runs our stages through a thin adapter: the first stage takes input_ids, pixel_values and
pixel_attention_mask as the schedule's positional inputs; every stage gets attention_mask and labels
as keyword inputs, which `schedule.step(**kwargs)` chunks into micro-batches on each rank (the
real masks, so nothing is rebuilt from the hidden's shape); the last stage returns our summed token
loss, and the schedule's loss_fn divides it by the batch's token count (the target it is given is
unused), with scale_grads=False: the loss and gradients are the mean over the whole batch, as ours.
Torch's schedule leaves the loss on the last rank only; ours all-reduces it so every rank leaves
the step together, so the torch steps end with the same all-reduce.

Idle share: ours is `Pipeline.last_idle_fraction`, the time spent waiting on receives, on sends'
completion and on the final loss all-reduce, over the wall time of `train_step`. For torch the same
is measured by wrapping `schedules._wait_batch_p2p`, through which both schedules wait on every
receive and send, plus the final all-reduce's wait, over the wall time of `step` and that
all-reduce. Both are medians over the timed steps; the optimizer step is in neither.

All rows run in one spawn of WORLD ranks (one torch thread each), each row with its own model, stage
and AdamW: with a spawn per row, most of its ~14 s went to spawning. The rows take turns a step at a
time, each round starting one row later, so load from elsewhere on the machine falls on all rows
alike rather than on whichever ran at the time. The step time is the slower rank's median; rank 0
prints the table.

    python bench/pipeline_vs_torch.py [--steps 6] [--warmup 2] [--batch 4]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, schedules

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddp_vs_torch import WORLD, parse_args, random_batch, spawn

from engine.loss import answer_loss, answer_token_count
from models.stages import Stage, split_points, stage
from models.tiny import build_tiny
from parallel.pipeline import Pipeline, bubble

# (implementation, schedule, micro-batches); the first torch gpipe row of each M is the ratio's base.
ROWS = (("ours", "gpipe", 1), ("ours", "gpipe", 4), ("ours", "1f1b", 4),
        ("torch", "gpipe", 1), ("torch", "gpipe", 4), ("torch", "1f1b", 4))
NAMES = {("ours", "gpipe"): "ours gpipe", ("ours", "1f1b"): "ours 1f1b",
         ("torch", "gpipe"): "torch ScheduleGPipe", ("torch", "1f1b"): "torch Schedule1F1B"}
FIRST_INPUTS = ("input_ids", "pixel_values", "pixel_attention_mask")  # the first stage's positional inputs
KEYWORD_INPUTS = ("attention_mask", "labels")  # every stage's


class TorchAdapter(nn.Module):
    """Our `Stage` called the way torch's PipelineStage calls a module: positional tensors, then kwargs."""

    def __init__(self, stage_: Stage):
        super().__init__()
        self.stage = stage_

    def forward(self, *inputs: torch.Tensor, **batch: torch.Tensor) -> torch.Tensor:
        if self.stage.first:
            return self.stage(None, dict(zip(FIRST_INPUTS, inputs, strict=True), **batch))
        (hidden,) = inputs
        return self.stage(hidden, batch)


class _WaitClock:
    """Wraps torch's `schedules._wait_batch_p2p` once, adding up the seconds this rank spends in it."""

    def __init__(self):
        self.blocked = 0.0
        self.wrapped = schedules._wait_batch_p2p
        schedules._wait_batch_p2p = self

    def __call__(self, works: list[dist.Work]) -> None:
        start = time.perf_counter()
        self.wrapped(works)
        self.blocked += time.perf_counter() - start


def _ours(model_stage: Stage, schedule: str, batch: dict, micro_batches: int, divisor: int):
    """A step function of ours: runs one step, returns (loss, idle fraction)."""
    hidden_size = model_stage.text_config.hidden_size
    dtype = next(model_stage.parameters()).dtype

    def activation_shape(micro_batch: dict) -> tuple[torch.Size, torch.dtype]:
        return torch.Size((*micro_batch["input_ids"].shape, hidden_size)), dtype

    pipeline = Pipeline(model_stage, activation_shape, schedule)
    chunks = [{key: value.chunk(micro_batches)[i] for key, value in batch.items()} for i in range(micro_batches)]

    def step() -> tuple[float, float]:
        loss = float(pipeline.train_step(chunks, divisor))  # the step's one wait, as the engine's caller makes it
        return loss, pipeline.last_idle_fraction

    return step


def _torch(model_stage: Stage, schedule: str, batch: dict, micro_batches: int, divisor: int, rank: int,
           clock: _WaitClock):
    """The same with torch's PipelineStage and schedule on an adapter of the same stage."""
    pipe_stage = PipelineStage(TorchAdapter(model_stage), rank, WORLD, torch.device("cpu"))
    schedule_class = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    pipe = schedule_class(pipe_stage, micro_batches, loss_fn=lambda loss, _target: loss / divisor, scale_grads=False)
    args = tuple(batch[key] for key in FIRST_INPUTS) if pipe_stage.is_first else ()
    kwargs = {key: batch[key] for key in KEYWORD_INPUTS}
    if pipe_stage.is_last:
        kwargs["target"] = batch["labels"]

    def step() -> tuple[float, float]:
        started, clock.blocked = time.perf_counter(), 0.0
        losses: list[torch.Tensor] = []
        pipe.step(*args, losses=losses, return_outputs=False, **kwargs)
        loss = torch.stack(losses).sum().detach() if losses else torch.zeros(())
        waited = time.perf_counter()
        dist.all_reduce(loss)  # as ours: every rank gets the loss and leaves the step together
        clock.blocked += time.perf_counter() - waited
        return float(loss), clock.blocked / (time.perf_counter() - started)

    return step


def _row(row: tuple[str, str, int], points: list[int], batch: dict, rank: int, clock: _WaitClock):
    """A fresh model's stage for `row`: its step function (loss, idle fraction) and its AdamW."""
    implementation, schedule, micro_batches = row
    model_stage = stage(build_tiny(seed=0).train(), points, rank, answer_loss)
    divisor = answer_token_count(batch["labels"])
    if implementation == "ours":
        step = _ours(model_stage, schedule, batch, micro_batches, divisor)
    else:
        step = _torch(model_stage, schedule, batch, micro_batches, divisor, rank, clock)
    return step, torch.optim.AdamW(model_stage.parameters(), lr=1e-4)


def _rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    batch = random_batch(args.batch, seed=0)  # the same on every rank: the pipeline's ranks share the batch
    batch["labels"] = batch["input_ids"]
    clock = _WaitClock()
    points = split_points(build_tiny(seed=0), WORLD)
    runs = [_row(row, points, batch, rank, clock) for row in ROWS]
    times, idles, losses = ([[] for _ in ROWS] for _ in range(3))
    for round_ in range(args.warmup + args.steps):
        for i in [(round_ + k) % len(ROWS) for k in range(len(ROWS))]:
            step, optimizer = runs[i]
            start = time.perf_counter()
            loss, idle = step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[i].append(time.perf_counter() - start)
            idles[i].append(idle)
            losses[i].append(loss)
    mine = [(statistics.median(step[args.warmup :]), statistics.median(idle[args.warmup :]), loss[0])
            for step, idle, loss in zip(times, idles, losses, strict=True)]
    ranks = [None] * WORLD
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        _print(args, points, ranks)
    dist.destroy_process_group()


def _print(args: argparse.Namespace, points: list[int], ranks: list[list[tuple[float, float, float]]]) -> None:
    """The table, from every rank's (median step s, median idle fraction, first loss) per row."""
    print(f"{WORLD} gloo ranks, tiny Idefics2 fully trainable, split before decoder layer(s) {points} of 4, "
          f"batch {args.batch} rows in M micro-batches, median of {args.steps} steps")
    seconds = [max(r[i][0] for r in ranks) for i in range(len(ROWS))]
    columns = ("M", "ms", "vs torch GPipe", *(f"idle r{r}" for r in range(WORLD)), "bubble", "first loss")
    print(f"{'pipeline':<21}" + "".join(f"{c:>15}" for c in columns))
    for i, (implementation, schedule, m) in enumerate(ROWS):
        base = seconds[ROWS.index(("torch", "gpipe", m))]
        idles = "".join(f"{r[i][1]:>15.2f}" for r in ranks)
        print(f"{NAMES[implementation, schedule]:<21}{m:>15}{seconds[i] * 1e3:>15.1f}{seconds[i] / base:>15.2f}{idles}"
              f"{bubble(WORLD, m):>15.2f}{ranks[-1][i][2]:>15.6f}")


def main() -> None:
    spawn(_rank_main, parse_args(__doc__, steps=6, warmup=2, batch=4))


if __name__ == "__main__":
    main()
