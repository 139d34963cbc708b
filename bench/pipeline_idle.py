"""The pipeline's measured idle fraction per stage against theory, (N-1)/(M+N-1), on N equal stages.

Each of N gloo ranks runs a `Balanced` stage: a small linear layer whose forward lasts FORWARD_S and
whose backward BACKWARD_S per micro-batch (twice the forward, as in a real layer), so every stage
has the same, known work and the pipeline's own waiting is all that can differ from
`bubble(N, M)`. For both schedules and M = 1, 4, 8: the median over --steps steps (after --warmup)
of each rank's `Pipeline.last_idle_fraction`, and the worst rank's distance from theory relative
to theory; on plain gloo, and held to NCCL's point-to-point rules as the tests are (parallel/p2p.py).
--save keeps the rows as JSON, for --before to show them beside another version's; --write puts the
tables in bench/RESULTS.md.

    python bench/pipeline_idle.py [--stages 2 4] [--steps 5] [--warmup 1] [--save F] [--before F] [--write]
"""

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_page import replace_part
from parallel import p2p
from parallel.pipeline import SCHEDULES, Pipeline, bubble

FORWARD_S, BACKWARD_S = 0.010, 0.020
MICRO = (1, 4, 8)
ROWS, WIDTH = 8, 16  # a micro-batch's rows (the batch's are ROWS * M) and the activation's width
HEADING = "### The pipeline's idle fraction against theory"
# Each transport: its MUSEFT_NCCL_RULES, and what its table says.
TRANSPORTS = {
    "gloo": ("0", "On plain gloo, where a wait blocks the host whatever the code does around it: the synchronisation "
                  "of the CUDA stream before and after every wait, which issue 30 took out, cost only on a GPU, so the "
                  "code before it measures the same here. What is left above theory grows with M: each hop of a "
                  "micro-batch from stage to stage costs the host tenths of a millisecond (posting, waking, "
                  "autograd), on the critical path of a step balanced to the millisecond:"),
    "rules": ("1", "On gloo held to NCCL's point-to-point rules (`MUSEFT_NCCL_RULES=1`, parallel/p2p.py): a group "
                   "completes in the order posted, once both ends have started it, which the emulation sees by "
                   "polling the store every 2 ms, so a group waited for as soon as it is posted costs a poll. A "
                   "receive after a step that sends nothing goes out before that step and is there when needed "
                   "(GPipe's first and last stages, so all of N = 2); the others go out with the send of the step "
                   "before them, after it, as NCCL's order requires (parallel/pipeline.py), and keep the poll:"),
}
READING = ("The ranks run at real-time priority where allowed (`real_time`), and a stage sleeps out the rest of its "
           "time after its work, so that other load on the cores leaves the stages equal.")
LINE = 100  # the prose's line length, as the rest of RESULTS.md


class _Slot:
    """One micro-batch's backward on one stage: when it began, and how long it is to last."""

    def __init__(self, seconds: float):
        self.seconds, self.began = seconds, 0.0


class _BackwardMark(torch.autograd.Function):
    """The identity, whose backward notes when the stage's backward began (on its output, the first node the backward
    runs) or sleeps until the slot is over (on its input, the last)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, slot: _Slot, ends: bool) -> torch.Tensor:
        ctx.slot, ctx.ends = slot, ends
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.ends:
            _sleep_until(ctx.slot.began + ctx.slot.seconds)
        else:
            ctx.slot.began = time.perf_counter()
        return grad, None, None


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.perf_counter()))


class Balanced(nn.Module):
    """One of N equal stages: a linear layer whose forward lasts `forward_s` and whose backward lasts
    `backward_s`, however long the host takes to run them (up to that), as GPU kernels would: it sleeps
    until the time is up, so that other load on the machine's cores leaves the stages equal. The first
    reads the micro-batch's "x", the last returns the sum of its output as the loss."""

    def __init__(self, last: bool, forward_s: float = FORWARD_S, backward_s: float = BACKWARD_S):
        super().__init__()
        self.linear, self.last = nn.Linear(WIDTH, WIDTH), last
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, hidden: torch.Tensor | None, batch: dict) -> torch.Tensor:
        began, slot = time.perf_counter(), _Slot(self.backward_s)
        if hidden is None:  # (an input that needs a gradient, so that the backward's last node is its mark)
            hidden = batch["x"].requires_grad_()
        output = self.linear(_BackwardMark.apply(hidden, slot, True))
        output = _BackwardMark.apply(output.sum() if self.last else output, slot, False)
        _sleep_until(began + self.forward_s)
        return output


def activation_shape(batch: dict) -> tuple[torch.Size, torch.dtype]:
    return torch.Size((len(batch["x"]), WIDTH)), torch.float32


@contextlib.contextmanager
def real_time() -> Iterator[None]:
    """This process's threads at the lowest real-time priority (SCHED_FIFO 1) where the system lets it raise them
    (Linux, as root), then back to the ordinary policy. A stage that sleeps then wakes when its time is up, and a
    rank whose tensor has arrived runs at once, rather than when the other load on the cores lets them: on 2 busy
    cores those delays alone put M=8 20-70% above theory, as they make equal stages unequal. The ranks sleep
    nearly all the time, so they take little from that load."""
    with contextlib.suppress(AttributeError, OSError):  # elsewhere: ordinary priority, as good as the machine is quiet
        _every_thread(os.SCHED_FIFO, 1)
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError, OSError):
            _every_thread(os.SCHED_OTHER, 0)


