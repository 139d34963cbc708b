"""--compile against eager on this machine: the step time of each (median after warm-up), and the compile time apart.

    python bench/compile_vs_eager.py     # a few minutes on 2 CPU cores; rewrites RESULTS.md's "### --compile" part

For lora, qlora and full (their presets, one process, the tiny model on the CPU, LoRA dropout off so that the two
runs draw no random number differently), the engine builds the model twice, eager and with --compile (inductor,
its caches off: the compile time of a first run), and trains both on the same real MuseQuest batches, a step of
each in turn, so that other load on the machine falls on both alike. Real batches differ in length, as in a run: the
compiled blocks compile during the warm-up, for the first batch's shapes and then once more with the length
symbolic, and no timed step compiles (the script checks). Compile time: the compiled run's warm-up steps less the
eager run's same steps. Step time: wall, and CPU (every thread of the process, which other processes on the
machine do not inflate). The losses of the two runs are compared too: inductor's kernels round differently.
"""

import datetime
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._inductor.config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results_page import replace_part

from engine.config import from_approach
from engine.data.collate import Collator
from engine.data.sources import load_splits
from engine.optim.optimizer import optimizer_for
from engine.runtime import Runtime
from engine.step import train_step
from engine.strategies import strategy_for

APPROACHES = ("lora", "qlora", "full")
ROWS = 4  # a batch
WARMUP = 3  # steps, each on a batch of another length
STEPS = 10
LR = 1e-4
SECTION = "### --compile against eager"  # RESULTS.md's part this script writes, up to the next "### "
WIDTH = 100


@dataclass
class Timed:
    wall: list[float]
    cpu: list[float]
    losses: list[float]


def trainer(approach: str, compile_: bool, folder: Path) -> tuple[Callable[[dict], float], Collator]:
    """One optimizer step of the approach on a collated batch, as run.py trains it (returns the step's loss), and
    the collator of the model's processor."""
    config = from_approach(approach, model="tiny", device="cpu", output_dir=str(folder), skip_eval=True, lr=LR,
                           lora_dropout=0.0, compile=compile_).resolved(gpu=False)
    strategy = strategy_for(config, Runtime(torch.device("cpu")))
    processor = strategy.build(None)
    optimizer = optimizer_for(config, strategy.precision, strategy.parameters(), config.lr)

    def step(batch: dict) -> float:
        loss, _, _ = train_step(strategy, optimizer, [batch], config.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, Collator(processor)


def measure(approach: str, folder: Path) -> tuple[float, dict[bool, Timed], int, int]:
    """(compile seconds, each run's timed steps, graphs compiled in the warm-up, graphs compiled after it)."""
    torch._dynamo.reset()  # what the other approach compiled, and the shapes it saw, start over
    torch._dynamo.utils.counters.clear()
    made = {compile_: trainer(approach, compile_, folder / str(compile_)) for compile_ in (False, True)}
    steps, collate = {compile_: step for compile_, (step, _) in made.items()}, made[False][1]
    train = load_splits("musequest")["train"]
    batches = [collate([train[i * ROWS + j] for j in range(ROWS)]) for i in range(WARMUP + STEPS)]
    runs = {compile_: Timed([], [], []) for compile_ in steps}
    for index, batch in enumerate(batches):
        for compile_ in (False, True) if index % 2 else (True, False):
            wall, cpu = time.perf_counter(), time.process_time()
            loss = steps[compile_](batch)
            runs[compile_].wall.append(time.perf_counter() - wall)
            runs[compile_].cpu.append(time.process_time() - cpu)
            runs[compile_].losses.append(loss)
        if index == WARMUP - 1:
            warm_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compile_s = sum(runs[True].wall[:WARMUP]) - sum(runs[False].wall[:WARMUP])
    later = torch._dynamo.utils.counters["stats"]["unique_graphs"] - warm_graphs
    return compile_s, runs, warm_graphs, later


def row(approach: str, compile_s: float, runs: dict[bool, Timed], graphs: int) -> str:
    eager, compiled = ([statistics.median(times[WARMUP:]) for times in (run.wall, run.cpu)] for run in
                       (runs[False], runs[True]))
    gap = max(abs(c - e) / abs(e) for e, c in zip(runs[False].losses, runs[True].losses, strict=True))
    return (f"| {approach} | {compile_s:.0f} | {graphs} | {1000 * eager[0]:,.0f} | {1000 * compiled[0]:,.0f} | "
            f"{compiled[0] / eager[0]:.2f} | {1000 * eager[1]:,.0f} | {1000 * compiled[1]:,.0f} | "
            f"{compiled[1] / eager[1]:.2f} | {gap:.1e} |")


def main() -> None:
    torch._inductor.config.force_disable_caches = True  # a first run's compile, not one read back from disk
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for approach in APPROACHES:
            compile_s, runs, graphs, later = measure(approach, Path(folder) / approach)
            if later:
                raise SystemExit(f"{approach}: {later} graphs compiled during the timed steps; raise WARMUP")
            rows.append(row(approach, compile_s, runs, graphs))
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    text = "\n".join([
        f"{SECTION} (issue 30)", "",
        textwrap.fill(f"`python bench/compile_vs_eager.py`, {datetime.date.today().isoformat()}, {os.cpu_count()} "
                      f"CPU cores (load average {load:.1f} as it ended), torch {torch.__version__}: the tiny "
                      f"Idefics2 in one process, fp32, batches of {ROWS} real MuseQuest rows, a new batch (and "
                      f"length) every step, eager and --compile (inductor) taking turns; {WARMUP} warm-up steps, "
                      f"then the median of {STEPS}. Compile: the seconds the compiled run's warm-up took beyond "
                      "the eager run's, with inductor's caches off (a later run of the same model reads its "
                      "kernels back from disk and compiles for less); graphs: what dynamo compiled then (each "
                      "kind of layer for the first batch's shapes, the decoder's once more with the length "
                      "symbolic), none after. "
                      "CPU: the seconds of every thread of the process, which other processes on the machine do "
                      "not inflate as they do the wall time. Loss gap: the largest relative difference of the two "
                      "runs' training losses over all the steps (LoRA dropout off).", WIDTH),
        "", "| approach | compile s | graphs | eager ms | compiled ms | ratio | eager CPU ms | compiled CPU ms | "
            "ratio | loss gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""])
    replace_part(SECTION, text)


if __name__ == "__main__":
    main()
