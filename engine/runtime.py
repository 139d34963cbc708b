"""Device, precision and process facts, chosen in exactly one place: `setup_runtime` joins this process to
its ranks and picks its device once. Everything else asks the Runtime (its `precision`:
engine/precision.py) instead of looking at the hardware itself.
"""

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import TrainConfig
from engine.precision import Precision, precision_for
from errors import UsageError


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
        """The sum of a per-rank number (or a device tensor's one value) over all ranks, read on the host."""
        if self.world_size == 1:
            return float(value)
        return float(self.summed(torch.full((), float(value), dtype=torch.float64, device=self.device)))

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks, in place, without waiting for the sum: on NCCL the all-reduce is queued
        on the device's stream, so only a later read of the value waits."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

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


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_runtime(config: TrainConfig) -> Runtime:
    """This process's rank, world and device; joins the process group when there is more than one rank."""
    world = torchrun_world_size()
    if world == 1:
        device = pick_device(config.device, 1)
        return Runtime(device, precision=precision_for(config.precision, device))
    device = pick_device(config.device, 1)
    if device.type == "cuda":
        device = local_gpu(int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        gpu = device.type == "cuda"
        dist.init_process_group("nccl" if gpu else "gloo", device_id=device if gpu else None)
    setup = dist.new_group(backend="gloo", timeout=timedelta(minutes=config.setup_timeout))
    return Runtime(device, dist.get_rank(), dist.get_world_size(), precision_for(config.precision, device),
                   setup_group=setup)


def local_gpu(local_rank: int, local_ranks: int) -> torch.device:
    """This rank's GPU: the only one it sees, when a scheduler gives each task its own (CUDA_VISIBLE_DEVICES per
    task, as Slurm's --gpus-per-task does), else the LOCAL_RANK-th of the machine's, as torchrun starts them."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if visible >= local_ranks:
        return torch.device("cuda", local_rank)
    raise UsageError(f"{local_ranks} ranks were started on this machine but each sees {visible} GPUs; give each rank "
                     "one GPU (CUDA_VISIBLE_DEVICES per rank) or let every rank see them all.")
