"""Every benchmark in one command: each approach against its peer, a table, bench/RESULTS.md and
bench/results.json.

    python bench/run.py                     # CPU: every case on the tiny model, each against its peer
    python bench/run.py --approaches lora_pipe qlora_fsdp   # CPU: only these cases
    python bench/run.py --device cuda       # GPU: Idefics2-8B's real config, random bf16 weights

A case is one of the six approaches, or an approach with one of the engine's options
(bench/ours.py OPTIONS): full+bf16 (bf16 weights, grads and moments, stochastic rounding),
full+adamw8bit and lora+adamw8bit (8-bit AdamW moments), lora+checkpointing and
full+checkpointing (activation checkpointing); or one of issue 18's hybrids (bench/ours.py
HYBRIDS): lora_pipe and qlora_pipe (LoRA, QLoRA on the 2-stage pipeline), qlora_fsdp (QLoRA, its
NF4 base sharded), full_pipe_fsdp (2 pipeline stages, each sharded over its ranks) and
full_fsdp+no_prefetch (FSDP that gathers each unit only when it runs), which is also measured
against ours with prefetch. bench/peers.py says what each is compared with.
On the CPU every case runs the engine's own build and step (bench/ours.py) and the same work
done with the tools users pick instead (bench/peers.py), in one spawn of its ranks (2 gloo ranks
for every parallel case, 2 per stage, so 4, for full_pipe_fsdp), taking turns a step at a time
on the same real MuseQuest batches. Measured per approach: step time (median after warm-up),
samples/s and tokens/s (every real token of the global batch, image tokens included), and per
rank (the larger rank) the bytes of params, grads, optimizer state and activations
(bench/measure.py says how each is counted). Each entry's ratio is ours / peer: below 1 is better
for times and bytes, above 1 for rates. A run of some cases replaces the whole section of its
device in results.json: give it another --output to keep the full table.

On a GPU, lora, qlora and full train Idefics2-8B's architecture (models/idefics2_8b_config.json,
the hub's config.json) with random weights, so nothing is downloaded: for each, the largest batch
that fits (up to --max-batch), then tokens/s, MFU and peak memory at --batch (or the largest
batch, if smaller). With 2 or more GPUs, lora_ddp, full_fsdp and full_mp run over all of them.
No peers run there, to fit a 10-minute slot. Each device's results replace only its own section
of results.json; RESULTS.md shows every section.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from measure import Batches, measure
from ours import baseline_of, engine_config, engine_contender, pipeline_stages, world_of
from peers import peer_contender, peer_name
from real_size import largest_batch, peak_flops, step_fits

from engine.data.collate import Collator
from engine.data.sources import load_splits
from engine.precision import precision_for
from engine.runtime import Runtime

REAL_CONFIG = BENCH.parent / "models" / "idefics2_8b_config.json"
SINGLE = ("lora", "qlora", "full")
PARALLEL = ("lora_ddp", "full_fsdp", "full_mp")
OPTIONAL = ("full+bf16", "full+adamw8bit", "lora+adamw8bit", "lora+checkpointing", "full+checkpointing")
HYBRID = ("lora_pipe", "qlora_pipe", "qlora_fsdp", "full_pipe_fsdp", "full_fsdp+no_prefetch")
CASES = SINGLE + PARALLEL + OPTIONAL + HYBRID
MIB, GIB = 2**20, 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--approaches", nargs="+", default=None, metavar="CASE",
                        help="a subset of the cases (default: all on CPU, those that fit on GPU)")
    parser.add_argument("--batch", type=int, default=4, help="rows per rank and step (the original's 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    parser.add_argument("--ranks", type=int, default=2,
                        help="CPU ranks of the parallel approaches (per stage under pipeline+fsdp)")
    parser.add_argument("--max-batch", type=int, default=64, help="GPU: the largest batch tried")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU: dense bf16 peak, if not in the table")
    parser.add_argument("--output", type=Path, default=BENCH, help="where RESULTS.md and results.json go")
    return parser.parse_args()


def rows_of(split, start: int, count: int) -> list[dict]:
    """`count` consecutive rows from `start`, wrapping around the split."""
    return [split[(start + i) % len(split)] for i in range(count)]


def _case_rank(rank: int, world: int, port: int, case: str, spec: str, args: argparse.Namespace,
               workdir: Path, results) -> None:
    """One rank of one case: build ours (and the peer), measure, and (on a GPU, alone) search the
    largest batch. Rank 0 puts the per-rank maxima (and the peer's name) on `results`."""
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=15))  # a stuck rank ends the run, not the slot
    config = engine_config(case, spec, device, world, workdir)
    runtime = Runtime(device, rank, world, precision_for(config.precision, device))
    ours, processor = engine_contender(config, runtime, workdir)
    contenders = {"ours": ours} if cuda else {"ours": ours, "peer": peer_contender(config, runtime)}
    baseline = baseline_of(case)  # (case, words), for an option also measured against ours without it
    if baseline:
        contenders["baseline"] = engine_contender(engine_config(baseline[0], spec, device, world, workdir), runtime,
                                                  workdir)[0]
    collate, train = Collator(processor), load_splits("musequest")["train"]
    stages = pipeline_stages(config, world)
    data_ranks = world // stages  # a pipeline's stages share their rows
    data_rank = rank % data_ranks

    def batches(rows: int) -> Batches:
        return [collate(rows_of(train, data_rank * rows, rows))]

    largest = None
    if cuda and world == 1:
        largest = largest_batch(lambda b: step_fits(lambda: ours.step(batches(b)),
                                                    lambda: ours.optimizer.zero_grad(set_to_none=True)),
                                args.max_batch)
    batch = min(args.batch, largest) if largest is not None else args.batch
    measured, tokens = {}, 0
    if batch:
        fixed = batches(batch)  # collated once: the timed batch and its token count
        measured = measure(contenders, fixed, device, args.warmup, args.steps, count_flops=cuda)
        tokens = runtime.sum_over_ranks(sum(int(b["attention_mask"].sum()) for b in fixed))
    tokens /= stages  # every stage counted the same rows
    ranks = runtime.gather({name: asdict(m) for name, m in measured.items()})
    if rank == 0:
        results.put({"measured": larger_rank(ranks), "rows": batch * data_ranks, "tokens": tokens,
                     "largest_batch": largest, "peak_flops": peak_flops(device, args.peak_tflops),
                     "peer": None if cuda else peer_name(config), "baseline": baseline[1] if baseline else None})
    if world > 1:
        # Torch DDP's reducer holds the process group; freed after it is destroyed, it joins gloo's
        # worker thread while holding the GIL that thread waits for, and the rank hangs at exit.
        del contenders, ours
        gc.collect()
        dist.destroy_process_group()


