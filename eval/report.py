"""`python run.py report RUN_DIR...`: what it reads of each run, the folder it writes, and the markdown table
comparing the runs, with the original's published scores beside them where the runs were tested on MuseQuest.

A run folder gives `summary.json` (written by training), `config.json`, and `eval/results.json` and
`results.csv` (written by evaluation, if it ran); each is checked whole as it is read, so a damaged one is
one sentence. The reference rows are the averages in the last row of each of the original project's
result files (eval/seed_results/, CC0, shipped with the package): Idefics2-8B on MuseQuest's test split,
scored by each fine-tuned model itself (`--scorer self`), so they compare with our `self` scores only.
"""

import collections
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.outputs.folder import run_config
from engine.outputs.publish import temporary
from errors import UsageError
from eval.answers_table import NAMES
from eval.bootstrap import mean_interval
from eval.metrics import set_metrics
from eval.results_csv import SCORE_METRIC, metric_values, read_results

MARK = "museft-report.json"  # written first into every report folder: what makes a folder a report of ours

# (approach, hardware, score before training, score after) of the original's seed_results files.
ORIGINAL = [
    ("lora", "1x A6000 48G", 0.596, 0.037),
    ("qlora", "1x A5000 24G", 0.593, 0.042),
    ("qlora", "1x A4000 16G", 0.592, 0.036),
    ("lora_ddp", "2x A6000 48G", 0.596, 0.039),
    ("lora_ddp", "4x A6000 48G", 0.596, 0.042),
    ("full", "1x A100 80G", 0.595, 0.031),
    ("full_mp", "2x A6000 48G", 0.596, 0.029),
    ("full_mp", "4x A5000 24G", 0.596, 0.028),
    ("full_fsdp", "2x A100 80G", 0.595, 0.025),
    ("full_fsdp", "4x A6000 48G", 0.596, 0.030),
    ("GPT-4o (no fine-tuning)", "API", None, 0.323),
]
ANSWERS = "Answers (1 is best; a mean rank 1), with 95% intervals over the test rows:"  # the second table's title
REPORTED = ("token_f1", "rouge_l", "chrf", "item_named", "retrieval_top1", "retrieval_mean_rank", "distinct_answers")
ROW_KEY = ("data_id", "image_name", "user_question", "ground_truth_answer")  # what makes two runs' rows one row
COLUMNS = ("run", "approach", "ranks", "score before → after (scorer)", "train time", "peak memory per rank",
           "trainable parameters")


SUMMARY = {"approach": str, "world_size": int, "wall_time_s": (int, float), "trainable_params": int,
           "total_params": int, "ranks": list, "history": dict}  # what the report reads of summary.json
CONFIG_FIELDS = {"dataset": str}
RESULTS = {"score": (int, float), "scorer": str}  # of eval/results.json
RANK = {"rank": int, "peak_memory_bytes": (int, float)}  # of each of summary.json's ranks


@dataclass
class Run:
    """A run folder as the report reads it: every file checked whole when it is read."""

    folder: Path
    name: str  # the shortest end of its path that no other run of the report shares
    summary: dict
    config: dict
    scores: dict | None  # eval/results.json; None when evaluation did not run
    rows: list[dict]  # eval/results.csv's records, in its order

    @property
    def stopped(self) -> str:
        """"" for a finished run, else where it stopped ("stopped at step 1 of 3")."""
        if self.summary.get("completed", True):
            return ""
        return f"stopped at step {self.summary.get('steps', '?')} of {self.summary.get('total_steps', '?')}"


def read_runs(folders: list[Path]) -> list[Run]:
    names = distinct_names(folders)
    runs = []
    for folder, name in zip(folders, names, strict=True):
        summary = read_json(folder, "summary.json", SUMMARY)
        for rank in summary["ranks"]:
            check_fields(folder / "summary.json", rank, RANK)
        evaluated = (folder / "eval" / "results.json").exists()
        scores = read_json(folder, "eval/results.json", RESULTS) if evaluated else None
        rows = read_results(folder / "eval" / "results.csv") if scores is not None else []
        runs.append(Run(folder, name, summary, read_json(folder, "config.json", CONFIG_FIELDS), scores, rows))
    return runs


