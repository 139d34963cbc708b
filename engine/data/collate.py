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
            _truncate(batch, lengths, [row_spans[-1][0] for row_spans in spans], self.max_length, rows, self.processor)
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


def _truncate(batch: dict, lengths: list[int], answer_starts: list[int], max_length: int, rows: list[dict],
              processor: ProcessorMixin) -> None:
    """Keep each row's first `max_length` tokens, which cuts its last answer from the end, but never part of a
    picture: a cut inside (or before) a picture's tokens (one in a question after the last answer) moves to where
    that picture starts, and its tiles are zeroed, which the model drops as padding. Rows cut shorter than
    `max_length` are padded on the left, as the processor pads."""
    width = batch["input_ids"].shape[1]
    kept, tiles = [], []  # per row: tokens kept, and the tiles of pixel_values they keep (None: all)
    for r, (row, length, start) in enumerate(zip(rows, lengths, answer_starts, strict=True)):
        end, row_tiles = (length, None) if length <= max_length else \
            _whole_pictures(batch["input_ids"][r, width - length :], max_length, row, processor)
        if start >= end:
            raise UsageError(f"row data_id={row.get('data_id')}: its prompt and image tokens need {start} tokens, "
                             f"leaving no room for the answer within max_length={max_length}.")
        kept.append(end)
        tiles.append(row_tiles)
    for key, fill in (("input_ids", processor.tokenizer.pad_token_id), ("attention_mask", 0), ("labels", IGNORE)):
        full = batch[key]
        cut = full.new_full((len(rows), max_length), fill)
        for r, (length, end) in enumerate(zip(lengths, kept, strict=True)):
            cut[r, max_length - end :] = full[r, width - length : width - length + end]
        batch[key] = cut
    for r, row_tiles in enumerate(tiles):
        for key in ("pixel_values", "pixel_attention_mask"):
            if row_tiles is not None and key in batch:
                batch[key][r, row_tiles:] = 0
    if "pixel_values" in batch and not (batch["input_ids"] == processor.image_token_id).any():
        del batch["pixel_values"]  # no picture left in the batch: the model takes none
        batch.pop("pixel_attention_mask", None)


def _whole_pictures(ids: torch.Tensor, max_length: int, row: dict, processor: ProcessorMixin) -> tuple[int, int | None]:
    """Where to cut one row's tokens `ids` at most `max_length` long without splitting a picture's run (its
    opening <fake_token_around_image> to its closing one), and how many tiles the kept pictures hold (None: the
    cut keeps every picture)."""
    seq_len, fake = processor.image_seq_len, processor.tokenizer.convert_tokens_to_ids(processor.fake_image_token)
    images = torch.nonzero(ids == processor.image_token_id).flatten().tolist()
    fakes = torch.nonzero(ids == fake).flatten().tolist()
    if not fakes or fakes[-1] < max_length:
        return max_length, None  # every picture ends before the cut (the common case: no image processing)
    tiles, previous_end = 0, 0
    for picture in row_images(row):
        count = len(processor.image_processor([[picture]])["pixel_values"][0])  # its crops or tiles and the whole
        first, last = images[tiles * seq_len], images[(tiles + count) * seq_len - 1]
        opening = max(f for f in fakes if f < first)
        end = min(f for f in fakes if f > last) + 1
        if end > max_length:
            # Adjacent Idefics2 pictures share one <fake_token_around_image>: the previous one keeps it.
            return min(max(opening, previous_end), max_length), tiles
        tiles, previous_end = tiles + count, end
    return max_length, None
