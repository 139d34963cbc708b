"""The training loop against independent references: HF's own loss, one big batch, an unbroken run."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import models
from engine.config import from_approach
from engine.data.collate import Collator
from engine.data.sources import load_splits
from engine.outputs import checkpoint
from engine.runtime import Runtime
from engine.step import train_step
from engine.strategies import Strategy
from engine.trainer import train
from harness import ROOT, run_cli

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def rows():
    train_split = load_splits("musequest", limit_exhibits=2)["train"]
    return [train_split[i] for i in range(4)]


def _step(rows, processor, micro_batch: int) -> tuple[float, float, dict]:
    model = models.build_tiny(0)
    collator = Collator(processor)
    batches = [collator(rows[i : i + micro_batch]) for i in range(0, len(rows), micro_batch)]
    strategy = Strategy(from_approach("full", model="tiny", device="cpu", train_modules=("all",)), CPU)
    strategy.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, grad_norm, _ = train_step(strategy, optimizer, batches, max_grad_norm=1e9)
    return loss, grad_norm, model.state_dict()


def test_loss_is_the_token_mean_of_the_whole_batch_however_it_is_cut(rows, processor):
    batch = Collator(processor)(rows)
    with torch.no_grad():  # transformers' own loss: mean over every labelled token of one batch
        reference = models.build_tiny(0)(**batch).loss.item()
    whole, whole_norm, whole_weights = _step(rows, processor, micro_batch=4)
    split, split_norm, split_weights = _step(rows, processor, micro_batch=1)
    assert whole == pytest.approx(reference, rel=1e-5)
    assert split == pytest.approx(reference, rel=1e-5)
    assert split_norm == pytest.approx(whole_norm, rel=1e-4)  # a sum-vs-mean error would scale this by 4
    for name in whole_weights:
        assert torch.allclose(whole_weights[name], split_weights[name], atol=1e-6), name


def _config(out: Path, **overrides):
    settings = dict(model="tiny", limit_exhibits=2, batch_size=2, max_steps=6, eval_every=1 / 3, lr=1e-3,
                    train_modules=("all",), output_dir=str(out), device="cpu", skip_eval=True)
    return from_approach("full", **dict(settings, **overrides))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, train(_config(out))


@pytest.mark.slow  # a tiny run trained end to end (the `straight_run` fixture)
def test_resume_continues_with_exactly_the_same_losses(straight_run, tmp_path):
    _, straight = straight_run
    first = train(_config(tmp_path, stop_after_steps=3))
    assert not first["completed"] and first["steps"] == 3 and not (tmp_path / "final").exists()
    second = train(_config(tmp_path, resume=True))
    assert second["completed"] and second["steps"] == 6
    resumed = first["history"]["train_loss"] + second["history"]["train_loss"]
    assert [step for step, _ in resumed] == list(range(1, 7))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in straight["history"]["train_loss"]],
                                                          rel=1e-6)
    assert [s for s, _ in second["history"]["val_loss"]] == [s for s, _ in straight["history"]["val_loss"][-2:]]
    assert [v for _, v in second["history"]["val_loss"]] == pytest.approx(
        [v for _, v in straight["history"]["val_loss"][-2:]], rel=1e-6)


@pytest.mark.slow  # a tiny run trained end to end (the `straight_run` fixture)
def test_base_and_final_reload_with_transformers(straight_run, processor):
    out, summary = straight_run
    base = AutoModelForImageTextToText.from_pretrained(out / "base")
    fresh = models.build_tiny(0).state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), fresh, strict=True))
    final = AutoModelForImageTextToText.from_pretrained(out / "final")
    # --final best: the final weights are the base plus the best checkpoint's trainable tensors.
    best = checkpoint.best(out / "checkpoints")
    assert json.loads((best / "meta.json").read_text())["val_loss"] == min(v for _, v in summary["history"]["val_loss"])
    tensors, _, _ = checkpoint.load(best, {})
    base.load_state_dict(tensors, strict=False)
    row = load_splits("musequest", limit_exhibits=1)["test"][0]
    batch = Collator(AutoProcessor.from_pretrained(out / "final"))([row])
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(final(**batch).logits, base(**batch).logits)


@pytest.mark.slow  # a tiny run trained end to end (the `straight_run` fixture)
def test_summary_reports_what_the_issue_lists(straight_run):
    out, summary = straight_run
    saved = json.loads((out / "summary.json").read_text())
    for key in ("approach", "world_size", "steps", "final_train_loss", "final_val_loss", "wall_time_s",
                "samples_per_s", "tokens_per_s"):
        assert saved[key] is not None, key
    rank = saved["ranks"][0]
    trainable_fp32 = 4 * saved["trainable_params"]
    assert rank["grad_bytes"] == trainable_fp32 and rank["optimizer_bytes"] >= 2 * trainable_fp32
    assert rank["param_bytes"] == 4 * saved["total_params"]
    assert json.loads((out / "config.json").read_text())["approach"] == "full"


def _docs_demos() -> list[str]:
    """Every CPU training demo docs/approaches.md shows (on the built-in data subset). The README's one,
    its first command, tests/e2e/test_demo.py runs as written, evaluation included."""
    lines = (ROOT / "docs" / "approaches.md").read_text().splitlines()
    commands = [line.split("python run.py", 1)[1].split("#")[0].strip() for line in lines
                if "python run.py" in line and "--limit-exhibits" in line]
    demos = [args for args in commands if args.startswith("--")]  # not eval/score/report
    assert demos, "docs/approaches.md shows no CPU training demo"
    return demos


@pytest.mark.slow
@pytest.mark.parametrize("args", _docs_demos())
def test_docs_demos_lower_the_validation_loss(args, tmp_path):
    """The demo commands of docs/approaches.md (whose approaches other tests run end to end) for one epoch instead
    of their three, with 5 validations and no evaluation, to keep the suite short: they must lower the loss
    by half a nat (full: 10.39 -> 9.44 in that epoch)."""
    result = run_cli(*args.split(), "--epochs", "1", "--eval-every", "0.2", "--skip-eval", "--output-dir",
                     str(tmp_path), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    # It says what it trains, and the bar shows the latest validation loss beside the training loss.
    assert re.search(r"model: the built-in tiny stand-in, \d\.\dM random parameters in Idefics2's shape, not "
                     r"Idefics2 itself", result.stdout), result.stdout
    assert re.search(r"loss=\d+\.\d{3}, .*val_loss=\d+\.\d{3}\]", result.stderr), result.stderr[-500:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # The first step's training loss is the untrained model's (the first validation may come later).
    assert summary["history"]["val_loss"][-1][1] < summary["history"]["train_loss"][0][1] - 0.5
