"""`--parallel pipeline`: rank i holds and trains stage i of the model's layers (models/stages.py)
and reads only that stage's weights; every rank has the whole batch, cut into micro-batches that
flow through the stages (parallel/pipeline.py)."""

import contextlib
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from engine.config import TrainConfig
from engine.greedy import answer_by_steps, greedy_token
from engine.loss import answer_loss
from engine.outputs import checkpoint
from engine.outputs.export import export_adapter, persistent_buffers, piece_file, save_piece, write_index_and_config
from engine.outputs.publish import publish_folder, temporary
from engine.runtime import Runtime
from engine.strategies.base import ReadsOwnPiece
from models.lazy import materialize
from models.load import config_and_processor
from models.stages import Stage, activation_shape, check_split, split_points, stage
from parallel import clip
from parallel.pipeline import ActivationShape, Pipeline, bubble


class PipelineParallel(ReadsOwnPiece):
    min_ranks = 2
    one_rank = False
    alike_ranks = False  # each stage holds its own layers
    whole_model_per_rank = False

    @classmethod
    def batch_multiple(cls, config: TrainConfig) -> int:
        return config.micro_batches  # a batch is cut into that many micro-batches

    @classmethod
    def refuse_before_start(cls, config: TrainConfig, ranks: int) -> None:
        model_config, _ = config_and_processor(config.model)
        check_split(config.split, config.stages or ranks, model_config.text_config.num_hidden_layers)

    def __init__(self, config, runtime):
        super().__init__(config, runtime)
        self.data_ranks = Runtime(runtime.device, precision=runtime.precision)  # every stage sees the whole batch
        self.shard = checkpoint.Shard(runtime.rank, runtime.world_size)
        self.stage_index, self.stages, self.pipe = runtime.rank, runtime.world_size, None  # None: every rank

    def prepare(self, model: PreTrainedModel) -> None:
        own = self.own_stage(model)
        materialize(model, own, self.reader(model), self.runtime.device)  # the other stages stay on meta
        del self.read
        self.model, self.parts = model, [own]
        self.checkpoint_activations(model)
        self.start_pipeline(own, activation_shape(model))

    def own_stage(self, model: PreTrainedModel) -> Stage:
        return stage(model, split_points(model, self.stages, self.config.split), self.stage_index, answer_loss)

    def start_pipeline(self, own: Stage, shape: ActivationShape) -> None:
        self.precision.autocast_forward(own, self.runtime.device)
        self.pipeline = Pipeline(own, shape, self.config.schedule, group=self.pipe, device=self.runtime.device)

    def forward_backward(self, batches: list[dict], divisor: torch.Tensor) -> torch.Tensor:
        micro = [piece for batch in batches for piece in self.micro_batches(batch)]
        loss = self.pipeline.train_step(micro, divisor)
        return self.data_ranks.summed(loss)  # the other pipelines' shares of the batch (pipeline+fsdp)

    def eval_loss(self, batch: dict) -> torch.Tensor:
        return self.pipeline.evaluate(self.micro_batches(batch))

    @property
    def answer_batch_size(self) -> int:
        return 1  # a stage counts positions from the first column (models/stages.py): a left-padded row would shift

    def answer_batch(self, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int) -> list[str]:
        """A row's answer stage by stage: no stage keeps a cache, so every new token passes the whole sequence
        through the pipeline (`next_token`)."""
        return [answer_by_steps(functools.partial(self.next_token, processor), processor, rows[0], max_new_tokens,
                                self.runtime.device, synced=self.collective_forward)]

    def next_token(self, processor: ProcessorMixin, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's greedy next token, which the last stage picks (`greedy_token`) where in training it computes
        the loss, and every rank of the pipeline gets, so that all stop together."""
        own = self.parts[0]
        # labels: what the last stage hands its loss function, here the picker, which reads none.
        batch = dict(batch, labels=None)
        with picking_tokens(own, processor) if own.last else contextlib.nullcontext():
            return self.pipeline.infer(batch, batch["input_ids"].shape[:1], torch.int64)

    def micro_batches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """`batch` cut into --micro-batches pieces of rows (fewer if it has fewer rows)."""
        pieces = {key: value.chunk(self.config.micro_batches) for key, value in self.on_device(batch).items()}
        return [{key: chunks[i] for key, chunks in pieces.items()} for i in range(len(pieces["input_ids"]))]

    def clip_(self, max_norm: float) -> torch.Tensor:
        return clip.clip_grad_norm_(self.parameters(), max_norm)  # the stages' squares summed over ranks

    def fingerprint(self) -> dict:
        return {"shards": self.shard.count, "stages": self.runtime.gather(list(self.parts[0].bounds))}

    @property
    def writes_checkpoints(self) -> bool:
        return True

    def export(self, folder: Path, processor: ProcessorMixin, adapter_base: str | None) -> None:
        """The whole model, one file per stage; or the adapter, every stage's gathered on the main rank."""
        own = self.stage_weights(trainable_only=adapter_base is not None)
        if adapter_base is None:
            self.export_by_stage(own, processor, folder)
            return
        stages = self.runtime.gather({name: tensor.cpu() for name, tensor in (own or {}).items()})
        if self.runtime.is_main:
            adapter = {name: tensor for stage in stages for name, tensor in stage.items()}
            export_adapter(self.model, processor, folder, adapter_base, self.config.to_json(), adapter)

    def export_by_stage(self, own: dict[str, torch.Tensor] | None, processor: ProcessorMixin, folder: Path) -> None:
        """One rank of every stage writes `own`, the stage's weights by the model's names, as one safetensors file
        of a shared temporary folder, which the main rank (one of the writers) completes with the index, config
        and processor and publishes. `own` is None on a stage's other ranks (pipeline+fsdp)."""
        tmp, main = temporary(folder), self.runtime.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.runtime.gather(None)  # the folder is there before any stage writes into it
        written = None
        if own is not None:
            piece = dict(own, **(persistent_buffers(self.model) if main else {}))
            file = piece_file(self.stage_index + 1, self.stages)
            written = (file, sorted(piece), save_piece(piece, tmp / file, self.precision.frozen_dtype))
        pieces = [piece for piece in self.runtime.gather(written) if piece is not None]
        if main:
            weight_map = {name: file for file, names, _ in pieces for name in names}
            write_index_and_config(tmp, self.model, processor, weight_map, sum(size for *_, size in pieces))
            publish_folder(tmp, folder)
        self.runtime.gather(None)  # published before any rank goes on

    def stage_weights(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """This stage's weights (or those that train) by the model's names, on the rank that writes them."""
        params = [p for p in self.parts[0].parameters() if p.requires_grad or not trainable_only]
        return {name: p.detach() for name, p in self.named(params).items()}

    def rank_report(self) -> dict:
        """This rank's stage (its decoder layers) and the measured fraction of its step time spent waiting."""
        idle = self.pipeline.idle_fractions  # read at the run's end: on CUDA, no wait for the GPU in a step
        return {"decoder_layers": list(self.parts[0].bounds), "idle_fraction": sum(idle) / max(1, len(idle))}

    def run_report(self) -> dict:
        return {"theoretical_bubble": bubble(self.stages, self.config.micro_batches * self.config.grad_accum)}


@contextlib.contextmanager
def picking_tokens(last: Stage, processor: ProcessorMixin) -> Iterator[None]:
    """The last stage returns the greedy next token of each row's last position in place of the loss."""
    loss, last.loss = last.loss, lambda hidden, head, labels: greedy_token(head(hidden[:, -1]), processor)
    try:
        yield
    finally:
        last.loss = loss
