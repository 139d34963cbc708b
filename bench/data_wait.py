"""The share of a step the training loop waits for its batch: ours with --data-workers 2 (engine/data/loader.py),
the in-line collation of --data-workers 0 (the loop before issue 30), and the DataLoader HF Trainer builds, with the
same 2 workers.

    python bench/data_wait.py     # about a minute on 2 CPU cores; rewrites RESULTS.md's "### Waiting for batches" part

The built-in MuseQuest train rows at batch 14 (their 224-pixel stand-in pictures), collated for the tiny model's
processor, one rank. There is no GPU here, so the step is a stand-in of fixed length: a sleep of STEP_S, the issue's
estimate of an H200 LoRA step at batch 14. A sleep leaves the cores to the workers, as a GPU step leaves them while
the loop's thread waits on the GPU. The first step, in which the workers start and collate their first batches, is
given apart from the rest, whose wait is the steady share.
"""

import datetime
import os
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results_page import replace_part

from engine.data.batches import BatchOrder
from engine.data.collate import Collator
from engine.data.loader import RunBatches, batches_ahead
from engine.data.sources import load_splits
from models.tiny import tiny_processor

BATCH, WORKERS, STEPS = 14, 2, 20
STEP_S = 0.6  # the estimate of an H200 LoRA step at batch 14
SECTION = "### Waiting for batches"  # RESULTS.md's part this script writes, up to the next "### "
WIDTH = 100


def waits(next_batch: Callable[[], object]) -> list[float]:
    """Each step's wait for its batch, the step itself a sleep of STEP_S."""
    seconds = []
    for _ in range(STEPS):
        tick = time.perf_counter()
        next_batch()
        seconds.append(time.perf_counter() - tick)
        time.sleep(STEP_S)
    return seconds


def ours(splits: dict, collator: Collator, workers: int) -> list[float]:
    order = BatchOrder(len(splits["train"]), BATCH)
    with batches_ahead(RunBatches(splits, collator, order, rank=0), range(STEPS), lambda step: False, workers,
                       pin=False) as batches:
        return waits(batches.step)


def hf_trainer(splits: dict, collator: Collator) -> list[float]:
    """As transformers' Trainer.get_train_dataloader builds it: a RandomSampler, the collator as collate_fn, the
    workers, torch's default prefetch (pin_memory on a GPU only, where it pins)."""
    loader = DataLoader(splits["train"], batch_size=BATCH, sampler=RandomSampler(splits["train"]),
                        collate_fn=collator, num_workers=WORKERS)
    return waits(iter(loader).__next__)


def row(name: str, seconds: list[float]) -> str:
    steady = sum(seconds[1:]) / (STEPS - 1)
    return (f"| {name} | {1000 * seconds[0]:,.0f} | {1000 * steady:,.0f} | "
            f"{100 * steady / (steady + STEP_S):.1f}% |")


def main() -> None:
    torch.set_num_threads(1)  # the step's thread; the cores are the workers'
    load = os.getloadavg()[0]  # other jobs on the same cores slow the collation, not the sleep
    splits = load_splits("musequest")
    collator = Collator(tiny_processor())
    rows = [row("in line (`--data-workers 0`, the loop before)", ours(splits, collator, 0)),
            row(f"ours, `--data-workers {WORKERS}`", ours(splits, collator, WORKERS)),
            row(f"HF Trainer's DataLoader, {WORKERS} workers", hf_trainer(splits, collator))]
    print("\n".join(rows))
    text = "\n".join([
        f"{SECTION} (issue 30)", "",
        textwrap.fill(f"`python bench/data_wait.py`, {datetime.date.today().isoformat()}, 2 CPU cores: the built-in "
                      f"MuseQuest train rows at batch {BATCH} (224-pixel stand-ins) collated for the tiny model's "
                      f"processor, one rank, {STEPS} steps, each step a sleep of {STEP_S} s (no GPU here: the issue's "
                      f"estimate of an H200 LoRA step at batch {BATCH}; load average {load:.1f} as it started). "
                      "Wait: the time the loop waited for the step's batch; share: the steady wait (steps 2 on) over "
                      "the steady wait plus the step.", WIDTH),
        "",
        "| loader | first step's wait, ms | wait a step after, ms | share of the step |",
        "|---|---:|---:|---:|", *rows, ""])
    replace_part(SECTION, text)


if __name__ == "__main__":
    main()
