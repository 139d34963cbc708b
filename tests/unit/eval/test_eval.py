"""Evaluation: the original's similarity score re-derived by hand, the fair score's padding invariance,
the results CSV layout against the original's files, generation's padding, stops and bans, the prompt
of `run.py ask`, and the table an evaluation ends with."""

import contextlib
import json
from collections.abc import Iterator

import pytest
import torch

from engine.data.prompts import prompt_batch
from engine.data.standin_images import standin_image
from engine.greedy import generate_ids
from errors import UsageError
from eval.answers_table import WIDTH, answers_table, score_line
from eval.generate import generate_answers, question_row
from eval.results_csv import AVERAGE, SCORE, average_score, read_results, write_results
from eval.score import load_judge, similarity_scores
from harness import SEED_RESULTS
from models.lazy import SliceReader
from models.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, build_tiny

CPU = torch.device("cpu")
ANSWER = "The Wright Flyer made the first powered flight at Kitty Hawk in 1903."
TRUTH = "This exhibit features the 1903 Wright Flyer, the first successful powered airplane."
TEXTS = [ANSWER, TRUTH, "A coin.", "Helen Keller's watch let her tell the time by touch, a gift from John Hitz."]


def original_distance(model, processor, answer: str, truth: str) -> float:
    """The original's computation, step by step (Gefu-Xu/MuseQuest my_utils.py)."""
    embeddings = []
    for text in (answer, truth):
        inputs = processor(text=[text], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        embeddings.append(hidden[0].mean(dim=0))
    a, b = embeddings
    return 1.0 - float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("batched", [False, True])
def test_identical_texts_score_zero(tiny_model, processor, batched):
    scores = similarity_scores(tiny_model, processor.tokenizer, TEXTS, TEXTS, batched=batched, batch_size=3, device=CPU)
    assert scores == pytest.approx([0.0] * len(TEXTS), abs=1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_no_pairs_score_to_nothing(tiny_model, processor, batched):
    """The share of a rank beyond a small test split's rows (2 rows, 4 ranks)."""
    assert similarity_scores(tiny_model, processor.tokenizer, [], [], batched=batched, device=CPU) == []


def test_faithful_score_is_the_original_formula(tiny_model, processor):
    assert processor.tokenizer(ANSWER)["input_ids"][0] == processor.tokenizer.bos_token_id
    [score] = similarity_scores(tiny_model, processor.tokenizer, [ANSWER], [TRUTH], batched=False, device=CPU)
    assert score == pytest.approx(original_distance(tiny_model, processor, ANSWER, TRUTH), abs=1e-6)
    assert 0.0 < score < 2.0


def test_faithful_score_keeps_the_models_dtype_like_the_original(processor):
    """The original ran in bf16, so each of its scores is a bf16 number (0.0234375 = 3/128)."""
    model = build_tiny(0).to(torch.bfloat16)
    [score] = similarity_scores(model, processor.tokenizer, [ANSWER], [TRUTH], batched=False, device=CPU)
    assert is_bfloat16(score)


def is_bfloat16(value: float) -> bool:
    return torch.tensor(value, dtype=torch.float64).to(torch.bfloat16).double().item() == value


def test_fair_score_ignores_padding_order_and_batch_company(tiny_model, processor):
    tokenizer = processor.tokenizer
    generated, truth = TEXTS, TEXTS[::-1]
    faithful = similarity_scores(tiny_model, tokenizer, generated, truth, batched=False, device=CPU)
    for batch_size in (1, 3, 8):
        fair = similarity_scores(tiny_model, tokenizer, generated, truth, batched=True, batch_size=batch_size,
                                 device=CPU)
        assert fair == pytest.approx(faithful, abs=1e-5)
    reordered = similarity_scores(tiny_model, tokenizer, generated[::-1], truth[::-1], batched=True, batch_size=3,
                                  device=CPU)
    assert reordered[::-1] == pytest.approx(faithful, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_judge_loads_in_the_runs_dtype_and_refuses_a_bad_spec(processor, dtype, tmp_path):
    judge, tokenizer = load_judge("base", "tiny", CPU, dtype)
    assert {p.dtype for p in judge.parameters()} == {dtype} and not judge.training
    assert tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    with pytest.raises(UsageError, match="neither self, base nor a local model folder"):
        load_judge(str(tmp_path / "missing"), "tiny", CPU, dtype)


def test_the_judge_reads_the_text_decoder_alone_and_scores_as_the_whole_model(processor, tmp_path, monkeypatch):
    """A judge from a folder reads no vision encoder, connector or lm_head weight (1.3B of the 8B's parameters,
    2.4 GiB in bf16: what lets a 16 GB card judge), and scores exactly as the whole model it came from."""
    whole = build_tiny(0).eval()
    whole.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    read, reader = [], SliceReader.__call__
    monkeypatch.setattr(SliceReader, "__call__",
                        lambda self, name, *span: read.append(name) or reader(self, name, *span))
    judge, tokenizer = load_judge(str(tmp_path), "tiny", CPU, torch.float32)
    decoder = dict(whole.get_decoder().named_parameters())
    assert len(read) == len(decoder) and not [name for name in read if "text_model" not in name]
    assert dict(judge.named_parameters()).keys() == decoder.keys()
    generated, truth = TEXTS, TEXTS[::-1]
    assert similarity_scores(judge, tokenizer, generated, truth, batched=True, device=CPU) == pytest.approx(
        similarity_scores(whole, processor.tokenizer, generated, truth, batched=True, device=CPU), abs=1e-6)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])  # ~9 s each
def test_a_bf16_judge_scores_within_one_step_of_the_originals_bf16_scores(processor, seed):
    """A judge in the run's compute dtype (bf16 on a GPU) against the fp32 judge, on the original's answers
    before and after full fine-tuning (148 rows). The original's own per-row scores are bf16 numbers, spaced
    2^-7 apart in [1, 2), 2^-8 in [0.5, 1): a row may move by less than one such step (0.0078; measured on
    all 1,554 rows: 0.0031 and 0.0058 at most for seeds 0 and 1), and a mean, which averages the rows'
    rounding, by less than one step in [0.5, 1) (0.0039; measured: 0.0023 at most over the 21 files)."""
    rows = [row for name in ("before", "after")
            for row in read_results(SEED_RESULTS / f"2.4_full_finetuning_run_1_a100_80g_x1__{name}_finetuning.csv")]
    generated, truth = [row["model_generated_answer"] for row in rows], [row["ground_truth_answer"] for row in rows]
    judge = build_tiny(seed).eval()
    fp32 = torch.tensor(similarity_scores(judge, processor.tokenizer, generated, truth, batched=True, device=CPU))
    bf16 = torch.tensor(similarity_scores(judge.to(torch.bfloat16), processor.tokenizer, generated, truth,
                                          batched=True, device=CPU))
    moved = (bf16 - fp32).abs()
    assert 0 < moved.max() < 2**-7  # (0: the cast did nothing, and the bound would prove nothing)
    assert (bf16.mean() - fp32.mean()).abs() < 2**-8


@pytest.mark.parametrize("path", sorted(SEED_RESULTS.glob("*.csv")), ids=lambda path: path.stem)
def test_original_results_files_round_trip(path, tmp_path):
    rows = read_results(path)
    scores = [float(row[SCORE]) for row in rows]
    assert all(is_bfloat16(score) for score in scores)
    assert f"{average_score(scores)}\n" == path.read_text(encoding="utf-8").splitlines(keepends=True)[-1].split(",")[-1]
    write_results(tmp_path / "copy.csv", rows, scores)
    assert (tmp_path / "copy.csv").read_bytes() == path.read_bytes()


def test_rescore_an_original_file_end_to_end(tiny_model, processor, tmp_path):
    path = SEED_RESULTS / "2.1_lora_finetuning_run_1_a6000_48g_x1__after_finetuning.csv"
    rows = read_results(path)[:5]
    scores = similarity_scores(tiny_model, processor.tokenizer, [row["model_generated_answer"] for row in rows],
                               [row["ground_truth_answer"] for row in rows], batched=False, device=CPU)
    write_results(tmp_path / "rescored.csv", rows, scores)
    written = (tmp_path / "rescored.csv").read_text(encoding="utf-8").splitlines()
    assert written[-1] == f",{AVERAGE},,,,,{round(sum(scores) / len(scores), 3)}"
    rescored = read_results(tmp_path / "rescored.csv")
    assert [float(row[SCORE]) for row in rescored] == scores
    assert [row["data_id"] for row in rescored] == [row["data_id"] for row in rows]


def dialog_row(data_id: int, question: str, answer: str) -> dict:
    dialog = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}
    name = f"exhibit-{data_id}-1.jpg"
    return {"data_id": data_id, "item_name": f"exhibit-{data_id}", "image_name": name,
            "image": standin_image(name, IMAGE_SIZE), "dialog": json.dumps(dialog)}


