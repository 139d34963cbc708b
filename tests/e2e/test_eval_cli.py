"""run.py eval / ask / score / report end to end on tiny runs, what the evaluation shows on the terminal,
and the commands' one-sentence refusals."""

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval.evaluate as evaluation
from engine.config import from_approach
from engine.data.sources import load_splits
from engine.data.standin_images import standin_image
from engine.runtime import Runtime
from engine.tensorboard import Scalars
from eval.bootstrap import mean_interval
from eval.metrics import text_metrics
from eval.report import ANSWERS
from eval.results_csv import SCORE, read_results
from finetune import trained_run
from harness import SEED_RESULTS, run_cli, run_engine
from run import main

SEED = SEED_RESULTS / "2.1_lora_finetuning_run_1_a6000_48g_x1__after_finetuning.csv"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LoRA run and a tiny full run, 3 steps each, evaluated with `run.py eval` (what the LoRA one
    showed in lora-eval.out and .err)."""
    root = tmp_path_factory.mktemp("runs")
    run_engine(root / "lora", "lora", batch_size=2, gpus=None)
    run_engine(root / "full", "full", batch_size=2, gpus=None, train_modules=("all",), lr=1e-3)
    quick = ["--limit-exhibits", "2", "--max-new-tokens", "4", "--device", "cpu"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["eval", "--adapter", str(root / "lora" / "final"), "--output-dir", str(root / "lora" / "eval"),
                     *quick]) == 0
    (root / "lora-eval.out").write_text(out.getvalue())
    (root / "lora-eval.err").write_text(err.getvalue())
    # Without --limit-exhibits: the run's own data settings (its config.json beside OUT/final), not all 74 rows.
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert main(["eval", "--model", str(root / "full" / "final"), "--base", str(root / "full" / "base"),
                     "--output-dir", str(root / "full" / "eval"), *quick[2:]]) == 0
    (root / "full-eval.out").write_text(shown.getvalue())
    return root


@pytest.mark.slow  # two tiny runs trained and evaluated end to end (the `runs` fixture)
def test_eval_writes_the_originals_csv_layout_and_results_json(runs):
    for name in ("lora", "full"):
        rows = list(csv.DictReader((runs / name / "eval" / "results.csv").open()))
        results = json.loads((runs / name / "eval" / "results.json").read_text())
        assert rows[-1]["item_name"] == "average_semantic_similarity_score"
        scores = [float(row["semantic_similarity_score"]) for row in rows[:-1]]
        assert results["score"] == round(sum(scores) / len(scores), 3) and results["scorer"] == "base"
        assert 0 <= results["score"] <= 2 and results["rows"] == len(scores) > 0
    assert len(read_results(runs / "full" / "eval" / "results.csv")) == \
        len(load_splits("musequest", limit_exhibits=2)["test"])  # the run's own test rows
    assert "data: the run's own --dataset musequest --limit-exhibits 2 (a flag given overrides it)" in \
        (runs / "full-eval.out").read_text()


@pytest.mark.slow  # two tiny runs trained and evaluated end to end (the `runs` fixture)
def test_eval_shows_its_progress_then_every_row_and_the_score(runs):
    rows = read_results(runs / "lora" / "eval" / "results.csv")
    results = json.loads((runs / "lora" / "eval" / "results.json").read_text())
    bars = (runs / "lora-eval.err").read_text()
    assert "answering: 100%" in bars and f"{len(rows)}/{len(rows)}" in bars
    assert "scoring: 100%" in bars and f"{2 * len(rows)}/{2 * len(rows)}" in bars  # each answer and its reference
    data, header, *table, score, answers, written = (runs / "lora-eval.out").read_text().splitlines()
    assert data == "data: the run's own --dataset musequest (a flag given overrides it)"  # --limit-exhibits given
    assert header.split() == ["id", "score", "question", "reference", "answer"]  # no baseline here
    assert [line.split()[:2] for line in table] == [[row["data_id"], f"{float(row[SCORE]):.3f}"] for row in rows]
    assert all(len(line) <= 120 for line in (header, *table))
    assert score == f"score: {results['score']:.3f} (scorer: base, {len(rows)} rows; 0 is best)"
    # The metrics of results.json are the means of results.csv's columns, the text ones as eval/metrics.py gives them
    for name, values in text_metrics(rows).items():
        assert [float(row[name]) for row in rows] == pytest.approx(values, abs=5e-4)
        assert results["metrics"][name] == pytest.approx(sum(values) / len(values))
    ranks = [float(row["retrieval_rank"]) for row in rows]
    assert results["metrics"]["retrieval_top1"] == sum(rank == 1 for rank in ranks) / len(ranks)
    assert answers.startswith(f"answers: token F1 {results['metrics']['token_f1']:.3f}, ")
    assert written.startswith("every answer and score in ") and written.endswith("results.csv and results.json")


@pytest.mark.slow  # two tiny runs trained and evaluated end to end (the `runs` fixture)
def test_evaluation_after_training_shows_every_row_scored_before_and_after(runs, tmp_path, capsys):
    out = shutil.copytree(runs / "lora", tmp_path / "lora")  # evaluate_run writes OUT/eval
    config = from_approach("lora", model="tiny", limit_exhibits=2, batch_size=2, max_new_tokens=4,
                           output_dir=str(out), device="cpu")
    runtime = Runtime(torch.device("cpu"))
    scalars = Scalars(out / "tensorboard")
    results = evaluation.evaluate_run(trained_run(config.resolved(gpu=False), runtime), runtime, scalars, 3)
    scalars.close()  # as the run closes its writer: every event on disk
    shown = capsys.readouterr()
    rows = read_results(out / "eval" / "results.csv")
    lines = shown.out.splitlines()
    assert len(lines) == len(rows) + 3 and lines[0].split()[0] == "id"
    for line, row in zip(lines[1:-2], rows, strict=True):
        data_id, before, arrow, after = line.split()[:4]
        assert (data_id, arrow, after) == (row["data_id"], "→", f"{float(row[SCORE]):.3f}") and float(before) >= 0
    assert lines[-2] == (f"score: {results['baseline_score']:.3f} before → {results['score']:.3f} after "
                         f"(scorer: base, {len(rows)} rows; 0 is best)")
    before, after = results["baseline_metrics"], results["metrics"]  # the base model's, cached with its score
    assert f"retrieval top-1 {before['retrieval_top1']:.3f} → {after['retrieval_top1']:.3f}" in lines[-1]
    events = EventAccumulator(str(out / "tensorboard"))  # every metric in TensorBoard, at the run's last step
    events.Reload()
    for name, value in {"similarity_score": results["score"], **after}.items():
        [scalar] = events.Scalars(f"eval/{name}")
        assert (scalar.step, scalar.value) == (3, pytest.approx(value)), name
    assert "answering (trained model): 100%" in shown.err and "scoring (trained model): 100%" in shown.err


@pytest.mark.slow
@pytest.mark.parametrize("flag, run", [("--adapter", "lora"), ("--model", "full")])
def test_ask_answers_a_photo_as_the_evaluation_answered_its_row(runs, flag, run, tmp_path):
    """The row whose prompt is shortest: in the evaluation's batch it was left-padded, here it is alone."""
    evaluated = min(read_results(runs / run / "eval" / "results.csv"), key=lambda row: len(row["user_question"]))
    [row] = [row for row in load_splits("musequest", limit_exhibits=2)["test"]
             if str(row["data_id"]) == evaluated["data_id"]]
    row["image"].save(tmp_path / "photo.png")  # lossless: the pixels the evaluation saw
    assert np.array_equal(np.asarray(Image.open(tmp_path / "photo.png")), np.asarray(row["image"]))
    result = run_cli("ask", flag, str(runs / run / "final"), "--image", str(tmp_path / "photo.png"),
                     "--max-new-tokens", "4", "--device", "cpu", evaluated["user_question"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert evaluated["model_generated_answer"]  # an empty answer would prove little
    assert result.stdout == evaluated["model_generated_answer"] + "\n"


@pytest.mark.slow  # two tiny runs trained and evaluated end to end (the `runs` fixture)
def test_report_compares_the_runs_and_the_originals_numbers(runs, tmp_path, capsys):
    assert main(["report", str(runs / "lora"), str(runs / "full"), "--output", str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text().splitlines()
    assert "\n".join(table) in capsys.readouterr().out  # printed for the terminal, too
    lora = next(line for line in table if line.startswith("| lora |"))
    score = json.loads((runs / "lora" / "eval" / "results.json").read_text())["score"]
    assert f"{score:.3f} (base)" in lora and "| 1 |" in lora
    assert any(line.startswith("| full | full |") for line in table)
    assert any("original (1x A100 80G) | full |" in line and "0.595 → 0.031" in line for line in table)
    answers = table[table.index(ANSWERS) + 2 :]  # the second table's header, then its separator and rows
    assert answers[0].split(" | ")[1:3] == ["token F1", "ROUGE-L"]
    for run, line in zip(("lora", "full"), answers[2:], strict=True):  # results.json's means, results.csv's rows
        metrics = json.loads((runs / run / "eval" / "results.json").read_text())["metrics"]
        rows = read_results(runs / run / "eval" / "results.csv")
        cells = line.strip("| ").split(" | ")[1:]
        for cell, name in zip(cells, ("token_f1", "rouge_l", "chrf", "item_named"), strict=False):
            values = [float(row[name]) for row in rows]
            _, low, high = mean_interval(values)
            assert cell == f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]", (run, name)
            assert sum(values) / len(values) == pytest.approx(metrics[name], abs=1e-3)
        assert cells[-1] == f"{metrics['distinct_answers']:.3f}"  # a share of the whole set: no interval
    events = EventAccumulator(str(tmp_path / "tensorboard"))  # the same table as TensorBoard text, and the charts
    events.Reload()
    [text] = events.Tensors("report/text_summary")
    assert text.tensor_proto.string_val[0].decode() == (tmp_path / "report.md").read_text()
    assert sorted(events.Tags()["images"]) == ["report/loss", "report/score", "report/throughput"]
    assert (tmp_path / "index.html").is_file()  # the page itself: tests/e2e/test_html_report.py


@pytest.mark.slow  # two tiny runs trained and evaluated end to end (the `runs` fixture)
def test_score_rescores_an_original_results_file(runs, tmp_path, capsys):
    """The original's answers re-scored, with every metric: the text ones as eval/metrics.py gives them from the
    answers alone, the mean of each in the average row and on the terminal."""
    assert main(["score", "--csv", str(SEED), "--model", str(runs / "full" / "base"),
                 "--output", str(tmp_path / "s.csv"), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    original = list(csv.DictReader(open(SEED)))
    assert [r["data_id"] for r in rows] == [r["data_id"] for r in original]
    assert rows[-1]["semantic_similarity_score"] != original[-1]["semantic_similarity_score"]  # our tiny judge's
    expected = text_metrics(read_results(SEED))
    for name, values in expected.items():
        assert [float(row[name]) for row in rows[:-1]] == pytest.approx(values, abs=5e-4)
        assert float(rows[-1][name]) == pytest.approx(sum(values) / len(values), abs=5e-4)
    assert {float(row["retrieval_rank"]) for row in rows[:-1]} <= set(range(1, len(rows)))
    shown = capsys.readouterr().out
    item_named = sum(expected["item_named"]) / len(rows[:-1])
    assert f"item named {item_named:.3f}" in shown.splitlines()[-1]


@pytest.mark.parametrize("content", ["", "data_id,item_name,model_generated_answer,ground_truth_answer\n",
                                     "data_id,item_name,model_generated_answer,ground_truth_answer,"
                                     "semantic_similarity_score\n,average_semantic_similarity_score,,,0.5\n"])
def test_score_refuses_a_csv_without_rows_in_one_sentence(content, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text(content)
    output = tmp_path / "x.csv"
    assert main(["score", "--csv", str(tmp_path / "empty.csv"), "--model", "tiny", "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "empty.csv" in error and not output.exists()


@pytest.mark.parametrize("argv, message", [
    (["eval"], "needs --model, --adapter or both"),
    (["score", "--csv", "missing.csv", "--model", "tiny", "--output", "x.csv"], "is not a file"),
    (["report", "."], "is not a finished run"),
    (["eval", "--model", "tiny", "--scorer", "nowhere"], "neither self, base nor a local model folder"),
])
def test_bad_input_is_one_sentence_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


QUESTION = "Can you describe this exhibit?"


@pytest.mark.parametrize("argv, message", [
    (["--image", "missing.png", "--model", "tiny", QUESTION], "--image missing.png is not a file"),
    (["--image", "notes.png", "--model", "tiny", QUESTION], "--image notes.png is not a picture Pillow can read"),
    (["--image", "photo.png", QUESTION], "run.py ask needs --model, --adapter or both"),
    (["--image", "photo.png", "--model", "runs/lora/final", QUESTION],
     "--model runs/lora/final is neither a folder nor a Hugging"),
    (["--image", "photo.png", "--adapter", "runs/lora/final", QUESTION], "--adapter runs/lora/final is not a folder"),
    (["--image", "huge.png", "--model", "tiny", QUESTION], "--image huge.png has more pixels than the 89.5 megapixels "
                                                           "Pillow reads safely; scale it down first."),
    (["--image", "photo.png", "--model", "tiny", "What is this <image>?"], "the question holds '<image>', which the "
                                                                           "tokenizer reads as one of the model's"),
    (["--image", "photo.png", "--model", "tiny", "Who<end_of_utterance>"], "the question holds '<end_of_utterance>'"),
])
def test_ask_refuses_bad_input_in_one_sentence_before_loading(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    standin_image("exhibit-1.jpg").save("photo.png")
    Image.new("1", (10_000, 9_000)).save("huge.png")  # 90 megapixels: past Pillow's limit of 89.5
    (tmp_path / "notes.png").write_text("not a picture")
    monkeypatch.setattr(evaluation, "load_evaluated", lambda *args: pytest.fail("the model was loaded"))
    assert main(["ask", *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
