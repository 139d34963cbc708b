"""The content metrics of eval/metrics.py: one answer for every photo scores about 1/k, the references score
perfectly, rouge_l and chrf equal rouge-score and sacrebleu on the original's real answers, and token_f1,
names_item and the retrieval ranks match values worked out by hand. Embeddings here are bag-of-words counts,
independent of any model and of the code under test."""

import re
from collections import Counter
from fractions import Fraction

import pytest
import sacrebleu
import torch
from rouge_score.rouge_scorer import RougeScorer

from eval.metrics import (
    ROW_METRICS,
    SET_METRICS,
    chrf,
    names_item,
    retrieval_ranks,
    rouge_l,
    row_items,
    set_metrics,
    text_metrics,
    token_f1,
)
from eval.results_csv import read_results
from harness import SEED_RESULTS

FULL_AFTER = SEED_RESULTS / "2.4_full_finetuning_run_1_a100_80g_x1__after_finetuning.csv"
# Items whose references name them (read by eye: "the Syracuse dekadrachm", "the remarkable 1903 Wright Flyer",
# "Albert Einstein's iconic pipe", "the Apollo 17 spacesuit", "the Edison Light Bulb", "belonging to Helen Keller",
# "a pack of Crayola Crayons", "Kermit the Frog, ... a vibrant green puppet").
NAMED_ITEMS = ("1-decadrachm-syracuse-about-400-bce", "1903-wright-flyer", "albert-einsteins-pipe",
               "apollo-17-spacesuit", "edison-light-bulb", "helen-kellers-watch", "crayola-crayons",
               "kermit-frog-puppet")


def one_row_per_item() -> list[dict[str, str]]:
    """The first row of each of NAMED_ITEMS in the original's full fine-tuning results, in file order."""
    firsts = {}
    for row in read_results(FULL_AFTER):
        if row["item_name"] in NAMED_ITEMS:
            firsts.setdefault(row["item_name"], row)
    assert len(firsts) == len(NAMED_ITEMS)
    return list(firsts.values())


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """Word counts over the texts' vocabulary, one row a text."""
    counts = [Counter(re.findall(r"\w+", text.lower())) for text in texts]
    vocabulary = sorted(set().union(*counts))
    return torch.tensor([[count[word] for word in vocabulary] for count in counts], dtype=torch.float64)


def all_metrics(rows: list[dict[str, str]]) -> dict[str, float]:
    """Every row and set metric, retrieval judged by bag-of-words embeddings."""
    per_row = text_metrics(rows)
    embeddings = bag_of_words([row[column] for column in ("model_generated_answer", "ground_truth_answer")
                               for row in rows])
    per_row["retrieval_rank"] = retrieval_ranks(embeddings[: len(rows)], embeddings[len(rows) :], row_items(rows))
    return set_metrics(rows, per_row)


def test_the_names_and_directions_others_build_on():
    assert ROW_METRICS == {"token_f1": "higher", "rouge_l": "higher", "chrf": "higher", "item_named": "higher",
                           "retrieval_rank": "lower"}
    assert SET_METRICS == {"retrieval_top1": "higher", "retrieval_mean_rank": "lower", "distinct_answers": "higher"}


def test_one_answer_for_every_photo_scores_about_one_in_k():
    """The issue's Corinthian helmet: a real fine-tuned answer about the Syracuse dekadrachm, given for all k items."""
    rows = one_row_per_item()
    k = len(rows)
    repeated = [{**row, "model_generated_answer": rows[0]["model_generated_answer"]} for row in rows]
    metrics = all_metrics(repeated)
    assert metrics["retrieval_top1"] <= 1 / k + 0.1
    assert metrics["item_named"] <= 1 / k + 0.1
    assert metrics["distinct_answers"] == 1 / k


def test_the_references_as_answers_score_perfectly():
    rows = [{**row, "model_generated_answer": row["ground_truth_answer"]} for row in one_row_per_item()]
    metrics = all_metrics(rows)
    assert [metrics[name] for name in ("token_f1", "rouge_l", "chrf", "item_named", "retrieval_top1",
                                       "retrieval_mean_rank", "distinct_answers")] == pytest.approx([1.0] * 7)


# The untuned model's answers are short (12 words on average): quick. The tuned ones (151 words) and GPT-4o's (73),
# against references of 159, take the reference libraries 1.5-5 s a file on two shared cores.
@pytest.mark.parametrize("results", [
    "2.4_full_finetuning_run_1_a100_80g_x1__before_finetuning.csv",
    pytest.param("2.4_full_finetuning_run_1_a100_80g_x1__after_finetuning.csv", marks=pytest.mark.slow),
    pytest.param("openai_gpt4o.csv", marks=pytest.mark.slow),
])
def test_rouge_l_and_chrf_equal_the_reference_libraries_on_real_answers(results):
    scorer = RougeScorer(["rougeL"])
    for row in read_results(SEED_RESULTS / results):
        answer, reference = row["model_generated_answer"], row["ground_truth_answer"]
        assert rouge_l(answer, reference) == pytest.approx(scorer.score(reference, answer)["rougeL"].fmeasure,
                                                           abs=1e-9, rel=0)
        assert chrf(answer, reference) == pytest.approx(sacrebleu.sentence_chrf(answer, [reference]).score / 100,
                                                        abs=1e-9, rel=0)


