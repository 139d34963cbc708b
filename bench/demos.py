"""The CPU demos, run as the docs write them, and their numbers in bench/RESULTS.md.

    python bench/demos.py        # about 10 minutes on 2 CPU cores; rewrites RESULTS.md's "The demos" part

Each demo is `python run.py` with the flags below, in a fresh folder, trained and evaluated (the test
split answered and scored against the references by the base model, 0 is best; docs/evaluation.md).
The first is the README's first command, read from the README; the LoRA lines are docs/approaches.md's.
The table gives what each run's summary.json holds, so every number of that part is this script's.
"""

import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from results_page import replace_part

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WIDTH = 100  # the prose's line length, as the rest of RESULTS.md
SECTION = "### The demos on this machine"  # RESULTS.md's part this script writes, up to the next "### "

LORA_8 = "--limit-exhibits 8 --lr 5e-3 --lora-target projections lm_head"
DEMOS = [  # (what it shows, flags)
    ("the README's first command: full fine-tuning, 2 exhibits, 40 epochs", None),
    ("LoRA with the first command's data and steps", "--limit-exhibits 2 --epochs 40 --lr 5e-3 --lora-target "
     "projections lm_head --final last"),
    ("LoRA on 8 exhibits (docs/approaches.md)", LORA_8),
    ("QLoRA on 8 exhibits (docs/approaches.md)", f"--approach qlora {LORA_8}"),
    ("LoRA on 8 exhibits, one epoch, fp32", f"{LORA_8} --epochs 1 --skip-eval --precision fp32"),
    ("LoRA on 8 exhibits, one epoch, bf16-mixed", f"{LORA_8} --epochs 1 --skip-eval --precision bf16-mixed"),
]


def readme_command() -> str:
    """The flags of `python run.py` in the README's first bash block, as tests/e2e/test_demo.py runs it."""
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    [line] = [line for line in block.splitlines() if "python run.py" in line]
    return line.split("python run.py", 1)[1].split("#", 1)[0].strip()


def run(flags: str, folder: Path) -> dict:
    """One demo's summary.json, and its wall time in all (training, export and evaluation)."""
    command = [sys.executable, str(ROOT / "run.py"), *shlex.split(flags), "--output-dir", str(folder / "out")]
    print(" ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((folder / "out" / "summary.json").read_text())
    return summary | {"all_s": time.perf_counter() - started}


def row(what: str, flags: str, summary: dict) -> str:
    history = summary["history"]
    train = [loss for _, loss in history["train_loss"]]
    val = [loss for _, loss in history["val_loss"]]
    scores = summary.get("eval")
    score = "not evaluated" if not scores else f"{scores['baseline_score']:.3f} → {scores['score']:.3f} " + \
        ("(better)" if scores["score"] < scores["baseline_score"] else "(worse)")
    peak = max(rank["peak_memory_bytes"] for rank in summary["ranks"]) / 2**30
    return (f"| {what} | `{flags}` | {summary['steps']} | {summary['mean_step_time_s']:.2f} | "
            f"{train[0]:.2f} → {train[-1]:.2f} | {val[0]:.2f} → {min(val):.2f} → {val[-1]:.2f} | {score} | "
            f"{peak:.2f} | {summary['wall_time_s']:.0f} / {summary['all_s']:.0f} |")


HOW = ("each demo as `python run.py FLAGS` in a fresh folder on the built-in tiny Idefics2 (4.4M random weights), "
       "evaluated on its test split (4 dialogs of 2 exhibits, 14 of 8; up to 512 new tokens), judged by the base "
       "model, 0 is best. Validation loss: first evaluation → lowest → last; peak memory: the process's resident "
       "set; time: training / the whole command, evaluation included.")
READING = ("A random 4.4M-parameter model memorises what it can: fully fine-tuned on 2 exhibits it learns their "
           "dialogs and tells the two apart by their (stand-in) pictures, which is why the first command trains "
           "every weight. Adapters on a frozen random base lower the validation loss by learning word frequencies, "
           "and greedy decoding then repeats the most frequent token (`,,,,`): whatever their score says, nothing "
           "here measures Idefics2-8B, where the original measured 0.596 → 0.037 (lora, self-scored).")


def section(rows: list[str], date: str) -> str:
    return "\n".join([f"{SECTION} (2 CPU cores, no GPU)", "", textwrap.fill(f"`python bench/demos.py`, {date}: {HOW}",
                                                                          WIDTH), "",
                      "| demo | flags | steps | s/step | train loss | validation loss | score before → after | "
                      "peak GiB | s |", "|---|---|---:|---:|---|---|---|---:|---|", *rows, "",
                      textwrap.fill(READING, WIDTH), ""])


def main() -> None:
    rows = []
    for what, flags in DEMOS:
        flags = flags or readme_command()
        with tempfile.TemporaryDirectory(prefix="museft-demo-") as folder:
            rows.append(row(what, flags, run(flags, Path(folder))))
        print(rows[-1], flush=True)
    replace_part(SECTION, section(rows, datetime.date.today().isoformat()))


if __name__ == "__main__":
    main()
