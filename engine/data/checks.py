"""The checks on a loaded data set that need more than its text: every image decodes, and every row
fits the model. They run before the model loads, so bad data stops a run in seconds, not mid-run.

Rows are measured in tokens with the processor the run uses, rendered exactly as the collator
renders them (tests/unit/engine/test_data_checks.py holds the two to the same numbers). An Idefics2 processor
expands each image to a fixed run of tokens whatever its pixels, so its rows are measured from the
text alone, without reading a picture; any other processor (Idefics3's grid depends on the image
size) is given the rows' images.
"""

import io
import os
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError
from transformers import Idefics2Processor, ProcessorMixin

from engine.build import configure_processor
from engine.config import TrainConfig
from engine.data.sources import column, dialog_messages, image_column, image_entries, row_images
from errors import UsageError
from models.load import config_and_processor

CHUNK = 256  # rows rendered and tokenized at once
IMAGE_CHUNK = 64  # rows whose stored images are read at once (embedded photos take memory)


def check_data(splits: datasets.DatasetDict, config: TrainConfig, spec: str) -> str:
    """Refuse, in one sentence, a data set with an image that does not decode or a row the model cannot take;
    of one that passes, a line on its rows: their tokens and image tokens, as the collator makes them."""
    if config.dataset != "musequest":  # the built-in stand-in pictures are drawn, never read: always fine
        for name, split in splits.items():
            check_images(split, name)
    model_config, processor = config_and_processor(spec)
    configure_processor(processor, config)  # image splitting multiplies the image tokens
    for name, split in splits.items():
        check_special_tokens(split, name, processor)
    context = getattr(getattr(model_config, "text_config", model_config), "max_position_embeddings", None)
    check_lengths(splits, processor, config.max_length, context)
    return summary(splits, processor)


def summary(splits: datasets.DatasetDict, processor: ProcessorMixin) -> str:
    """'data: train 780 rows, validation 97, test 98; tokens per row 150 to 1021 (median 398), image tokens per row
    0 to 320 (median 64)': what the image size and splitting flags cost each row (cached: the check counted them)."""
    counts = [count for split in splits.values() for count in _row_counts(split, processor)]
    rows = ", ".join(f"{name} {len(split)}{' rows' if i == 0 else ''}"
                     for i, (name, split) in enumerate(splits.items()))

    def spread(values: list[int]) -> str:
        return f"{min(values)} to {max(values)} (median {statistics.median_low(values)})"

    return (f"data: {rows}; tokens per row {spread([tokens for tokens, _ in counts])}, image tokens per row "
            f"{spread([images for _, images in counts])}")


# --- images ----------------------------------------------------------------------------------


def check_images(split: datasets.Dataset, name: str) -> None:
    """Every image of the split present and decodable, each decoded once; the first bad one is named."""
    images = image_column(split.column_names)
    if images is None:
        return  # text-only rows: their dialogs were checked to hold no image part at load
    feature = split.features[images]
    if not isinstance(feature.feature if isinstance(feature, datasets.List) else feature, datasets.Image):
        raise UsageError(f"the {name!r} split's {images} column holds {feature}, not images.")
    table = split.with_format("arrow")
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        for start in range(0, len(split), IMAGE_CHUNK):
            chunk = table[start : start + IMAGE_CHUNK]
            stored, data_ids = chunk.column(images).to_pylist(), chunk.column("data_id").to_pylist()
            entries = [(offset, entry) for offset, row in enumerate(stored)
                       for entry in (row or [] if images == "images" else [row])]
            for (offset, _), problem in zip(entries, pool.map(image_problem, [e for _, e in entries]), strict=True):
                if problem:
                    raise UsageError(f"row {start + offset} (data_id={data_ids[offset]}) of the {name!r} split: "
                                     f"{problem}.")


