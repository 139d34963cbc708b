"""Start the ranks a run asks for, and set up this process's part in them.

All of these run the same N ranks:

    python run.py --approach lora_ddp --gpus 2                  # we start 2 workers (torch's elastic launcher)
    torchrun --nproc_per_node 2 run.py --approach lora_ddp      # torchrun started them
    torchrun run.py --approach lora_ddp --gpus 2                # one torchrun worker that asks for 2

A failure on any rank ends every rank (the elastic agent tears the group down) and the parent
reports that rank's error instead of hanging.
"""

import os
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine.config import TrainConfig
from errors import UsageError
from engine.precision import precision_for
from engine.runtime import Runtime, pick_device


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def ranks_wanted(config: TrainConfig) -> int:
    """--gpus, or the world torchrun made; a disagreement between the two is an error."""
    world = torchrun_world_size()
    if world > 1 and config.gpus not in (None, world):
        raise UsageError(f"torchrun started {world} ranks but --gpus asks for {config.gpus}; give one or the other.")
    if world > 1 and config.parallel == "none":
        raise UsageError(f"approach {config.approach!r} runs on one device, but torchrun started {world} ranks.")
    return config.gpus or world


def launch(config: TrainConfig, worker: Callable[[TrainConfig], Any]) -> Any:
    """Run `worker(config)` on every rank; returns rank 0's result.

    `worker` must be a module-level function (it is pickled to spawned ranks) decorated with
    torch's `errors.record`, so that a rank's exception reaches the parent's report.
    """
    wanted = ranks_wanted(config)
    if wanted > 1 and torchrun_world_size() == 1:
        pick_device(config.device, wanted)  # refuse more GPUs than present before starting anyone
        return _spawn(config, worker, wanted)
    return worker(config)


def _spawn(config: TrainConfig, worker: Callable[[TrainConfig], Any], ranks: int) -> Any:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(launch_config, worker)(config)
    except ChildFailedError as failure:
        rank, error = failure.get_first_failure()
        message = error.message.get("message", "") if isinstance(error.message, dict) else error.message
        raise UsageError(f"rank {rank} failed, so every rank was stopped: {message}".strip()) from failure
    return results[0]


def setup_runtime(config: TrainConfig) -> Runtime:
    """This process's rank, world and device; joins the process group when there is more than one rank."""
    world = torchrun_world_size()
    if world == 1:
        device = pick_device(config.device, 1)
        return Runtime(device, precision=precision_for(config.precision, device))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = pick_device(config.device, local_ranks)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Runtime(device, dist.get_rank(), dist.get_world_size(), precision_for(config.precision, device))
