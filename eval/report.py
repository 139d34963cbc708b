"""`python run.py report RUN_DIR...`: one markdown table comparing runs, with the original's published
scores beside them.

A run folder gives `summary.json` (written by training) and `eval/results.json` (written by
evaluation, if it ran). The reference rows are the averages in the last row of each of the
original project's result files (eval/seed_results/, CC0, shipped with the package): Idefics2-8B on
MuseQuest's test split, scored by each fine-tuned model itself (`--scorer self`), so they compare
with our `self` scores only.
"""

import json
from pathlib import Path

from errors import UsageError

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
COLUMNS = ("run", "approach", "ranks", "score before → after (scorer)", "train time", "peak memory per rank",
           "trainable parameters")


def read_run_file(folder: Path, name: str) -> dict:
    """One of the JSON files every finished run has (summary.json, config.json)."""
    try:
        return json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{folder} is not a finished run: cannot read its {name} ({error}).") from error


def read_scores(folder: Path) -> dict | None:
    """The run's eval/results.json (score, baseline_score, scorer), or None when evaluation did not run."""
    results = folder / "eval" / "results.json"
    return json.loads(results.read_text()) if results.exists() else None


def run_row(folder: Path) -> list[str]:
    """One table row from a run folder; the score cell is empty when evaluation did not run."""
    summary = read_run_file(folder, "summary.json")
    scores = read_scores(folder)
    score = ""
    if scores is not None:
        score = f"{_number(scores.get('baseline_score'))} → {_number(scores['score'])} ({scores['scorer']})"
    peak = max(rank["peak_memory_bytes"] for rank in summary["ranks"])
    return [folder.name, summary["approach"], str(summary["world_size"]), score, f"{summary['wall_time_s']:.0f} s",
            f"{peak / 2**30:.2f} GiB", f"{summary['trainable_params']:,} of {summary['total_params']:,}"]


def report(folders: list[Path]) -> str:
    """The markdown table: these runs first, then the original's published rows."""
    rows = [run_row(folder) for folder in folders]
    rows += [[f"original ({hardware})", approach, hardware.split("x")[0] if "x" in hardware else "—",
              f"{_number(before)} → {_number(after)} (self)", "—", "—", "—"]
             for approach, hardware, before, after in ORIGINAL]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"
