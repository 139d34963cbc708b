"""LoRA and QLoRA runs end to end: small checkpoints, a final adapter PEFT loads, merges that match."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText

import lora
import models
from engine.build import add_lora
from engine.config import from_approach
from engine.data.collate import Collator
from engine.data.sources import load_splits
from engine.runtime import Runtime
from engine.step import train_step
from engine.strategies import Strategy
from finetune import finetune
from harness import ROOT, run_cli
from models.targets import QUANT_SKIP
from quant import quantize
from run import main


def _run(out: Path, approach: str) -> dict:
    config = from_approach(approach, model="tiny", limit_exhibits=2, batch_size=2, max_steps=4, eval_every=0.5,
                           lr=5e-3, lora_target=("projections", "lm_head"), output_dir=str(out), device="cpu",
                           skip_eval=approach != "lora", max_new_tokens=16)  # the LoRA run shows evaluation
    return finetune(config)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, _run(out, "lora")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    return out, _run(out, "qlora")


@pytest.fixture(scope="module")
def batch():
    rows = load_splits("musequest", limit_exhibits=1)["test"]
    inputs = Collator(models.tiny_processor())([rows[0], rows[1]])
    inputs.pop("labels")
    return inputs


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def _merge(adapter: Path, output: Path) -> None:
    result = run_cli("merge", "--adapter", str(adapter), "--output", str(output), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # an end-to-end run
def test_lora_checkpoints_hold_only_the_adapter(lora_run):
    out, summary = lora_run
    checkpoint = sorted((out / "checkpoints").iterdir())[-1]
    from safetensors.torch import load_file

    keys = load_file(checkpoint / "model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert (checkpoint / "model.safetensors").stat().st_size < 2_000_000  # megabytes, not the model
    assert summary["trainable_params"] < 0.1 * summary["total_params"]


@pytest.mark.slow  # an end-to-end run
def test_training_ends_by_scoring_the_test_split_against_the_cached_base(lora_run, tmp_path):
    out, summary = lora_run
    results = json.loads((out / "eval" / "results.json").read_text())
    assert summary["eval"] == results and results["scorer"] == "base"
    assert 0 <= results["score"] <= 2 and 0 <= results["baseline_score"] <= 2
    # The same base model, data and scorer: the baseline comes from the cache, not from a new run.
    cached = list((Path(os.environ["MUSEFT_CACHE"]) / "baselines").glob("*.json"))
    assert any(json.loads(path.read_text())["score"] == results["baseline_score"] for path in cached)
    # Scored by the base model itself, OUT/base's own answers give the cached baseline score.
    assert main(["eval", "--model", str(out / "base"), "--limit-exhibits", "2", "--max-new-tokens", "16",
                 "--batch-size", "2", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["score"] == results["baseline_score"]


@pytest.mark.slow  # an end-to-end run
def test_final_adapter_loads_in_peft_with_our_logits(lora_run, batch):
    out, _ = lora_run
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "../base"  # OUT/base, from OUT/final
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 64, True)
    ours = AutoModelForImageTextToText.from_pretrained(out / "base")
    lora.load(ours, out / "final")
    theirs = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "base"), out / "final")
    base = _logits(AutoModelForImageTextToText.from_pretrained(out / "base"), batch)
    assert not torch.allclose(_logits(ours, batch), base, atol=1e-3)  # the adapter learnt something
    assert torch.allclose(_logits(ours, batch), _logits(theirs, batch), atol=1e-5)


@pytest.mark.slow  # an end-to-end run
def test_merge_command_gives_the_adapter_models_logits(lora_run, batch, tmp_path):
    out, _ = lora_run
    moved = shutil.copytree(out, tmp_path / "moved")  # a run folder copied elsewhere finds its own OUT/base
    (out / "base").rename(out / "away")
    try:
        _merge(moved / "final", tmp_path / "merged")
    finally:
        (out / "away").rename(out / "base")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any(".lora_" in name for name in merged.state_dict())
    adapted = AutoModelForImageTextToText.from_pretrained(out / "base")
    lora.load(adapted, out / "final")
    assert torch.allclose(_logits(merged, batch), _logits(adapted, batch), atol=1e-4)


@pytest.mark.slow  # an end-to-end run
def test_qlora_reports_nf4_bytes_and_merges_into_the_dequantized_base(qlora_run, batch, tmp_path):
    out, summary = qlora_run
    assert summary["quantized_ratio"] <= 0.30
    assert summary["quantized_weight_bf16_bytes"] == 2 * sum(
        m.in_features * m.out_features for n, m in models.build_tiny(0).named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    _merge(out / "final", tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    # Reference: the NF4 base as it was trained against, with the adapter on top (not merged).
    reference = AutoModelForImageTextToText.from_pretrained(out / "base")
    quantize(reference, skip=QUANT_SKIP)
    lora.load(reference, out / "final")
    assert torch.allclose(_logits(merged, batch), _logits(reference, batch), atol=1e-4)
    # Folding the adapter into the original (never quantized) weights would give another model.
    unquantized = AutoModelForImageTextToText.from_pretrained(out / "base")
    lora.load(unquantized, out / "final")
    assert not torch.allclose(_logits(merged, batch), _logits(unquantized, batch), atol=1e-3)


def test_activation_checkpointing_with_lora_trains_every_adapter(processor):
    """The classic silent failure: checkpointed blocks with frozen inputs pass no gradient to LoRA."""
    config = from_approach("lora", lora_dropout=0.0, activation_checkpointing=True)
    model = models.build_tiny(0)
    paths = add_lora(model, config)
    strategy = Strategy(config, Runtime(torch.device("cpu")))
    strategy.prepare(model)  # checkpoints the decoder layers, as --activation-checkpointing asks
    rows = load_splits("musequest", limit_exhibits=1)["train"]
    batches = [Collator(processor)([rows[0], rows[1]])]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for param in optimizer.param_groups[0]["params"]:
        param.register_post_accumulate_grad_hook(lambda p: setattr(p, "seen", p.grad.abs().sum().item()))
    train_step(strategy, optimizer, batches, max_grad_norm=1e9)
    for path in paths:  # B starts at zero, so B's gradient is where a live adapter shows
        assert model.get_submodule(path).lora_B.weight.seen > 0, path
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
