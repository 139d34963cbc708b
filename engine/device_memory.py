"""Giving a model's device memory back before the next one loads."""

import gc

import torch


def free_device_memory(device: torch.device) -> None:
    """Collect what only the cyclic garbage collector frees, then hand the cached blocks back to CUDA.

    A model's last references are often cycles: activation checkpointing and autocast replace a
    module's forward by a wrapper of its own bound method, FSDP's units and hooks point back at
    their modules. Dropping the last outside reference leaves such a model allocated until Python's
    collector happens to run; the caller drops its references first (`del model`), then calls this.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def phase_peak(device: torch.device) -> int | None:
    """The most `device` held since the last call (CUDA's max_memory_allocated), then counted afresh: one phase's
    peak, as `run.py plan` plans each phase (train, export, generate, judge). None on the CPU, whose process
    peak (ru_maxrss) cannot be reset."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak
