"""One command that checks a GPU in minutes: `python bench/gpu_check.py [--out DIR]`.

Random weights at Idefics2-8B's real widths with 2 text and 2 vision layers (models/idefics2_8b_config.json, cut),
run as a user runs them (`run.py` in subprocesses): lora, qlora and full (`--precision bf16 --optimizer adamw8bit`),
each for 1 step, stopped, resumed to step 2, exported, and answering and scoring 4 test rows; with 2 or more GPUs
also lora_ddp, full_fsdp and a 1F1B pipeline on 2 ranks (NCCL). Beside them: the NF4 and 8-bit block kernels against
their CPU results; parallel/ddp.py and parallel/fsdp.py on a one-rank NCCL group against the bare model; each run's
measured peak in each phase (training, export, generating, judging: torch.cuda.max_memory_allocated, reset as each
starts, in summary.json) against `run.py plan`'s, within 10%; the time a step waits for its batches against the
step's; and the host syncs left in a step, by CUDA's count. Prints a table, writes OUT/gpu_check.json, and exits 1
if any check failed.

`--tiny` is the same on the CPU with the built-in tiny model (tests/e2e/test_gpu_check.py runs it), where the
CUDA-only checks report `skip`: the script cannot rot where no GPU is.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAN_TOLERANCE = 0.10
COMMON = ["--limit-exhibits", "2", "--max-steps", "2", "--batch-size", "2", "--eval-every", "0.5",
          "--max-new-tokens", "16", "--final", "last"]
RUNS = {  # name -> (flags, ranks)
    "lora": (["--approach", "lora"], 1),
    "qlora": (["--approach", "qlora"], 1),
    "full bf16 adamw8bit": (["--approach", "full", "--precision", "bf16", "--optimizer", "adamw8bit"], 1),
    "lora_ddp x2": (["--approach", "lora_ddp", "--gpus", "2"], 2),
    "full_fsdp x2": (["--approach", "full_fsdp", "--gpus", "2"], 2),
    "full_mp x2 1f1b": (["--approach", "full_mp", "--gpus", "2", "--schedule", "1f1b", "--micro-batches", "2"], 2),
}


def few_layer_8b(out: Path) -> str:
    """The 8B config with 2 text and 2 vision layers: real widths, a few GiB."""
    config = json.loads((ROOT / "models" / "idefics2_8b_config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    config["vision_config"]["num_hidden_layers"] = 2
    path = out / "idefics2_8b_2_layers.json"
    path.write_text(json.dumps(config))
    return str(path)


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, cwd=ROOT)


def check_run(name: str, flags: list[str], model: str, device: str, out: Path) -> dict:
    """Stop after step 1, resume to step 2, export and evaluate; then the measured peak against the plan."""
    folder = out / name.replace(" ", "_")
    common = [*flags, *COMMON, "--model", model, "--device", device, "--output-dir", str(folder)]
    started = time.perf_counter()
    first = run_py(*common, "--stop-after-steps", "1", "--skip-eval")
    if first.returncode:
        return {"result": "fail", "why": f"first part: {first.stderr.strip()[-300:]}"}
    second = run_py(*common, "--resume")
    if second.returncode:
        return {"result": "fail", "why": f"resumed part: {second.stderr.strip()[-300:]}"}
    summary = json.loads((folder / "summary.json").read_text())
    results = json.loads((folder / "eval" / "results.json").read_text())
    exported = any((folder / "final").glob("*.safetensors"))
    row = {"seconds": round(time.perf_counter() - started, 1), "steps": summary["steps"], "score": results["score"],
           "rows": results["rows"], "peak_gib": max(r["peak_memory_bytes"] for r in summary["ranks"]) / 2**30,
           "data wait / step": f"{summary['mean_data_wait_s']:.3f} / {summary['mean_step_time_s']:.3f} s"}
    ok = summary["completed"] and summary["steps"] == 2 and exported and results["rows"] > 0 and \
        math.isfinite(results["score"])
    planned = plan_phases(common)
    row["planned GiB"] = " / ".join(f"{phase} {peak / 2**30:.2f}" for phase, peak in planned.items())
    if device == "cuda":  # each phase's measured peak (the most over ranks) against the plan's
        measured = {phase: max(r["phase_peak_bytes"][phase] for r in summary["ranks"]) for phase in ("train", "export")}
        measured.update(results["phase_peak_bytes"])
        row["measured GiB"] = " / ".join(f"{phase} {peak / 2**30:.2f}" for phase, peak in measured.items())
        row["plan_error"] = max(abs(peak - planned[phase]) / planned[phase] for phase, peak in measured.items())
        ok = ok and row["plan_error"] <= PLAN_TOLERANCE
    return {"result": "pass" if ok else "fail", **row}


def plan_phases(common: list[str]) -> dict[str, int]:
    """`run.py plan --json`'s peak per phase for the run's own flags."""
    planned = run_py("plan", *(flag for flag in common if flag != "--resume"), "--json")
    return json.loads(planned.stdout)["phases"]


def check_one_rank_group(device: str) -> dict:
    """parallel/ddp.py and parallel/fsdp.py on a one-rank group in this process (NCCL on a GPU, gloo on the
    CPU): 3 AdamW steps of a stack of blocks through each wrapper against the same steps on the bare model. One
    rank sums nothing, so a difference is the wrappers' own: a collective's stream not waited on, a gradient
    not written back. (The 2-GPU rows run the engine's DDP and FSDP across ranks.)"""
    import torch.distributed as dist
    from torch import nn

    from parallel.ddp import DataParallel
    from parallel.fsdp import fully_shard, unit_state_dicts

    def stack() -> nn.Sequential:
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 256), nn.GELU()) for _ in range(4)]
        return nn.Sequential(*blocks, nn.Linear(256, 8)).to(device)

    def sharded() -> nn.Module:
        model = stack()
        return fully_shard(model, list(model)[:4], device=device)

    def trained(model: nn.Module) -> nn.Module:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            inputs = torch.randn(8, 256, generator=torch.Generator().manual_seed(step)).to(device)
            model(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model

    def weights(state: dict) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().float().cpu() for name, tensor in state.items()}

    store = dist.HashStore()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        expected = weights(trained(stack()).state_dict())
        got = {"ddp": weights(trained(DataParallel(stack())).module.state_dict()),
               "fsdp": weights({name: tensor for unit in unit_state_dicts(trained(sharded()))
                                for name, tensor in unit.items()})}
    finally:
        dist.destroy_process_group()
    differences = {f"{name} max diff": max((weights_[key] - expected[key]).abs().max().item() for key in expected)
                   for name, weights_ in got.items()}
    ok = all(set(weights_) == set(expected) for weights_ in got.values()) and max(differences.values()) <= 1e-5
    return {"result": "pass" if ok else "fail", **differences}


