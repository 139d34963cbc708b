"""Training checkpoints: atomic, rotated, verified on resume.

A checkpoint is a folder `step-000123/` holding the trainable tensors (`model.safetensors`;
only the adapter for LoRA), the optimizer/scheduler/RNG state (`train_state.pt`) and
`meta.json`. It is written under a temporary name and renamed when complete, so a run killed
mid-save leaves the previous checkpoints untouched, and resume never sees a half folder.
Rotation keeps the newest `keep_last` plus the best one (by validation loss, or the --select-by metric).

Under FSDP every rank writes its own pair of files (`model-rank00001-of-00004.safetensors`, ...)
into the same temporary folder, and the main rank publishes it once all of them are complete.
"""

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import SELECT_BY, as_given
from engine.data.fingerprint import changed_split
from engine.outputs.publish import TMP_PREFIX, publish_folder, temporary
from errors import UsageError

PREFIX = "step-"


@dataclass(frozen=True)
class Shard:
    """Which piece of a checkpoint this process writes and reads: one of `count` ranks, or the whole."""

    rank: int = 0
    count: int = 1

    def file(self, stem: str, extension: str) -> str:
        if self.count == 1:
            return f"{stem}.{extension}"
        return f"{stem}-rank{self.rank:05d}-of-{self.count:05d}.{extension}"

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
    select_by: str = "val_loss",
) -> Path:
    """Write checkpoint `step` into `folder` atomically, then rotate, keeping the best by `select_by` (a name
    `meta` records a value under); returns its path.

    With a `shard` of several ranks, every rank calls this with its own tensors and state.
    """
    final = folder / f"{PREFIX}{step:06d}"
    tmp = temporary(final)
    if shard.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir()
    shard.barrier()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / shard.file("model", "safetensors"))
    # Through a Python file, so that a full disk raises OSError(ENOSPC), not torch's "iostream error".
    with open(tmp / shard.file("train_state", "pt"), "wb") as handle:
        torch.save(train_state, handle)
    shard.barrier()
    if shard.rank == 0:
        (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step), indent=2))
        _fsync_folder(tmp)
        publish_folder(tmp, final)  # re-saving the same step after a resume replaces it whole
        _rotate(folder, keep_last, select_by)
    shard.barrier()
    return final


def complete(folder: Path) -> list[Path]:
    """Checkpoints that finished writing, oldest first (temporary folders are never listed)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


class DamagedCheckpoint(UsageError):
    """A checkpoint whose files cannot be read (as opposed to one that belongs to another run setup)."""


def read_meta(checkpoint: Path) -> dict[str, Any]:
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: cannot read meta.json ({error}).") from error
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: meta.json holds no settings.")
    return meta


def best(folder: Path, by: str = "val_loss") -> Path | None:
    """The kept checkpoint best by the value its meta records under `by` (a --select-by name), in that metric's
    direction (SELECT_BY), the earliest of equals; None if none records one. A damaged one is no candidate."""
    scored = []
    for candidate in complete(folder):
        with contextlib.suppress(DamagedCheckpoint):
            scored.append((read_meta(candidate).get(by), candidate))
    sign = -1 if SELECT_BY[by] == "higher" else 1
    scored = [(sign * value, c) for value, c in scored if value is not None]
    return min(scored)[1] if scored else None


def load(checkpoint: Path, expected: dict[str, Any], shard: Shard = Shard(), with_train_state: bool = True) \
        -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(tensors, train_state, meta) of `checkpoint` (this `shard`'s), refusing one written by a different run setup.

    Everything lands in host memory: the weights are copied into the model's own tensors, and the optimizer's
    state_dict moves each state to its parameter's device. Without `with_train_state` (an export of the weights
    only) the train state, the optimizer's moments included, is not read at all: None."""
    meta = read_meta(checkpoint)
    for key, value in expected.items():
        saved = meta.get(key)
        if key == "settings" and isinstance(saved, dict):  # the flags that change a run's result, by flag
            differing = next((name for name, setting in value.items() if saved.get(name) != setting), None)
            if differing is not None:
                raise UsageError(f"checkpoint {checkpoint} does not match this run: it was written "
                                 f"{as_given(differing, saved.get(differing))}, this run "
                                 f"{as_given(differing, value[differing])}; --resume needs the same settings, or "
                                 "start a new run.")
        elif key == "data":  # each split's rows and hash (engine/data/fingerprint.py)
            changed = changed_split(saved, value)
            if changed:
                raise UsageError(f"checkpoint {checkpoint} was trained on other data: {changed}; --resume needs "
                                 "the data it started on, or start a new run.")
        elif saved != value:
            raise UsageError(
                f"checkpoint {checkpoint} does not match this run: its {key} is {saved!r}, "
                f"this run's is {value!r}; --resume needs the same settings, or start a new run."
            )
    weights, state = checkpoint / shard.file("model", "safetensors"), checkpoint / shard.file("train_state", "pt")
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as error:
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {weights.name} cannot be read ({error}).") \
            from error
    if not with_train_state:
        return tensors, None, meta
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol it does not write
            warnings.simplefilter("ignore")
            # weights_only: never runs code from the file. map_location: without it, tensors saved from cuda:0 land
            # on cuda:0 again, on every rank, beside the live optimizer.
            train_state = torch.load(state, map_location="cpu", weights_only=True)
        if not isinstance(train_state, dict):
            raise TypeError(f"a {type(train_state).__name__}")
    except Exception as error:  # whatever unpickling raises; not in torch's words, which advise weights_only=False
        reason = error.strerror if isinstance(error, OSError) else type(error).__name__
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {state.name} cannot be read as a training "
                                f"state ({reason}).") from error
    return tensors, train_state, meta


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: dropout masks and anything else drawn during training. On CUDA, its own
    GPU's only: each rank draws on its own device, and asking every visible GPU would make a context on each."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def train_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                rng_by_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """What a resumed run needs besides the weights to continue exactly: optimizer, schedule, and the
    random generators of every rank (each rank draws its own dropout masks)."""
    return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng_by_rank": rng_by_rank}


def restore_train_state(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int, device: torch.device) -> None:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng_by_rank"][rank]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if isinstance(rng["cuda"], torch.Tensor) and device.type == "cuda":  # this rank's own GPU, as rng_state saved it
        torch.cuda.set_rng_state(rng["cuda"], device)


def _rotate(folder: Path, keep_last: int, select_by: str) -> None:
    checkpoints = complete(folder)
    keep = set(checkpoints[-keep_last:])
    best_checkpoint = best(folder, select_by)
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
