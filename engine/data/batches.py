"""Which rows go into which optimizer step, micro-batch and rank.

The order is a pure function of (seed, epoch, step): resuming needs nothing but the step
number, and a global batch holds the same rows in the same order whatever the world size
or accumulation, so runs stay comparable across 1, 2 or 4 ranks (the last step of an epoch
adds, on several ranks, the few padding rows described below).

An epoch keeps its last, partial global batch, as the original does: HF Trainer with
`dataloader_drop_last=False` over torch's `DistributedSampler` runs ceil(rows / global batch)
optimizer steps an epoch (819 train rows at batch 14 on one GPU: 59 steps, 177 for 3 epochs;
dropping the tail gave 58 and 174). Like `DistributedSampler`, the epoch's order is padded by
repeating its first rows until its length is a multiple of the world size, so that the last step
has at least one row on every rank: an FSDP or DDP forward is a collective, every rank must run
every micro-batch. With one rank nothing is repeated.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchOrder:
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
        # The last step keeps the ragged tail (HF Trainer, dataloader_drop_last=False): the original's count.
        # The padding changes nothing here: padded up to a multiple of the world size, the rows never pass
        # the next multiple of the global batch, itself a multiple of the world size. 0 only with no rows.
        return -(-self.num_rows // self.global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        """A seeded permutation of the rows, padded as DistributedSampler pads: its first rows repeated
        (cyclically, should there be fewer rows than ranks) up to a multiple of the world size."""
        # One stream per (seed, epoch): resuming mid-run re-derives the same order.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        padding = -len(order) % self.world_size
        if order and padding:
            order += (order * -(-padding // len(order)))[:padding]
        return order

    def global_rows(self, step: int) -> list[int]:
        """Every row of optimizer step `step` (counted from 0 over all epochs), in order, padding included;
        the last step of an epoch holds the rest, fewer than a global batch but a multiple of the world size."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """This rank's micro-batches: the step's rows in accumulation rounds of batch_size * world_size,
        rank r taking the r-th contiguous slice of each round.

        Only an epoch's last step can end in a partial round; it is dealt evenly, len(round) / world_size
        contiguous rows to each rank in rank order (a whole number, at least 1: the padding makes every
        step's length a multiple of the world size). That step has ceil(len / (batch_size * world_size))
        rounds, possibly fewer than grad_accum, but the same number on every rank and none empty (DDP's
        no_sync and FSDP's reduce-scatters run per micro-batch). Concatenated round by round and rank by
        rank, the micro-batches are exactly `global_rows(step)`.
        """
        rows = self.global_rows(step)
        per_round = self.batch_size * self.world_size
        batches = []
        for round_start in range(0, len(rows), per_round):
            share = len(rows[round_start : round_start + per_round]) // self.world_size  # batch_size unless partial
            start = round_start + rank * share
            batches.append(rows[start : start + share])
        return batches
