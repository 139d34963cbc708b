"""run.py plan: each rank's memory worked out on fake tensors must equal what the same step holds on real
ones, the 8B plan must reproduce what the original logged, and an unfit run is refused before it loads."""

import json
from pathlib import Path

import pytest
import torch

from engine.config import from_approach
from engine.fit import GIB, WidestBatch
from engine.memory_trace import CUDA_BLOCK, MemoryTrace
from engine.optim import optimizer_for
from engine.plan import at_fullest, plan_ranks, traced_step
from engine.precision import PRECISIONS
from engine.runtime import Runtime
from engine.strategies import strategy_for
from tests.harness import assert_one_sentence, run_cli, spawn

REPO = Path(__file__).resolve().parent.parent


def test_trace_counts_storages_by_hand():
    """Worked out by hand: each new storage once (views are free), freed ones leave, peak is the most at once."""
    trace = MemoryTrace()
    with trace:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10].view(2, 5)  # a view: no new storage
        b = a * 2  # 4000
        del a  # the view still holds a's storage
        del view
        c = torch.ones(10, dtype=torch.bfloat16)  # 20
    assert trace.peak == 8000
    assert trace.live == 4020
    del b, c
    assert trace.live == 0
    rounded = MemoryTrace(CUDA_BLOCK)
    with rounded:
        d = torch.ones(10)  # 40 bytes take one 512-byte block on CUDA
    assert rounded.peak == 512 and d.numel() == 10


def measured_step(rank: int, world: int, base: Path, settings: dict) -> dict:
    """A real step of the engine on the tiny model's real weights, traced as the plan traces its fake one."""
    config = from_approach(**settings, gpus=world, device="cpu")
    precision = PRECISIONS[config.precision if config.precision != "auto" else "fp32"]
    batch = WidestBatch(config, None)(config.batch_size)
    with MemoryTrace() as trace:
        strategy = strategy_for(config, Runtime(torch.device("cpu"), rank, world, precision))
        strategy.build(base)
        optimizer = optimizer_for(config, precision, strategy.parameters(), config.lr)
        steps = [traced_step(trace, strategy, optimizer, batch, config) for _ in range(2)]
    return {**steps[-1].memory, "activation_bytes": at_fullest(steps)[1]}


CASES = [
    ("lora", 1, {}), ("qlora", 1, {}), ("full", 1, {}), ("full", 1, {"precision": "bf16-mixed"}),
    ("full", 1, {"precision": "bf16", "optimizer": "adamw8bit", "activation_checkpointing": True}),
    pytest.param("lora_ddp", 2, {}, marks=pytest.mark.slow), pytest.param("full_fsdp", 2, {}, marks=pytest.mark.slow),
    pytest.param("full_mp", 2, {"micro_batches": 2}, marks=pytest.mark.slow),
    # Issue 18's combinations: NF4 codes sharded; and adapters on NF4 stages, each sharded over 2 ranks.
    pytest.param("qlora", 2, {"parallel": "fsdp"}, marks=pytest.mark.slow),
    pytest.param("qlora", 4, {"parallel": "pipeline+fsdp", "stages": 2, "micro_batches": 2}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("approach, world, extra", CASES)
def test_plan_equals_a_real_step(tmp_path, approach, world, extra):
    """Static bytes exactly, activations within 10%, on every rank, for the CPU's own plan."""
    settings = dict(approach=approach, model="tiny", batch_size=4, limit_exhibits=4, **extra)
    if world == 1:
        measured = [measured_step(0, 1, tmp_path / "base", settings)]
    else:
        measured = spawn(world, measured_step, tmp_path, base=tmp_path / "base", settings=settings)
    config = from_approach(**settings, gpus=world, device="cpu")
    precision = PRECISIONS[extra.get("precision", "fp32")]
    planned = plan_ranks(config, precision, WidestBatch(config, None)(4), gpu=False)
    for plan, real in zip(planned, measured, strict=True):
        for name in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            assert getattr(plan, name) == real[name], (plan.rank, name)
        # Buffers (NF4 codes, rotary tables) too, but for one 32-byte rotary table: loading in bf16, transformers
        # makes original_inv_freq share inv_freq's storage, which the plan's model built on meta does not.
        assert 0 <= plan.buffer_bytes - real["buffer_bytes"] <= 32, plan.rank
        assert abs(plan.activation_bytes - real["activation_bytes"]) <= 0.1 * real["activation_bytes"], plan.rank
        assert real["activation_bytes"] > 0


def test_plan_command_json(tmp_path):
    """--json: one object with the fields the issue names; a longer --sequence-length needs more activations."""
    def plan(*flags):
        result = run_cli("plan", "--approach", "full", "--device", "cpu", "--limit-exhibits", "4", "--json",
                         "--output-dir", str(tmp_path / "out"), *flags, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    short, long = plan("--sequence-length", "300", "--memory-budget", "0.3"), plan("--sequence-length", "600")
    rank = short["ranks"][0]
    assert set(rank) >= {"rank", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "peak_bytes"}
    assert short["sequence_length"] == 300 and long["sequence_length"] == 600
    assert long["ranks"][0]["activation_bytes"] > rank["activation_bytes"]
    assert long["fits"] is None and short["fits"] is True
    # The largest batch fits and one more row does not.
    largest = short["max_batch_size"]
    config = from_approach("full", model="tiny", device="cpu", limit_exhibits=4, batch_size=largest)
    widest = WidestBatch(config, 300)
    budget = short["budget_bytes"]
    assert plan_ranks(config, PRECISIONS["fp32"], widest(largest), False)[0].peak_bytes <= budget
    bigger = from_approach("full", model="tiny", device="cpu", limit_exhibits=4, batch_size=largest + 1)
    assert plan_ranks(bigger, PRECISIONS["fp32"], widest(largest + 1), False)[0].peak_bytes > budget


def test_run_over_its_memory_budget_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--approach", "full", "--limit-exhibits", "4", "--memory-budget", "0.01",
                     "--output-dir", str(out), cwd=REPO)
    assert_one_sentence(result, "over the budget of 0.0 GiB")
    assert "--batch-size" in result.stderr or "--activation-checkpointing" in result.stderr
    assert not out.exists()  # nothing written, nothing loaded


def test_run_whose_checkpoints_cannot_fit_on_disk_is_refused(tmp_path, monkeypatch):
    import shutil

    from engine import fit
    from errors import UsageError

    monkeypatch.setattr(fit.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    config = from_approach("full", model="tiny", device="cpu", limit_exhibits=4, output_dir=str(tmp_path / "run"), keep_last=3)
    with pytest.raises(UsageError, match="--keep-last 3") as refusal:
        fit.refuse_if_unfit_before_loading(config, 1, gpu=False)
    assert "5 checkpoints" in str(refusal.value)


@pytest.mark.slow
def test_every_run_of_the_originals_table_fits():
    """The README's table: each of the original's runs, as our command on its GPUs, fits in the plan; where
    the original logged torch.cuda.memory_allocated after its first optimizer step and zero_grad (its FSDP
    runs, fp32 masters as accelerate kept them; its LoRA + DDP runs), the plan holds within 5% of it."""
    from bench.original_runs import RUNS, plan_of

    for words, flags, logged in RUNS:
        plan = plan_of(flags, search=False)
        assert plan["fits"], words
        if logged is not None:
            held = plan["ranks"][0]["held_bytes"] / GIB
            assert abs(held - logged[0]) <= 0.05 * logged[0], (words, held)
