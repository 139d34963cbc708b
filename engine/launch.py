"""Start the ranks a run asks for, and set up this process's part in them.

All of these run the same N ranks:

    python run.py --approach lora_ddp --gpus 2                  # we start 2 workers (torch's elastic launcher)
    torchrun --nproc_per_node 2 run.py --approach lora_ddp      # torchrun started them
    torchrun run.py --approach lora_ddp --gpus 2                # one torchrun worker that asks for 2

A failure on any rank ends every rank (the elastic agent tears the group down) and the parent
reports that rank's error instead of hanging: a rank's one-sentence error (errors.explain) as the
same sentence and exit status, a bug as the rank's traceback.
"""

import contextlib
import json
import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.config import TrainConfig
from engine.fork_server import start_fork_server
from engine.runtime import pick_device, torchrun_world_size
from engine.strategies import STRATEGIES
from errors import PEER_GONE, DiskError, RankFailed, UsageError, debug, explain, lost_peer


def ranks_wanted(config: TrainConfig) -> int:
    """--gpus, or the world torchrun made; a disagreement between the two is an error."""
    world = torchrun_world_size()
    if world > 1 and config.gpus not in (None, world):
        raise UsageError(f"torchrun started {world} ranks but --gpus asks for {config.gpus}; give one or the other.")
    if world > 1 and STRATEGIES[config.parallel].one_rank:
        raise UsageError(f"approach {config.approach!r} runs on one device, but torchrun started {world} ranks.")
    return config.gpus or world


def placement(config: TrainConfig) -> tuple[int, torch.device]:
    """The run's ranks and this process's device for them (asking for more GPUs than there are is refused here)."""
    wanted = ranks_wanted(config)
    return wanted, pick_device(config.device, wanted if _spawning(wanted) else 1)


def launch(config: TrainConfig, worker: Callable[[TrainConfig], Any]) -> Any:
    """Run `worker(config)` on every rank; returns rank 0's result. Whether the run fits is the caller's to ask
    first (run.py asks engine/plan/fit.py), before any rank starts.

    `worker` must be a module-level function (it is pickled to spawned ranks) decorated with
    torch's `errors.record`, so that a rank's exception reaches the parent's report.
    """
    wanted, _ = placement(config)
    return _spawn(config, worker, wanted) if _spawning(wanted) else _in_group(worker, config)


def _spawning(ranks: int) -> bool:
    """Whether this process starts the ranks itself (--gpus N), rather than being one that torchrun started."""
    return ranks > 1 and torchrun_world_size() == 1


def _spawn(config: TrainConfig, worker: Callable[[TrainConfig], Any], ranks: int) -> Any:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The ranks fork from a server process that has torch and transformers imported (started by the first launch):
    # a rank starts without seconds of imports of its own. Where there is a GPU, nothing that touches CUDA may be
    # imported there (the engine's modules import bitsandbytes, which asks the GPU's capability): a rank forked
    # from a process that has initialized CUDA cannot use it. Without one, the worker's own module is too. The
    # server's objects are frozen last, so that no rank's garbage collection walks (and copies) them.
    no_gpu = [] if torch.cuda.is_available() else [worker.__module__]
    start_fork_server(["torch", "transformers", *no_gpu, "engine.frozen_imports"])
    launch_config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
        start_method="forkserver",
    )
    try:
        with _quiet_launcher():
            results = elastic_launch(launch_config, _rank)(worker, config, (dict(os.environ), os.getcwd()))
    except ChildFailedError as failure:
        rank, message, stack = _reported_failure(failure)
        kind, _, sentence = message.partition(": ")  # torch's error file holds "ExceptionType: message"
        if kind in SENTENCES:  # the rank's own sentence, as if this process had failed so
            raise SENTENCES[kind](sentence) from failure
        print(file=sys.stderr)  # the main rank's bar, stopped mid-line, ends before the sentence starts
        if stack and not debug():  # a bug: its traceback (with --debug, torch's launcher logged it already)
            print(stack, file=sys.stderr, end="")
        raise RankFailed(f"rank {rank} failed, so every rank was stopped: {message}".strip()) from failure
    return results[0]


