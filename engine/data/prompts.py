"""A test row's prompt, as evaluation asks it and the planner measures it: the dialog up to its last
assistant turn, rendered by the chat template with the generation prompt ("Assistant:"), given the
images that come before that turn, as training saw it; left-padded, so every prompt ends in the last
column and the answer's tokens are the columns after it."""

import contextlib
from collections.abc import Iterator

from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from engine.data.sources import dialog_messages, image_entries, row_images


def prompt_batch(processor: ProcessorMixin, rows: list[dict]) -> BatchFeature:
    """Every row's prompt (its dialog before the last answer), left-padded to the longest."""
    prompts = [prompt_messages(row) for row in rows]
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in prompts]
    images = [row_images(row)[: image_entries(messages)] for row, messages in zip(rows, prompts, strict=True)]
    with _left_padding(processor.tokenizer):
        # The processor wants None, not a list of empty lists, when no prompt has an image.
        return processor(text=texts, images=images if any(images) else None, padding="longest", return_tensors="pt")


def question_and_reference(row: dict) -> tuple[str, str]:
    """The last question a row's dialog asks before its last answer, and that answer (the reference)."""
    messages = dialog_messages(row["dialog"])
    last = _last_answer_turn(messages)
    question = next((_text(m) for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return question, _text(messages[last])


def prompt_messages(row: dict) -> list[dict]:
    messages = dialog_messages(row["dialog"])
    return messages[: _last_answer_turn(messages)]


@contextlib.contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _last_answer_turn(messages: list[dict]) -> int:
    return max(turn for turn, message in enumerate(messages) if message["role"] == "assistant")


def _text(message: dict) -> str:
    # The chat template joins a turn's text parts with nothing between them.
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")
