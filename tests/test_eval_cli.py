"""run.py eval / score / report end to end on tiny runs, and their one-sentence refusals."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness import SEED_RESULTS, run_engine
from run import main

SEED = SEED_RESULTS / "2.1_lora_finetuning_run_1_a6000_48g_x1__after_finetuning.csv"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LoRA run and a tiny full run, 3 steps each, evaluated with `run.py eval`."""
    root = tmp_path_factory.mktemp("runs")
    run_engine(root / "lora", "lora", batch_size=2, gpus=None)
    run_engine(root / "full", "full", batch_size=2, gpus=None, train_modules=("all",), lr=1e-3)
    quick = ["--limit-exhibits", "2", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(["eval", "--adapter", str(root / "lora" / "final"), "--output-dir", str(root / "lora" / "eval"),
                 *quick]) == 0
    assert main(["eval", "--model", str(root / "full" / "final"), "--base", str(root / "full" / "base"),
                 "--output-dir", str(root / "full" / "eval"), *quick]) == 0
    return root


def test_eval_writes_the_originals_csv_layout_and_results_json(runs):
    for name in ("lora", "full"):
        rows = list(csv.DictReader((runs / name / "eval" / "results.csv").open()))
        results = json.loads((runs / name / "eval" / "results.json").read_text())
        assert rows[-1]["item_name"] == "average_semantic_similarity_score"
        scores = [float(row["semantic_similarity_score"]) for row in rows[:-1]]
        assert results["score"] == round(sum(scores) / len(scores), 3) and results["scorer"] == "base"
        assert 0 <= results["score"] <= 2 and results["rows"] == len(scores) > 0


def test_report_compares_the_runs_and_the_originals_numbers(runs, tmp_path, capsys):
    assert main(["report", str(runs / "lora"), str(runs / "full"), "--output", str(tmp_path / "report.md")]) == 0
    table = (tmp_path / "report.md").read_text().splitlines()
    lora = next(line for line in table if line.startswith("| lora |"))
    score = json.loads((runs / "lora" / "eval" / "results.json").read_text())["score"]
    assert f"{score:.3f} (base)" in lora and "| 1 |" in lora
    assert any(line.startswith("| full | full |") for line in table)
    assert any("original (1x A100 80G) | full |" in line and "0.595 → 0.031" in line for line in table)
    events = EventAccumulator(str(tmp_path / "report" / "tensorboard"))  # the same table as TensorBoard text
    events.Reload()
    [text] = events.Tensors("report/text_summary")
    assert text.tensor_proto.string_val[0].decode() == (tmp_path / "report.md").read_text()


def test_score_rescores_an_original_results_file(runs, tmp_path):
    assert main(["score", "--csv", str(SEED), "--model", str(runs / "full" / "base"), "--output", str(tmp_path / "s.csv"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    original = list(csv.DictReader(open(SEED)))
    assert [r["data_id"] for r in rows] == [r["data_id"] for r in original]
    assert rows[-1]["semantic_similarity_score"] != original[-1]["semantic_similarity_score"]  # our tiny judge's


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
