"""Training checkpoints: atomic, rotated, verified on resume.

A checkpoint is a folder `step-000123/` holding the trainable tensors (`model.safetensors`;
only the adapter for LoRA), the optimizer/scheduler/RNG state (`train_state.pt`) and
`meta.json`. It is written under a temporary name and renamed when complete, so a run killed
mid-save leaves the previous checkpoints untouched, and resume never sees a half folder.
Rotation keeps the newest `keep_last` plus the one with the best validation loss.

Under FSDP every rank writes its own pair of files (`model-rank00001-of-00004.safetensors`, ...)
into the same temporary folder, and the main rank publishes it once all of them are complete.
"""

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UsageError

PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Shard:
    """Which piece of a checkpoint this process writes and reads: one of `count` ranks, or the whole."""

    rank: int = 0
    count: int = 1

    def file(self, stem: str, extension: str) -> str:
        return f"{stem}.{extension}" if self.count == 1 else f"{stem}-rank{self.rank:05d}-of-{self.count:05d}.{extension}"

    def barrier(self) -> None:
        if self.count > 1:
            dist.barrier()


def save(
    folder: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    shard: Shard = Shard(),
) -> Path:
    """Write checkpoint `step` into `folder` atomically, then rotate; returns its path.

    With a `shard` of several ranks, every rank calls this with its own tensors and state.
    """
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f"{TMP_PREFIX}{final.name}"
    if shard.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir()
    shard.barrier()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / shard.file("model", "safetensors"))
    torch.save(train_state, tmp / shard.file("train_state", "pt"))
    shard.barrier()
    if shard.rank == 0:
        (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step), indent=2))
        _fsync_folder(tmp)
        if final.exists():  # re-saving the same step after a resume: replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        _rotate(folder, keep_last)
    shard.barrier()
    return final


def complete(folder: Path) -> list[Path]:
    """Checkpoints that finished writing, oldest first (temporary folders are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def read_meta(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"checkpoint {checkpoint} is corrupt: cannot read meta.json ({error}).") from error


def best(folder: Path) -> Path | None:
    """The kept checkpoint with the lowest validation loss, if any recorded one."""
    scored = [(read_meta(c).get("val_loss"), c) for c in complete(folder)]
    scored = [(loss, c) for loss, c in scored if loss is not None]
    return min(scored)[1] if scored else None


def load(checkpoint: Path, expected: dict[str, Any], shard: Shard = Shard()) \
        -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, train_state, meta) of `checkpoint` (this `shard`'s), refusing one written by a different run setup."""
    meta = read_meta(checkpoint)
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UsageError(
                f"checkpoint {checkpoint} does not match this run: its {key} is {meta.get(key)!r}, "
                f"this run's is {value!r}; use a fresh --output-dir or the same settings."
            )
    try:
        tensors = load_file(checkpoint / shard.file("model", "safetensors"))
        train_state = torch.load(checkpoint / shard.file("train_state", "pt"), weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError) as error:
        raise UsageError(f"checkpoint {checkpoint} is corrupt: {error}") from error
    return tensors, train_state, meta


def train_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """What a resumed run needs besides the weights to continue exactly: optimizer, schedule, RNG."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_train_state(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _rotate(folder: Path, keep_last: int) -> None:
    checkpoints = complete(folder)
    keep = set(checkpoints[-keep_last:])
    best_checkpoint = best(folder)
    if best_checkpoint is not None:
        keep.add(best_checkpoint)
    for checkpoint in checkpoints:
        if checkpoint not in keep:
            shutil.rmtree(checkpoint)
    for leftover in folder.glob(f"{TMP_PREFIX}*"):  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Flush file contents before the rename publishes them, so a power cut can't expose empty files."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
