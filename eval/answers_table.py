"""What an evaluation leaves on the terminal: one line per test row, then the score line and the answers' metrics.

Each line holds the row's data_id, its score (before → after training when the baseline is known;
lower is better), and its question, reference and generated answer, each cut to its column, so a
line fits in `WIDTH` columns.
The whole texts are in results.csv; this is for reading the run at a glance.
"""

WIDTH = 120
GAP = "  "


def answers_table(rows: list[dict], scores: list[float], before: list[float] | None) -> str:
    """`rows` as generate_answers (or results.csv) gives them, with their scores; `before`, when
    known, the base model's scores of the same rows."""
    ids = [str(row["data_id"]) for row in rows]
    if before is None:
        title, cells = "score", [f"{score:.3f}" for score in scores]
    else:
        title, cells = "before → after", [f"{then:.3f} → {now:.3f}" for then, now in zip(before, scores, strict=True)]
    id_width, score_width = max(map(len, ["id", *ids])), max(map(len, [title, *cells]))
    text_width = WIDTH - id_width - score_width - 4 * len(GAP)
    question = text_width // 4  # questions are short; the answers are what is read
    reference = (text_width - question) // 2
    widths = (id_width, score_width, question, reference, text_width - question - reference)
    lines = [_line(("id", title, "question", "reference", "answer"), widths)]
    lines += [_line((data_id, cell, row["user_question"], row["ground_truth_answer"], row["model_generated_answer"]),
                    widths) for data_id, cell, row in zip(ids, cells, rows, strict=True)]
    return "\n".join(lines)


def score_line(results: dict) -> str:
    """`score: 0.596 before → 0.037 after (scorer: base, 4 rows; 0 is best)`, from results.json's fields;
    without a baseline (`run.py eval`), the score alone."""
    before = results.get("baseline_score")
    score = f"{results['score']:.3f}" if before is None else f"{before:.3f} before → {results['score']:.3f} after"
    return f"score: {score} (scorer: {results['scorer']}, {results['rows']} rows; 0 is best)"


NAMES = {"token_f1": "token F1", "rouge_l": "ROUGE-L", "chrf": "chrF", "item_named": "item named",
         "retrieval_top1": "retrieval top-1", "retrieval_mean_rank": "mean rank",
         "distinct_answers": "distinct answers"}


def metrics_line(results: dict) -> str:
    """`answers: token F1 0.120 → 0.452, ROUGE-L ..., mean rank 2.50 → 1.00, distinct answers 0.250 → 1.000 (1 is
    best, a mean rank 1)`: each metric of results.json, before → after training where the baseline has it."""
    before = results.get("baseline_metrics") or {}
    cells = []
    for name, label in NAMES.items():
        if name in results["metrics"]:
            now = f"{results['metrics'][name]:.3f}"
            cells.append(f"{label} {before[name]:.3f} → {now}" if name in before else f"{label} {now}")
    return f"answers: {', '.join(cells)} (1 is best, a mean rank 1)"


def _line(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return GAP.join(_cut(cell, width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def _cut(text: str, width: int) -> str:
    """`text` on one line, cut with an ellipsis if longer than `width`, padded to it otherwise."""
    flat = " ".join(text.split())
    return (flat[: width - 1] + "…" if len(flat) > width else flat).ljust(width)
