"""Per-row results in the original MuseQuest layout, so our files and its seed_results compare row for row.

The original (Gefu-Xu/MuseQuest, `my_utils.py`, `batch_inference_model`) wrote them with pandas:
one row per test row (`data_id, item_name, image_name, user_question, model_generated_answer,
ground_truth_answer, semantic_similarity_score`), then a row whose `item_name` is
`average_semantic_similarity_score`, whose score is the mean rounded to 3 places, and whose other
cells are empty. pandas' `to_csv` is the csv module with "\\n" line ends and minimal quoting, which
is what we write, so an original file read and written back comes out byte for byte the same.
Our files add eval/metrics.py's per-row columns after the score; `metric_values` reads every metric a file
gives, computing the text ones from the answers of a file that has none (the original's), for the report and
`run.py compare` alike.
"""

import csv
import math
from pathlib import Path

from engine.outputs.publish import write_file
from errors import UsageError
from eval.metrics import ROW_METRICS, text_metrics

SCORE = "semantic_similarity_score"
AVERAGE = "average_semantic_similarity_score"
REQUIRED = ("item_name", "model_generated_answer", "ground_truth_answer")
SCORE_METRIC = "score"  # SCORE's name as a metric (run.py compare --metric, the tables): 1 - cosine
COLUMNS = {SCORE_METRIC: SCORE, **{name: name for name in ROW_METRICS}}  # metric -> its column


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


def metric_values(rows: list[dict[str, str]], file: Path) -> dict[str, list[float]]:
    """Each metric the rows of `file` give, per row, in COLUMNS' order: the columns the file has, and the text
    metrics computed from the answers where it lacks them."""
    computed = text_metrics(rows) if any(column not in rows[0] for column in COLUMNS.values()) else {}
    values = {}
    for name, column in COLUMNS.items():
        if column in rows[0]:
            values[name] = [number(row, column, file) for row in rows]
        elif name in computed:
            values[name] = computed[name]
    return values


def number(row: dict[str, str], column: str, file: Path) -> float:
    try:
        value = float(row[column])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"{file}: the {column} of its row data_id={row['data_id']} is {row[column]!r}, not a "
                         f"finite number.")
    return value
