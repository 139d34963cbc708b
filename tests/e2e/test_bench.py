"""The benchmark's measuring tools against values worked out by hand, and the random-weight loader.

The benchmark runs themselves are not part of the suite (minutes of timing); one short run of
the lora case checks that ours and PEFT count the same adapter bytes, since they train the same
weights.
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from measure import Contender, SavedTensors, held_bytes, measure
from ours import world_of
from real_size import largest_batch

# bench/run.py under a name of its own: `run` is the engine's command line.
_spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)

import models
from models.tiny import build_tiny, tiny_idefics2_config


@pytest.mark.parametrize("capacity, limit, expected", [(37, 64, 37), (0, 64, 0), (1, 64, 1), (64, 64, 64),
                                                       (500, 64, 64), (5, 6, 5), (2, 3, 2)])
def test_largest_batch_finds_the_capacity_and_never_tries_past_the_limit(capacity, limit, expected):
    tried = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= capacity

    assert largest_batch(fits, limit) == expected
    assert max(tried) <= limit and len(tried) <= 2 * limit.bit_length()


def test_saved_tensors_counts_each_storage_once_and_not_the_parameters():
    weight = nn.Parameter(torch.randn(10, 10))
    x = torch.randn(1000, 10, requires_grad=True)
    with SavedTensors(exclude=[weight]) as saved:
        y = (x @ weight).exp()  # mm saves x (40,000 bytes) and the weight (excluded); exp saves y (40,000)
        z = y.sin()  # saves y again: the same storage
        assert saved.current == 80_000
        z.sum().backward()
    assert saved.current == 0 and saved.peak == 80_000


def _linear_contender(pause_s: float = 0.0) -> Contender:
    """A linear layer's AdamW step, after a sleep of `pause_s`: a step that takes at least that long."""
    model = nn.Linear(10, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batches):
        time.sleep(pause_s)
        for batch in batches:
            model(batch["x"]).relu().sum().backward()
        optimizer.step()

    return Contender(model, optimizer, step)


def test_measure_counts_params_grads_optimizer_and_activations_by_hand():
    contender = _linear_contender(pause_s=0.02)
    batch = [{"x": torch.randn(7, 10)}]
    result = measure({"linear": contender}, batch, torch.device("cpu"), warmup=1, steps=3)["linear"]
    assert (result.param_bytes, result.grad_bytes) == (440, 440)  # 110 fp32 weights
    assert result.optimizer_bytes == 2 * 440 + 2 * 4  # two moments, and a step scalar per parameter
    # relu saves its output (7x10 fp32); mm saves the input x (7x10) for the weight's gradient.
    assert result.activation_bytes == 2 * 7 * 10 * 4
    assert result.step_s >= 0.02  # the median timed step, each of which slept 0.02 s
    assert held_bytes(contender.model, contender.optimizer)["grad_bytes"] == 0


def test_measure_counts_the_matmul_flops_of_a_step_for_mfu():
    result = measure({"linear": _linear_contender()}, [{"x": torch.randn(7, 10)}], torch.device("cpu"),
                     warmup=0, steps=1, count_flops=True)["linear"]
    # 2*7*10*10 each: the forward and the weight's gradient (the input x takes none).
    assert result.flops == 2 * 2 * 7 * 10 * 10


def test_entries_give_ours_over_peer_per_metric():
    measured = dict(step_s=0.5, param_bytes=2**20, grad_bytes=0, optimizer_bytes=0, activation_bytes=3 * 2**20,
                    peak_bytes=None, flops=None)
    report = {"measured": {"ours": measured, "peer": dict(measured, step_s=0.25, activation_bytes=2**20)},
              "rows": 8, "tokens": 2000, "largest_batch": None, "peak_flops": None, "peer": "torch DDP"}
    rows = {e["name"]: e for e in bench_run.entries("lora_ddp", 2, report)}
    assert rows["lora_ddp (2 ranks): step time"]["ratio"] == 2.0
    assert rows["lora_ddp (2 ranks): samples/s"]["ours"] == 16 and rows["lora_ddp (2 ranks): samples/s"]["ratio"] == 0.5
    assert rows["lora_ddp (2 ranks): tokens/s"]["peer"] == 8000
    assert rows["lora_ddp (2 ranks): activations per rank"]["ratio"] == 3.0
    assert rows["lora_ddp (2 ranks): grads per rank"]["ratio"] is None  # 0 / 0
    assert all(set(e) >= {"name", "ours", "peer", "unit", "ratio"} and e["peer_name"] == "torch DDP"
               for e in rows.values())


