"""Which rows go into which optimizer step, micro-batch and rank.

The plan is a pure function of (seed, epoch, step): resuming needs nothing but the step
number, and a global batch holds the same rows in the same order whatever the world size
or accumulation, so runs stay comparable across 1, 2 or 4 ranks.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_rows: int
    batch_size: int  # rows per micro-batch on one rank
    grad_accum: int = 1
    world_size: int = 1
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The ragged tail is dropped so every step averages over the same number of rows.
        return self.num_rows // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        # One stream per (seed, epoch): resuming mid-run re-derives the same order.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def global_rows(self, step: int) -> list[int]:
        """Every row of optimizer step `step` (counted from 0 over all epochs), in order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """This rank's micro-batches: rank r takes the r-th contiguous slice of each accumulation round."""
        rows = self.global_rows(step)
        per_round = self.batch_size * self.world_size
        batches = []
        for round_start in range(0, len(rows), per_round):
            start = round_start + rank * self.batch_size
            batches.append(rows[start : start + self.batch_size])
        return batches
