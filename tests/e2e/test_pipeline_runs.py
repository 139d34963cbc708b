"""full_mp end to end: 2 and 4 gloo ranks, GPipe and 1F1B, reproduce a one-process full run on the same batch.

Tolerances as in test_fsdp_runs (which explains them): the pipeline computes the same sums in
another order, micro-batch by micro-batch.
"""

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from harness import FULL, ROOT, assert_same_curves, run_engine, saved_logits, saved_weights
from models.tiny import build_tiny

ROTARY_BYTES = 2 * 8 * 4  # the tiny model's rotary tables (inv_freq, original_inv_freq: 8 fp32 each), in every stage


@pytest.fixture
def single(one_process) -> tuple[dict, Path]:
    """One process, full fine-tuning, the same batch of 4: the reference of every test here."""
    summary, out = one_process("full", 4, **FULL)
    return summary, out / "final"


def _assert_same_weights(folder, reference_folder, atol: float = 5e-5) -> None:
    ours, reference = saved_weights(folder), saved_weights(reference_folder)
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=atol, msg=name)


@pytest.mark.slow
# Every schedule x M x world size is in test_pipeline.py on a toy; here one of each on the real model.
@pytest.mark.parametrize("world, schedule, micro", [(2, "gpipe", 1), (2, "1f1b", 4), (4, "gpipe", 4)])
def test_full_mp_equals_one_process_full_and_each_rank_holds_its_stage(world, schedule, micro, single, tmp_path,
                                                                       processor):
    reference, reference_final = single
    piped = run_engine(tmp_path, "full_mp", batch_size=4, gpus=world, micro_batches=micro, schedule=schedule,
                       **FULL)
    assert_same_curves(piped, reference)
    _assert_same_weights(tmp_path / "final", reference_final)
    # Contiguous stages over all decoder layers; each rank's parameters are exactly its stage's.
    layers = [rank["decoder_layers"] for rank in piped["ranks"]]
    assert layers[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(layers))
    assert layers[-1][1] == len(build_tiny(0).model.text_model.layers)
    assert sum(rank["param_bytes"] for rank in piped["ranks"]) == reference["ranks"][0]["param_bytes"]
    assert all(rank["param_bytes"] < reference["ranks"][0]["param_bytes"] for rank in piped["ranks"])
    assert piped["theoretical_bubble"] == pytest.approx((world - 1) / (micro + world - 1))
    assert all(0 <= rank["idle_fraction"] < 1 for rank in piped["ranks"])
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which exhibit is this?"}]}]
    batch = dict(processor(text=[processor.apply_chat_template(messages)], return_tensors="pt"))
    torch.testing.assert_close(saved_logits(tmp_path / "final", batch), saved_logits(reference_final, batch),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_mp_resumes_from_per_stage_checkpoints(single, tmp_path):
    """Resumed with its batches collated ahead by a worker process on each stage (--data-workers 1)."""
    reference, reference_final = single
    first = run_engine(tmp_path, "full_mp", batch_size=4, gpus=2, stop_after_steps=2, **FULL)
    saved = {p.name for p in (tmp_path / "checkpoints").glob("step-*/*")}
    assert {"model-rank00000-of-00002.safetensors", "model-rank00001-of-00002.safetensors"} <= saved
    second = run_engine(tmp_path, "full_mp", batch_size=4, gpus=2, resume=True, data_workers=1, **FULL)
    resumed = first["history"]["train_loss"] + second["history"]["train_loss"]
    assert [s for s, _ in resumed] == [1, 2, 3]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in reference["history"]["train_loss"]], rel=1e-5)
    _assert_same_weights(tmp_path / "final", reference_final)


