"""`--parallel none`: one rank holds every weight and runs the whole batch. The base strategy.

A strategy owns everything that differs between the ways of spreading a run over ranks, so the
training loop (engine/trainer.py) asks none of it: which weights this rank materialises, how the
model is prepared (wrapped, sharded, split), forward+backward of a step's micro-batches, the
validation loss, greedy answers while training (--select-by), clipping by the global gradient norm,
which ranks split the data, what this rank's checkpoint files hold, the final export and its rows of
summary.json. The other strategies (ddp.py, fsdp.py, pipeline.py) override only what they change.
"""

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
from transformers import PreTrainedModel, ProcessorMixin

from engine.activation_checkpoint import apply_activation_checkpointing
from engine.build import apply_approach, load_whole, load_without_weights, quantizing
from engine.compile import compile_blocks
from engine.config import TrainConfig
from engine.data.loader import ValidationBatch
from engine.greedy import answer_rows
from engine.loss import answer_token_count, loss_forward
from engine.metrics import memory_breakdown, parameter_counts, quantized_summary
from engine.outputs import checkpoint
from engine.outputs.export import export_adapter, export_pretrained, recorded_base
from engine.runtime import Runtime
from errors import UsageError
from models.lazy import SliceReader, materialize
from models.parts import blocks, checkpointed_blocks
from quant import QuantizingReader


