"""`run.py eval` and `run.py score`: answer the test split and score the answers, or re-score a results file.

Both write the original's per-row CSV layout (eval/results_csv.py) and a `results.json` beside it
with the mean score and which scorer gave it, which `run.py report` reads.
"""

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

import models
from engine.data_sources import load_splits
from engine.merge import load_merged
from eval.generate import generate_answers
from eval.results_csv import average_score, read_results, write_results
from eval.score import load_scorer, similarity_scores

RESULTS_CSV, RESULTS_JSON = "results.csv", "results.json"


def load_evaluated(model_spec: str, adapter: Path | None, device: torch.device) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model to evaluate: a Hugging Face id or folder, or an adapter folded into its base."""
    if adapter is not None:
        model, processor, _ = load_merged(adapter, model_spec, device)
    else:
        model, processor = models.load(model_spec, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    return model.eval(), processor


def score_rows(rows: list[dict], model: PreTrainedModel, processor: ProcessorMixin, scorer: str, base: str,
               device: torch.device) -> list[float]:
    """`--scorer self` scores as the original did (the evaluated model, one text at a time); a fixed
    judge (`base` or a folder) scores in fp32 batches with padding masked out, comparably across runs."""
    judge, tokenizer = load_scorer(scorer, model, processor.tokenizer, base, device)
    return similarity_scores(judge, tokenizer, [r["model_generated_answer"] for r in rows],
                             [r["ground_truth_answer"] for r in rows], batched=scorer != "self", device=device)


def evaluate_test_split(model: PreTrainedModel, processor: ProcessorMixin, dataset: str, limit_exhibits: int | None,
                        scorer: str, base: str, output: Path, device: torch.device, batch_size: int = 4,
                        max_new_tokens: int = 512) -> dict:
    """Generate answers for the test split, score them, write the CSV and results.json; returns the latter."""
    rows = generate_answers(model, processor, load_splits(dataset, limit_exhibits=limit_exhibits)["test"],
                            batch_size=batch_size, max_new_tokens=max_new_tokens, device=device)
    return write_scored(output, rows, score_rows(rows, model, processor, scorer, base, device), scorer)


def rescore_csv(csv_file: Path, model_spec: str, scorer: str, output: Path, device: torch.device) -> dict:
    """`run.py score`: new scores for any results file with the original's columns."""
    model, processor = load_evaluated(model_spec, None, device)
    rows = read_results(csv_file)
    scores = score_rows(rows, model, processor, scorer, model_spec, device)
    write_results(output, rows, scores)
    return {"score": average_score(scores), "scorer": scorer, "rows": len(rows)}


def write_scored(folder: Path, rows: list[dict], scores: list[float], scorer: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    write_results(folder / RESULTS_CSV, rows, scores)
    results = {"score": average_score(scores), "scorer": scorer, "rows": len(rows),
               "examples": [{k: r[k] for k in ("user_question", "model_generated_answer", "ground_truth_answer")}
                            for r in rows[:3]]}
    (folder / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    return results