def check_kernels(device: str) -> dict:
    """NF4 (quant/) and 8-bit blocks (engine/optim/adamw.py's moments) on the GPU against the same on the CPU."""
    if device != "cuda":
        return {"result": "skip", "why": "no GPU"}
    import bitsandbytes.functional as bnbf

    from quant.linear4bit import dequantize_nf4, quantize_nf4

    weight = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    nf4 = {where: dequantize_nf4(*quantize_nf4(weight.to(where)).values(), weight.shape, torch.bfloat16).cpu()
           for where in ("cpu", "cuda")}
    moments = weight.float()
    blocks = {}
    for where in ("cpu", "cuda"):
        code = bnbf.create_dynamic_map(signed=True).to(where)
        quantized, state = bnbf.quantize_blockwise(moments.to(where), code=code)
        blocks[where] = bnbf.dequantize_blockwise(quantized, state).cpu()
    nf4_diff = (nf4["cpu"].float() - nf4["cuda"].float()).abs().max().item()
    block_diff = (blocks["cpu"] - blocks["cuda"]).abs().max().item()
    ok = nf4_diff <= 1e-2 * weight.float().abs().max().item() and block_diff <= 1e-2 * moments.abs().max().item()
    return {"result": "pass" if ok else "fail", "nf4_max_diff": nf4_diff, "blockwise_8bit_max_diff": block_diff}


