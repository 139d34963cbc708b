"""full_fsdp and LoRA+FSDP end to end: 2 and 4 gloo ranks reproduce one process on the same global batches.

Tolerances: the losses agree to float rounding. torch's clip_grad_norm_ (the one-process reference)
is itself 1e-4 off the float64 norm on this model, ours 1e-7, hence rel=1e-3 on the norms: still
a thousand times tighter than a sum-for-mean slip. Adam turns rounding differences of near-zero
gradients into weight differences of a few percent of one step (lr=1e-3 here); a wrong gradient
moves weights by whole steps.
"""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from engine.data.sources import load_splits
from engine.outputs import checkpoint
from errors import UsageError
from harness import FULL, assert_same_curves, run_engine, saved_logits, saved_weights
from models.tiny import build_tiny


@pytest.mark.slow
@pytest.mark.parametrize("world", [2])  # 4 ranks: test_fsdp.py on the toy, and test_pipeline_runs' headline
def test_full_fsdp_equals_one_process_full_and_holds_one_nth_per_rank(world, tmp_path, processor, one_process):
    single, single_out = one_process("full", 4, **FULL)
    sharded = run_engine(tmp_path / "fsdp", "full_fsdp", batch_size=4 // world, gpus=world, **FULL)
    assert sharded["world_size"] == world and sharded["total_params"] == single["total_params"]
    assert_same_curves(sharded, single)
    ours, reference = saved_weights(tmp_path / "fsdp" / "final"), saved_weights(single_out / "final")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=5e-5, msg=name)
    # Parameters, gradients and AdamW state: 1/N each, plus at most the padding of a flat buffer
    # (and less: AdamW keeps one 4-byte step count per tensor, and there are fewer shards than weights).
    largest_block = max(sum(p.numel() for p in block.parameters()) for block in build_tiny(0).model.text_model.layers)
    whole = single["ranks"][0]
    for rank in sharded["ranks"]:
        for kind in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            assert 0.99 * whole[kind] / world <= rank[kind] <= whole[kind] / world + 4 * largest_block, (kind, rank)
    # The export is a sharded Hugging Face folder that transformers loads, with the logits of the reference.
    index = json.loads((tmp_path / "fsdp" / "final" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # written unit by unit, never as one piece
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which exhibit is this?"}]}]
    batch = dict(processor(text=[processor.apply_chat_template(messages)], return_tensors="pt"))
    torch.testing.assert_close(saved_logits(tmp_path / "fsdp" / "final", batch),
                               saved_logits(single_out / "final", batch), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_fsdp_resumes_from_per_rank_shards_on_the_same_world_size(tmp_path):
    """The whole run collates its batches ahead in 2 worker processes a rank, the resumed one in line and then in 1:
    the same rows in the same batches on the same ranks, whichever (tests/unit/engine/test_loader.py)."""
    whole = run_engine(tmp_path / "whole", "full_fsdp", batch_size=2, gpus=2, data_workers=2, **FULL)
    first = run_engine(tmp_path / "resumed", "full_fsdp", batch_size=2, gpus=2, stop_after_steps=2, **FULL)
    saved = sorted((tmp_path / "resumed" / "checkpoints").glob("step-*/*"))
    assert {p.name for p in saved} >= {"model-rank00000-of-00002.safetensors", "train_state-rank00001-of-00002.pt"}
    meta = json.loads((checkpoint.complete(tmp_path / "resumed" / "checkpoints")[-1] / "meta.json").read_text())
    with pytest.raises(UsageError, match="its shards is 2, this run's is 4"):  # what a 4-rank resume is told
        checkpoint.load(checkpoint.complete(tmp_path / "resumed" / "checkpoints")[-1], dict(meta, shards=4))
    second = run_engine(tmp_path / "resumed", "full_fsdp", batch_size=2, gpus=2, resume=True, data_workers=1, **FULL)
    assert [s for s, _ in first["history"]["train_loss"] + second["history"]["train_loss"]] == [1, 2, 3]
    resumed = first["history"]["train_loss"] + second["history"]["train_loss"]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in whole["history"]["train_loss"]], rel=1e-6)
    again, reference = saved_weights(tmp_path / "resumed" / "final"), saved_weights(tmp_path / "whole" / "final")
    for name, tensor in reference.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_lora_with_fsdp_equals_one_process_lora(tmp_path, one_process):
    single, single_out = one_process("lora", 4)
    sharded = run_engine(tmp_path / "fsdp", "lora", batch_size=2, gpus=2, parallel="fsdp", skip_eval=False,
                         max_new_tokens=8)
    assert sharded["trainable_params"] == single["trainable_params"]
    assert_same_curves(sharded, single)
    # Only the adapter's gradients and AdamW state exist; the frozen base is sharded too.
    assert sharded["ranks"][0]["grad_bytes"] <= single["ranks"][0]["grad_bytes"] / 2 + 1024
    assert sharded["ranks"][0]["param_bytes"] <= single["ranks"][0]["param_bytes"] / 2 + 1024 * 1024
    # Evaluation after training: both ranks answered half of the test rows; all come back, in order.
    rows = list(csv.DictReader((tmp_path / "fsdp" / "eval" / "results.csv").open()))[:-1]
    test = load_splits("musequest", limit_exhibits=2)["test"]
    assert [row["data_id"] for row in rows] == [str(row["data_id"]) for row in test]
    assert sharded["eval"]["rows"] == len(test) and sharded["eval"]["baseline_score"] is not None
    ours = load_file(tmp_path / "fsdp" / "final" / "adapter_model.safetensors")
    reference = load_file(single_out / "final" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=2e-4, msg=name)  # lr=5e-3


@pytest.mark.slow
def test_qlora_with_fsdp_equals_one_process_qlora_with_half_the_nf4_codes_per_rank(tmp_path, one_process):
    """Each rank quantizes the layers its shards cover as one process does, keeps its half of the packed codes
    and absmaxes (whole NF4 blocks' bytes, sharded as flat uint8 and fp32 buffers) and gathers a block's codes
    only while the block runs: the same losses, gradient norms and adapter as one-process QLoRA."""
    single, single_out = one_process("qlora", 4)
    sharded = run_engine(tmp_path / "fsdp", "qlora", batch_size=2, gpus=2, parallel="fsdp")
    assert sharded["total_params"] == single["total_params"]
    assert sharded["quantized_weight_bytes"] == single["quantized_weight_bytes"] > 0
    # The validation after 3 steps at lr=5e-3 within 1e-4 (3e-5 apart here): Adam moves the adapter by
    # whole steps on the rounding of near-zero gradients (the module docstring).
    assert_same_curves(sharded, single, validation=1e-4)
    whole = single["ranks"][0]
    for rank in sharded["ranks"]:  # the rotary tables (64 bytes) are the only buffers every rank keeps whole
        assert whole["buffer_bytes"] / 2 <= rank["buffer_bytes"] <= whole["buffer_bytes"] / 2 + 1024
        assert rank["grad_bytes"] <= whole["grad_bytes"] / 2 + 1024
    ours = load_file(tmp_path / "fsdp" / "final" / "adapter_model.safetensors")
    reference = load_file(single_out / "final" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=2e-4, msg=name)  # lr=5e-3
