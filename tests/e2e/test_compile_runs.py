"""--compile end to end: compiled runs reproduce the eager one-process runs that other files compare against.

Four runs cover the compositions: one process, full fine-tuning (vision layers train, so every kind of block is
compiled with a backward) under activation checkpointing, choosing its checkpoint by its answers (the blocks run
eagerly while generating: greedy.py); QLoRA sharded by FSDP on 2 ranks (NF4 dequantization inside compiled
blocks, LoRA around it, FSDP's gathers and recomputation around them); LoRA with DDP and full fine-tuning on a
pipeline of 2 stages, on 2 ranks each; and full fine-tuning on 2 stages of 2 FSDP shards each, on 4 ranks. In the
suite the compiled graphs run on
aot_eager (tests/conftest.py): dynamo's capture and AOT autograd's forward and backward graphs, eager kernels. So
the tolerances are those of the eager comparisons (harness.assert_same_curves); bench/compile_vs_eager.py compares
inductor's losses with eager's.
"""

import pytest
import torch

from harness import FULL, SELECT, assert_same_curves, run_engine


@pytest.mark.slow
def test_compiled_checkpointed_run_choosing_by_answers_equals_the_eager_run(tmp_path, one_process):
    single, _ = one_process("full", 4, **SELECT)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run_engine(tmp_path, "full", batch_size=4, gpus=None, compile=True, activation_checkpointing=True,
                          **SELECT)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it compiled (in this process)
    assert_same_curves(compiled, single)
    steps, values = zip(*single["history"]["chrf"], strict=True)  # the same answers at every evaluation point
    assert [step for step, _ in compiled["history"]["chrf"]] == list(steps)
    assert [value for _, value in compiled["history"]["chrf"]] == pytest.approx(values, rel=1e-9)
    assert compiled["final"]["step"] == single["final"]["step"]


@pytest.mark.slow
def test_compiled_qlora_with_fsdp_equals_one_process_qlora(tmp_path, one_process):
    single, _ = one_process("qlora", 4)
    sharded = run_engine(tmp_path, "qlora", batch_size=2, gpus=2, parallel="fsdp", compile=True)
    assert_same_curves(sharded, single, validation=1e-4)  # eager FSDP's own tolerance (tests/e2e/test_fsdp_runs.py)


# Each eager comparison's own tolerances: tests/e2e/test_ddp_runs.py's; harness.assert_same_curves' (the pipeline's).
DDP_RELATIVE = {"train_loss": 1e-4, "grad_norm": 1e-4, "val_loss": 1e-4}
PIPELINE_RELATIVE = {"train_loss": 1e-5, "grad_norm": 1e-3, "val_loss": 1e-5}


@pytest.mark.slow
@pytest.mark.parametrize("approach, batch_size, gpus, flags, reference, relative", [
    ("lora_ddp", 2, 2, {}, ("lora", {}), DDP_RELATIVE),
    ("full_mp", 4, 2, dict(FULL, micro_batches=2), ("full", FULL), PIPELINE_RELATIVE),
    ("full_mp", 2, 4, dict(FULL, parallel="pipeline+fsdp", stages=2, micro_batches=2), ("full", FULL),
     PIPELINE_RELATIVE),
], ids=["ddp", "pipeline", "pipeline+fsdp"])
def test_compiled_ddp_and_pipeline_runs_equal_one_process(approach, batch_size, gpus, flags, reference, relative,
                                                          tmp_path, one_process, monkeypatch):
    """DDP's gradient hooks fire from compiled blocks' backward; a pipeline stage's compiled blocks send and receive
    between them, and under pipeline+fsdp each stage's shards gather around them. Each equals the eager one-process
    run as its eager self does (--batch-size is per pipeline: two pipelines of 2 rows make the batch of 4)."""
    # A stage compiling its blocks for the first step keeps the next one waiting for its activations: under load, 4
    # ranks on 2 cores, longer than the 10 s after which the NCCL-rules mode (parallel/p2p.py) calls a wait a hang.
    monkeypatch.setenv("MUSEFT_NCCL_DEADLINE_S", "120")
    single, _ = one_process(reference[0], 4, **reference[1])
    run = run_engine(tmp_path, approach, batch_size=batch_size, gpus=gpus, compile=True, **flags)
    for key, rel in relative.items():
        expected = [v for _, v in single["history"][key]]
        assert [v for _, v in run["history"][key]] == pytest.approx(expected, rel=rel), key