def _every_thread(policy: int, priority: int) -> None:
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setscheduler(int(thread), policy, os.sched_param(priority))


def idle_fractions(rank: int, world: int, steps: int, warmup: int, **stage_seconds: float) \
        -> dict[tuple[str, int], list[float]]:
    """This rank's `last_idle_fraction` in each of `steps` steps after `warmup`, by (schedule, micro-batches), at
    real-time priority where allowed."""
    stage = Balanced(last=rank == world - 1, **stage_seconds)
    results = {}
    with real_time():
        for schedule in SCHEDULES:
            pipeline = Pipeline(stage, activation_shape, schedule)
            for micro in MICRO:
                micro_batches = [{"x": torch.randn(ROWS, WIDTH)} for _ in range(micro)]
                idle = []
                for _ in range(warmup + steps):
                    pipeline.train_step(micro_batches, ROWS * micro)
                    idle.append(pipeline.last_idle_fraction)
                    stage.zero_grad(set_to_none=True)
                results[schedule, micro] = idle[warmup:]
    return results


def _rank_main(rank: int, world: int, port: int, rules: str, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    os.environ[p2p.RULES] = rules
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ranks = [None] * world
    dist.all_gather_object(ranks, idle_fractions(rank, world, args.steps, args.warmup))
    if rank == 0:
        torch.save(ranks, out)
    dist.destroy_process_group()


def _spawn(world: int, rules: str, args: argparse.Namespace) -> list[dict[tuple[str, int], list[float]]]:
    """Every rank's `idle_fractions` on `world` fresh processes, with MUSEFT_NCCL_RULES=`rules`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ranks.pt"
        mp.spawn(_rank_main, args=(world, port, rules, args, out), nprocs=world)
        return torch.load(out)


def measure(args: argparse.Namespace) -> list[dict]:
    """Rows of transport, stages, schedule, micro (M) and each rank's median idle fraction ("idle")."""
    rows = []
    for transport, (rules, _) in TRANSPORTS.items():
        for world in args.stages:
            ranks = _spawn(world, rules, args)
            rows += [{"transport": transport, "stages": world, "schedule": schedule, "micro": micro,
                      "idle": [statistics.median(rank[schedule, micro]) for rank in ranks]}
                     for schedule in SCHEDULES for micro in MICRO]
    return rows


def _cells(row: dict) -> str:
    """The ranks' idle fractions and the one farthest from theory, relative to theory."""
    theory = bubble(row["stages"], row["micro"])
    worst = max((value - theory for value in row["idle"]), key=abs) / theory
    return " / ".join(f"{value:.3f}" for value in row["idle"]) + f" | {worst:+.1%}"


def table(rows: list[dict], transport: str, before: list[dict]) -> list[str]:
    """A markdown table of `transport`'s rows, beside those of `before` (if any) with the same keys."""
    key = ("transport", "stages", "schedule", "micro")
    earlier = {tuple(row[k] for k in key): row for row in before}
    then = "before: ranks 0 / 1 / ... | worst vs theory | " if earlier else ""
    lines = [f"| N | schedule | M | theory | {then}ranks 0 / 1 / ... | worst vs theory |",
             "|---|---|---:|---:|" + "---|---:|" * (2 if earlier else 1)]
    for row in rows:
        if row["transport"] == transport:
            old = earlier.get(tuple(row[k] for k in key))
            cells = (f"{_cells(old)} | " if old else "| | " if earlier else "") + _cells(row)
            lines.append(f"| {row['stages']} | {row['schedule']} | {row['micro']} | "
                         f"{bubble(row['stages'], row['micro']):.3f} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="pipeline lengths N, one spawn each")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--save", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--before", type=Path, help="rows that --save wrote for other code, to show beside")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's part of bench/RESULTS.md")
    args = parser.parse_args()
    rows = measure(args)
    before = json.loads(args.before.read_text()) if args.before else []
    if args.save:
        args.save.write_text(json.dumps(rows, indent=1))
    text = [HEADING, "", textwrap.fill(
        f"`python bench/pipeline_idle.py`, {datetime.date.today()}: N equal stages, each {FORWARD_S * 1e3:g} ms a "
        f"micro-batch's forward and {BACKWARD_S * 1e3:g} ms its backward; each rank's `last_idle_fraction`, median "
        f"of {args.steps} steps, against (N-1)/(M+N-1). {READING}"
        + (f" Beside them, as before: the rows of the same run of the code at {args.before.stem}." if before else ""),
        LINE)]
    for transport, (_, title) in TRANSPORTS.items():
        text += ["", textwrap.fill(title, LINE), "", *table(rows, transport, before)]
    print("\n".join(text))
    if args.write:
        replace_part(HEADING, "\n".join(text))


if __name__ == "__main__":
    main()
