"""A run's batches, prepared ahead (`--data-workers N`): collated in N worker processes a few items before the loop
asks for them, and pinned where the device is CUDA, so that a step waits for none of it.

One torch DataLoader serves the whole run, in exactly the order the loop takes its batches: each step's micro-batches
for this rank (BatchOrder, from the step the run starts at: a resumed run takes the uninterrupted one's batches), and
after each step that ends at an evaluation point, this rank's validation batches (`validation_rows`). It is iterated
once, from the first step to the last, so its workers live across epochs and evaluation points and collate the
validation batches while the step before them trains. With 0 workers the loop's own thread collates each item as the
loop asks for it: the batches, and the moment they are made, of the loop that collated in line.
"""

import contextlib
import itertools
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from engine.data.batches import BatchOrder
from engine.data.collate import Collator

PREFETCH = 2  # items each worker keeps ready (torch's default): N workers are 2N steps ahead, a few batches deep

Key = tuple[str, int]  # ("train", step) or ("validation", i): this rank's i-th validation batch
ValidationBatch = tuple[dict[str, torch.Tensor], bool]  # a batch, and whether its loss counts


def validation_rows(rows: int, batch_size: int, rank: int, world_size: int) -> list[tuple[range, bool]]:
    """This rank's validation batches of a split of `rows` rows, as row ranges and whether each counts: rank r takes
    the r-th `batch_size` rows of every `batch_size * world_size`. Every rank runs as many batches, since an FSDP
    forward is a collective: a rank whose rows have run out repeats the split's first batch and does not count it."""
    stride = batch_size * world_size
    batches = []
    for start in range(rank * batch_size, -(-rows // stride) * stride, stride):
        counted = start < rows
        batches.append((range(start, min(start + batch_size, rows)) if counted else range(min(batch_size, rows)),
                        counted))
    return batches


class RunBatches(Dataset):
    """Item ("train", k): this rank's collated micro-batches of step k; item ("validation", i): its i-th validation
    batch and whether it counts."""

    def __init__(self, splits: dict, collator: Collator, order: BatchOrder, rank: int):
        self.splits, self.collator, self.order, self.rank = splits, collator, order, rank
        self.validation = validation_rows(len(splits["validation"]), order.batch_size, rank, order.world_size)

    def __getitem__(self, key: Key) -> list[dict[str, torch.Tensor]] | ValidationBatch:
        split, index = key
        if split == "train":
            return [self.collate("train", rows) for rows in self.order.micro_batches(index, self.rank)]
        rows, counted = self.validation[index]
        return self.collate("validation", rows), counted

    def collate(self, split: str, rows: list[int] | range) -> dict[str, torch.Tensor]:
        return self.collator([self.splits[split][i] for i in rows])


class Batches:
    """The loop's side of the DataLoader: the next step's micro-batches, and at an evaluation point its
    validation batches."""

    def __init__(self, items: Iterator, validation_batches: int):
        self.items, self.validation_batches = items, validation_batches

    def step(self) -> list[dict[str, torch.Tensor]]:
        return next(self.items)

    def validation(self) -> Iterator[ValidationBatch]:
        return itertools.islice(self.items, self.validation_batches)


@contextlib.contextmanager
def batches_ahead(dataset: RunBatches, steps: range, evaluates: Callable[[int], bool], workers: int,
                  pin: bool) -> Iterator[Batches]:
    """The batches of `steps`, each followed by the validation batches where `evaluates(step + 1)`, collated by
    `workers` processes (none: in line) and pinned if `pin`; the workers end with the block, however it ends."""
    schedule: list[Key] = []
    for step in steps:
        schedule.append(("train", step))
        if evaluates(step + 1):
            schedule += [("validation", i) for i in range(len(dataset.validation))]
    # A generator of its own: the workers' base seed would otherwise be drawn from torch's global one, moving the
    # dropout masks of every later step (and differently on resume). Nothing is collated at random.
    # Workers by fork, torch's default on Linux, whatever this process's own default: a rank that torch's launcher
    # started (by forkserver, engine/launch.py) would start a server of its own, which imports torch and
    # transformers again (25 s on 2 busy cores), and pickle the processor and the data set to each worker.
    loader = DataLoader(dataset, batch_size=None, sampler=schedule, num_workers=workers,
                        prefetch_factor=PREFETCH if workers else None, pin_memory=pin, generator=torch.Generator(),
                        multiprocessing_context="fork" if workers else None)
    items = iter(loader)
    try:
        yield Batches(items, len(dataset.validation))
    finally:
        if workers:
            items._shutdown_workers()  # torch's own (its __del__ calls it), now rather than when the error is freed
