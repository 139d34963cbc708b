"""The three ways to start N ranks run the same thing, and a crash on one rank ends them all."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from engine.config import from_approach
from engine.launch import launch
from engine.runtime import setup_runtime
from errors import RankFailed, UsageError, explain
from harness import ROOT

TINY_RUN = ["--approach", "lora_ddp", "--limit-exhibits", "2", "--batch-size", "1", "--max-steps", "2",
            "--eval-every", "1", "--lr", "5e-3", "--lora-dropout", "0", "--skip-eval"]


@record
def _crash_on_rank_one(config):
    runtime = setup_runtime(config)
    if runtime.rank == 1:
        raise RuntimeError("rank one broke on purpose")
    dist.barrier()  # rank 0 would wait here forever if a crash did not end every rank


@record
def _killed_on_rank_one(config):
    runtime = setup_runtime(config)
    if runtime.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer ends a rank
    dist.barrier()


@pytest.mark.parametrize("worker, words", [
    (_crash_on_rank_one, "rank 1 failed, so every rank was stopped: .*rank one broke on purpose"),
    (_killed_on_rank_one, "rank [01] failed, so every rank was stopped: "),  # the killed rank, or its peer's lost link
])
def test_a_crash_or_a_kill_on_one_rank_ends_all_ranks_names_it_and_exits_1(worker, words):
    """Exit status 1, as errors.py and docs/outputs.md say of a rank that went away (not 2: no bad input)."""
    config = from_approach("lora_ddp", gpus=2, device="cpu")
    started = time.monotonic()
    with pytest.raises(RankFailed, match=words) as failed:
        launch(config, worker)
    assert time.monotonic() - started < 120
    assert explain(failed.value)[0] == 1


@record
def _where_and_what(config):
    runtime = setup_runtime(config)
    dist.barrier()  # no rank leaves the group while the other still connects to it (gloo: "Connection closed by peer")
    return {"folder": os.getcwd(), "probe": os.environ.get("MUSEFT_PROBE"), "world": runtime.world_size}


def test_forked_ranks_take_the_launching_processs_environment_and_folder_as_they_are_now(tmp_path, monkeypatch):
    """Ranks fork from a server started at the first launch: each launch's ranks still see the environment and the
    folder of their launching process as they are at that launch, and the rendezvous address torch's launcher set
    for them, not a MASTER_PORT the launching process happens to have."""
    for value in ("first", "second"):
        monkeypatch.setenv("MUSEFT_PROBE", value)
        monkeypatch.setenv("MASTER_PORT", "1")
        (tmp_path / value).mkdir()
        monkeypatch.chdir(tmp_path / value)
        result = launch(from_approach("lora_ddp", gpus=2, device="cpu"), _where_and_what)
        assert result == {"folder": str(tmp_path / value), "probe": value, "world": 2}


def test_torchrun_world_and_gpus_must_agree(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="torchrun started 4 ranks but --gpus asks for 2"):
        launch(from_approach("lora_ddp", gpus=2), _crash_on_rank_one)
    with pytest.raises(UsageError, match="runs on one device, but torchrun started 4 ranks"):
        launch(from_approach("lora"), _crash_on_rank_one)


def _losses(out: Path) -> list[float]:
    return [loss for _, loss in json.loads((out / "summary.json").read_text())["history"]["train_loss"]]


@pytest.mark.slow
def test_python_torchrun_and_a_torchrun_worker_asking_for_two_agree(tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    commands = {
        "python": [sys.executable, str(ROOT / "run.py"), *TINY_RUN, "--gpus", "2"],
        "torchrun": [torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "run.py"), *TINY_RUN],
        "torchrun_asks": [torchrun, "--standalone", "--nproc_per_node", "1", str(ROOT / "run.py"), *TINY_RUN,
                          "--gpus", "2"],
    }
    for name, command in commands.items():
        result = subprocess.run([*command, "--output-dir", str(tmp_path / name)], capture_output=True, text=True,
                                timeout=300, env=env, cwd=tmp_path)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and len(summary["ranks"]) == 2, name
    assert _losses(tmp_path / "torchrun") == pytest.approx(_losses(tmp_path / "python"), rel=1e-6)
    assert _losses(tmp_path / "torchrun_asks") == pytest.approx(_losses(tmp_path / "python"), rel=1e-6)


FORK_SERVER_PROBE = """
import multiprocessing, os, sys
sys.path.insert(0, sys.argv[1])  # where the probe module is: on this process's path alone, as tests/ is for the suite
sys.path.insert(0, sys.argv[2])  # the repository, for engine.fork_server
from engine.fork_server import start_fork_server
if __name__ == "__main__":
    os.chdir(sys.argv[1] + "/elsewhere")  # a user's own folder: neither the probe's nor the repository's
    start_fork_server(["probe"])
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        print(pool.apply(os.getpid), pool.apply(__import__("probe").imported_in), os.environ.get("PYTHONPATH"))
"""


def test_the_fork_server_imports_what_it_is_told_from_the_launching_process_path(tmp_path):
    """Python 3.11 starts the fork server on `python -c`'s path, not the launcher's (CPython issue 117378), and
    skips a module it cannot find without a word: each rank then imported the engine (and the tests' harness) itself.
    The probe module, on the launcher's path alone, is imported by the server: the rank did not import it again.
    The launcher's own environment is as it was."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "probe.py").write_text("import os\nPID = os.getpid()\ndef imported_in():\n    return PID\n")
    script = tmp_path / "launcher.py"
    script.write_text(FORK_SERVER_PROBE)
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(ROOT)], capture_output=True, text=True,
                            timeout=120, env=environ, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rank, imported_in, launcher_path = result.stdout.split()
    assert imported_in != rank  # by the server, before it forked the rank
    assert launcher_path == "None"
