"""`--parallel fsdp`: each rank holds 1/N of every weight, gradient and optimizer state
(parallel/fsdp.py), reads only its slices of the weight files, writes its own checkpoint shard,
and takes part in gathering the final export unit by unit."""

import collections
import itertools
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

import models
from engine.config import TrainConfig
from engine.loss import loss_forward
from engine.metrics import parameter_counts, quantized_summary
from engine.outputs import checkpoint
from engine.outputs.export import export_adapter, export_pieces, persistent_buffers
from engine.strategies.base import ReadsOwnPiece
from parallel import fsdp

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --fsdp-reduce-dtype


def sharding_flags(config: TrainConfig) -> dict:
    """fully_shard's keywords that the run's flags choose, the same for FSDP alone and a pipeline's stages (a run
    that shards nothing refuses these flags changed: engine/config.py)."""
    return {"prefetch": config.fsdp_prefetch, "reduce_dtype": REDUCE_DTYPES[config.fsdp_reduce_dtype]}


class MeasuredBeforeSharding:
    """The whole model's sizes, taken before sharding replaces its weights by this rank's shards."""

    def measure_whole(self, model: PreTrainedModel) -> None:
        self.counts, self.quantized = parameter_counts(model), quantized_summary(model)

    def parameter_counts(self) -> tuple[int, int]:
        return self.counts

    def quantized_summary(self) -> dict:
        return self.quantized


class FSDP(MeasuredBeforeSharding, ReadsOwnPiece):
    min_ranks = 2
    one_rank = False
    whole_model_per_rank = False
    collective_forward = True
    first_step_differs = True  # it records the order its units run in, which later steps prefetch by

    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        self.shard = checkpoint.Shard(runtime.rank, runtime.world_size)

    def prepare(self, model: PreTrainedModel) -> None:
        loss_forward(model)  # before sharding: the root unit's gathers enclose the loss and its output layer
        self.measure_whole(model)
        # Every block is recomputed in backward by FSDP itself, which is activation checkpointing:
        # no checkpointing on top. Blocks are gathered in the frozen weights' dtype to compute.
        fsdp.fully_shard(model, models.blocks(model), self.precision.frozen_dtype, read=self.reader(model),
                         device=self.runtime.device, master_dtype=self.precision.trained_dtype,
                         **sharding_flags(self.config))
        del self.read  # the weight files' handles: every shard is filled now
        self.model, self.parts = model, [model]
        self.precision.autocast_forward(model, self.runtime.device)

    def clip_(self, max_norm: float) -> torch.Tensor:
        return fsdp.clip_grad_norm_(self.model, max_norm)

    @property
    def writes_checkpoints(self) -> bool:
        return True

    def export(self, folder: Path, processor: ProcessorMixin, adapter_base: str | None) -> None:
        """Gathered one unit at a time, so no rank ever holds the whole model; the main rank writes."""
        if adapter_base is None:
            units = fsdp.unit_state_dicts(self.model)  # a collective per unit: every rank takes every one
            if not self.runtime.is_main:
                collections.deque(units, maxlen=0)
                return
            buffers = persistent_buffers(self.model)
            export_pieces(self.model, processor, folder, self.precision.frozen_dtype,
                          itertools.chain(units, [buffers] if buffers else []),
                          len(self.model.fsdp_units) + bool(buffers))
            return
        adapter = {name: tensor for unit in fsdp.unit_state_dicts(self.model, trainable_only=True)
                   for name, tensor in unit.items()}
        if self.runtime.is_main:
            export_adapter(self.model, processor, folder, adapter_base, self.config.to_json(), adapter)