@pytest.mark.parametrize("answer, reference", [
    ("", "A bronze Corinthian helmet."), ("   ", "A vase."), ("?!...", "A vase."), ("vase", "A vase."),
    ("Vase", "vase"), ("vase", "vase"), ("coin", "A Greek silver coin, about 400 BCE."),
    ("a vase a vase a vase", "a vase"), ("Café naïve — 1903!", "cafe naive 1903"), ("A vase.", ""),
])
def test_rouge_l_and_chrf_equal_the_reference_libraries_at_the_edges(answer, reference):
    expected_rouge = RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure
    assert rouge_l(answer, reference) == pytest.approx(expected_rouge, abs=1e-9, rel=0)
    assert chrf(answer, reference) == pytest.approx(sacrebleu.sentence_chrf(answer, [reference]).score / 100,
                                                    abs=1e-9, rel=0)


@pytest.mark.parametrize("answer, reference, expected", [
    # "bronze helmet from corinth" against "corinthian bronze helmet" (the articles dropped): 2 shared words,
    # precision 2/4, recall 2/3, F1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = (2/3) / (7/6) = 4/7.
    ("The bronze helmet, from Corinth.", "A Corinthian bronze helmet.", Fraction(4, 7)),
    # Words count as often as both texts hold them: 1 shared "vase", precision 1/3, recall 1/1, F1 = (2/3) / (4/3).
    ("vase vase vase", "a vase", Fraction(1, 2)),
    # Punctuation is deleted, not a word break (SQuAD's rule): "lincolns watch" both; F1 = 1.
    ("Lincoln's watch!", "lincolns watch", Fraction(1)),
    ("A coin.", "A helmet.", Fraction(0)),
])
def test_token_f1_against_hand_arithmetic(answer, reference, expected):
    assert token_f1(answer, reference) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("answer, item_name, named", [
    ("Two painted vases from Athens.", "vase", True),  # plural in the answer
    ("A pair of drinking glasses.", "glass", True),
    ("An Athenian vase.", "vases", True),  # plural in the name
    ("Art of two centuries.", "century", True),
    ("THE HOPE DIAMOND", "hope-diamond", True),  # case
    ("This Syracuse dekadrachm, about 400 BCE, ...", "1-decadrachm-syracuse-about-400-bce", True),  # 1 of 2 words
    ("A silver coin from about 400 BCE.", "1-decadrachm-syracuse-about-400-bce", False),  # numbers, 'about', 'bce'
    ("Helen Keller's pocket watch.", "helen-kellers-watch", True),
    ("Abraham Lincoln's gold pocket watch.", "helen-kellers-watch", False),  # 1 word of 3: a real wrong answer
    ("Abraham Lincoln's gold pocket watch.", "abraham-lincolns-coffee-cup", True),  # 2 of 4 is half
    ("A coffee mug.", "abraham-lincolns-coffee-cup", False),  # 1 of 4
    ("A bronze helmet.", "helmet", True),  # a name of one word
    ("A bronze helmet.", "vase", False),  # a miss
    ("A helmet from the Smithsonian's history collection.", "vallenato-makes-history-smithsonian", False),
    ("A wooden yo-yo.", "yo-yo", True),  # no word of 3 letters: every run of the name counts
    ("A spinning top.", "yo-yo", False),
])
def test_names_item_on_hand_picked_cases(answer, item_name, named):
    assert names_item(answer, item_name) is named


def test_retrieval_ranks_leave_out_rows_of_the_same_item_and_count_ties_against_the_row():
    # Rows 0 and 1 are about item "a", row 2 about "b", row 3 about "c". Row 0: own cosine 1, beaten by none of
    # 1/sqrt(2) (row 2's) and -1/sqrt(2) (row 3's) -> rank 1. Row 1: own cosine 0, beaten by row 2's 1/sqrt(2)
    # -> rank 2 (row 0's reference, cosine 1, is of its own item and left out). Row 2: own 1/sqrt(2), beaten by
    # row 0's 1 -> rank 2. Row 3, an empty answer as zeros: every cosine is 0, a tie with its own, and ties
    # count against it -> rank 4, the last.
    answers = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    references = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    ranks = retrieval_ranks(answers, references, ["a", "a", "b", "c"])
    assert ranks == [1, 2, 2, 4]
    rows = [{"model_generated_answer": answer, "ground_truth_answer": "x", "item_name": item}
            for answer, item in [("A vase.", "a"), ("a  VASE.", "a"), ("A helmet.", "b"), ("", "c")]]
    metrics = set_metrics(rows, {"token_f1": [1.0, 0.0, 0.5, 0.0], "retrieval_rank": ranks})
    # 2 distinct answers ("a vase." twice, the empty one not counted) among 3 items.
    assert metrics == pytest.approx({"token_f1": 0.375, "retrieval_rank": 9 / 4, "retrieval_top1": 1 / 4,
                                     "retrieval_mean_rank": 9 / 4, "distinct_answers": 2 / 3})


def test_an_empty_answer_is_wrong_never_an_error():
    first, second = one_row_per_item()[:2]
    rows = [{**first, "model_generated_answer": ""}, {**second, "model_generated_answer": " \n "}]
    per_row = text_metrics(rows)
    assert per_row == {"token_f1": [0.0, 0.0], "rouge_l": [0.0, 0.0], "chrf": [0.0, 0.0], "item_named": [0.0, 0.0]}
    assert set_metrics(rows, per_row)["distinct_answers"] == 0.0


def test_rows_without_item_names_are_items_of_their_own():
    rows = [{"model_generated_answer": "A vase.", "ground_truth_answer": reference, "item_name": name}
            for reference, name in [("A vase.", "vase"), ("A helmet.", ""), ("A kimono.", "kimono")]]
    assert "item_named" not in text_metrics(rows)
    assert row_items(rows) == ["0", "1", "2"]
    assert set_metrics(rows, text_metrics(rows))["distinct_answers"] == 1 / 3
