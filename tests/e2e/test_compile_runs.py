"""--compile end to end: compiled runs reproduce the eager one-process runs that other files compare against.

Two runs cover the compositions: one process, full fine-tuning (vision layers train, so every kind of block is
compiled with a backward) under activation checkpointing, choosing its checkpoint by its answers (the blocks run
eagerly while generating: greedy.py); and QLoRA sharded by FSDP on 2 ranks (NF4 dequantization inside compiled
blocks, LoRA around it, FSDP's gathers and recomputation around them). In the suite the compiled graphs run on
aot_eager (tests/conftest.py): dynamo's capture and AOT autograd's forward and backward graphs, eager kernels. So
the tolerances are those of the eager comparisons (harness.assert_same_curves); bench/compile_vs_eager.py compares
inductor's losses with eager's.
"""

import pytest
import torch

from harness import SELECT, assert_same_curves, run_engine


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