def larger_rank(ranks: list[dict[str, dict]]) -> dict[str, dict]:
    """Every contender's numbers at their largest over the ranks: the slower step, the fuller rank."""
    return {name: {key: None if value is None else max(r[name][key] for r in ranks) for key, value in fields.items()}
            for name, fields in ranks[0].items()}


def run_case(case: str, world: int, spec: str, args: argparse.Namespace) -> dict:
    """`case` in `world` freshly spawned ranks; rank 0's report."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    workdir = Path(tempfile.mkdtemp(prefix="museft-bench-"))
    try:
        mp.spawn(_case_rank, args=(world, port, case, spec, args, workdir, results), nprocs=world)
        return results.get()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def entries(case: str, world: int, report: dict) -> list[dict]:
    """The report of one case as results.json entries (name, ours, peer, unit, ratio, peer_name): ours against
    the peer, and against ours without the case's option where the report has that baseline."""
    measured = report["measured"]
    label = f"{case} ({world} rank{'s' if world > 1 else ''})"
    if "ours" not in measured:
        return [dict(name=f"{label}: largest batch", ours=0, peer=None, unit="rows", ratio=None, peer_name=None)]
    mine = _metrics(measured["ours"], report)
    rows = _against(label, mine, _metrics(measured["peer"], report) if "peer" in measured else {}, report["peer"])
    if report.get("baseline"):
        rows += _against(f"{label} vs {report['baseline']}", mine, _metrics(measured["baseline"], report),
                         report["baseline"])
    if report["largest_batch"] is not None:
        rows.append(dict(name=f"{label}: largest batch", ours=report["largest_batch"], peer=None, unit="rows",
                         ratio=None, peer_name=None))
    return rows


