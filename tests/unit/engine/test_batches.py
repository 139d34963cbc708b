"""The batch order: a global batch holds the same rows in the same order however it is cut, and an epoch
keeps its last partial batch as HF Trainer over DistributedSampler does (dataloader_drop_last=False)."""

from collections import Counter

import pytest

from engine.data.batches import BatchOrder


@pytest.mark.parametrize("batch_size,grad_accum,world_size", [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_global_batch_is_independent_of_the_split(batch_size, grad_accum, world_size):
    reference = BatchOrder(num_rows=50, batch_size=8, seed=3)
    batches = BatchOrder(num_rows=50, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size, seed=3)
    assert batches.global_batch == 8 and batches.steps_per_epoch == 7  # 6 full steps and one of 2 rows
    for step in range(14):  # two epochs
        per_rank = [batches.micro_batches(step, rank) for rank in range(world_size)]
        last = step % 7 == 6
        rounds = len(per_rank[0])
        assert all(len(batches) == rounds for batches in per_rank)
        assert rounds == (1 if last else grad_accum)  # the tail of 2 (or 4, padded) rows is one round
        # Round by round, rank by rank, the micro-batches concatenate to the one-process global batch,
        # followed on the last step by the padding to a multiple of the world size (50 % 4 == 2: 2 rows).
        joined = [row for r in range(rounds) for rank in range(world_size) for row in per_rank[rank][r]]
        expected = reference.global_rows(step)
        if last and world_size == 4:
            expected = expected + reference.epoch_order(step // 7)[:2]
        assert joined == batches.global_rows(step) == expected


def test_each_epoch_is_a_seeded_permutation_without_repeats():
    batches = BatchOrder(num_rows=20, batch_size=4, seed=1)
    epoch0 = [row for step in range(5) for row in batches.global_rows(step)]
    epoch1 = [row for step in range(5, 10) for row in batches.global_rows(step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert epoch0 == [row for step in range(5) for row in BatchOrder(20, 4, seed=1).global_rows(step)]
    assert epoch0 != [row for step in range(5) for row in BatchOrder(20, 4, seed=2).global_rows(step)]


@pytest.mark.parametrize("batch_size,grad_accum,world_size,steps", [
    (14, 1, 1, 59),  # the original's one-GPU run: 177 steps for 3 epochs (dropping the tail gave 58, 174)
    (14, 1, 2, 30),  # its 2-GPU run: 90 for 3 epochs
    (14, 1, 4, 15),  # 45
    (10, 1, 4, 21),  # its FSDP 4-GPU run: 63
    (7, 2, 1, 59),   # the same global batch by accumulation
    (8, 1, 1, 103),
])
def test_an_epoch_keeps_its_ragged_tail_as_hf_trainer_does(batch_size, grad_accum, world_size, steps):
    batches = BatchOrder(num_rows=819, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size)
    assert batches.steps_per_epoch == steps
    padded = -(-819 // world_size) * world_size
    tail = padded - (steps - 1) * batches.global_batch
    assert 0 < tail < batches.global_batch and tail % world_size == 0
    assert len(batches.global_rows(steps - 1)) == tail and len(batches.global_rows(steps)) == batches.global_batch


def test_no_rows_give_no_steps():
    assert BatchOrder(num_rows=0, batch_size=4, world_size=2).steps_per_epoch == 0
    assert BatchOrder(num_rows=1, batch_size=4, world_size=2).steps_per_epoch == 1


SPLITS = [  # (rows, batch_size, grad_accum, world_size)
    (819, 14, 1, 1), (819, 14, 1, 2), (819, 14, 1, 4), (819, 10, 1, 4), (819, 4, 3, 2), (819, 3, 4, 4),
    (50, 2, 2, 2), (51, 4, 2, 4), (5, 1, 1, 4), (3, 2, 3, 4), (1, 4, 1, 4), (7, 8, 1, 1), (13, 2, 3, 3),
]


@pytest.mark.parametrize("rows,batch_size,grad_accum,world_size", SPLITS)
def test_every_row_of_an_epoch_appears_once_besides_the_padding(rows, batch_size, grad_accum, world_size):
    batches = BatchOrder(rows, batch_size, grad_accum, world_size, seed=5)
    for epoch in range(2):
        steps = range(epoch * batches.steps_per_epoch, (epoch + 1) * batches.steps_per_epoch)
        seen = [row for step in steps for row in batches.global_rows(step)]
        order = batches.epoch_order(epoch)
        padding = -rows % world_size
        assert seen == order and len(seen) == rows + padding and sorted(set(seen)) == list(range(rows))
        # The repeats are the epoch's first rows (cyclically, if there are fewer rows than ranks), as
        # DistributedSampler pads.
        assert order[rows:] == (order[:rows] * world_size)[:padding]
        assert Counter(seen) - Counter(range(rows)) == Counter(order[rows:])
        if world_size == 1:
            assert len(seen) == rows


@pytest.mark.parametrize("rows,batch_size,grad_accum,world_size", SPLITS)
def test_every_rank_runs_as_many_micro_batches_each_step(rows, batch_size, grad_accum, world_size):
    batches = BatchOrder(rows, batch_size, grad_accum, world_size, seed=5)
    for step in range(2 * batches.steps_per_epoch):
        per_rank = [batches.micro_batches(step, rank) for rank in range(world_size)]
        rounds = len(per_rank[0])
        assert all(len(batches) == rounds for batches in per_rank)  # a collective per micro-batch
        assert 1 <= rounds <= grad_accum
        for r in range(rounds):
            sizes = {len(batches[r]) for batches in per_rank}
            assert len(sizes) == 1 and 1 <= sizes.pop() <= batch_size  # dealt evenly, none empty, none over
        joined = [row for r in range(rounds) for rank in range(world_size) for row in per_rank[rank][r]]
        assert joined == batches.global_rows(step)
        if step % batches.steps_per_epoch != batches.steps_per_epoch - 1:
            assert rounds == grad_accum and all(len(b) == batch_size for batches in per_rank for b in batches)


def test_the_last_step_deals_its_tail_evenly_in_fewer_rounds():
    # 819 rows, 2 ranks: padded to 820; 34 steps of 24 leave 4 rows, one round of 2 rows a rank (not 3 rounds).
    batches = BatchOrder(num_rows=819, batch_size=4, grad_accum=3, world_size=2, seed=0)
    assert batches.steps_per_epoch == 35
    rows = batches.global_rows(34)
    assert rows[:3] == batches.epoch_order(0)[816:819] and rows[3] == batches.epoch_order(0)[0]
    assert batches.micro_batches(34, 0) == [rows[:2]] and batches.micro_batches(34, 1) == [rows[2:]]
    # FSDP 4x10: 20 rows left in one round of 40, 5 a rank, contiguous in rank order.
    batches = BatchOrder(num_rows=819, batch_size=10, world_size=4)
    rows = batches.global_rows(20)
    assert [batches.micro_batches(20, rank) for rank in range(4)] == [[rows[5 * r : 5 * r + 5]] for r in range(4)]


def test_the_plan_is_a_pure_function_of_seed_epoch_and_step():
    batches, again = BatchOrder(819, 10, 1, 4, seed=7), BatchOrder(819, 10, 1, 4, seed=7)
    for step in (0, 20, 21, 41, 62):
        assert [batches.micro_batches(step, r) for r in range(4)] == [again.micro_batches(step, r) for r in range(4)]
    assert batches.global_rows(21) != batches.global_rows(0)  # epoch 1 is reshuffled
