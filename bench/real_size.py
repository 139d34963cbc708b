"""What only a GPU can tell: the largest batch that fits, and how much of the chip a step uses.

MFU (model FLOPs utilisation) is the matmul FLOPs of one training step, counted by
`torch.utils.flop_counter` on the step itself (forward and backward, none recomputed on one GPU),
over the step time, over the chip's dense bf16 peak. LoRA's backward computes no gradient for
the frozen weights, so its FLOPs per token are about 2/3 of full fine-tuning's.
"""

import gc
from collections.abc import Callable

import torch

# Dense bf16 peak FLOP/s by device-name fragment (the vendors' data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The chip's dense bf16 peak, or None where unknown (a CPU, an unlisted GPU without --peak-tflops)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for fragment, flops in PEAK_BF16_FLOPS.items() if fragment in name), None)


def largest_batch(fits: Callable[[int], bool], limit: int) -> int:
    """The largest batch size in [1, limit] for which `fits` holds (0 if none), assuming that what
    fits at b fits at every smaller b: doubling until the first failure, then bisection."""
    good, size = 0, 1  # the largest size known to fit (0: none yet), the next to try
    while fits(size):
        if size == limit:
            return limit
        good, size = size, min(2 * size, limit)
    bad = size  # the smallest size known not to fit
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def step_fits(step: Callable[[], None], clear: Callable[[], None]) -> bool:
    """Whether one training step runs without running out of GPU memory; memory is freed either way."""
    try:
        step()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        clear()
        gc.collect()
        torch.cuda.empty_cache()
