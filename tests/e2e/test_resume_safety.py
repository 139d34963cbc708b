"""--resume continues exactly or refuses: other settings, a finished run, a damaged checkpoint, a killed DDP job.

Every refusal is checked as a user meets it (exit status, one sentence, no traceback) and must leave
every file of the run byte-identical.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import from_approach, result_settings
from engine.data.sources import load_splits
from engine.outputs import checkpoint
from errors import UsageError
from harness import ROOT, assert_one_sentence, run_cli, snapshot

# 4 LoRA steps on 2 exhibits with dropout on (the default 0.1), a checkpoint after every step.
RUN = ["--approach", "lora", "--limit-exhibits", "2", "--batch-size", "2", "--max-steps", "4", "--eval-every", "0.25",
       "--lr", "5e-3", "--lora-target", "projections", "lm_head", "--skip-eval", "--final", "last", "--device", "cpu"]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "adapter_model.safetensors")


def _assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`whole/`: the 4 steps in one go; `stopped/`: the same run stopped after step 3 (checkpoints 2 and 3 kept)."""
    root = tmp_path_factory.mktemp("resume")
    for name, extra in (("whole", []), ("stopped", ["--stop-after-steps", "3"])):
        result = run_cli(*RUN, *extra, "--output-dir", str(root / name), cwd=root)
        assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow
def test_a_setting_that_changes_the_result_is_refused_by_name(runs):
    before = snapshot(runs / "stopped")
    result = run_cli(*RUN, "--output-dir", str(runs / "stopped"), "--resume", "--lr", "1e-2", cwd=runs)
    assert_one_sentence(result, "does not match this run: it was written with --lr 0.005, this run with --lr 0.01")
    assert snapshot(runs / "stopped") == before


@pytest.mark.parametrize("change,named", [
    (dict(lora_alpha=16), "written with --lora-alpha 64, this run with --lora-alpha 16"),
    (dict(seed=1), "written with --seed 0, this run with --seed 1"),
    (dict(lora_rslora=False), "written without --no-rslora, this run with --no-rslora"),
    (dict(dataset="other"), "written with --dataset musequest, this run with --dataset other"),
    (dict(max_length=64), "written without --max-length, this run with --max-length 64"),
    (dict(lora_target=("text", "lm_head")),
     "written with --lora-target projections, this run with --lora-target text lm_head"),
    (dict(optimizer="adamw8bit"), "written with --optimizer adamw, this run with --optimizer adamw8bit")])
def test_every_setting_that_changes_the_result_is_compared(change, named, tmp_path):
    """The same comparison the CLI test above runs, for more flags: what the checkpoint recorded against this
    run, named as the command line gives it."""
    saved = checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)}, {},
                            {"settings": result_settings(from_approach("lora"))}, 2)
    with pytest.raises(UsageError, match=f"it was {named};"):
        checkpoint.load(saved, {"settings": result_settings(from_approach("lora", **change))})
    for harmless in (dict(keep_last=5), dict(tensorboard=True), dict(stop_after_steps=1), dict(skip_eval=True)):
        checkpoint.load(saved, {"settings": result_settings(from_approach("lora", **harmless))})


@pytest.mark.slow
def test_a_resume_on_data_changed_since_its_checkpoint_is_refused_naming_the_split(runs, tmp_path):
    """The checkpoints record each split's rows and hash (which tests/unit/engine/test_data.py changes by editing
    a data set); here the stopped run's newest records a train split of other contents than musequest's."""
    out = tmp_path / "stopped"
    shutil.copytree(runs / "stopped", out)
    for meta_file in (out / "checkpoints").glob("step-*/meta.json"):
        meta = json.loads(meta_file.read_text())
        meta["data"]["train"]["sha256"] = "0" * 64
        meta_file.write_text(json.dumps(meta))
    before = snapshot(out)
    result = run_cli(*RUN, "--output-dir", str(out), "--resume", cwd=tmp_path)
    rows = len(load_splits("musequest", limit_exhibits=2)["train"])
    assert_one_sentence(result, f"step-000003 was trained on other data: its 'train' split had the same {rows} rows, "
                                "with other contents than the data set's now; --resume needs the data it started on")
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_still_ends_exactly(runs, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(runs / "stopped", out)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-000003"
    (newest / "train_state.pt").write_bytes(b"not a checkpoint")  # a half-copied file
    result = run_cli(*RUN, "--output-dir", str(out), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping" in result.stdout and "step 2" in result.stdout
    assert "cannot be read as a training state" in result.stdout and "weights_only" not in result.stdout + result.stderr
    _assert_bit_identical(_adapter(out), _adapter(runs / "whole"))
    # Now finished: resuming again says so and changes nothing.
    before = snapshot(out)
    again = run_cli(*RUN, "--output-dir", str(out), "--resume", cwd=tmp_path)
    assert_one_sentence(again, "already finished (4 of 4 steps): there is nothing to resume; to train further, start "
                               f"a new run from its weights in another --output-dir, with the merged model (run.py "
                               f"merge --adapter {out / 'final'} --output MERGED, then --model MERGED).")
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_same_export_and_says_no_step_was_left(runs, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(runs / "whole", out)
    (out / "summary.json").unlink()  # as a run killed between its last checkpoint and its export leaves it
    shutil.rmtree(out / "final")
    result = run_cli(*RUN, "--output-dir", str(out), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"done: 4 steps, no step was left to train after the checkpoint it resumed from, outputs in {out}" in \
        result.stdout
    _assert_bit_identical(_adapter(out), _adapter(runs / "whole"))


def _ranks_of(launcher: int) -> list[int]:
    """The rank processes a `run.py --gpus N` started: forked by its fork server, which it forked itself."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            pid, fields = int(stat.parent.name), stat.read_text().rpartition(")")[2].split()
            parents[pid], commands[pid] = int(fields[1]), (stat.parent / "cmdline").read_bytes()
    servers = [pid for pid, parent in parents.items() if parent == launcher and b"forkserver" in commands[pid]]
    return [pid for pid, parent in parents.items() if parent in servers]


@pytest.mark.slow
def test_ddp_with_a_rank_killed_after_its_second_checkpoint_resumes_bit_identically(tmp_path):
    """Two ranks with dropout, so the resumed run must restore both ranks' random generators. One rank is killed
    (as the kernel's OOM killer would): the launcher stops the other and ends with one sentence on a line of its
    own after the bar, exit status 1, and nothing after it (no "leaked semaphore" warning)."""
    ddp = [arg if arg != "lora" else "lora_ddp" for arg in RUN] + ["--gpus", "2", "--batch-size", "1"]
    whole = run_cli(*ddp, "--output-dir", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *ddp, "--output-dir", str(out)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000002").exists() and job.poll() is None:
            assert time.monotonic() < deadline, "the run wrote no second checkpoint"
            time.sleep(0.05)
        os.kill(_ranks_of(job.pid)[-1], signal.SIGKILL)
        assert job.wait(timeout=120) == 1
    last = (tmp_path / "killed.log").read_text().splitlines()[-1]
    assert re.fullmatch(r"error: rank [01] failed, so every rank was stopped: .*", last), last
    assert not (out / "final").exists()
    resumed = run_cli(*ddp, "--output-dir", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing from" in resumed.stdout
    _assert_bit_identical(_adapter(out), _adapter(tmp_path / "whole"))