@pytest.mark.slow
def test_pipeline_of_fsdp_stages_equals_one_process_full_and_resumes(single, tmp_path):
    """4 ranks as 2 stages x 2 shards: two pipelines, each fed half of every batch of 4 (--batch-size is per
    pipeline), each stage sharded over its 2 ranks. Stopped after 2 steps and resumed from the 4 ranks' own
    checkpoint files (its batches now collated ahead by a worker process a rank), it trains, validates and exports
    what one process does with the whole batch."""
    reference, reference_final = single
    hybrid = dict(parallel="pipeline+fsdp", stages=2, micro_batches=2, **FULL)
    first = run_engine(tmp_path, "full_mp", batch_size=2, gpus=4, stop_after_steps=2, **hybrid)
    saved = {p.name for p in (tmp_path / "checkpoints").glob("step-*/*")}
    assert {f"model-rank{rank:05d}-of-00004.safetensors" for rank in range(4)} <= saved
    second = run_engine(tmp_path, "full_mp", batch_size=2, gpus=4, resume=True, data_workers=1, **hybrid)
    for key in ("train_loss", "val_loss", "grad_norm"):
        second["history"][key] = first["history"][key] + second["history"][key]
    assert_same_curves(second, reference)
    _assert_same_weights(tmp_path / "final", reference_final)
    # Rank r is stage r // 2; a stage's two ranks hold a half of its weights each (to the shards' padding).
    ranks, whole = second["ranks"], reference["ranks"][0]["param_bytes"]
    assert [rank["stage"] for rank in ranks] == [0, 0, 1, 1]
    padding = 4 * 64  # at most one fp32 element of padding per flat buffer, a few dozen flats per rank
    assert whole <= sum(rank["param_bytes"] for rank in ranks) <= whole + 4 * padding
    for first_shard, second_shard in (ranks[0:2], ranks[2:4]):
        assert abs(first_shard["param_bytes"] - second_shard["param_bytes"]) <= padding
        assert first_shard["param_bytes"] < whole / 2


@pytest.mark.slow
def test_the_headline_command_runs_on_four_cpu_processes(tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
    command = [torchrun, str(ROOT / "run.py"), "--approach", "full_mp", "--gpus", "4",
               "--limit-exhibits", "2", "--max-steps", "2", "--skip-eval", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["completed"] and len(summary["ranks"]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("approach", ["lora", "qlora"])
def test_adapters_on_the_pipeline_and_on_its_fsdp_stages_equal_one_process(approach, tmp_path):
    """Adapters on each stage's layers (and the last stage's lm_head), trained through a 2-stage pipeline, and
    through 2 stages x 2 FSDP shards: the same losses, gradient norms and adapter as one process; the PEFT
    export gathers every stage's adapters. Under QLoRA each rank quantizes the layers it reads exactly as one
    process quantizes the whole model, and keeps its stage's (and shard's) NF4 codes only."""
    from safetensors.torch import load_file

    settings = dict(lr=5e-3, lora_target=("projections", "lm_head"), micro_batches=2)
    reference = run_engine(tmp_path / "one", approach, batch_size=4, gpus=None, **settings)
    piped = run_engine(tmp_path / "piped", approach, batch_size=4, gpus=2, parallel="pipeline", **settings)
    sharded = run_engine(tmp_path / "sharded", approach, batch_size=2, gpus=4, parallel="pipeline+fsdp", stages=2,
                         **settings)
    expected = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert len(expected) > 0
    for run, folder in ((piped, "piped"), (sharded, "sharded")):
        # Validation after 3 steps at lr=5e-3 within 1e-4 where FSDP sums (test_fsdp_runs says why).
        assert_same_curves(run, reference, validation=1e-4 if run is sharded else 1e-5)
        ours = load_file(tmp_path / folder / "final" / "adapter_model.safetensors")
        assert ours.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=2e-4, msg=name)
    whole = reference["ranks"][0]
    # Each pipeline rank holds its stage only: the stages' weights and buffers (the NF4 codes) add up to the
    # whole model's, but for the rotary tables every stage keeps.
    assert sum(rank["param_bytes"] for rank in piped["ranks"]) == whole["param_bytes"]
    assert sum(rank["grad_bytes"] for rank in piped["ranks"]) == whole["grad_bytes"]
    stages = [rank["buffer_bytes"] for rank in piped["ranks"]]
    assert sum(stages) - whole["buffer_bytes"] == ROTARY_BYTES
    assert approach == "lora" or max(stages) < whole["buffer_bytes"]
    # Each pipeline+fsdp rank holds half of its stage: the two ranks of a stage hold as much, to the padding.
    for kind, stage_bytes in (("param_bytes", None), ("buffer_bytes", stages)):
        shards = [rank[kind] for rank in sharded["ranks"]]
        for stage, pair in enumerate((shards[0:2], shards[2:4])):
            assert abs(pair[0] - pair[1]) <= 256, (kind, shards)
            if stage_bytes:
                assert stage_bytes[stage] / 2 <= pair[0] <= stage_bytes[stage] / 2 + 256, (kind, shards)

