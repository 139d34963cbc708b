"""The optimizer step of --optimizer-offload cpu: the serial version before issue 30 (every gradient to the host,
one step, every weight back; read from git at SERIAL_COMMIT), ours in one chunk (the same serial schedule through
the pinned slots) and ours chunked (engine/optim/offload.py, CHUNK_BYTES).

    python bench/offload_step.py     # 1-3 minutes on 2 CPU cores; rewrites RESULTS.md's "### Offload" part

The weights are one decoder layer of Idefics2-8B (Mistral-7B's shapes, 218M weights) in bf16, as --precision bf16
keeps them, with bf16 gradients; the median of STEPS steps after one that creates the moments, the three
optimizers' steps taken in turn (about 10 GB of memory). Here the "device" is the CPU: every copy is a memcpy done
when issued, so there is nothing for the copies to overlap with, and the table shows only what chunking costs or
saves the host (its Python calls per chunk, the copies through the slots, a chunk's working set in cache). The
overlap itself needs a GPU: there the serial version's time adds its copies over PCIe to the update, and the
chunked one adds only its first chunk's copy in and its last chunk's copy out.
"""

import datetime
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results_page import replace_part

from engine.optim.offload import CHUNK_BYTES, HostAdamW

SERIAL_COMMIT = "814c4e5"  # the last commit whose HostAdamW stepped serially
HIDDEN, KV, MLP = 4096, 1024, 14336
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
          (HIDDEN, MLP), (HIDDEN,), (HIDDEN,)]
STEPS = 5
SECTION = "### Offload"  # RESULTS.md's part this script writes, up to the next "### "
WIDTH = 100


def serial_host_adamw() -> type[torch.optim.Optimizer]:
    """HostAdamW as it was at SERIAL_COMMIT."""
    source = subprocess.run(["git", "show", f"{SERIAL_COMMIT}:engine/optim/offload.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "serial_offload.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("serial_offload", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.HostAdamW


def layer() -> list[nn.Parameter]:
    """The layer's weights, their gradients given; the optimizers share them (each writes its own updates)."""
    generator = torch.Generator().manual_seed(0)
    weights = [nn.Parameter(torch.randn(shape, generator=generator).bfloat16()) for shape in SHAPES]
    for weight in weights:
        weight.grad = torch.randn(weight.shape, generator=generator).bfloat16()
    return weights


def optimizer(weights: list[nn.Parameter], make: type[torch.optim.Optimizer], **settings) -> torch.optim.Optimizer:
    """`make` over `weights`, after the step that creates its moments."""
    made = make([{"params": weights}], lr=1e-5, **settings)
    made.step()
    return made


def medians(optimizers: list[torch.optim.Optimizer]) -> list[tuple[float, float]]:
    """Each optimizer's median step, (wall seconds, CPU seconds of every thread), their steps taken in turn so that
    what else runs on the machine falls on each alike."""
    times = [[] for _ in optimizers]
    for _ in range(STEPS):
        for steps, made in zip(times, optimizers, strict=True):
            wall, cpu = time.perf_counter(), time.process_time()
            made.step()
            steps.append((time.perf_counter() - wall, time.process_time() - cpu))
    return [(statistics.median(w for w, _ in steps), statistics.median(c for _, c in steps)) for steps in times]


def main() -> None:
    names = ["serial, before issue 30", "ours, one chunk (the serial schedule)",
             f"ours, chunks of {CHUNK_BYTES // 2**20} MiB"]
    weights = layer()
    results = medians([optimizer(weights, serial_host_adamw()), optimizer(weights, HostAdamW, chunk_bytes=2**40),
                       optimizer(weights, HostAdamW)])
    (serial_wall, serial_cpu), load = results[0], os.getloadavg()[0]
    table = [f"| {name} | {1000 * wall:,.0f} | {wall / serial_wall:.2f} | {1000 * cpu:,.0f} | {cpu / serial_cpu:.2f} |"
             for name, (wall, cpu) in zip(names, results, strict=True)]
    print("\n".join(table))
    count = sum(weight.numel() for weight in weights)
    text = "\n".join([
        f"{SECTION}: the optimizer step, chunked against serial (issue 30)", "",
        textwrap.fill(f"`python bench/offload_step.py`, {datetime.date.today().isoformat()}, "
                      f"{os.cpu_count()} CPU cores (load average {load:.1f} as it ended), torch {torch.__version__}: "
                      f"HostAdamW's step over one decoder layer of Idefics2-8B ({count / 1e6:.0f}M bf16 weights "
                      f"and gradients), median of {STEPS} steps each, the three taken in turn; CPU: the seconds of "
                      "every thread of the process, which the other processes on the machine (the load) do not "
                      "inflate as they do the wall time. The device is the CPU here, so copies are memcpys done when "
                      "issued and nothing overlaps: the table shows what chunking costs the host, not what it saves "
                      "a GPU, which is the copies over PCIe that the serial version adds to the update and the "
                      "chunked one hides behind it, but for the first chunk in and the last chunk out.", WIDTH),
        "", "| step | wall ms | vs serial | CPU ms | vs serial |", "|---|---:|---:|---:|---:|", *table, ""])
    replace_part(SECTION, text)


if __name__ == "__main__":
    main()