def image_problem(entry: dict | None) -> str | None:
    """What is wrong with an Image feature's stored value ({"bytes", "path"}), or None."""
    if entry is None:
        return None  # a row without an image: its dialog was checked against that at load
    data, path = entry.get("bytes"), entry.get("path")
    where = f"its image {path!r}" if path else "its image"
    if data is None:
        if not path:
            return "its image has neither bytes nor a path"
        if "://" in path:  # a remote file: let datasets fetch and decode it as training would
            try:
                datasets.Image().decode_example(entry)
            except Exception as error:  # noqa: BLE001 -- whatever stops the decoding stops training
                return f"{where} cannot be read ({_reason(error)})"
            return None
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            return f"{where} does not exist"
        except OSError as error:
            return f"{where} cannot be read ({_reason(error)})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # the file's structure and checksums
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # every pixel: a truncated file fails here
    except UnidentifiedImageError:
        return f"{where} is not an image file Pillow can read ({len(data)} bytes)"
    except Exception as error:  # noqa: BLE001 -- corrupt files raise all kinds (OSError, SyntaxError, struct.error)
        return f"{where} is damaged and cannot be decoded ({_reason(error)})"
    return None


def _reason(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- text ------------------------------------------------------------------------------------


def special_token_in(text: str, processor: ProcessorMixin) -> str | None:
    """The first of the tokenizer's added tokens (`<image>`, `<end_of_utterance>`, Idefics3's `<global-img>`,
    `</s>`, ...) that `text` holds literally, or None. The tokenizer reads such text as the token itself: an
    `<image>` in a question asks for a picture the row does not have, an end-of-turn ends the turn."""
    found = _special_tokens(processor.tokenizer).search(text)
    return found[0] if found else None


def check_special_tokens(split: datasets.Dataset, name: str, processor: ProcessorMixin) -> None:
    for start in range(0, len(split), CHUNK):
        indices = range(start, min(start + CHUNK, len(split)))
        for index, messages in zip(indices, _dialogs(split, indices), strict=True):
            for text in (part["text"] for message in messages for part in message["content"] if part["type"] == "text"):
                token = special_token_in(text, processor)
                if token:
                    raise UsageError(f"{_where({name: split}, name, index)}: its text holds {token!r}, which the "
                                     f"tokenizer reads as one of the model's special tokens; remove or reword it.")


_PATTERNS: dict[tuple[str, ...], re.Pattern] = {}


def _special_tokens(tokenizer) -> re.Pattern:
    tokens = tuple(sorted(tokenizer.get_added_vocab(), key=len, reverse=True))  # the longest first
    if tokens not in _PATTERNS:
        _PATTERNS[tokens] = re.compile("|".join(map(re.escape, tokens)) or r"(?!)")  # (?!): no tokens, no match
    return _PATTERNS[tokens]


# --- lengths ---------------------------------------------------------------------------------


def check_lengths(splits: datasets.DatasetDict, processor: ProcessorMixin, max_length: int | None,
                  context: int | None) -> None:
    """Every row fits: without `max_length`, within the model's `context`; with it, it keeps at least one
    answer token after the cut (as the collator requires) and is cut to no more than `context`."""
    if max_length is None and context is None:
        return
    limit = min(max_length or context, context or max_length)
    rows = [(name, index, length) for name, split in splits.items()
            for index, length in enumerate(row_lengths(split, processor))]
    over = [row for row in rows if row[2] > limit]
    if not over:
        return
    name, index, length = max(over, key=lambda row: row[2])
    where = _where(splits, name, index)
    many, need = (f"{len(over)} rows", "need") if len(over) > 1 else ("1 row", "needs")
    if max_length is not None and context is not None and max_length > context:
        raise UsageError(f"--max-length {max_length} is more than the model's context of {context} tokens, and "
                         f"{many} {need} more than {context} (the longest, {where}, {length}); use --max-length "
                         f"{context} or less.")
    cut = []  # (tokens before the last answer, split, row) of every row the cut shortens
    for name, split in splits.items():
        indices = [index for row_split, index, _ in over if row_split == name]
        starts = answer_starts(split, indices, processor)
        cut += [(start, name, index) for index, start in zip(indices, starts, strict=True)]
    start, name, index = max(cut, key=lambda row: row[0])
    if start >= limit:  # the collator would refuse this row mid-run: no answer token is left after the cut
        within = (f"--max-length {max_length}; use --max-length {start + 1} or more" if limit == max_length else
                  f"the model's context of {context} tokens; shorten that row's prompt")
        raise UsageError(f"{_where(splits, name, index)}: its prompt and image tokens need {start} tokens before its "
                         f"last answer, leaving no room for the answer within {within}.")
    if max_length is None:
        raise UsageError(f"{many} of the data set {need} more tokens than the model's context of {context} "
                         f"(max_position_embeddings), the longest being {where} with {length} tokens; pass "
                         f"--max-length {context} to cut the answers that do not fit.")


_COUNTS: dict[tuple, list[tuple[int, int]]] = {}  # this process's row counts, the last few, by split and processor


def row_lengths(split: datasets.Dataset, processor: ProcessorMixin) -> list[int]:
    """Each row's token count as the collator makes it (its unpadded length, before any --max-length cut)."""
    return [tokens for tokens, _ in _row_counts(split, processor)]


def _row_counts(split: datasets.Dataset, processor: ProcessorMixin) -> list[tuple[int, int]]:
    """Each row's (tokens, image tokens), counted once per process for a split and a processor alike (the
    planner's widest row, the data checks and their summary)."""
    key = (split._fingerprint, type(processor).__name__, processor.tokenizer.name_or_path, len(processor.tokenizer),
           processor.image_processor.to_json_string(), processor.chat_template)
    if key not in _COUNTS:
        if len(_COUNTS) >= 4:
            del _COUNTS[next(iter(_COUNTS))]
        _COUNTS[key] = _count_rows(split, processor)
    return _COUNTS[key]


def _count_rows(split: datasets.Dataset, processor: ProcessorMixin) -> list[tuple[int, int]]:
    counts = []
    for start in range(0, len(split), CHUNK):
        indices = range(start, min(start + CHUNK, len(split)))
        texts = [processor.apply_chat_template(messages) for messages in _dialogs(split, indices)]
        counts += _token_counts(processor, texts, split, indices, [None] * len(texts))
    return counts


def answer_starts(split: datasets.Dataset, indices: list[int], processor: ProcessorMixin) -> list[int]:
    """Where each row's last answer starts, in tokens: a --max-length cut must leave that answer a token."""
    starts = []
    for chunk in range(0, len(indices), CHUNK):
        rows = indices[chunk : chunk + CHUNK]
        dialogs = [messages[: max(t for t, m in enumerate(messages) if m["role"] == "assistant")]
                   for messages in _dialogs(split, rows)]  # up to the last answer
        texts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in dialogs]
        starts += [tokens for tokens, _ in
                   _token_counts(processor, texts, split, rows, [image_entries(messages) for messages in dialogs])]
    return starts


def _token_counts(processor: ProcessorMixin, texts: list[str], split: datasets.Dataset, indices,
                  image_counts: list[int | None]) -> list[tuple[int, int]]:
    """(tokens, image tokens) of each text with the images of its row (the first `image_counts` of them; None:
    all)."""
    if isinstance(processor, Idefics2Processor):  # image tokens do not depend on the pixels
        rows = processor(text=texts)["input_ids"]
    else:
        rows = []
        for text, index, count in zip(texts, indices, image_counts, strict=True):
            images = row_images(split[index])[:count]
            rows.append(processor(text=[text], images=[images] if images else None)["input_ids"][0])
    return [(len(ids), sum(token == processor.image_token_id for token in ids)) for ids in rows]  # not grid tokens


def _dialogs(split: datasets.Dataset, indices) -> list[list[dict]]:
    return [dialog_messages(dialog) for dialog in column(split, "dialog", list(indices))]


def _where(splits: datasets.DatasetDict, name: str, index: int) -> str:
    return f"row {index} (data_id={column(splits[name], 'data_id', [index])[0]}) of the {name!r} split"

