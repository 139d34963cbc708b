"""Greedy answers to a split's rows, batched, for the similarity score.

Each prompt is the dialog up to its last assistant turn, rendered by the chat template with the
generation prompt ("Assistant:") and given the images that come before that turn, as training saw
it. Prompts are left-padded, so every row's prompt ends in the last column and the new tokens are
the columns after it; only those are decoded (R7, R8). Decoding stops at `</s>` or
`<end_of_utterance>` and may never emit an image token, which only the processor may place: the stop
and ban lists of Idefics2-8B's generation_config.json, passed explicitly because a model built
from a bare config (or a saved fine-tune) may not carry them.
"""

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from engine.data_sources import image_entries

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
        records += [_record(row, answer) for row, answer in zip(batch, answers)]
        progress(len(batch))
    return records


def answer_rows(model: PreTrainedModel, processor: ProcessorMixin, rows: list[dict], max_new_tokens: int,
                device: torch.device) -> list[str]:
    """Each row's answer: its new tokens, decoded without special tokens."""
    _, new_ids = generate_ids(model, processor, rows, max_new_tokens, device)
    return [answer.strip() for answer in processor.batch_decode(new_ids, skip_special_tokens=True)]


def question_row(image: Image.Image, question: str) -> dict:
    """One photo and one question as a test row holds them (`run.py ask`): the user's turn, the picture
    before the text, and the assistant's turn that the answer will be."""
    dialog = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                           {"role": "assistant", "content": [{"type": "text", "text": ""}]}]}
    return {"dialog": json.dumps(dialog), "image": image}


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


def prompt_batch(processor: ProcessorMixin, rows: list[dict]) -> BatchFeature:
    """Every row's prompt (its dialog before the last answer), left-padded to the longest."""
    prompts = [_prompt_messages(row) for row in rows]
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in prompts]
    images = [_row_images(row)[: image_entries(messages)] for row, messages in zip(rows, prompts)]
    with _left_padding(processor.tokenizer):
        # The processor wants None, not a list of empty lists, when no prompt has an image.
        return processor(text=texts, images=images if any(images) else None, padding="longest", return_tensors="pt")


@contextlib.contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _messages(row: dict) -> list[dict]:
    return json.loads(row["dialog"])["messages"]


def _last_answer_turn(messages: list[dict]) -> int:
    return max(turn for turn, message in enumerate(messages) if message["role"] == "assistant")


def _prompt_messages(row: dict) -> list[dict]:
    messages = _messages(row)
    return messages[: _last_answer_turn(messages)]


def _text(message: dict) -> str:
    # The chat template joins a turn's text parts with nothing between them.
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def _row_images(row: dict) -> list[Image.Image]:
    return [] if row.get("image") is None else [row["image"]]


def _record(row: dict, answer: str) -> dict:
    messages = _messages(row)
    last = _last_answer_turn(messages)
    question = next((_text(m) for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return {"data_id": row["data_id"], "item_name": row["item_name"], "image_name": row["image_name"],
            "user_question": question, "model_generated_answer": answer,
            "ground_truth_answer": _text(messages[last])}
