"""What each GPU holds before activations -- weights, gradients, optimizer state -- for the original
project's runs on Idefics2-8B, under each precision and optimizer.

    python bench/static_bytes.py

The model is the engine's own build of models/idefics2_8b_config.json on the meta device (nothing is
allocated), with the approach applied as a run applies it (`apply_approach`: LoRA, or the modules
full fine-tuning trains, in the precision's master dtype); a pipeline stage is `models.stages.stage`
of the original's split; FSDP holds 1/N of everything. Bytes per trained weight: the weight and its
gradient in the trained dtype, and the two AdamW moments (fp32, bf16, or 8 bits plus an fp32 scale
per block of 256: engine/optim/adamw.py), or with the optimizer offloaded (engine/optim/offload.py) only the
weight and gradient, the fp32 masters and moments being in host memory. Activations come on top.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.build import apply_approach
from engine.config import from_approach
from engine.loss import answer_loss
from engine.optim.adamw import BLOCK
from engine.precision import PRECISIONS
from engine.runtime import Runtime
from models import load
from models.stages import stage

CONFIG = str(Path(__file__).resolve().parent.parent / "models" / "idefics2_8b_config.json")
META, GIB = torch.device("meta"), 2**30
# The original's runs: (its words, approach, GPUs, GiB per GPU, pipeline split)
RUNS = [
    ("full, 1x A100 80 GB", "full", 1, 80, ()),
    ("full_mp, 2x A6000 48 GB, split 13", "full_mp", 2, 48, (13,)),
    ("full_mp, 4x A5000 24 GB, split 5 14 23", "full_mp", 4, 24, (5, 14, 23)),
    ("full_fsdp, 2x A100 80 GB", "full_fsdp", 2, 80, ()),
    ("full_fsdp, 4x A6000 48 GB", "full_fsdp", 4, 48, ()),
    ("lora, 1x A6000 48 GB", "lora", 1, 48, ()),
]
# (column, --precision, --optimizer, or "offload" for --optimizer-offload cpu)
OPTIONS = [("bf16-mixed, adamw (16 B)", "bf16-mixed", "adamw"),
           ("bf16-mixed, adamw8bit (10 B)", "bf16-mixed", "adamw8bit"),
           ("bf16, adamw (8 B)", "bf16", "adamw"), ("bf16, adamw8bit (6 B)", "bf16", "adamw8bit"),
           ("bf16, offload cpu (4 B)", "bf16", "offload")]


def tensor_bytes(param: torch.nn.Parameter, optimizer: str) -> int:
    """The parameter, and if it trains its gradient and moments (none on the GPU when offloaded)."""
    size = param.numel() * param.element_size()
    if not param.requires_grad:
        return size
    if optimizer == "offload":
        return 2 * size
    moments = 2 * param.numel() + 8 * -(-param.numel() // BLOCK) if optimizer == "adamw8bit" else 2 * size
    return 2 * size + moments


def largest_gpu_bytes(approach: str, gpus: int, split: tuple[int, ...], precision: str, optimizer: str) -> int:
    config = from_approach(approach, model=CONFIG, precision=precision, gpus=gpus, split=split, device="cpu")
    runtime = Runtime(META, precision=PRECISIONS[precision])
    model, _ = load(CONFIG, PRECISIONS[precision].frozen_dtype, META)
    apply_approach(model, config, runtime)
    if config.parallel == "pipeline":
        return max(sum(tensor_bytes(p, optimizer) for p in stage(model, list(split), rank, answer_loss).parameters())
                   for rank in range(gpus))
    total = sum(tensor_bytes(p, optimizer) for p in model.parameters())
    return -(-total // gpus) if config.parallel == "fsdp" else total


def main() -> None:
    lines = ["| the original's run | " + " | ".join(name for name, _, _ in OPTIONS) + " |",
             "|---|" + "---:|" * len(OPTIONS)]
    for words, approach, gpus, gib, split in RUNS:
        cells = [largest_gpu_bytes(approach, gpus, split, precision, optimizer) / GIB
                 for _, precision, optimizer in OPTIONS]
        marked = (f"{cell:.1f}" + ("" if cell < gib else " (over)") for cell in cells)
        lines.append(f"| {words} | " + " | ".join(marked) + " |")
    print("GiB per GPU (the fullest one) before activations\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
