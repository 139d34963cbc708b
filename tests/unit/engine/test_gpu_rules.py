"""What a CPU run cannot show by itself about CUDA and NCCL, made to show (issue 25): NCCL's failure texts read
as sentences, collectives on the rank's own device, one GPU per task, flash-attention refused when absent."""

import json
import os

import pytest
import torch
import torch.distributed as dist

from engine.launch import _reported_failure
from errors import explain

LOST_PEER = "another rank of this run went away"
TIMED_OUT = "a collective operation between the ranks timed out"

# NCCL's words, as torch 2.x's ProcessGroupNCCL wraps them in DistBackendError (from its source and users' logs).
NCCL_PEER_GONE = [
    "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, remote process exited or there was a "
    "network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a remote "
    "process exiting prematurely.",
    "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1191, unhandled system error, NCCL version "
    "2.11.4\nncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error. It "
    "can be also caused by unexpected exit of a remote peer, you can check NCCL warnings for failure reason.",
    "NCCL communicator was aborted on rank 1.",
]
NCCL_TIMEOUT = ("[PG 0 Rank 1] Process group watchdog thread terminated with exception: [Rank 1] Watchdog caught "
                "collective operation timeout: WorkNCCL(SeqNum=1, OpType=ALLREDUCE, NumelIn=1048576, "
                "NumelOut=1048576, Timeout(ms)=600000) ran for 600092 milliseconds before timing out.")


@pytest.mark.parametrize("text", NCCL_PEER_GONE)
def test_nccl_losing_a_peer_is_one_sentence(text):
    status, sentence = explain(dist.DistBackendError(text), resumable=True)
    assert status == 1 and sentence.startswith(LOST_PEER) and "--resume" in sentence, sentence


def test_a_collective_timeout_is_its_own_sentence_not_a_lost_peer():
    for error in (dist.DistBackendError(NCCL_TIMEOUT), RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] "
                                                                    "Timed out waiting 1800000ms for recv operation")):
        status, sentence = explain(error)
        assert status == 1 and sentence.startswith(TIMED_OUT), sentence
    assert explain(RuntimeError("CUDA error: an illegal memory access was encountered")) is None


class _Failed:
    def __init__(self, message: str, timestamp: int):
        self.message, self.timestamp = {"message": message, "extraInfo": {"py_callstack": ""}}, timestamp
        self.error_file = None


class _ChildFailed:
    def __init__(self, failures: dict):
        self.failures = failures


def test_the_parent_reports_the_rank_that_failed_not_the_one_that_lost_its_nccl_peer():
    """Rank 1 lost its NCCL peer first (timestamp 1), rank 0 failed for a reason of its own (timestamp 2)."""
    failure = _ChildFailed({1: _Failed(f"DistBackendError: {NCCL_PEER_GONE[0]}", 1),
                            0: _Failed("ValueError: a bug on rank 0", 2)})
    assert _reported_failure(failure)[:2] == (0, "ValueError: a bug on rank 0")


def test_an_error_file_a_stopped_rank_left_half_written_is_passed_over(tmp_path):
    """Rank 1 failed with its own sentence; the launcher stopped rank 0 while it wrote its error file (torch's
    writes in place), which is left empty. The parent reports rank 1's sentence instead of failing on that file
    (seen once in the suite: tests/e2e/test_failures.py's rank failure)."""
    for rank in (0, 1):
        (tmp_path / str(rank)).mkdir()
    (tmp_path / "0" / "error.json").write_text("")
    failed = _Failed("UsageError: rank one's own sentence.", 2)
    failed.error_file = str(tmp_path / "1" / "error.json")
    (tmp_path / "1" / "error.json").write_text(json.dumps({"message": failed.message}))
    assert _reported_failure(_ChildFailed({1: failed}))[:2] == (1, "UsageError: rank one's own sentence.")


