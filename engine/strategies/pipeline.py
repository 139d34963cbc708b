"""`--parallel pipeline`: rank i holds and trains stage i of the model's layers (models/stages.py)
and reads only that stage's weights; every rank has the whole batch, cut into micro-batches that
flow through the stages (parallel/pipeline.py)."""

from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from engine import checkpoint
from engine.export import export_adapter, export_pretrained_by_rank
from engine.loss import answer_loss
from engine.runtime import Runtime
from engine.strategies.single import ReadsOwnPiece
from models.lazy import materialize
from models.stages import activation_shape, split_points, stage
from parallel import clip
from parallel.pipeline import Pipeline, bubble


class PipelineParallel(ReadsOwnPiece):
    min_ranks = 2
    alike_ranks = False  # each stage holds its own layers

    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        self.data = Runtime(runtime.device, precision=runtime.precision)  # every stage sees the whole batch
        self.shard = checkpoint.Shard(runtime.rank, runtime.world_size)
        self.idle: list[float] = []

    def prepare(self, model: PreTrainedModel) -> None:
        points = split_points(model, self.runtime.world_size, self.config.split)
        own = stage(model, points, self.runtime.rank, answer_loss)
        materialize(model, own, self.reader(model), self.runtime.device)  # the other stages stay on meta
        del self.read
        self.model, self.parts = model, [own]
        self.checkpoint_activations(model)
        self.precision.autocast_forward(own, self.runtime.device)
        self.pipeline = Pipeline(own, activation_shape(model), self.config.schedule, device=self.runtime.device)

    def forward_backward(self, batches: list[dict], divisor: int) -> float:
        micro = [piece for batch in batches for piece in self.micro_batches(batch)]
        loss = self.pipeline.train_step(micro, divisor)
        self.idle.append(self.pipeline.last_idle_fraction)
        return loss

    def eval_loss(self, batch: dict) -> float:
        return self.pipeline.evaluate(self.micro_batches(batch))

    def micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """`batch` cut into --micro-batches pieces of rows (fewer if it has fewer rows)."""
        pieces = {key: value.to(self.runtime.device).chunk(self.config.micro_batches) for key, value in batch.items()}
        return [{key: chunks[i] for key, chunks in pieces.items()} for i in range(len(pieces["input_ids"]))]

    def clip_(self, max_norm: float) -> float:
        return clip.clip_grad_norm_(self.parameters(), max_norm)  # the stages' squares summed over ranks

    def fingerprint(self) -> dict:
        return {"shards": self.shard.count, "stages": self.runtime.gather(list(self.parts[0].bounds))}

    @property
    def writes_checkpoints(self) -> bool:
        return True

    def export(self, folder: Path, processor: ProcessorMixin, adapter_base: str | None) -> None:
        """The whole model, each stage writing its own layers; or the adapter, every stage's gathered on the main rank."""
        if adapter_base is None:
            own = self.named(list(self.parts[0].parameters()))
            export_pretrained_by_rank(self.model, own, processor, folder, self.precision.frozen_dtype,
                                      self.runtime.rank, self.runtime.world_size)
            return
        stages = self.runtime.gather({name: p.detach().cpu() for name, p in self.named(self.parameters()).items()})
        if self.runtime.is_main:
            adapter = {name: tensor for stage in stages for name, tensor in stage.items()}
            export_adapter(self.model, processor, folder, adapter_base, self.config.to_json(), adapter)

    def rank_report(self) -> dict:
        """This rank's stage (its decoder layers) and the measured fraction of its step time spent waiting."""
        return {"decoder_layers": list(self.parts[0].bounds), "idle_fraction": sum(self.idle) / max(1, len(self.idle))}

    def run_report(self) -> dict:
        stages, micro = self.runtime.world_size, self.config.micro_batches * self.config.grad_accum
        return {"theoretical_bubble": bubble(stages, micro)}
