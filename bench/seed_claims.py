"""The original project's claims, with error bars: which of its differences between approaches are real?

    python bench/seed_claims.py      # prints the tables of docs/evaluation.md's "Which of the original's
                                     # differences are real" (about 10 s on one CPU core)

The original reported one mean score per run (eval/report.py ORIGINAL) over the same 74 test rows and read the
gaps between them as differences between approaches (LoRA 0.037 against QLoRA 0.042, FSDP 0.025 against full
0.031, ...). From its per-row files (eval/seed_results/, after fine-tuning), this prints each run's means with
their 95% bootstrap intervals (eval/bootstrap.py), then each comparison its write-up implies as eval/compare.py
makes it: the rows paired by id, picture, question and reference, B - A with its interval, and the verdict.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.bootstrap import mean_interval
from eval.compare import BETTER, compared, interval, paired_positions
from eval.results_csv import SCORE_METRIC, metric_values, read_results

SEED_RESULTS = Path(__file__).resolve().parent.parent / "eval" / "seed_results"
GPT4O = "GPT-4o (no fine-tuning)"
RUNS = {  # the original's runs, in its order, and the file of each one's answers after fine-tuning
    "LoRA, 1x A6000": "2.1_lora_finetuning_run_1_a6000_48g_x1__after_finetuning.csv",
    "QLoRA, 1x A5000": "2.2_qlora_finetuning_run_1_a5000_24g_x1__after_finetuning.csv",
    "QLoRA, 1x A4000": "2.2_qlora_finetuning_run_2_a4000_16g_x1__after_finetuning.csv",
    "LoRA + DDP, 2x A6000": "2.3_lora_finetuning_with_ddp_run_1_a6000_48g_x2__after_finetuning.csv",
    "LoRA + DDP, 4x A6000": "2.3_lora_finetuning_with_ddp_run_2_a6000_48g_x4__after_finetuning.csv",
    "full, 1x A100": "2.4_full_finetuning_run_1_a100_80g_x1__after_finetuning.csv",
    "full + MP, 2x A6000": "2.5_full_finetuning_with_mp_run_1_a6000_48g_x2__after_finetuning.csv",
    "full + MP, 4x A5000": "2.5_full_finetuning_with_mp_run_2_a5000_24g_x4__after_finetuning.csv",
    "full + FSDP, 2x A100": "2.6_full_finetuning_with_fsdp_run_1_a100_80g_x2__after_finetuning.csv",
    "full + FSDP, 4x A6000": "2.6_full_finetuning_with_fsdp_run_2_a6000_48g_x4__after_finetuning.csv",
    GPT4O: "openai_gpt4o.csv",
}
# The comparisons the original's write-up implies: each variant against the plain approach it extends (A, B).
CLAIMS = [("LoRA, 1x A6000", variant) for variant in ("QLoRA, 1x A5000", "QLoRA, 1x A4000", "LoRA + DDP, 2x A6000",
                                                       "LoRA + DDP, 4x A6000")] + \
         [("full, 1x A100", variant) for variant in ("full + MP, 2x A6000", "full + MP, 4x A5000",
                                                      "full + FSDP, 2x A100", "full + FSDP, 4x A6000")]
COMPARED = (SCORE_METRIC, "token_f1")  # the original's claim, and what the answers say


def claims() -> str:
    """The two markdown tables, each run's means then each comparison, with the lines that introduce them."""
    rows = {name: read_results(SEED_RESULTS / file) for name, file in RUNS.items()}
    values = {name: metric_values(records, SEED_RESULTS / RUNS[name]) for name, records in rows.items()}
    metrics = [name for name in BETTER if all(name in per_run for per_run in values.values())]
    lines = [f"Each run's mean over its {', '.join(sorted({str(len(records)) for records in rows.values()}))} test "
             f"rows, with its 95% interval (score: 1 − cosine, lower is better; the others higher):", "",
             "| run | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(interval(mean_interval(per_run[metric])) for metric in metrics) + " |"
              for name, per_run in values.items()]
    tuned = [name for name in RUNS if name != GPT4O]
    best = min(tuned, key=lambda name: sum(values[name][SCORE_METRIC]) / len(values[name][SCORE_METRIC]))
    lines += ["", "Each comparison, B − A over the rows both files hold, with its 95% interval and the verdict:", "",
              "| A | B | rows paired | " + " | ".join(f"{metric} B − A | verdict" for metric in COMPARED) + " |",
              "|---" * (3 + 2 * len(COMPARED)) + "|"]
    for a, b in [*CLAIMS, (best, GPT4O)]:
        pairs = paired_positions(rows[a], rows[b])
        cells = [compared(metric, values[a][metric], values[b][metric], pairs) for metric in COMPARED]
        lines.append(f"| {a} | {b} | {len(pairs)} | " +
                     " | ".join(f"{interval(cell.difference, signed=True)} | {cell.verdict}" for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(claims(), end="")
