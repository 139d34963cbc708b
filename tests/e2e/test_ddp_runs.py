"""lora_ddp end to end: 2 gloo ranks reproduce a one-process run on the same global batches."""

import pytest
import torch
from safetensors.torch import load_file

from harness import FULL, assert_same_curves, run_engine, saved_weights


@pytest.mark.slow
def test_two_ranks_reproduce_one_process_with_the_double_batch(tmp_path, one_process):
    single, single_out = one_process("lora", 4)
    ddp = run_engine(tmp_path / "ddp", "lora_ddp", batch_size=2, gpus=2)
    assert ddp["world_size"] == 2 and len(ddp["ranks"]) == 2
    for key in ("train_loss", "grad_norm", "val_loss"):  # the grad norm catches a sum-vs-mean slip
        assert [v for _, v in ddp["history"][key]] == pytest.approx([v for _, v in single["history"][key]], rel=1e-4)
    ours = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    reference = load_file(single_out / "final" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    # Resume with 2 ranks: stop after 2 steps, continue, and land on the same curve and weights.
    first = run_engine(tmp_path / "resumed", "lora_ddp", batch_size=2, gpus=2, stop_after_steps=2)
    second = run_engine(tmp_path / "resumed", "lora_ddp", batch_size=2, gpus=2, resume=True)
    resumed = first["history"]["train_loss"] + second["history"]["train_loss"]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in ddp["history"]["train_loss"]], rel=1e-6)
    again = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert all(torch.allclose(again[name], ours[name], atol=1e-6) for name in ours)
    for name in ours:
        # Adam turns float-rounding differences of the summed gradients into ~1e-5 weight differences
        # (0.2% of one lr=5e-3 step); a real error would be a whole step.
        assert torch.allclose(ours[name], reference[name], atol=5e-5), name


@pytest.mark.slow
def test_qlora_with_ddp_is_a_flag_away_and_equals_one_process(tmp_path, one_process):
    single, _ = one_process("qlora", 4)
    hybrid = run_engine(tmp_path / "hybrid", "qlora", batch_size=2, gpus=2, parallel="ddp")
    assert hybrid["world_size"] == 2 and hybrid["quantized_ratio"] == single["quantized_ratio"]
    for key in ("train_loss", "grad_norm"):
        assert [v for _, v in hybrid["history"][key]] == pytest.approx([v for _, v in single["history"][key]], rel=1e-4)


@pytest.mark.slow
def test_full_fine_tuning_with_ddp_equals_one_process(tmp_path, one_process):
    """Replicated full fine-tuning (`--approach full --parallel ddp`): every trained weight's gradient summed."""
    single, single_out = one_process("full", 4, **FULL)
    hybrid = run_engine(tmp_path / "hybrid", "full", batch_size=2, gpus=2, parallel="ddp", **FULL)
    assert_same_curves(hybrid, single)
    ours, reference = saved_weights(tmp_path / "hybrid" / "final"), saved_weights(single_out / "final")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=5e-5, msg=name)
