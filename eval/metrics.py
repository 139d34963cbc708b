"""Metrics that see what an answer says, beside the embedding score (eval/score.py), which mostly sees how it says it.

Why: 1 - cosine of mean-pooled embeddings rewards an answer in the references' style. A model that answered
"This is a bronze Corinthian helmet..." for every photo (a vase, a helmet, a kimono, a steam engine) scored
0.088, near perfect, while three answers of four were wrong. These metrics tell a right answer from a wrong one;
the embedding score stays as it was, so runs keep comparing with the original's published files.

Per row (`ROW_METRICS`, each with the direction that is better):
- token_f1: SQuAD's bag-of-tokens F1 (its `normalize_answer`: lowercase, punctuation deleted, the articles
  a/an/the dropped, split on whitespace): the share of words the texts share, blind to their order; the usual
  measure of question answering, so its numbers read as elsewhere.
- rouge_l: the F-measure of the longest common subsequence of words: shared words in the same order. Equal to
  `rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure` (its
  tokenizer: lowercase, runs of [a-z0-9], no stemmer).
- chrf: character n-gram F-score (n = 1..6, whitespace removed; precision and recall each averaged over the
  orders both texts have, then combined with recall counted beta = 2 times as much): it credits a word spelt or
  inflected a little differently (dekadrachm, decadrachm). Equal to `sacrebleu.sentence_chrf(answer,
  [reference]).score / 100`.
- item_named: 1.0 when the answer names the item of its row (`names_item`: it holds at least half, and at least
  one, of the words of the item's name, less numbers, words under 3 letters and `_NAME_STOP_WORDS`, compared
  case-insensitively and in singular); only where every row has an item_name. The bluntest test of "right
  exhibit": the Corinthian-helmet answer names one item in four. On the original's files it holds for 82-91% of
  the fine-tuned answers, 37% of GPT-4o's, 10-12% of the untuned base model's, 90% of the references (those that
  do not are titled exhibitions: "beauty-broken-objects"), and 0.9% of answers checked against the names of
  other items (1.3-1.8% of the fine-tuned ones, which say more).
- retrieval_rank: with a judge's embeddings, where the row's own reference ranks among its own and the
  references of every row about another item, by cosine to the answer (1 = its own is nearest; rows of the
  same item are left out, since their references are right answers too). Ties count against the row. The
  references share their style, so only what an answer says can bring it nearer its own than the others.
Over the set (`SET_METRICS`): retrieval_top1 (the share of rank 1), retrieval_mean_rank, and distinct_answers:
the distinct answers (whitespace-normalised, case-folded, empty ones left out), capped at the number k of
distinct items (every row an item of its own where rows lack item names) and divided by k: a model that says
one thing for every photo gets exactly 1/k there, and about 1/k in retrieval_top1 and item_named, since its one
answer is nearest to, and names, one item's reference.

An empty answer is wrong, never an error: 0 in every text metric, not named, not a distinct answer. Its
embedding is the caller's to give as zeros: a zero vector has cosine 0 with every reference, and ties count
against it, so it ranks last.

rouge_l and chrf are written here, not imported: two small functions against two more dependency trees (nltk,
absl, lxml, portalocker, ...) in every user's install. The libraries are test-only references (the `test`
extra), and tests/unit/eval/test_metrics.py holds both equal to them on the original's real answers.
"""

import re
import string
from collections import Counter

import torch

ROW_METRICS: dict[str, str] = {"token_f1": "higher", "rouge_l": "higher", "chrf": "higher", "item_named": "higher",
                               "retrieval_rank": "lower"}
SET_METRICS: dict[str, str] = {"retrieval_top1": "higher", "retrieval_mean_rank": "lower", "distinct_answers": "higher"}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_NAME_TOKEN = re.compile(r"[a-z]+|[0-9]+")
_CHRF_ORDER, _CHRF_BETA = 6, 2
# Words of an item's name that do not tell it from others: dates and glue in MuseQuest's slugs
# ("1-decadrachm-syracuse-about-400-bce", "teapot-made-peter-bentzon"), and "history" and "smithsonian", which 57%
# and 60% of the original's fine-tuned answers hold: with them, 291 answers about other items named
# "vallenato-makes-history-smithsonian".
_NAME_STOP_WORDS = frozenset({"about", "the", "and", "with", "from", "for", "bce", "circa", "around", "made", "makes",
                              "history", "smithsonian"})


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's F1 of the two texts' bags of normalised words; 0 when either has none."""
    answer_words, reference_words = _squad_words(answer), _squad_words(reference)
    shared = sum((Counter(answer_words) & Counter(reference_words)).values())
    if shared == 0:
        return 0.0
    return _f1(shared / len(answer_words), shared / len(reference_words))


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1], as rouge_score computes it (its default tokenizer, no stemmer)."""
    answer_words, reference_words = _ROUGE_TOKEN.findall(answer.lower()), _ROUGE_TOKEN.findall(reference.lower())
    if not answer_words or not reference_words:
        return 0.0
    common = _lcs_length(reference_words, answer_words)
    return _f1(common / len(answer_words), common / len(reference_words))


