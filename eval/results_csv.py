"""Per-row results in the original MuseQuest layout, so our files and its seed_results compare row for row.

The original (Gefu-Xu/MuseQuest, `my_utils.py`, `batch_inference_model`) wrote them with pandas:
one row per test row (`data_id, item_name, image_name, user_question, model_generated_answer,
ground_truth_answer, semantic_similarity_score`), then a row whose `item_name` is
`average_semantic_similarity_score`, whose score is the mean rounded to 3 places, and whose other
cells are empty. pandas' `to_csv` is the csv module with "\\n" line ends and minimal quoting, which
is what we write, so an original file read and written back comes out byte for byte the same.
"""

import csv
from pathlib import Path

from engine.outputs.publish import write_file
from errors import UsageError

SCORE = "semantic_similarity_score"
AVERAGE = "average_semantic_similarity_score"
REQUIRED = ("item_name", "model_generated_answer", "ground_truth_answer")


def read_results(path: Path) -> list[dict[str, str]]:
    """The per-row records of a results CSV, every column kept, the average row left out; a missing, damaged
    (not UTF-8 text, a row cut short or too long) or empty file is one sentence."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            missing = [column for column in REQUIRED if column not in (reader.fieldnames or [])]
            if missing:
                raise UsageError(f"{path} lacks the column(s) {missing} that a results file needs.")
            rows = list(reader)
    except (OSError, ValueError, csv.Error) as error:  # ValueError: bytes that are no UTF-8
        raise UsageError(f"cannot read {path}: {error}.") from error
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():  # csv's marks of more cells than columns, and of fewer
            raise UsageError(f"{path} is damaged: its line {line} does not have one cell per column (cut short?).")
    records = [row for row in rows if row["item_name"] != AVERAGE]
    if not records:
        raise UsageError(f"{path} holds no rows of answers (only its header{' and average row' if rows else ''}).")
    return records


def average_score(scores: list[float]) -> float:
    """The run's score as the original reported it: the plain mean, rounded to 3 places."""
    return round(sum(scores) / len(scores), 3)


def write_results(path: Path, rows: list[dict], scores: list[float],
                  metrics: dict[str, list[float]] | None = None) -> None:
    """`rows` with `scores` as the score column (replacing any old one), then each of `metrics`' per-row columns
    (eval/metrics.py) after it, then the average row (every column's mean, the score's as the original rounded it).
    Without metrics, the original's layout exactly: an original file read and written back is the same file.

    Written beside `path` and renamed, so a crash never leaves a half-written results file.
    """
    metrics = metrics or {}
    if not rows or any(len(values) != len(rows) for values in (scores, *metrics.values())):
        raise ValueError(f"need one score per row and at least one row, got {len(scores)} for {len(rows)}")
    columns = [column for column in rows[0] if column != SCORE and column not in metrics] + [SCORE, *metrics]
    per_row = [{SCORE: score, **{name: _cell(values[i]) for name, values in metrics.items()}}
               for i, score in enumerate(scores)]
    average = {"item_name": AVERAGE, SCORE: average_score(scores),
               **{name: _cell(sum(values) / len(values)) for name, values in metrics.items()}}

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows({**row, **cells} for row, cells in zip(rows, per_row, strict=True))
            writer.writerow(average)

    write_file(Path(path), write)


def _cell(value: float) -> str:
    return f"{value:.4g}"