class Strategy:
    min_ranks = 1
    one_rank = True  # runs on one device: more ranks are refused
    alike_ranks = True  # every rank holds and allocates the same (replicas, shards): one stands for all in a plan
    whole_model_per_rank = True  # each rank holds every weight (more GPUs make no room for a larger model)
    collective_forward = False  # a forward takes every rank (FSDP's gathers): all must run as many forwards
    first_step_differs = False  # its first step runs as the later ones but for the optimizer's state (plans trace one)

    @classmethod
    def batch_multiple(cls, config: TrainConfig) -> int:
        """What every --batch-size of this strategy must be a multiple of."""
        return 1

    @classmethod
    def refuse_before_start(cls, config: TrainConfig, ranks: int) -> None:
        """Refuses what this strategy cannot run of a resolved `config` on `ranks` ranks, if that can be told from
        the model's config alone: before any rank starts and the run's folder is claimed."""

    def __init__(self, config: TrainConfig, runtime: Runtime):
        if runtime.world_size < self.min_ranks:
            raise UsageError(f"--parallel {config.parallel} needs {self.min_ranks} or more ranks (--gpus N, or "
                             f"torchrun); this run has {runtime.world_size}.")
        self.config, self.runtime, self.precision = config, runtime, runtime.precision
        self.data_ranks = runtime  # the ranks that split each global batch
        self.shard = checkpoint.Shard()  # which piece of a checkpoint this rank writes and reads
        self.model: PreTrainedModel | None = None  # the whole model as saved and exported
        self.parts: list[nn.Module] = []  # the modules this rank runs and trains

    # ---- the model ------------------------------------------------------------------------------

    def build(self, base_copy: Path | None) -> ProcessorMixin:
        """Load this rank's weights, apply the approach, compile (--compile), prepare; returns the processor."""
        model, processor = self.materialize(base_copy)
        apply_approach(model, self.config, self.runtime)
        if self.config.compile:  # here, not in `prepare`: a memory plan prepares fake tensors, which nothing compiles
            compile_blocks(blocks(model))  # before `prepare` wraps them (engine/compile.py)
        self.prepare(model)
        return processor

    def materialize(self, base_copy: Path | None) -> tuple[PreTrainedModel, ProcessorMixin]:
        return load_whole(self.config, self.runtime, base_copy)

    def adopt(self, model: PreTrainedModel, read: SliceReader) -> None:
        """Take a model built on meta whose weights `read` gives, instead of `materialize`'s (engine/plan/ranks.py
        reads fake tensors): this strategy reads them all now; sharding and staging ones in `prepare`."""
        materialize(model, model, read, self.runtime.device)

    def prepare(self, model: PreTrainedModel) -> None:
        self.model, self.parts = model, [model]
        loss_forward(model)
        self.checkpoint_activations(model)
        self.precision.autocast_forward(model, self.runtime.device)

    def checkpoint_activations(self, model: PreTrainedModel) -> None:
        """As the resolved config says (TrainConfig.resolved: on a GPU, off on a CPU, unless a flag says)."""
        if self.config.activation_checkpointing:
            apply_activation_checkpointing(checkpointed_blocks(model))

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps on this rank."""
        return [p for part in self.parts for p in part.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        return parameter_counts(self.model)

    def quantized_summary(self) -> dict:
        return quantized_summary(self.model)

    def set_training(self, mode: bool = True) -> None:
        """Training mode (dropout on) or evaluation mode, for every part this rank runs."""
        for part in self.parts:
            part.train(mode)

    # ---- a step ---------------------------------------------------------------------------------

    def forward_backward(self, batches: list[dict], divisor: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches, each summed loss divided by `divisor`, the answer
        tokens of the whole global batch (on the device), so the summed gradients are exactly the global mean.
        Returns the global batch's loss, on the device: nothing here waits for it."""
        local = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        for index, batch in enumerate(batches):
            with self.accumulating(last=index == len(batches) - 1):
                loss = self.forward(self.on_device(batch)) / divisor
                loss.backward()
            local += loss.detach()
        return self.data_ranks.summed(local)

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` on this rank's device, copied without waiting: from the memory the loader pins on CUDA
        (engine/data/loader.py) the copy runs while the host goes on. The labels stay on the host, where the loss
        finds its answer positions without waiting for the device (engine/loss.py answer_positions)."""
        return {key: value if key == "labels" else value.to(self.runtime.device, non_blocking=True)
                for key, value in batch.items()}

    def forward(self, batch: dict) -> torch.Tensor:
        """The summed answer-token loss of one micro-batch, labels included (engine/loss.py's loss_forward)."""
        return self.model(**batch)

    def accumulating(self, last: bool):
        """The context of one micro-batch's backward; DDP reduces only after the last."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def validation_loss(self, batches: Iterable[ValidationBatch]) -> float:
        """Validation loss averaged over every answer token of the split (not over batches or ranks), from this
        rank's validation batches and whether each counts (engine/data/loader.py: every rank runs as many)."""
        self.set_training(False)
        loss_sum, count = torch.zeros((), dtype=torch.float64, device=self.runtime.device), 0  # read once, at the end
        for batch, counted in batches:
            loss = self.eval_loss(batch)
            if counted:
                loss_sum += loss
                count += answer_token_count(batch["labels"])
        return self.data_ranks.sum_over_ranks(loss_sum) / max(1, self.data_ranks.sum_over_ranks(count))

    def answer(self, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int) -> list[str]:
        """Greedy answers to `rows` (engine/greedy.py), in order, the same list on every rank: each data rank
        answers rows r, r+N, ..., `answer_batch_size` at a time, and the answers are gathered. Where a forward is
        a collective (`collective_forward`), every rank answers as many batches, each in as many forwards: a rank
        whose rows have run out answers the first row again and drops the answer."""
        ranks, size = self.data_ranks, self.answer_batch_size
        mine = rows[ranks.rank::ranks.world_size]
        most = -(-len(rows) // ranks.world_size) if self.collective_forward else len(mine)
        answers = []
        for start in range(0, most, size):
            batch = mine[start:start + size]
            answers += self.answer_batch(processor, batch or rows[:1], max_new_tokens)[:len(batch)]
        shares = ranks.gather(answers)
        return [shares[i % ranks.world_size][i // ranks.world_size] for i in range(len(rows))]

    @property
    def answer_batch_size(self) -> int:
        return self.config.batch_size

    def answer_batch(self, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int) -> list[str]:
        """One batch's answers by transformers' generate, through the model's forward and all that wraps it (in
        step with the other ranks where that forward is a collective)."""
        return answer_rows(self.model, processor, rows, max_new_tokens, self.runtime.device,
                           synced=self.collective_forward)

    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The summed loss of one whole validation batch, which every rank of `data` has, on the device."""
        return self.forward(self.on_device(batch))

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm; returns the norm before, on the device."""
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    # ---- state, checkpoints, export, report -------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """This rank's trainable tensors under the model's own names: what its checkpoint holds."""
        return self.named(self.parameters())

    def named(self, params: list[nn.Parameter]) -> dict[str, nn.Parameter]:
        """`params` under the whole model's own names (a stage or a wrapper would name them otherwise)."""
        ids = {id(p) for p in params}
        return {name: p for name, p in self.model.named_parameters() if id(p) in ids}

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it."""
        return {"shards": self.shard.count, "stages": None}

    @property
    def writes_checkpoints(self) -> bool:
        """Replicas leave it to the main rank; shards and stages write their own piece."""
        return self.runtime.is_main

    def save_checkpoint(self, folder: Path, step: int, train_state: dict, meta: dict, keep_last: int) -> None:
        if self.writes_checkpoints:
            checkpoint.save(folder, step, self.trainable_state(), train_state, meta, keep_last, self.shard,
                            self.config.select_by)

    def load_checkpoint(self, path: Path, fingerprint: dict, with_train_state: bool = True) -> tuple[dict | None, dict]:
        """Copies this rank's trainable tensors from checkpoint `path`; returns (train state, or None without
        `with_train_state`, and meta)."""
        tensors, state, meta = checkpoint.load(path, fingerprint, self.shard, with_train_state)
        expected = self.trainable_state()
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))[:3]
            raise UsageError(f"checkpoint {path} does not hold this model's trainable tensors (missing {missing}).")
        with torch.no_grad():
            for name, param in expected.items():
                if tensors[name].shape != param.shape:
                    raise UsageError(f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)}, "
                                     f"the model's is {tuple(param.shape)}.")
                param.copy_(tensors[name])
        return state, meta

    def export_final(self, processor: ProcessorMixin, fingerprint: dict) -> dict | None:
        """OUT/final: the best checkpoint's weights (by --select-by) or the last ones; for an adapter, a PEFT
        folder whose base is OUT/base (tiny) or the model's id or folder. Returns the best checkpoint's meta, or
        None where the last weights went out."""
        config = self.config
        best = checkpoint.best(config.out / "checkpoints", config.select_by) if config.final == "best" else None
        meta = None
        if best is not None:
            _, meta = self.load_checkpoint(best, fingerprint, with_train_state=False)  # the optimizer is still held
        self.export(config.out / "final", processor, recorded_base(config) if config.trains_adapter else None)
        return meta

    def export(self, folder: Path, processor: ProcessorMixin, adapter_base: str | None) -> None:
        """OUT/final: a PEFT adapter folder on `adapter_base` when an adapter trained, else the
        whole model in the frozen weights' dtype. Every rank calls it."""
        if not self.runtime.is_main:
            return
        if adapter_base is not None:
            export_adapter(self.model, processor, folder, adapter_base, self.config.to_json())
        else:
            export_pretrained(self.model, processor, folder, self.precision.frozen_dtype)

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        return memory_breakdown(self.parts, optimizer)

    def rank_report(self) -> dict:
        """This rank's own rows of summary.json."""
        return {}

    def run_report(self) -> dict:
        """The run's rows of summary.json that only this parallelism has."""
        return {}


class ReadsOwnPiece(Strategy):
    """A strategy whose ranks each read only their own piece of the weights (a shard, a stage), in `prepare`."""

    def materialize(self, base_copy: Path | None) -> tuple[PreTrainedModel, ProcessorMixin]:
        model, processor, read = load_without_weights(self.config, self.runtime, base_copy)
        self.adopt(model, read)
        return model, processor

    def adopt(self, model: PreTrainedModel, read: SliceReader) -> None:
        self.read = read

    def reader(self, model: PreTrainedModel) -> QuantizingReader:
        """The weights of `prepare`, read once the approach is applied: NF4 layers quantized as read."""
        return quantizing(self.read, model, self.runtime.device)
