"""Device, precision and process facts, chosen in exactly one place.

Everything else asks the Runtime (its `precision`: engine/precision.py) instead of looking at the
hardware itself.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.precision import Precision, precision_for
from errors import UsageError

REAL_MODEL = "HuggingFaceM4/idefics2-8b"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: Precision = field(default=None)  # None: the device's default (precision_for "auto")
    group: dist.ProcessGroup | None = None  # the ranks counted here, if not all (pipeline+fsdp's data ranks)
    # Where ranks wait for the main rank's setup (a model download): gloo with --setup-timeout, not the default
    # group, whose NCCL watchdog would end a rank after 10 minutes of waiting. None: the default group.
    setup_group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.precision is None:
            object.__setattr__(self, "precision", precision_for("auto", self.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_over_ranks(self, value: float) -> float:
        """The sum of a per-rank number over all ranks (the number itself on one rank)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=self.group)
        return float(total)

    def gather(self, value: object) -> list[object]:
        """Every rank's `value`, in rank order."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def from_main(self, value: object) -> object:
        """The main rank's `value` on every rank, once the main rank gives it: however long its setup takes,
        within the setup group's timeout."""
        if self.world_size == 1:
            return value
        values = [value]
        dist.broadcast_object_list(values, src=0, group=self.setup_group)
        return values[0]

    def peak_memory_bytes(self) -> int:
        """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def pick_device(flag: str, gpus: int) -> torch.device:
    """`auto` takes CUDA when present; asking for more GPUs than exist is an error, not a fallback."""
    has_cuda = torch.cuda.is_available()
    if flag == "cuda" and not has_cuda:
        raise UsageError("--device cuda was asked for, but no CUDA GPU is visible on this machine.")
    if flag == "cpu" or not has_cuda:
        return torch.device("cpu")
    present = torch.cuda.device_count()
    if gpus > present:
        raise UsageError(f"--gpus {gpus} asks for more GPUs than the {present} present on this machine.")
    return torch.device("cuda", 0)


def resolve_model(spec: str, device: torch.device) -> str:
    """`auto` means the built-in tiny model on CPU and the real Idefics2-8B on a GPU."""
    if spec != "auto":
        return spec
    return REAL_MODEL if device.type == "cuda" else "tiny"