ROWS = [dialog_row(0, "Can you describe this exhibit?", "A flyer."),
        dialog_row(1, "Who made this object, when, and why is it kept in a museum today?", "A coin.")]


@contextlib.contextmanager
def favoured(model, token_ids: list[int]) -> Iterator[None]:
    """Greedy decoding wants `token_ids` above every other token while this lasts."""
    def hook(module, inputs, logits):
        logits = logits.clone()
        logits[..., token_ids] += 100.0
        return logits
    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_prompt_is_left_padded_and_padding_side_restored(processor):
    processor.tokenizer.padding_side = "right"
    batch = prompt_batch(processor, ROWS)
    assert processor.tokenizer.padding_side == "right"
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]
    for r, row in enumerate(ROWS):
        alone = prompt_batch(processor, [row])["input_ids"][0]
        assert torch.equal(batch["input_ids"][r, -len(alone) :], alone)
        assert processor.decode(alone).endswith("Assistant:")


def test_generation_bans_image_tokens_and_caps_length(processor):
    model = build_tiny(0)
    image_tokens = processor.tokenizer.convert_tokens_to_ids(["<image>", "<fake_token_around_image>"])
    assert IMAGE_TOKEN_ID in image_tokens
    with favoured(model, image_tokens):  # unbanned, greedy decoding would emit nothing else
        _, new_ids = generate_ids(model, processor, ROWS, max_new_tokens=8, device=CPU)
    assert new_ids.shape[1] <= 8 and not torch.isin(new_ids, torch.tensor(image_tokens)).any()