SENTENCES = {"UsageError": UsageError, "DiskError": DiskError}  # what _rank raises for a parent to show as is
# What torch's launcher sets for each rank (besides TORCHELASTIC_* and TORCH_NCCL_*): kept over the launching
# process's values, which a forked rank otherwise takes.
LAUNCHER_VARIABLES = {"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
                      "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}


def _rank(worker: Callable[[TrainConfig], Any], config: TrainConfig, launching: tuple[dict[str, str], str]) -> Any:
    """`worker(config)` on a spawned rank; a failure errors.explain words becomes a UsageError or DiskError of
    that sentence, which is what torch's error file then records for the parent. A lost peer stays as it is: the
    parent names the rank that went away instead.

    A forked rank starts with the fork server's environment and folder, the launching process's at its first
    launch: it takes `launching`, the launching process's environment and folder now, and keeps the variables
    torch's launcher set for this rank (its rank, world, rendezvous address, error file)."""
    environ, folder = launching
    from_launcher = {key: value for key, value in os.environ.items()
                     if key in LAUNCHER_VARIABLES or key.startswith(("TORCHELASTIC_", "TORCH_NCCL_"))}
    os.environ.clear()
    os.environ.update(environ | from_launcher)
    os.chdir(folder)
    try:
        return _in_group(worker, config)
    except Exception as error:
        explained = explain(error, config.out)
        if explained is None or lost_peer(error):
            raise
        raise (DiskError if explained[0] == 1 else UsageError)(explained[1]) from error


def _in_group(worker: Callable[[TrainConfig], Any], config: TrainConfig) -> Any:
    """`worker(config)`, then leaving the process group it joined, as NCCL asks: a process that exits holding its
    communicators may hang or abort at interpreter shutdown. A failing rank does not leave first: closing its
    connections would fail its peers (a lost peer, at once) before its own error is recorded and reported, and the
    launcher tears the whole group down anyway."""
    # A rank's bars take a thread lock, not tqdm's default multiprocessing one: that one's named semaphore,
    # left behind by a killed rank, makes the resource tracker warn of it after the run's error sentence.
    tqdm.set_lock(threading.RLock())
    result = worker(config)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _reported_failure(failure) -> tuple[int, str, str]:
    """(rank, message, traceback) of the failure to show: the first rank that failed with a sentence of its own
    (the others may only have lost their peer), else the first that did not just lose its peer (a rank killed by
    a signal, or a bug), else the first to fail. torch's launcher reports the one rank it saw exit first, which
    may be a rank that lost its peer; every rank that failed before the rest were stopped left its error file
    beside that one's, and is read from there."""
    failures = {}
    for rank, failed in failure.failures.items():
        failures[rank] = (failed.timestamp, *_message_and_stack(failed.message))
        for file in Path(failed.error_file).parent.parent.glob("*/error.json") if failed.error_file else []:
            other = int(file.parent.name)  # the local rank's folder: the rank, on one machine
            if other not in failures:
                try:
                    recorded = json.loads(file.read_text())["message"]
                except (json.JSONDecodeError, KeyError):  # torch writes it in place: a rank stopped mid-write
                    continue
                when = int(recorded.get("extraInfo", {}).get("timestamp", 0))
                failures[other] = (when, *_message_and_stack(recorded))
    ordered = [(rank, message, stack) for rank, (_, message, stack) in sorted(failures.items(), key=lambda i: i[1][0])]
    own_sentence = [f for f in ordered if f[1].partition(": ")[0] in SENTENCES]
    not_a_lost_peer = [f for f in ordered if not PEER_GONE.search(f[1])]
    return (own_sentence or not_a_lost_peer or ordered)[0]


def _message_and_stack(message: dict | str) -> tuple[str, str]:
    if isinstance(message, dict):
        return message.get("message", ""), message.get("extraInfo", {}).get("py_callstack", "")
    return message, ""


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """Without --debug, torch's launcher logs nothing: it would log every failed rank's traceback and each
    rank it stops, where the user should read one sentence."""
    if debug():
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.launcher",
                                                    "torch.multiprocessing")]
    silence = logging.NullHandler()
    saved = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.propagate = False
        logger.addHandler(silence)
    try:
        yield
    finally:
        for logger, propagate in zip(loggers, saved, strict=True):
            logger.propagate = propagate
            logger.removeHandler(silence)