def check_host_syncs(device: str, out: Path) -> dict:
    """What a LoRA step of the tiny model (images, 2 micro-batches) still makes the host wait for, by CUDA's own
    count (torch.cuda.set_sync_debug_mode): after a first step, the syncs of 3 steps, by the innermost code that
    asked, ours or a library's. The engine's own is one a step (engine/step.py reads the loss, norm and tokens
    together); tests/unit/engine/test_host_syncs.py holds the CPU to that."""
    if device != "cuda":
        return {"result": "skip", "why": "no GPU"}
    import collections
    import traceback
    import warnings

    from engine.config import from_approach
    from engine.data.collate import Collator
    from engine.data.sources import data_settings, load_splits
    from engine.optim.optimizer import optimizer_for
    from engine.runtime import Runtime
    from engine.step import train_step
    from engine.strategies import strategy_for

    config = from_approach("lora", model="tiny", device="cuda", limit_exhibits=4, grad_accum=2,
                           output_dir=str(out / "host_syncs")).resolved(gpu=True)
    strategy = strategy_for(config, Runtime(torch.device("cuda")))
    collate = Collator(strategy.build(config.base_copy))
    optimizer = optimizer_for(config, strategy.runtime.precision, strategy.parameters(), 1e-4)
    train = load_splits(**data_settings(config))["train"]
    batches = [collate([train[0], train[1]]), collate([train[2], train[3]])]
    train_step(strategy, optimizer, batches, config.max_grad_norm)  # the first: optimizer state, kernels chosen
    sites = collections.Counter()

    def asked(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
        sites[f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = asked
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                train_step(strategy, optimizer, batches, config.max_grad_norm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = sum(count for site, count in sites.items() if site.startswith(("step.py", "base.py", "loss.py", "ddp.py")))
    return {"result": "pass" if ours <= 3 else "fail", "syncs per step": sum(sites.values()) / 3,
            "ours per step": ours / 3, "sites": dict(sites.most_common(6))}


def checks(tiny: bool, out: Path) -> dict[str, Callable[[], dict]]:
    device = "cpu" if tiny else "cuda"
    model = "tiny" if tiny else few_layer_8b(out)
    gpus = 0 if tiny else torch.cuda.device_count()
    table: dict[str, Callable[[], dict]] = {"kernels: NF4 and 8-bit, GPU vs CPU": lambda: check_kernels(device),
                                            "ddp and fsdp on a one-rank group": lambda: check_one_rank_group(device),
                                            "host syncs of a LoRA step": lambda: check_host_syncs(device, out)}
    for name, (flags, ranks) in RUNS.items():
        if ranks > 1 and (tiny or gpus < ranks):  # the CPU ranks' equivalence is the test suite's
            table[name] = lambda ranks=ranks: {"result": "skip", "why": f"needs {ranks} GPUs"}
        else:
            table[name] = lambda name=name, flags=flags: check_run(name, flags, model, device, out)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check", help="where the runs and gpu_check.json go")
    parser.add_argument("--tiny", action="store_true", help="the CPU dry run: tiny model, CUDA checks skipped")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible; --tiny runs the CPU dry run.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, check in checks(args.tiny, out).items():
        try:
            report[name] = check()
        except Exception as error:  # a check that crashed is a failed check, reported beside the others
            report[name] = {"result": "fail", "why": f"{type(error).__name__}: {error}"}
        numbers = ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in report[name].items() if key != "result")
        print(f"{name:<38} {report[name]['result']:<5} {numbers}", flush=True)
    device = "cpu (dry run)" if args.tiny else torch.cuda.get_device_name(0)
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "checks": report}, indent=2))
    failed = [name for name, row in report.items() if row["result"] == "fail"]
    print(f"{len(report) - len(failed)} of {len(report)} checks passed or skipped on {device}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