def _metrics(m: dict, report: dict) -> dict[str, tuple[float, str]]:
    """One contender's measurement as metric -> (value, unit)."""
    values = {"step time": (m["step_s"] * 1e3, "ms"), "samples/s": (report["rows"] / m["step_s"], "samples/s"),
              "tokens/s": (report["tokens"] / m["step_s"], "tokens/s")}
    scale, unit = (GIB, "GiB") if m["peak_bytes"] else (MIB, "MiB")
    for key, metric in (("param", "params"), ("grad", "grads"), ("optimizer", "optimizer state"),
                        ("activation", "activations"), ("peak", "peak memory")):
        if m[f"{key}_bytes"] is not None:
            values[f"{metric} per rank"] = (m[f"{key}_bytes"] / scale, unit)
    if m["flops"] and report["peak_flops"]:
        values["MFU"] = (100 * m["flops"] / m["step_s"] / report["peak_flops"], "%")
    return values


def _against(label: str, mine: dict[str, tuple[float, str]], theirs: dict[str, tuple[float, str]],
             name: str | None) -> list[dict]:
    """A row per metric of ours, with theirs (`name`) beside it and ours / theirs."""
    return [dict(name=f"{label}: {metric}", ours=value, peer=theirs.get(metric, (None,))[0], unit=unit,
                 ratio=value / theirs[metric][0] if theirs.get(metric, (0,))[0] else None, peer_name=name)
            for metric, (value, unit) in mine.items()]


def machine(device: str) -> str:
    """The machine in words: CPU model and cores, memory, GPUs, and the library versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    words = f"{os.cpu_count()} CPU cores ({cpu}), {memory:.0f} GiB memory"
    if device == "cuda":
        gpu = torch.cuda.get_device_properties(0)
        words += f", {torch.cuda.device_count()} x {gpu.name} ({gpu.total_memory / GIB:.0f} GiB)"
    else:
        words += ", no GPU used"
    import bitsandbytes
    import peft
    import transformers
    return (f"{words}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")


def table(section: dict) -> str:
    """A section of results.json as a markdown table."""
    lines = ["| measurement | unit | ours | peer | ours/peer | peer |", "|---|---|---:|---:|---:|---|"]
    for e in section["entries"]:
        ratio = "—" if e["ratio"] is None else f"{e['ratio']:.2f}"
        lines.append(f"| {e['name']} | {e['unit']} | {_number(e['ours'])} | {_number(e['peer'])} | {ratio} | "
                     f"{e.get('peer_name') or '—'} |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


OTHERS = "## Measured by other commands"  # RESULTS.md's part that this script does not write


def write(results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    parts = ["# Benchmark results", "", "Written by `python bench/run.py` (see its docstring for what is measured "
             "and how). Ratios are ours / peer: below 1 is better for times and bytes, above 1 for rates."]
    for device, section in results.items():
        parts += ["", f"## {device.upper()}: {section['machine']}", "",
                  f"`{section['command']}`, {section['date']}: {section['setting']}", "", table(section)]
    # The other benchmarks' numbers follow this script's, under their own heading: kept as they are.
    page = folder / "RESULTS.md"
    kept = page.read_text().partition(OTHERS)[2] if page.exists() and OTHERS in page.read_text() else ""
    page.write_text("\n".join(parts) + "\n" + (f"\n{OTHERS}{kept}" if kept else ""))


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for, but no CUDA GPU is visible on this machine.")
    gpus = torch.cuda.device_count() if cuda else 0
    wanted = args.approaches or (SINGLE + (PARALLEL if gpus > 1 else ()) if cuda else CASES)
    unknown = sorted(set(wanted) - set(CASES))
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}.")
    spec = str(REAL_CONFIG) if cuda else "tiny"
    rows = []
    for case in wanted:
        world = world_of(case, args.ranks, gpus)
        print(f"{case} on {world} {'GPU' if cuda else 'CPU rank'}{'s' if world > 1 else ''} ...", flush=True)
        rows += entries(case, world, run_case(case, world, spec, args))
    model = ("Idefics2-8B config, random bf16 weights" if cuda else
             "tiny Idefics2 (4.4M parameters), fp32 (+bf16 cases: bf16)")
    section = {"machine": machine(args.device), "command": "python bench/run.py " + " ".join(sys.argv[1:]),
               "date": datetime.date.today().isoformat(),
               "setting": f"{model}; real MuseQuest batches of {args.batch} rows per rank; median of {args.steps} "
                          f"steps after {args.warmup} warm-up", "entries": rows}
    path = args.output / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.device] = section
    write(results, args.output)
    print(table(section))


if __name__ == "__main__":
    main()
