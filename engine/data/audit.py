"""`run.py data`: what the model will be taught, before any GPU time.

Every row goes through the training collator (engine/data/collate.py), in batches as training
makes them, so what is counted is what trains: a row's tokens, the tokens that carry loss (every
answer and its end of turn), and its image tokens against what the processor's crops imply (crops
times the image tokens a crop takes), which must agree or the model refuses the batch. `--max-length`
is applied by the collator itself, row by row, to the rows longer than it: its own sentence names a
row it would refuse.
"""

import statistics
from typing import Any

import datasets
import torch
from transformers import ProcessorMixin

from engine.data.collate import Collator
from engine.data.sources import row_images
from engine.loss import IGNORE
from errors import UsageError

ROWS_AT_ONCE = 16
IMAGE_TOKEN = "<image>"


def audit(splits: datasets.DatasetDict, processor: ProcessorMixin, max_length: int | None) -> dict[str, Any]:
    """Per split: rows, images, tokens per row (min, median, max and a histogram), answer and image tokens; the
    longest row; and what `max_length` cuts and refuses."""
    counts = {name: row_counts(split, processor) for name, split in splits.items()}
    report: dict[str, Any] = {"splits": {name: _summary(rows) for name, rows in counts.items()}}
    name, index = max(((name, i) for name, rows in counts.items() for i in range(len(rows))),
                      key=lambda place: counts[place[0]][place[1]]["tokens"])
    report["longest"] = {"split": name, "row": index, "data_id": str(splits[name][index]["data_id"]),
                         **counts[name][index]}
    mismatched = [(name, i) for name, rows in counts.items() for i, row in enumerate(rows)
                  if row["image_tokens"] != row["implied_image_tokens"]]
    report["image_token_mismatches"] = [{"split": name, "row": i} for name, i in mismatched]
    if max_length is not None:
        report["max_length"] = _cut_by(max_length, splits, counts, processor)
    return report


def row_counts(split: datasets.Dataset, processor: ProcessorMixin) -> list[dict[str, int]]:
    """Each row's tokens, loss tokens, images, image tokens and the image tokens its crops imply."""
    collate, image_id = Collator(processor), processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_crop = processor.image_seq_len
    counts = []
    for start in range(0, len(split), ROWS_AT_ONCE):
        rows = [split[i] for i in range(start, min(start + ROWS_AT_ONCE, len(split)))]
        batch = collate(rows)
        crops = _crops(batch, len(rows))
        for r, row in enumerate(rows):
            real = batch["attention_mask"][r].bool()
            counts.append({"tokens": int(real.sum()), "answer_tokens": int((batch["labels"][r] != IGNORE).sum()),
                           "images": len(row_images(row)),
                           "image_tokens": int((batch["input_ids"][r][real] == image_id).sum()),
                           "implied_image_tokens": crops[r] * per_crop})
    return counts


def _crops(batch: dict[str, torch.Tensor], rows: int) -> list[int]:
    """Each row's real crops (padding crops, which fill a batch's rows to one count, have an empty mask)."""
    if "pixel_values" not in batch:
        return [0] * rows
    if "pixel_attention_mask" in batch:
        return batch["pixel_attention_mask"].flatten(2).any(dim=2).sum(dim=1).tolist()
    return batch["pixel_values"].flatten(2).any(dim=2).sum(dim=1).tolist()


def _summary(rows: list[dict[str, int]]) -> dict[str, Any]:
    tokens = [row["tokens"] for row in rows]
    return {"rows": len(rows), "images": sum(row["images"] for row in rows),
            "text_only_rows": sum(row["images"] == 0 for row in rows),
            "tokens": {"min": min(tokens), "median": statistics.median(tokens), "max": max(tokens),
                       "histogram": histogram(tokens)},
            "answer_tokens": sum(row["answer_tokens"] for row in rows),
            "image_tokens": sum(row["image_tokens"] for row in rows)}


def histogram(values: list[int]) -> list[list[int]]:
    """[low, high, count] for bins between powers of two, from the smallest value's to the largest's: the sizes
    --max-length is usually chosen from."""
    low, bins = 1, []
    while low * 2 <= min(values):
        low *= 2
    while low <= max(values):
        bins.append([low, 2 * low - 1, sum(low <= value < 2 * low for value in values)])
        low *= 2
    return bins


