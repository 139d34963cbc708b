"""`--parallel ddp`: every rank holds the whole model and its slice of each batch; the trainable
gradients are summed across ranks (parallel/ddp.py) once per optimizer step, after the last
micro-batch."""

import contextlib

from transformers import PreTrainedModel

from engine.strategies.base import Strategy
from parallel.ddp import DataParallel


class DDP(Strategy):
    one_rank = False

    def prepare(self, model: PreTrainedModel) -> None:
        super().prepare(model)
        # One rank alone has nothing to sum with (and no process group to sum in).
        self.wrapped = DataParallel(model) if self.runtime.world_size > 1 else model

    def forward(self, batch: dict):
        return self.wrapped(**batch)

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last or self.wrapped is self.model else self.wrapped.no_sync()
