"""--select-by: the best checkpoint chosen by the answers it gives, not only by its validation loss.

At every evaluation point (engine/trainer.py) the model as it trains answers the first --select-rows rows of
the validation split -- the same rows each time, greedily, up to --max-new-tokens, by the decoding evaluation
uses (engine/greedy.py) -- and the chosen text metric of those answers is recorded in the checkpoint's meta
beside its validation loss; `checkpoint.best` then picks by it, in its direction (engine/config.py SELECT_BY).
The strategy answers (engine/strategies/: the rows shared over the ranks, every rank in step where a forward
is a collective); the metric is eval/metrics.py's, handed down by finetune.py, as the engine imports nothing
of eval/. The model answers in evaluation mode and goes back to training exactly as it was, and greedy
decoding draws no random number: every loss and weight of the run is what --select-by val_loss gives.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets
import torch.nn as nn
from transformers import ProcessorMixin

from engine.config import TrainConfig
from engine.data.prompts import prompt_messages, question_and_reference
from engine.data.sources import image_entries
from engine.strategies import STRATEGIES, Strategy
from errors import UsageError

# Records (item_name, model_generated_answer, ground_truth_answer) -> each text metric's mean over them.
Score = Callable[[list[dict]], dict[str, float]]


@dataclass(frozen=True)
class Selection:
    metric: str
    rows: list[dict]  # the first --select-rows validation rows: the same at every evaluation point
    score: Score
    max_new_tokens: int

    def measure(self, strategy: Strategy, processor: ProcessorMixin) -> float:
        """The metric of the model's answers to the rows, the same number on every rank."""
        with evaluating(strategy.parts):
            answers = strategy.answer(processor, self.rows, self.max_new_tokens)
        records = [{"item_name": row["item_name"], "model_generated_answer": answer,
                    "ground_truth_answer": question_and_reference(row)[1]}
                   for row, answer in zip(self.rows, answers, strict=True)]
        return self.score(records)[self.metric]


def selection_for(config: TrainConfig, validation: datasets.Dataset, score: Score | None) -> Selection | None:
    """The run's selection by answers; None under --select-by val_loss. Refuses, before the model loads, more
    --select-rows than the validation split has."""
    if config.select_by == "val_loss":
        return None
    if config.select_rows > len(validation):
        raise UsageError(f"--select-rows {config.select_rows} is more than the {len(validation)} rows of the "
                         f"validation split; give fewer, or --select-by val_loss.")
    rows = [validation[i] for i in range(config.select_rows)]
    if STRATEGIES[config.parallel].collective_forward and len({has_pictures(row) for row in rows}) > 1:
        # A prompt without pictures skips the vision tower, whose units the other ranks' prompts would gather.
        raise UsageError(f"--select-by {config.select_by} under --parallel {config.parallel} needs select rows that "
                         f"all have pictures or all have none, and the first {config.select_rows} validation rows "
                         "mix them; give another --select-rows, or --select-by val_loss.")
    if config.select_by == "item_named" and not all(row["item_name"] for row in rows):
        raise UsageError(f"--select-by item_named needs rows that name their item, and some of the first "
                         f"{config.select_rows} validation rows have no item_name; choose another --select-by.")
    if score is None:
        raise ValueError(f"--select-by {config.select_by} needs the text metrics: train(config, score)")
    return Selection(config.select_by, rows, score, config.max_new_tokens)


def has_pictures(row: dict) -> bool:
    """Whether the row's prompt holds a picture (pictures after its last question are not the prompt's)."""
    return image_entries(prompt_messages(row)) > 0


@contextlib.contextmanager
def evaluating(parts: list[nn.Module]) -> Iterator[None]:
    """Every module of `parts` in evaluation mode (dropout off), then each back in the mode it had."""
    modes = [(module, module.training) for part in parts for module in part.modules()]
    for part in parts:
        part.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode  # each module's own flag: train(mode) would set its children's too