def _cut_by(max_length: int, splits: datasets.DatasetDict, counts: dict[str, list[dict[str, int]]],
            processor: ProcessorMixin) -> dict[str, Any]:
    """Rows longer than `max_length`: the answer tokens the collator's cut drops, and the rows it refuses (its
    own sentence)."""
    collate = Collator(processor, max_length)
    cut, lost, refused = 0, 0, []
    for name, rows in counts.items():
        for index, row in enumerate(rows):
            if row["tokens"] <= max_length:
                continue
            try:
                kept = collate([splits[name][index]])
            except UsageError as refusal:
                refused.append({"split": name, "row": index, "why": str(refusal)})
                continue
            cut += 1
            lost += row["answer_tokens"] - int((kept["labels"][0] != IGNORE).sum())
    return {"max_length": max_length, "rows_cut": cut, "answer_tokens_lost": lost, "rows_refused": refused}


def shown_row(row: dict, processor: ProcessorMixin, colour: bool) -> str:
    """The row as the model reads it: its chat rendered, a run of image tokens shortened to `<image>×N`, and the
    tokens that carry loss in green (or between [[ and ]] when not on a terminal)."""
    batch = Collator(processor)([row])
    real = batch["attention_mask"][0].bool()
    ids, learnt = batch["input_ids"][0][real].tolist(), (batch["labels"][0][real] != IGNORE).tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    opening, closing = ("\033[1;32m", "\033[0m") if colour else ("[[", "]]")
    pieces, start = [], 0
    while start < len(ids):
        end = start + 1
        while end < len(ids) and learnt[end] == learnt[start] and (ids[end] == image_id) == (ids[start] == image_id):
            end += 1
        if ids[start] == image_id:
            text = f"{IMAGE_TOKEN}×{end - start}"
        else:
            text = processor.tokenizer.decode(ids[start:end])
        pieces.append(f"{opening}{text}{closing}" if learnt[start] else text)
        start = end
    return "".join(pieces)


def describe(report: dict[str, Any], source: str) -> str:
    """The report as a few lines for a terminal."""
    lines = [f"data: {source}",
             f"{'split':<11} {'rows':>6} {'images':>7} {'text-only':>9}  {'tokens/row min / median / max':>30}  "
             f"{'answer tokens':>13}  {'image tokens':>12}"]
    for name, split in report["splits"].items():
        tokens = split["tokens"]
        spread = f"{tokens['min']} / {tokens['median']:g} / {tokens['max']}"
        lines.append(f"{name:<11} {split['rows']:>6} {split['images']:>7} {split['text_only_rows']:>9}  "
                     f"{spread:>30}  {split['answer_tokens']:>13,}  {split['image_tokens']:>12,}")
    train = report["splits"]["train"]["tokens"]["histogram"]
    widest = max(count for *_, count in train) or 1
    lines.append("tokens per row, train split:")
    lines += [f"  {low:>6} - {high:<6} {'█' * round(30 * count / widest):<30} {count}" for low, high, count in train]
    longest = report["longest"]
    lines.append(f"longest row: row {longest['row']} (data_id={longest['data_id']}) of the {longest['split']!r} "
                 f"split, {longest['tokens']} tokens ({longest['image_tokens']} image tokens for "
                 f"{longest['images']} image(s), {longest['answer_tokens']} carrying loss)")
    if report["image_token_mismatches"]:
        first = report["image_token_mismatches"][0]
        lines.append(f"image tokens differ from what the crops imply in {len(report['image_token_mismatches'])} "
                     f"row(s), the first row {first['row']} of the {first['split']!r} split")
    cut = report.get("max_length")
    if cut:
        lines.append(f"--max-length {cut['max_length']}: {cut['rows_cut']} row(s) cut, {cut['answer_tokens_lost']} "
                     f"answer tokens lost, {len(cut['rows_refused'])} row(s) refused")
        lines += [f"  refused: {refusal['why']}" for refusal in cut["rows_refused"][:5]]
    return "\n".join(lines)
