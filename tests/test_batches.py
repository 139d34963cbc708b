"""The batch plan: a global batch holds the same rows in the same order however it is cut."""

import pytest

from engine.batches import BatchPlan


@pytest.mark.parametrize("batch_size,grad_accum,world_size", [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_global_batch_is_independent_of_the_split(batch_size, grad_accum, world_size):
    reference = BatchPlan(num_rows=50, batch_size=8, seed=3)
    plan = BatchPlan(num_rows=50, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size, seed=3)
    assert plan.global_batch == 8 and plan.steps_per_epoch == 6
    for step in range(12):  # two epochs
        per_rank = [plan.micro_batches(step, rank) for rank in range(world_size)]
        assert all(len(batches) == grad_accum for batches in per_rank)
        # Round by round, rank by rank, the micro-batches concatenate to the one-process global batch.
        joined = [row for r in range(grad_accum) for rank in range(world_size) for row in per_rank[rank][r]]
        assert joined == reference.global_rows(step)


def test_each_epoch_is_a_seeded_permutation_without_repeats():
    plan = BatchPlan(num_rows=20, batch_size=4, seed=1)
    epoch0 = [row for step in range(5) for row in plan.global_rows(step)]
    epoch1 = [row for step in range(5, 10) for row in plan.global_rows(step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert epoch0 == [row for step in range(5) for row in BatchPlan(20, 4, seed=1).global_rows(step)]
    assert epoch0 != [row for step in range(5) for row in BatchPlan(20, 4, seed=2).global_rows(step)]


def test_ragged_tail_is_dropped():
    plan = BatchPlan(num_rows=819, batch_size=8)
    assert plan.steps_per_epoch == 102
    assert len(plan.global_rows(101)) == 8
