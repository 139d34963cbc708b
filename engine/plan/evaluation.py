"""What evaluation after training holds on each GPU, planned as a training step is (engine/plan/ranks.py):
the models' own forward on fake tensors, every storage counted by engine/plan/memory_trace.py.

Evaluation (eval/evaluate.py) holds one model at a time, and every rank evaluates its own rows of the
test split (r, r+N, ...) holding a whole model: a sharded or pipelined run needs a whole model per GPU
here, not its shard or stage. Its phases:

- generate: a model answers `--batch-size` rows at a time (fewer if a rank's share of the test split is
  smaller): the trained model in the run's frozen dtype (full: OUT/final; LoRA: its adapter merged into
  the base, the base's size; QLoRA: the NF4 base quantized as in training with the adapters beside it),
  then the base model for the score before training (unless cached), which is no larger (QLoRA's is its
  NF4 base without the adapters). Planned as one no_grad forward with use_cache=True over the widest
  test prompt plus --max-new-tokens tokens, logits for the last position only: the KV cache at its full
  length plus one forward. That slightly over-counts a real generate, whose prefill covers the prompt
  alone and whose later steps each add one token's activations.
- judge: the `--scorer` model's text decoder alone in the frozen dtype (eval/score.py), 8 texts at once
  as long as the longest answer (--max-new-tokens, or the longest reference if longer). With `--scorer
  self` the evaluated model scores its own answers one text at a time instead, before it is freed.

With --select-by a text metric, the training model answers the select rows at every evaluation point as well
(engine/select.py): `Selecting` is what it answers, which engine/plan/ranks.py traces beside what training holds.
"""

import contextlib
import functools
import io
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import PreTrainedModel, ProcessorMixin

from engine.build import apply_approach, configure_processor
from engine.config import TrainConfig
from engine.data.prompts import prompt_batch, question_and_reference
from engine.data.sources import data_settings, load_splits
from engine.plan.memory_trace import CUDA_BLOCK, MemoryTrace, RealShapes
from engine.precision import Precision
from engine.runtime import Runtime
from engine.strategies import Strategy
from models.lazy import build_on_meta, materialize
from models.load import config_and_processor

CPU = torch.device("cpu")
JUDGE_BATCH = 8  # texts a batched judge embeds at once (eval/score.py's default)


def evaluation_plan(config: TrainConfig, precision: Precision, gpu: bool) -> "Evaluation | None":
    """The plan of the evaluation after training; None if the run evaluates nothing (--skip-eval, no test rows)."""
    if config.skip_eval:
        return None
    _, processor = config_and_processor(config.model)
    configure_processor(processor, config)
    test = load_splits(**data_settings(config))["test"]
    return Evaluation(config, precision, gpu, processor, test) if len(test) else None


class Evaluation:
    """The plan of a run's evaluation: `phases(batch_size)` is {"generate": bytes, "judge": bytes}, the most a
    rank holds in each (every rank alike). The widest test prompt and the longest reference are found once."""

    def __init__(self, config: TrainConfig, precision: Precision, gpu: bool, processor: ProcessorMixin, test):
        self.config, self.precision, self.gpu, self.processor = config, precision, gpu, processor
        lengths = [prompt_batch(processor, [row])["input_ids"].shape[1] for row in test]
        self.prompt_tokens = max(lengths)
        self.widest = test[lengths.index(self.prompt_tokens)]
        self.share = math.ceil(len(test) / (config.gpus or 1))  # rank 0's rows, the most any rank has
        tokenizer = self.processor.tokenizer
        reference = max(len(tokenizer(question_and_reference(row)[1])["input_ids"]) for row in test)
        self.text_tokens = max(config.max_new_tokens + 1, reference)  # an answer's tokens and its BOS
        # The model that answers, the largest: the base model's answers, for the score before training, come
        # from a model as large (full, LoRA merged) or smaller (QLoRA's NF4 base, without its adapters).
        self.planned: dict[tuple[str, int], int] = {}

    def phases(self, batch_size: int) -> dict[str, int]:
        shapes = self.describe(batch_size)
        return {"generate": self.known("generate", shapes["rows"], self.generate_peak),
                "judge": self.known("judge", shapes["judge_texts"], self.judge_peak)}

    def known(self, phase: str, size: int, plan: Callable[[int], int]) -> int:
        """`plan(size)`, planned once: most batch sizes a search tries give the same rows (a rank's share)."""
        if (phase, size) not in self.planned:
            self.planned[phase, size] = plan(size)
        return self.planned[phase, size]

    def generate_peak(self, rows: int) -> int:
        prompt = self.prompt(rows)
        return traced_peak(self.evaluated_model, answer, prompt, self.gpu)

    def judge_peak(self, count: int) -> int:
        if self.config.scorer == "self":
            inputs = texts(count, self.text_tokens)
            return traced_peak(self.evaluated_model, embed, inputs, self.gpu)
        spec = self.config.model if self.config.scorer == "base" else self.config.scorer
        return judge_peak(spec, self.precision.frozen_dtype, self.gpu, count, self.text_tokens)

    def describe(self, batch_size: int) -> dict:
        """What a rank's evaluation runs at `batch_size`: rows answered at once (at most its share of the test
        split, rows r, r+N, ...), their tokens, and the texts a judge embeds at once (its answers and their
        references, 8 at a time; one, as --scorer self)."""
        return {"rows": min(batch_size, self.share), "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.config.max_new_tokens,
                "judge_texts": 1 if self.config.scorer == "self" else min(JUDGE_BATCH, 2 * self.share),
                "judge_tokens": self.text_tokens, "scorer": self.config.scorer}

    def prompt(self, rows: int) -> dict[str, torch.Tensor]:
        return answered_prompt(self.processor, self.widest, rows, self.config.max_new_tokens)

    def evaluated_model(self) -> PreTrainedModel:
        """The trained model as evaluation loads it: QLoRA's NF4 base with its adapters beside it, else the
        whole model in the frozen dtype (a LoRA adapter merged into its base changes no size)."""
        model = fake_model(self.config.model, self.precision.frozen_dtype)
        if self.config.quantized:
            apply_approach(model, self.config, Runtime(CPU, precision=self.precision))
        return model.eval()


