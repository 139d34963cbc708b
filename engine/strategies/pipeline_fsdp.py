"""`--parallel pipeline+fsdp --stages S`: the N ranks form an S x N/S grid. Rank r holds stage
r // (N/S) of the pipeline (engine/strategies/pipeline.py), sharded FSDP-style (parallel/fsdp.py)
over the N/S ranks of that stage, and reads only its shard of that stage's weights. The ranks at
the same position of every stage form one pipeline, which is fed its own slice of each batch: the
N/S pipelines are data parallel, as DDP's and FSDP's ranks are, so --batch-size is per pipeline.

Two kinds of process groups, made by every rank in the same order: a stage's ranks (the FSDP
gathers and reduce-scatters, and the data ranks' sums), and a position's ranks (a pipeline's
activations). Clipping sums the shards' squares over every rank: stages and shards are disjoint.
"""

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

import models
from engine.runtime import Runtime
from engine.strategies.fsdp import MeasuredBeforeSharding, sharding_flags
from engine.strategies.pipeline import PipelineParallel
from errors import UsageError
from models.stages import activation_shape
from parallel import fsdp


class PipelineFSDP(MeasuredBeforeSharding, PipelineParallel):
    collective_forward = True  # a stage's forward gathers from the same stage of the other pipelines
    first_step_differs = True  # FSDP's: it records the order its units run in, which later steps prefetch by

    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        world, stages = runtime.world_size, config.stages
        if world % stages:
            raise UsageError(f"--stages {stages} needs a world size that is a multiple of it; this run has {world} "
                             "ranks.")
        shards = world // stages
        self.stage_index, position = divmod(runtime.rank, shards)
        self.stages, self.is_writer = stages, position == 0
        stage_groups = [dist.new_group(list(range(s * shards, (s + 1) * shards))) for s in range(stages)]
        pipe_groups = [dist.new_group(list(range(p, world, shards))) for p in range(shards)]
        self.group, self.pipe = stage_groups[self.stage_index], pipe_groups[position]
        self.data_ranks = Runtime(runtime.device, position, shards, runtime.precision, group=self.group)

    def prepare(self, model: PreTrainedModel) -> None:
        own = self.own_stage(model)
        self.measure_whole(model)
        self.trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)  # (shards are not)
        # The stage's own names for its tensors are not the model's, by which the weight files know them.
        names = {id(t): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self.names = {name: names[id(t)] for name, t in [*own.named_parameters(), *own.named_buffers()]}
        inside = {id(module) for module in own.modules()}
        read = self.reader(model)
        # The activations in the dtype FSDP gathers the embeddings in; measured before their weights are sharded.
        shape = activation_shape(model, self.precision.frozen_dtype)
        fsdp.fully_shard(own, [block for block in models.blocks(model) if id(block) in inside],
                         self.precision.frozen_dtype, self.group,
                         lambda name, start, stop: read(self.names[name], start, stop), self.runtime.device,
                         self.precision.trained_dtype, **sharding_flags(self.config))
        del self.read
        self.model, self.parts = model, [own]  # FSDP recomputes every block: no activation checkpointing on top
        self.start_pipeline(own, shape)

    def eval_loss(self, batch: dict) -> torch.Tensor:
        # One micro-batch per batch: a stage's ranks must run as many forwards (each one gathers), and the
        # last validation batches of two pipelines may have too few rows for as many micro-batches.
        return self.pipeline.evaluate([self.on_device(batch)])

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "trainable": self.trainable}  # the same on every stage

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """This rank's trainable shards by their names in its stage (the stage's root unit is no module of the
        model)."""
        return {name: p for name, p in self.parts[0].named_parameters() if p.requires_grad}

    def stage_weights(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Gathered one unit at a time by the stage's ranks; its first rank keeps them."""
        units = fsdp.unit_state_dicts(self.parts[0], trainable_only)
        weights = {self.names[name]: tensor for unit in units for name, tensor in unit.items()}
        return weights if self.is_writer else None

    def rank_report(self) -> dict:
        return {**super().rank_report(), "stage": self.stage_index}