def chrf(answer: str, reference: str) -> float:
    """chrF in [0, 1], as sacrebleu's `sentence_chrf` with its defaults (character 6-grams, beta 2), over 100."""
    answer_chars, reference_chars = "".join(answer.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, _CHRF_ORDER + 1):
        answer_grams, reference_grams = _char_ngrams(answer_chars, n), _char_ngrams(reference_chars, n)
        if answer_grams and reference_grams:  # an order one text is too short for does not count
            matched = sum((answer_grams & reference_grams).values())
            precisions.append(matched / answer_grams.total())
            recalls.append(matched / reference_grams.total())
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    factor = _CHRF_BETA**2
    return (1 + factor) * precision * recall / (factor * precision + recall)


def names_item(answer: str, item_name: str) -> bool:
    """Whether the answer holds at least half (and at least one) of the words that name the item: the name's
    words of 3 letters or more, less `_NAME_STOP_WORDS`, compared case-insensitively and in singular; a name with
    no such word ("yo-yo", "1903") is matched by all its letter and number runs."""
    name_tokens = _NAME_TOKEN.findall(item_name.lower())
    words = {_singular(t) for t in name_tokens if t.isalpha() and len(t) >= 3 and t not in _NAME_STOP_WORDS}
    words = words or {_singular(token) for token in name_tokens}
    said = {_singular(token) for token in _NAME_TOKEN.findall(answer.lower())}
    named = len(words & said)
    return named >= 1 and 2 * named >= len(words)


def row_items(rows: list[dict]) -> list[str]:
    """Each row's item: its item_name where every row has one, else the row itself (its index), so that
    retrieval and distinct_answers treat every row as an item of its own."""
    return _item_names(rows) or [str(index) for index in range(len(rows))]


def text_metrics(rows: list[dict]) -> dict[str, list[float]]:
    """Per-row token_f1, rouge_l and chrf of each row's model_generated_answer against its ground_truth_answer,
    and item_named (1.0 or 0.0) where every row has a non-empty item_name."""
    answers = [row["model_generated_answer"] for row in rows]
    references = [row["ground_truth_answer"] for row in rows]
    metrics = {name: [function(answer, reference) for answer, reference in zip(answers, references, strict=True)]
               for name, function in (("token_f1", token_f1), ("rouge_l", rouge_l), ("chrf", chrf))}
    names = _item_names(rows)
    if names:
        metrics["item_named"] = [float(names_item(answer, name)) for answer, name in zip(answers, names, strict=True)]
    return metrics


def retrieval_ranks(answers: torch.Tensor, references: torch.Tensor, items: list[str]) -> list[int]:
    """Each row's rank of its own reference among its own and those of the rows about other items, by cosine to
    its answer's embedding (rows, dim): 1 + the number of other items' references at least as near as its own."""
    if not len(answers) == len(references) == len(items):
        raise ValueError(f"{len(answers)} answers, {len(references)} references and {len(items)} items")
    answers, references = answers.float(), references.float()
    cosines = torch.nn.functional.normalize(answers, dim=1) @ torch.nn.functional.normalize(references, dim=1).T
    own = cosines.diagonal().unsqueeze(1)
    labels = {item: label for label, item in enumerate(dict.fromkeys(items))}
    item_ids = torch.tensor([labels[item] for item in items])
    other_item = item_ids.unsqueeze(1) != item_ids.unsqueeze(0)
    return (1 + ((cosines >= own) & other_item).sum(dim=1)).tolist()


def set_metrics(rows: list[dict], per_row: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each per-row list, retrieval_top1 and retrieval_mean_rank where `per_row` has retrieval_rank,
    and distinct_answers."""
    if not rows:
        raise ValueError("set metrics need at least one row")
    means = {name: sum(values) / len(values) for name, values in per_row.items()}
    if "retrieval_rank" in per_row:
        ranks = per_row["retrieval_rank"]
        means["retrieval_top1"] = sum(rank == 1 for rank in ranks) / len(ranks)
        means["retrieval_mean_rank"] = means["retrieval_rank"]
    items = len(set(row_items(rows)))
    answers = {" ".join(row["model_generated_answer"].split()).casefold() for row in rows} - {""}
    means["distinct_answers"] = min(len(answers), items) / items
    return means


def _item_names(rows: list[dict]) -> list[str] | None:
    """The rows' item names, or None unless every row has one (other data sets may have none)."""
    names = [str(row.get("item_name") or "") for row in rows]
    return names if rows and all(names) else None


def _squad_words(text: str) -> list[str]:
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lcs_length(first: list[str], second: list[str]) -> int:
    """The length of the longest common subsequence, bit-parallel (Allison and Dix 1986; Hyyro 2004): a row of the
    dynamic-programming table over `first` steps up by 0 or 1 from word to word, and `row` holds a 0 bit where it
    steps up, so the zero bits count the row's last value. One integer operation per word of `second` instead of
    a loop over `first`: a file of the original's answers in 0.01 s instead of 0.6, 60 times faster."""
    where: dict[str, int] = {}
    for index, word in enumerate(first):
        where[word] = where.get(word, 0) | 1 << index
    full = (1 << len(first)) - 1
    row = full
    for word in second:
        matches = row & where.get(word, 0)
        row = ((row + matches) | (row - matches)) & full
    return len(first) - row.bit_count()


def _char_ngrams(text: str, n: int) -> Counter:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def _singular(word: str) -> str:
    """A plural's singular, enough to match a name's words: vases/vase, glasses/glass, centuries/century."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word
