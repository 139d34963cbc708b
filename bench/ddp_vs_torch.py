"""Median training-step time of our DataParallel vs torch's DistributedDataParallel, 2 gloo ranks.

The model is the tiny Idefics2 with images, once with a frozen base (vision tower and token
embeddings frozen, the rest trainable, as under LoRA) and once fully trainable. Each rank runs
the same steps through both wrappers; rank 0 prints the table.

    python bench/ddp_vs_torch.py [--steps 20] [--warmup 5] [--batch 4]
"""

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.loss import summed_token_loss
from models.tiny import IMAGE_SEQ_LEN, IMAGE_SIZE, IMAGE_TOKEN_ID, build_tiny
from parallel import DataParallel

WORLD = 2
SEQ_LEN = 64


def random_batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens after one image's <image> slots, and random pixels: the tiny model's real path."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 32000, (rows, SEQ_LEN), generator=generator)
    input_ids[:, 1 : 1 + IMAGE_SEQ_LEN] = IMAGE_TOKEN_ID
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(rows, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
        "pixel_attention_mask": torch.ones(rows, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool),
    }


def _median_step_s(wrapper: str, frozen_base: bool, args: argparse.Namespace, rank: int) -> float:
    model = build_tiny(seed=0).train()
    if frozen_base:
        model.model.vision_model.requires_grad_(False)
        model.model.text_model.embed_tokens.requires_grad_(False)
    trained = DataParallel(model) if wrapper == "ours" else DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = random_batch(args.batch, seed=rank)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        logits = trained(**batch, use_cache=False).logits
        summed_token_loss(logits, batch["input_ids"]).div(WORLD * args.batch * SEQ_LEN).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup :])


def _rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // WORLD))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = []
    for frozen_base in (True, False):
        ours, torchs = (_median_step_s(w, frozen_base, args, rank) for w in ("ours", "torch"))
        rows.append(("frozen base" if frozen_base else "all trainable", ours, torchs))
    if rank == 0:
        print(f"{WORLD} gloo ranks, tiny Idefics2, batch {args.batch}/rank, median of {args.steps} steps")
        print(f"{'model':<15}{'ours ms':>10}{'torch ms':>10}{'ours/torch':>12}")
        for name, ours, torchs in rows:
            print(f"{name:<15}{ours * 1e3:>10.1f}{torchs * 1e3:>10.1f}{ours / torchs:>12.2f}")
    dist.destroy_process_group()


def main() -> None:
    spawn(_rank_main, parse_args(__doc__, steps=20, warmup=5, batch=4))


def parse_args(doc: str, steps: int, warmup: int, batch: int) -> argparse.Namespace:
    """The flags every benchmark here takes, with its own defaults."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=batch, help="rows per rank")
    return parser.parse_args()


def spawn(rank_main: Callable[[int, int, argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Runs `rank_main(rank, port, args)` in WORLD fresh processes that meet on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(rank_main, args=(port, args), nprocs=WORLD)


if __name__ == "__main__":
    main()
