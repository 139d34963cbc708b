"""The issue's situation, through evaluation's own scoring (eval/evaluate.py's Scored, a judge's embeddings): one
fine-tuned answer given for photos of k different exhibits. Its cosine score looks like a gain over the untuned
model's answers, while the metrics that see content say it is right once in k."""

import torch

from eval.evaluate import Scored
from eval.results_csv import read_results
from eval.score import distances, pair_embeddings
from harness import SEED_RESULTS
from models.tiny import build_tiny

RUN = "2.4_full_finetuning_run_1_a100_80g_x1__{}_finetuning.csv"
ITEMS = 8


def scored(rows: list[dict], processor) -> Scored:
    answers, references = pair_embeddings(build_tiny(0).eval(), processor.tokenizer,
                                          [row["model_generated_answer"] for row in rows],
                                          [row["ground_truth_answer"] for row in rows], batched=True,
                                          device=torch.device("cpu"))
    return Scored.of(rows, distances(answers, references), answers, references)


def test_one_answer_for_every_exhibit_scores_well_by_cosine_and_is_caught_by_the_content_metrics(processor):
    tuned = list({row["item_name"]: row for row in reversed(read_results(SEED_RESULTS / RUN.format("after")))}
                 .values())[:ITEMS]  # one row for each of 8 exhibits
    before = {(row["data_id"], row["user_question"]): row for row in read_results(SEED_RESULTS / RUN.format("before"))}
    untuned = [before[row["data_id"], row["user_question"]] for row in tuned]  # the same rows before fine-tuning
    repeated = [dict(row, model_generated_answer=tuned[0]["model_generated_answer"]) for row in tuned]
    untuned, repeated, tuned = (scored(rows, processor) for rows in (untuned, repeated, tuned))

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    assert mean(repeated.scores) < mean(untuned.scores)  # by cosine, the one answer looks like a gain
    wrong, right = repeated.summary(), tuned.summary()
    assert wrong["retrieval_top1"] <= 1 / ITEMS + 0.1 and wrong["item_named"] <= 1 / ITEMS + 0.1
    assert wrong["distinct_answers"] == 1 / ITEMS
    assert right["item_named"] == right["distinct_answers"] == 1  # each answer names its own exhibit
    assert right["retrieval_top1"] > wrong["retrieval_top1"] + 0.25