def test_generation_stops_at_end_of_utterance(processor):
    model = build_tiny(0)
    with favoured(model, processor.tokenizer.convert_tokens_to_ids(["<end_of_utterance>"])):
        _, new_ids = generate_ids(model, processor, ROWS, max_new_tokens=8, device=CPU)
        records = generate_answers(model, processor, ROWS, batch_size=2, max_new_tokens=8, device=CPU)
    assert new_ids.shape[1] == 1
    assert [record["model_generated_answer"] for record in records] == ["", ""]
    assert [record["ground_truth_answer"] for record in records] == ["A flyer.", "A coin."]
    assert records[1]["user_question"].startswith("Who made this object")


def test_batched_generation_matches_one_row_at_a_time(processor):
    model = build_tiny(0)
    batched = generate_answers(model, processor, ROWS, batch_size=2, max_new_tokens=8, device=CPU)
    alone = generate_answers(model, processor, ROWS, batch_size=1, max_new_tokens=8, device=CPU)
    assert all(isinstance(record["model_generated_answer"], str) and record["model_generated_answer"]
               for record in batched)
    assert batched == alone


def test_a_photo_and_a_question_make_the_prompt_of_a_test_row(processor):
    """`run.py ask` prompts as the evaluation prompts the row that holds the same picture and question."""
    for row in ROWS:
        question = json.loads(row["dialog"])["messages"][0]["content"][1]["text"]
        asked = prompt_batch(processor, [question_row([row["image"]], question)])
        evaluated = prompt_batch(processor, [row])
        assert asked.keys() == evaluated.keys()
        assert all(torch.equal(asked[key], evaluated[key]) for key in asked)


def test_answers_table_fits_a_line_per_row_and_the_score_line_names_the_scorer():
    records = [{"data_id": 7, "user_question": "Who?", "ground_truth_answer": "A coin.",
                "model_generated_answer": "A\nvery " + "long " * 50 + "answer."},
               {"data_id": 12, "user_question": "What? " * 30, "ground_truth_answer": "A flyer.",
                "model_generated_answer": ""}]
    header, first, second = answers_table(records, [0.25, 1.5], [0.5, 0.75]).splitlines()
    assert header.split() == ["id", "before", "→", "after", "question", "reference", "answer"]
    assert first.startswith("7   0.500 → 0.250   Who?") and first.endswith("…") and "\n" not in first
    assert second.startswith("12  0.750 → 1.500   What? What?") and "…  A flyer." in second
    assert max(map(len, (header, first, second))) <= WIDTH
    header, first, _ = answers_table(records, [0.25, 1.5], None).splitlines()
    assert header.startswith("id  score  question") and first.startswith("7   0.250  Who?")
    assert score_line({"score": 0.0374, "baseline_score": 0.596, "scorer": "base", "rows": 2}) == \
        "score: 0.596 before → 0.037 after (scorer: base, 2 rows; 0 is best)"
    assert score_line({"score": 0.5, "scorer": "self", "rows": 2}) == "score: 0.500 (scorer: self, 2 rows; 0 is best)"
