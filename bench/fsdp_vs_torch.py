"""Median training-step time and per-rank memory of our fully_shard vs torch's FSDP2, 2 gloo ranks.

The model is the tiny Idefics2 with images, fully trainable; the units are `models.blocks` (vision
encoder, perceiver and decoder layers) plus the root. Ours recomputes every block in backward (it
checkpoints each block with its gather), so torch runs twice: as is, and with non-reentrant
activation checkpointing on every block. Each row runs in its own freshly spawned ranks, so its
peak RSS is its own; the parent prints the table, bytes and RSS taken from the larger rank. Peak
RSS includes freed buffers glibc keeps; MALLOC_MMAP_THRESHOLD_=1048576 leaves out most of them.

    python bench/fsdp_vs_torch.py [--steps 10] [--warmup 2] [--batch 2]
"""

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard as torch_fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddp_vs_torch import SEQ_LEN, WORLD, parse_args, random_batch, spawn

import models
from engine.activation_checkpoint import apply_activation_checkpointing
from engine.loss import summed_token_loss
from models.tiny import build_tiny
from parallel import fsdp

ROWS = ("ours", "torch FSDP2", "torch FSDP2 + AC")
MIB = 2**20


def _local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds: a DTensor counts only its local shard."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _shard(model: torch.nn.Module, row: str) -> Callable[[], float]:
    """Shards `model` the way `row` says; returns its clip (max norm 1), which gives the norm before."""
    if row == "ours":
        fsdp.fully_shard(model, models.blocks(model))
        return lambda: fsdp.clip_grad_norm_(model, 1.0)
    if row.endswith("AC"):
        apply_activation_checkpointing(models.blocks(model))
    for block in models.blocks(model):
        torch_fully_shard(block)
    torch_fully_shard(model)
    return lambda: float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).full_tensor())


def _rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    # FSDP2 warns that the root returns a view (the logits); nothing here modifies it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rss_before_model = _peak_rss()
    model = build_tiny(seed=0).train()
    result = {"full params": _local_bytes(model.parameters())}
    clip = _shard(model, args.row)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = random_batch(args.batch, seed=rank)
    # Ours reduce-scatters a sum, FSDP2 a mean: scale torch's loss by WORLD so both get the global mean.
    tokens = WORLD * args.batch * SEQ_LEN if args.row == "ours" else args.batch * SEQ_LEN
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        logits = model(**batch, use_cache=False).logits
        summed_token_loss(logits, batch["input_ids"]).div(tokens).backward()
        norm = clip()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if step == 0:
            result.update({"first norm": norm, "params": _local_bytes(model.parameters()),
                           "grads": _local_bytes(p.grad for p in model.parameters() if p.grad is not None),
                           "AdamW": _local_bytes(t for s in optimizer.state.values() for t in s.values())})
        optimizer.zero_grad(set_to_none=True)
    result.update({"s": statistics.median(times[args.warmup :]), "peak RSS": _peak_rss(),
                   "RSS growth": _peak_rss() - rss_before_model})
    dist.destroy_process_group()
    args.results.put(result)


def main() -> None:
    args = parse_args(__doc__, steps=10, warmup=2, batch=2)
    args.results = multiprocessing.get_context("spawn").SimpleQueue()
    rows = {}
    for args.row in ROWS:
        spawn(_rank_main, args)
        ranks = [args.results.get() for _ in range(WORLD)]
        rows[args.row] = {key: max(r[key] for r in ranks) for key in ranks[0]}
    print(f"{WORLD} gloo ranks, tiny Idefics2 fully trainable, batch {args.batch}/rank, median of {args.steps} steps;"
          f" unsharded params {rows['ours']['full params'] / MIB:.2f} MiB. MiB per rank (the larger rank):")
    columns = ("ms", "vs ours", "params", "grads", "AdamW", "peak RSS", "RSS growth", "first norm")
    print(f"{'wrapper':<18}" + "".join(f"{c:>11}" for c in columns))
    for name, r in rows.items():
        mib = (r[key] / MIB for key in columns[2:7])
        print(f"{name:<18}{r['s'] * 1e3:>11.1f}{r['s'] / rows['ours']['s']:>11.2f}"
              + "".join(f"{v:>11.2f}" for v in mib) + f"{r['first norm']:>11.4f}")


if __name__ == "__main__":
    main()
