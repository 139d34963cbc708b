"""Greedy answers to a split's rows, batched, for the similarity score.

Each prompt is the row's dialog up to its last assistant turn, left-padded (engine/data/prompts.py),
so the new tokens are the columns after it; only those are decoded (R7, R8). Decoding stops at `</s>` or
`<end_of_utterance>` and may never emit an image token, which only the processor may place: the stop
and ban lists of Idefics2-8B's generation_config.json, passed explicitly because a model built
from a bare config (or a saved fine-tune) may not carry them.
"""

import json
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

from engine.data.prompts import prompt_batch, question_and_reference

STOP_TOKENS = ["</s>", "<end_of_utterance>"]
IMAGE_TOKENS = ["<image>", "<fake_token_around_image>"]


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


def answer_rows(model: PreTrainedModel, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int,
                device: torch.device) -> list[str]:
    """Each row's answer: its new tokens, decoded without special tokens."""
    _, new_ids = generate_ids(model, processor, rows, max_new_tokens, device)
    return [answer.strip() for answer in processor.batch_decode(new_ids, skip_special_tokens=True)]


def question_row(images: list[Image.Image], question: str) -> dict:
    """Photos and one question as a test row holds them (`run.py ask`): the user's turn, the pictures
    before the text, in order, and the assistant's turn that the answer will be."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    dialog = {"messages": [{"role": "user", "content": content},
                           {"role": "assistant", "content": [{"type": "text", "text": ""}]}]}
    return {"dialog": json.dumps(dialog), "images": images}


@torch.no_grad()
def generate_ids(model: PreTrainedModel, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int,
                 device: torch.device) -> tuple[BatchFeature, torch.Tensor]:
    """The left-padded prompt batch, and the token ids generated after it (padded after a stop)."""
    inputs = prompt_batch(processor, rows).to(device)
    tokenizer = processor.tokenizer
    output = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(STOP_TOKENS),
        bad_words_ids=[[token] for token in tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)],
        pad_token_id=tokenizer.pad_token_id,
    )
    return inputs, output[:, inputs["input_ids"].shape[1] :]


def _record(row: dict, answer: str) -> dict:
    question, reference = question_and_reference(row)
    return {"data_id": row["data_id"], "item_name": row["item_name"], "image_name": row["image_name"],
            "user_question": question, "model_generated_answer": answer, "ground_truth_answer": reference}