def read_json(folder: Path, name: str, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """A JSON object a run wrote, with `fields` of their types; a missing or damaged file is one sentence."""
    path = folder / name
    if not path.is_file():
        raise UsageError(f"{folder} is not a finished run: it has no {name}.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON and bytes that are no UTF-8
        raise UsageError(f"cannot read {path}: {error}; the file is damaged (cut short?).") from error
    return check_fields(path, value, fields)


def check_fields(path: Path, value: object, fields: dict[str, type | tuple[type, ...]]) -> dict:
    if not isinstance(value, dict):
        raise UsageError(f"{path} is damaged: it holds a {type(value).__name__}, not the object a run writes.")
    for key, kind in fields.items():
        if not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
            raise UsageError(f"{path} is damaged: its {key!r} is missing or not what a run writes.")
    return value


def distinct_names(folders: list[Path]) -> list[str]:
    """Each folder's name, or as many of its path's last parts as it takes for no two runs to share one."""
    parts = [folder.resolve().parts for folder in folders]
    for count in range(1, max(map(len, parts)) + 1):
        names = ["/".join(part[-count:]) for part in parts]
        if len(set(names)) == len(names):
            return names
    raise UsageError(f"{folders[0]} is given twice; give each run once.")


def matched_rows(tables: list[list[dict]]) -> list[list[dict | None]]:
    """The test rows of several runs' results (each run's records), each with every run's record of it (None where
    a run has none): a row is the same row in two runs when its id, picture, question and reference are (runs on
    different test sets share none), and a row that repeats within a run is kept as often as it repeats."""
    table: dict[tuple, list[dict | None]] = {}
    for number, records in enumerate(tables):
        seen = collections.Counter()
        for record in records:
            key = tuple(record.get(column) for column in ROW_KEY)
            seen[key] += 1
            table.setdefault((key, seen[key]), [None] * len(tables))[number] = record
    return list(table.values())


def run_row(run: Run) -> list[str]:
    """One table row from a run folder; the score cell is empty when evaluation did not run."""
    summary, scores = run.summary, run.scores
    score = ""
    if scores is not None:
        score = f"{_number(scores.get('baseline_score'))} → {_number(scores['score'])} ({scores['scorer']})"
    peak = max((rank["peak_memory_bytes"] for rank in summary["ranks"]), default=0)
    name = f"{run.name} ({run.stopped})" if run.stopped else run.name
    return [name, summary["approach"], str(summary["world_size"]), score, f"{summary['wall_time_s']:.0f} s",
            f"{peak / 2**30:.2f} GiB", f"{summary['trainable_params']:,} of {summary['total_params']:,}"]


def report(runs: list[Run]) -> str:
    """The markdown tables: these runs first, then the original's published rows where every run was tested on
    MuseQuest; then what the runs' answers say (answers_report)."""
    rows = [run_row(run) for run in runs]
    if all(run.config["dataset"] == "musequest" for run in runs):
        rows += [[f"original ({hardware})", approach, hardware.split("x")[0] if "x" in hardware else "—",
                  f"{_number(before)} → {_number(after)} (self)", "—", "—", "—"]
                 for approach, hardware, before, after in ORIGINAL]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    answers = answers_rows(runs)
    lines += [_markdown(row) for row in rows]
    if answers:
        lines += ["", ANSWERS, "", _markdown(answers[0]), "|" + "---|" * len(answers[0])]
        lines += [_markdown(row) for row in answers[1:]]
    return "\n".join(lines) + "\n"


def _markdown(row: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"


def answers_rows(runs: list[Run]) -> list[list[str]]:
    """The header, then each evaluated run's answer metrics (eval/metrics.py), each mean with its 95% bootstrap
    interval over the test rows where it is a mean of rows: from results.csv's columns, or, for a results file
    written before the metrics, the text metrics computed from its answers."""
    evaluated = [run for run in runs if run.scores is not None]
    rows = [["run", *(NAMES[name] for name in REPORTED)]] if evaluated else []
    for run in evaluated:
        per_row = metric_values(run.rows, run.folder / "eval" / "results.csv")
        per_row.pop(SCORE_METRIC, None)  # the first table's
        means = set_metrics(run.rows, per_row)
        cells = []
        for name in REPORTED:
            values = per_row.get("retrieval_rank" if name == "retrieval_mean_rank" else name)
            if name == "retrieval_top1" and "retrieval_rank" in per_row:
                values = [float(rank == 1) for rank in per_row["retrieval_rank"]]
            if name not in means:
                cells.append("—")
            elif values is None:
                cells.append(f"{means[name]:.3f}")
            else:
                _, low, high = mean_interval(values)
                cells.append(f"{means[name]:.3f} [{low:.3f}, {high:.3f}]")
        rows.append([run.name, *cells])
    return rows


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def start_report_folder(output: Path, runs: list[Path]) -> Path:
    """The temporary folder a report is written in before it replaces `output`, with its MARK written first.
    A report goes to a new or empty folder, or replaces an earlier report; it never writes into a run folder
    (whose --overwrite would then refuse the files it did not write) nor over a user's files."""
    for folder in (output.resolve(), *output.resolve().parents):
        if run_config(folder) is not None:
            raise UsageError(f"--output {output} is inside the run folder {folder}, and a report never writes into a "
                             f"run; choose another folder (the default is runs/report).")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder.")
    if output.is_dir() and any(output.iterdir()) and not (output / MARK).is_file():
        raise UsageError(f"--output {output} is not empty and holds no report (it has no {MARK}), so a report "
                         f"would replace files it did not write; choose another folder.")
    tmp = temporary(output)
    if tmp.is_symlink() or tmp.exists() and not (tmp / MARK).is_file():
        raise UsageError(f"--output {output}: {tmp} is in the way and is no report's; remove it or choose another "
                         f"folder.")
    if tmp.exists():  # an interrupted report's own
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / MARK).write_text(json.dumps({"runs": [str(run) for run in runs]}, indent=2))
    return tmp
