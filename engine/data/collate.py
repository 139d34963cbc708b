"""Turn data set rows into a left-padded batch whose labels cover the assistant's answers only.

Answer spans are found by running the processor on the chat template rendered up to each turn
boundary, with the images that precede it, so they follow whatever the template and the image
expansion (Idefics2's fixed count, Idefics3's per-image grid) produce. A boundary whose tokens
are not a prefix of the whole dialog's tokens is refused rather than guessed.
"""


import torch
from PIL import Image
from transformers import ProcessorMixin

from engine.data.sources import dialog_messages, dialog_problem, image_entries, row_images
from engine.loss import IGNORE
from errors import UsageError

Span = tuple[int, int]  # [start, end) token positions within one row's unpadded tokens


class Collator:
    """Rows (dicts with `image` and a `dialog` JSON string) -> model inputs plus `labels`."""

    def __init__(self, processor: ProcessorMixin, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        dialogs = [_checked_messages(row) for row in rows]
        images = [row_images(row) for row in rows]
        texts = [self.processor.apply_chat_template(messages) for messages in dialogs]
        # Left padding: batched generation appends to the right end of every row.
        batch = dict(self.processor(text=texts, images=_images_argument(images), padding="longest",
                                    padding_side="left", return_tensors="pt"))
        ids = batch["input_ids"]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        spans = [self._answer_spans(messages, pictures, ids[r, ids.shape[1] - lengths[r]:].tolist())
                 for r, (messages, pictures) in enumerate(zip(dialogs, images, strict=True))]
        labels = torch.full_like(ids, IGNORE)
        for r, row_spans in enumerate(spans):
            offset = ids.shape[1] - lengths[r]
            for start, end in row_spans:
                labels[r, offset + start : offset + end] = ids[r, offset + start : offset + end]
        batch["labels"] = labels
        if self.max_length is not None and ids.shape[1] > self.max_length:
            _truncate(batch, lengths, [row_spans[-1][0] for row_spans in spans], self.max_length, rows)
        return batch

    def _answer_spans(self, messages: list[dict], images: list[Image.Image], ids: list[int]) -> list[Span]:
        texts, text_images = [], []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # The answer starts after the generation prompt ("Assistant:") and ends with its
            # end-of-utterance token; the whitespace the template puts between turns is not learnt.
            texts.append(self.processor.apply_chat_template(messages[:turn], add_generation_prompt=True))
            texts.append(self.processor.apply_chat_template(messages[: turn + 1]).rstrip())
            text_images += [images[: image_entries(messages[:turn])], images[: image_entries(messages[: turn + 1])]]
        prefixes = self.processor(text=texts, images=_images_argument(text_images))["input_ids"]
        for prefix in prefixes:
            if ids[: len(prefix)] != prefix:
                raise ValueError("the chat template tokenizes a turn boundary differently from the whole dialog, "
                                 "so the assistant's answer cannot be located in the tokens")
        bounds = [len(prefix) for prefix in prefixes]
        return list(zip(bounds[::2], bounds[1::2], strict=True))


def _checked_messages(row: dict) -> list[dict]:
    problem = dialog_problem(row["dialog"], len(row_images(row)))
    if problem:
        raise UsageError(f"row data_id={row.get('data_id')}: {problem}.")
    return dialog_messages(row["dialog"])


def _images_argument(images: list[list[Image.Image]]) -> list[list[Image.Image]] | None:
    # The processor fails on a batch in which no text has an image (all lists empty); it wants None.
    return images if any(images) else None


def _truncate(batch: dict, lengths: list[int], answer_starts: list[int], max_length: int, rows: list[dict]) -> None:
    """Keep each row's first `max_length` tokens, which cuts its last answer from the end."""
    for row, length, start in zip(rows, lengths, answer_starts, strict=True):
        if length > max_length and start >= max_length:
            raise UsageError(f"row data_id={row.get('data_id')}: its prompt and image tokens need {start} tokens, "
                             f"leaving no room for the answer within max_length={max_length}.")
    width = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        full = batch[key]
        cut = full[:, width - max_length :].clone()  # rows that fit only lose left padding
        for r, length in enumerate(lengths):
            if length > max_length:
                cut[r] = full[r, width - length : width - length + max_length]
        batch[key] = cut
