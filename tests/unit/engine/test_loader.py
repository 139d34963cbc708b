"""Batches prepared ahead (engine/data/loader.py): with worker processes, and from a resumed step, the very batches
the loop collated in line before, in the same order, with the same validation rule; the workers end with the run.

The loader depends on the strategy only through the data ranks (rank and world size): DDP and FSDP give it the
process's rank, the pipeline one rank of one (every stage takes the whole batch), pipeline+fsdp the rank's position
among its stage's shards. Ranks 0 and 1 of 2 and a world of 1 cover every case.
"""

import multiprocessing
import os

import pytest
import torch

from engine.data.batches import BatchOrder
from engine.data.collate import Collator
from engine.data.loader import RunBatches, batches_ahead, validation_rows
from engine.data.sources import load_splits

# 9 rows at 2 a rank on 2 ranks and 2 micro-batches: a global batch of 8, padded to 10 rows an epoch, so each
# epoch's second step is ragged (one partial round of a row a rank). 3 epochs; 5 validation rows, 2 a batch.
ROWS, BATCH, ACCUM, WORLD, STEPS = 9, 2, 2, 2, 6
EVALUATED = {2, 5, STEPS}  # steps after which the loop measures the validation loss


@pytest.fixture(scope="module")
def splits():
    loaded = load_splits("musequest", limit_exhibits=2, image_size=56)
    return {"train": loaded["train"].select(range(ROWS)), "validation": loaded["validation"].select(range(5))}


@pytest.fixture(scope="module")
def collator(_processor):
    return Collator(_processor)  # which only reads it


def in_line(splits: dict, collator: Collator, order: BatchOrder, rank: int) -> list[tuple[int, object]]:
    """What the loop collated in line before the loader, in the order it asked for it, each with the step it came in:
    each step's micro-batches (engine/trainer.py), and after an evaluated step the validation batches by
    validation_loss's old rule."""
    items, split = [], splits["validation"]
    for step in range(STEPS):
        items.append((step, [collator([splits["train"][i] for i in rows]) for rows in order.micro_batches(step, rank)]))
        if step + 1 in EVALUATED:
            stride = BATCH * WORLD
            for row in range(rank * BATCH, -(-len(split) // stride) * stride, stride):
                counted = row < len(split)
                rows = range(row, min(row + BATCH, len(split))) if counted else range(min(BATCH, len(split)))
                items.append((step, (collator([split[i] for i in rows]), counted)))
    return items


def ahead(splits: dict, collator: Collator, order: BatchOrder, rank: int, start: int, workers: int) -> list:
    """Everything the loader yields, taken as the loop takes it."""
    items = []
    with batches_ahead(RunBatches(splits, collator, order, rank), range(start, STEPS), EVALUATED.__contains__,
                       workers, pin=False) as batches:
        for step in range(start, STEPS):
            items.append(batches.step())
            if step + 1 in EVALUATED:
                items += list(batches.validation())
    return items


def assert_same(got: list, expected: list) -> None:
    """Item for item, batch for batch, tensor for tensor (dtype and every value), counted flags alike."""
    assert len(got) == len(expected)
    for got_item, expected_item in zip(got, expected, strict=True):
        if isinstance(expected_item, tuple):  # a validation batch and its flag
            (got_item, got_counted), (expected_item, counted) = got_item, expected_item
            assert got_counted == counted
            got_item, expected_item = [got_item], [expected_item]
        assert len(got_item) == len(expected_item)
        for got_batch, batch in zip(got_item, expected_item, strict=True):
            assert got_batch.keys() == batch.keys()
            for key, tensor in batch.items():
                assert got_batch[key].dtype == tensor.dtype and torch.equal(got_batch[key], tensor), key


@pytest.mark.parametrize("rank", [0, 1])
def test_workers_and_a_resumed_start_give_the_batches_collated_in_line(splits, collator, rank):
    order = BatchOrder(ROWS, BATCH, ACCUM, WORLD, seed=3)
    assert order.steps_per_epoch == 2 and len(order.micro_batches(1, rank)) == 1  # the ragged step is there
    expected = in_line(splits, collator, order, rank)
    rng = torch.get_rng_state()
    assert_same(ahead(splits, collator, order, rank, start=0, workers=2), [item for _, item in expected])
    assert_same(ahead(splits, collator, order, rank, start=0, workers=0), [item for _, item in expected])
    # Resumed mid-epoch (after step 3): the uninterrupted run's items from there on.
    resumed = [item for step, item in expected if step >= 3]
    assert_same(ahead(splits, collator, order, rank, start=3, workers=2), resumed)
    # torch's global generator, which drives dropout and a resume restores, is where it was.
    assert torch.equal(torch.get_rng_state(), rng)


def test_one_rank_takes_every_row_of_the_step_and_of_validation(splits, collator):
    """A world of 1: one process, and each stage of a pipeline."""
    order = BatchOrder(ROWS, BATCH * WORLD, ACCUM, seed=3)
    step_4, *validation, step_5 = ahead(splits, collator, order, 0, start=4, workers=1)[:4]
    assert [len(batch["input_ids"]) for batch in step_4] == [4, 4]  # its epoch's first 8 rows
    assert [(len(batch["input_ids"]), counted) for batch, counted in validation] == [(4, True), (1, True)]
    assert [len(batch["input_ids"]) for batch in step_5] == [1]  # the ninth


@pytest.mark.parametrize("rows, batch_size, world_size, expected", [
    (5, 2, 2, [[(range(0, 2), True), (range(4, 5), True)],  # rank 1's second batch: rows 6-7 do not exist,
               [(range(2, 4), True), (range(0, 2), False)]]),  # so it repeats the first batch, uncounted
    (5, 2, 1, [[(range(0, 2), True), (range(2, 4), True), (range(4, 5), True)]]),
    (1, 4, 3, [[(range(0, 1), True)], [(range(0, 1), False)], [(range(0, 1), False)]]),
    (0, 2, 2, [[], []]),
])
def test_validation_rows_give_every_rank_as_many_batches_and_count_each_row_once(rows, batch_size, world_size,
                                                                                  expected):
    assert [validation_rows(rows, batch_size, rank, world_size) for rank in range(world_size)] == expected


class _Interrupted(Exception):
    pass


def test_the_workers_end_with_the_loop_when_it_fails(splits, collator):
    order = BatchOrder(ROWS, BATCH, ACCUM, WORLD, seed=3)
    before = set(multiprocessing.active_children())
    with pytest.raises(_Interrupted):
        with batches_ahead(RunBatches(splits, collator, order, 0), range(STEPS), EVALUATED.__contains__, 2,
                           pin=False) as batches:
            batches.step()
            assert len(set(multiprocessing.active_children()) - before) == 2
            raise _Interrupted
    assert set(multiprocessing.active_children()) == before


class _ParentOfWorker(RunBatches):
    def __getitem__(self, key):
        return os.getppid()


def test_the_workers_fork_from_the_loop_even_in_a_rank_of_torchs_launcher(splits, collator):
    """Its ranks start by forkserver, which becomes their own default: workers started so would come from a server
    of their own that imports torch and transformers first (25 s on 2 busy cores)."""
    default = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        with batches_ahead(_ParentOfWorker(splits, collator, BatchOrder(ROWS, BATCH), 0), range(1),
                           EVALUATED.__contains__, 1, pin=False) as batches:
            assert batches.step() == os.getpid()
    finally:
        multiprocessing.set_start_method(default, force=True)