def test_a_4bit_layer_counts_its_quant_state_once_also_when_fsdp_has_swapped_its_weight():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compress_statistics=True).to("cpu")  # quantizes
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    # 4096 weights in 2048 bytes; quant state: 64 blocks' absmax in uint8 (64), the NF4 code (16 fp32), and the
    # nested state's one fp32 absmax (4) and 8-bit code (256 fp32). The layer and its weight share the state.
    expected = 2048 + 64 + 16 * 4 + 4 + 256 * 4
    assert held_bytes(layer, optimizer)["param_bytes"] == expected
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # a plain tensor, as FSDP's shard
    assert held_bytes(layer, optimizer)["param_bytes"] == expected


def test_an_option_measured_against_ours_also_gets_rows_against_ours_without_it():
    measured = dict(step_s=0.5, param_bytes=2**20, grad_bytes=0, optimizer_bytes=0, activation_bytes=2**20,
                    peak_bytes=None, flops=None)
    timed = {"ours": measured, "peer": dict(measured, step_s=1.0), "baseline": dict(measured, step_s=0.4)}
    report = {"measured": timed, "rows": 8, "tokens": 2000, "largest_batch": None, "peak_flops": None,
              "peer": "torch FSDP2", "baseline": "ours with prefetch"}
    rows = {e["name"]: e for e in bench_run.entries("full_fsdp+no_prefetch", 2, report)}
    assert rows["full_fsdp+no_prefetch (2 ranks): step time"]["ratio"] == 0.5
    off_on = rows["full_fsdp+no_prefetch (2 ranks) vs ours with prefetch: step time"]
    assert off_on["ratio"] == 1.25 and off_on["peer_name"] == "ours with prefetch"
    assert len(rows) == 2 * 7  # step time, samples/s, tokens/s and four kinds of bytes, against each


@pytest.mark.parametrize("case, gpus, world", [("qlora", 0, 1), ("lora_ddp", 0, 2), ("lora_pipe", 0, 2),
                                               ("qlora_fsdp", 0, 2), ("full_pipe_fsdp", 0, 4),
                                               ("full_fsdp+no_prefetch", 0, 2), ("qlora", 8, 1),
                                               ("full_pipe_fsdp", 8, 8)])
def test_a_case_runs_on_one_rank_or_on_every_parallel_rank_per_stage(case, gpus, world):
    assert world_of(case, 2, gpus) == world


def test_a_config_file_gives_random_weights_of_that_architecture_and_a_fitted_processor(tmp_path):
    path = tmp_path / "config.json"
    tiny_idefics2_config().to_json_file(path)
    model, processor = models.load(str(path), torch.float32, torch.device("cpu"), seed=3)
    reference = build_tiny(seed=3).state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())
    assert processor.image_seq_len == 4 and dict(processor.image_processor.size)["longest_edge"] == 56


def test_the_shipped_8b_config_keeps_the_real_processor_sizes():
    config_file = Path(models.__file__).parent / "idefics2_8b_config.json"
    settings = json.loads(config_file.read_text())
    from transformers import AutoConfig

    processor = models.tiny.shipped_processor(AutoConfig.for_model(**settings))
    assert processor.image_seq_len == 64
    assert dict(processor.image_processor.size) == {"shortest_edge": 378, "longest_edge": 980}


@pytest.mark.slow
def test_bench_command_finds_ours_and_peft_holding_the_same_adapter_bytes(tmp_path):
    subprocess.run([sys.executable, str(BENCH / "run.py"), "--approaches", "lora", "--batch", "2", "--warmup", "0",
                    "--steps", "1", "--output", str(tmp_path)], check=True, capture_output=True)
    results = {e["name"]: e for e in json.loads((tmp_path / "results.json").read_text())["cpu"]["entries"]}
    assert (tmp_path / "RESULTS.md").read_text().count("| lora (1 rank): ") == 7
    model = build_tiny(0)
    targets = [model.get_submodule(path) for path in models.matching_modules(model, ["projections"])]
    adapter_bytes = sum(8 * (linear.in_features + linear.out_features) * 4 for linear in targets)  # r=8, fp32 A and B
    grads, state = results["lora (1 rank): grads per rank"], results["lora (1 rank): optimizer state per rank"]
    assert grads["ours"] == grads["peer"] == adapter_bytes / 2**20
    assert state["ours"] == state["peer"] == (2 * adapter_bytes + 2 * len(targets) * 4) / 2**20  # moments, steps
    assert results["lora (1 rank): params per rank"]["ratio"] == 1.0


def test_the_results_page_keeps_what_other_commands_measured(tmp_path):
    """bench/run.py rewrites its own sections of RESULTS.md from results.json and keeps the part other
    commands measured (the hybrids, the FSDP and pipeline comparisons) as it is."""
    others = f"{bench_run.OTHERS}\n\n| a table | measured elsewhere |\n"
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\nan old section\n\n" + others)
    bench_run.write({}, tmp_path)
    page = (tmp_path / "RESULTS.md").read_text()
    assert "an old section" not in page and page.endswith(others)
