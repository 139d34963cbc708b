"""Greedy answers to a split's rows, batched, as records of the original's CSV columns, for the similarity score.

The decoding itself (prompts, stop and ban lists) is engine/greedy.py's, shared with the choice of the best
checkpoint by its answers (--select-by), so that a checkpoint is chosen by the answers it gives here.
"""

import json
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from engine.data.prompts import question_and_reference
from engine.greedy import answer_rows


def generate_answers(model: PreTrainedModel, processor: ProcessorMixin, rows: Sequence[dict], *,
                     batch_size: int = 4, max_new_tokens: int = 512, device: torch.device,
                     progress: Callable[[int], object] = lambda rows: None) -> list[dict]:
    """One record per row, keyed by the original's CSV columns: `data_id, item_name, image_name,
    user_question, model_generated_answer, ground_truth_answer`. `rows` may be a list or a Dataset;
    `progress` is told how many rows each batch answered."""
    records = []
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        answers = answer_rows(model, processor, batch, max_new_tokens, device)
        records += [_record(row, answer) for row, answer in zip(batch, answers, strict=True)]
        progress(len(batch))
    return records


def question_row(images: list[Image.Image], question: str) -> dict:
    """Photos and one question as a test row holds them (`run.py ask`): the user's turn, the pictures
    before the text, in order, and the assistant's turn that the answer will be."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    dialog = {"messages": [{"role": "user", "content": content},
                           {"role": "assistant", "content": [{"type": "text", "text": ""}]}]}
    return {"dialog": json.dumps(dialog), "images": images}


def _record(row: dict, answer: str) -> dict:
    question, reference = question_and_reference(row)
    return {"data_id": row["data_id"], "item_name": row["item_name"], "image_name": row["image_name"],
            "user_question": question, "model_generated_answer": answer, "ground_truth_answer": reference}