class Selecting:
    """What --select-by answers at every evaluation point (engine/select.py), for engine/plan/ranks.py to trace
    beside what training holds: the widest prompt of the first --select-rows validation rows, answered
    `rows(strategy)` at a time, each --max-new-tokens long."""

    def __init__(self, config: TrainConfig, processor: ProcessorMixin, validation):
        self.config, self.processor = config, processor
        lengths = [prompt_batch(processor, [validation[i]])["input_ids"].shape[1]
                   for i in range(min(config.select_rows, len(validation)))]
        self.prompt_tokens = max(lengths)
        self.widest = validation[lengths.index(self.prompt_tokens)]

    def rows(self, strategy: Strategy) -> int:
        """The rows a rank answers at once: its strategy's batch, or its share of the rows (r, r+N, ...) if fewer."""
        return min(strategy.answer_batch_size, math.ceil(self.config.select_rows / strategy.data_ranks.world_size))

    def prompt(self, rows: int) -> dict[str, torch.Tensor]:
        return answered_prompt(self.processor, self.widest, rows, self.config.max_new_tokens)

    def describe(self) -> dict:
        return {"metric": self.config.select_by, "rows": self.config.select_rows, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.config.max_new_tokens}


def selecting_plan(config: TrainConfig) -> Selecting | None:
    """The plan of --select-by's answers; None under --select-by val_loss."""
    if config.select_by == "val_loss":
        return None
    _, processor = config_and_processor(config.model)
    configure_processor(processor, config)
    return Selecting(config, processor, load_splits(**data_settings(config))["validation"])


def answered_prompt(processor: ProcessorMixin, widest: dict, rows: int, new_tokens: int) -> dict[str, torch.Tensor]:
    """`rows` copies of the `widest` row's prompt, as engine/greedy.py batches them, with `new_tokens` tokens after
    it (text: the prompt's last token again stands for each)."""
    prompt = dict(prompt_batch(processor, [widest] * rows))
    answer = prompt["input_ids"][:, -1:].expand(-1, new_tokens)
    prompt["input_ids"] = torch.cat([prompt["input_ids"], answer], dim=1)
    prompt["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(answer)], dim=1)
    return prompt


@functools.cache
def judge_peak(spec: str, dtype: torch.dtype, gpu: bool, count: int, tokens: int) -> int:
    """The judge `spec` in `dtype` embedding `count` texts of `tokens` tokens: the same for many runs' plans, so
    planned once a process (bench/original_runs.py plans ten)."""
    return traced_peak(lambda: fake_model(spec, dtype, text_only=True), embed, texts(count, tokens), gpu)


def traced_peak(load: Callable[[], PreTrainedModel], run: Callable[[PreTrainedModel, dict], object],
                inputs: dict[str, torch.Tensor], gpu: bool) -> int:
    """The most a rank holds while `load()`'s model (counted from its first weight) does `run(model, inputs)`,
    the inputs copied to the device. (From the model loaded on: the plan reads each fake weight in fp32 first,
    where a checkpoint is read in its own dtype.)"""
    with FakeTensorMode(allow_non_fake_inputs=True), RealShapes(), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()), MemoryTrace(CUDA_BLOCK if gpu else 1) as trace:
        model = load()  # (stdout: apply_approach's count line)
        trace.at_peak_of(lambda: 0)
        run(model, {key: value.clone() for key, value in inputs.items()})
        return trace.peak


def texts(count: int, tokens: int) -> dict[str, torch.Tensor]:
    """`count` texts of `tokens` tokens (any text tokens). Batched texts of different lengths are padded: one
    pad makes the attention mask a real one, which attention expands."""
    mask = torch.ones(count, tokens, dtype=torch.long)
    if count > 1:
        mask[-1, -1] = 0
    return {"input_ids": mask.clone(), "attention_mask": mask}


def fake_model(spec: str, dtype: torch.dtype, *, text_only: bool = False) -> nn.Module:
    """The whole model `spec` names as evaluation loads it (models.load: sdpa attention), or as a judge its
    text decoder alone (models/lazy.py), its weights fake tensors in `dtype`."""
    model, _ = build_on_meta(spec, dtype)
    part = model.get_decoder() if text_only else model
    materialize(model, part, lambda name, start, stop: torch.empty(stop - start), CPU)
    return part.eval()


def answer(model: PreTrainedModel, prompt: dict[str, torch.Tensor]) -> tuple:
    """generate's prefill over the whole answer: the KV cache at its full length, the last position's logits;
    then what a decoding step holds beside them (transformers' `_sample`, with the ban list of eval/generate.py):
    their copy in fp32, the ban's bias as wide and a vocabulary-wide one, the biased scores and the last step's."""
    output = model(**prompt, use_cache=True, logits_to_keep=1)
    scores = output.logits[:, -1].to(copy=True, dtype=torch.float32)
    return output, scores, [torch.zeros_like(scores) for _ in range(3)], torch.zeros_like(scores[0])


def embed(model: PreTrainedModel, texts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A judge's embeddings of `texts`: the text model's last hidden state, mean-pooled in fp32 over the
    real tokens (eval/score.py)."""
    hidden = model.get_decoder()(**texts, use_cache=False).last_hidden_state.float()
    weights = texts["attention_mask"].unsqueeze(-1).float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