def test_a_rank_without_gradients_clips_on_its_own_device(monkeypatch):
    """A pipeline stage (or FSDP shard) whose parameters got no gradient still joins the all-reduce, with a tensor
    on its device: NCCL takes no CPU tensor. The meta device stands in for the rank's GPU."""
    from parallel import clip

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: seen.append(tensor.device))
    params = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    norm = clip.clip_grad_norm_(params, 1.0)  # on the device, unread: the host does not wait for it (issue 30)
    assert seen == [torch.device("meta")] and norm.device == torch.device("meta")


@pytest.mark.parametrize("installed", [False, True])
def test_flash_attention_without_its_package_is_refused_before_any_work(monkeypatch, installed):
    import importlib.util

    from engine.config import from_approach
    from errors import UsageError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: (object() if installed else None) if name == "flash_attn"
                        else find_spec(name, *args))
    if installed:
        assert from_approach("lora", attn_implementation="flash_attention_2").attn_implementation == "flash_attention_2"
    else:
        with pytest.raises(UsageError, match="needs the flash-attn package"):
            from_approach("lora", attn_implementation="flash_attention_2")


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (4, 3, 3), (8, 3, 3), (2, 3, None)])
def test_each_rank_finds_its_gpu_whether_it_sees_one_or_all(monkeypatch, visible, local_rank, expected):
    """4 ranks on a machine: a scheduler that gives each task one GPU (each sees cuda:0), or torchrun (each sees
    all and takes the LOCAL_RANK-th); a rank that sees some but too few is told so."""
    from engine import runtime
    from engine.config import from_approach
    from errors import UsageError

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # no process group is made
    monkeypatch.setattr(dist, "get_rank", lambda: local_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: None)
    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank)}.items():
        monkeypatch.setenv(name, value)
    config = from_approach("lora_ddp", device="cuda")
    if expected is None:
        with pytest.raises(UsageError, match="each sees 2 GPUs"):
            runtime.setup_runtime(config)
    else:
        assert runtime.setup_runtime(config).device == torch.device("cuda", expected) == chosen[0]


def _joins_a_group(config):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return "done"


@pytest.mark.parametrize("path", ["spawned rank", "torchrun rank"])
def test_a_rank_leaves_its_process_group_when_its_work_is_done(monkeypatch, path):
    """A spawned rank (`_rank`) and a rank torchrun started (launch calls the worker itself) leave the group they
    joined once the worker returns. (A failing rank leaves it to the launcher: test_launch's crash test.)"""
    from engine import launch
    from engine.config import from_approach

    config = from_approach("lora_ddp", device="cpu")
    if path == "torchrun rank":
        monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        assert (launch.launch(config, _joins_a_group) if path == "torchrun rank"
                else launch._rank(_joins_a_group, config, (dict(os.environ), os.getcwd()))) == "done"
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _waits_for_a_slow_download(rank: int, world: int, port: int, tmp: str, download_s: float) -> float:
    """Rank 0 takes `download_s` to fetch the model while the run's collectives time out after 2 s, as NCCL's
    watchdog ends a rank after 10 minutes; every rank must still get the folder."""
    import os
    import time
    from datetime import timedelta

    from engine import build
    from engine.config import from_approach
    from engine.runtime import setup_runtime

    dist.destroy_process_group()  # the harness's group, for one whose collectives time out after 2 s
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=2))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    config = from_approach("full_fsdp", model="some/hub-id", device="cpu", setup_timeout=0.5)
    runtime = setup_runtime(config)
    build.local_folder = lambda spec: time.sleep(download_s) or tmp
    build.load_on_meta = lambda folder, dtype, attn: (None, folder, None)  # the folder every rank got
    build.configure_processor = lambda processor, config: None
    started = time.monotonic()
    _, folder, _ = build.load_without_weights(config, runtime, base_copy=None)
    assert str(folder) == tmp
    return time.monotonic() - started


def test_ranks_wait_for_the_main_ranks_download_longer_than_a_collectives_timeout(tmp_path):
    from harness import free_port, spawn

    waited = spawn(2, _waits_for_a_slow_download, tmp_path, port=free_port(), tmp=str(tmp_path), download_s=4.0)
    assert all(seconds >= 3.5 for seconds in waited), waited
