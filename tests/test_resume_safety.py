"""--resume continues exactly or refuses: other settings, a finished run, a damaged checkpoint, a killed DDP job.

Every refusal is checked as a user meets it (exit status, one sentence, no traceback) and must leave
every file of the run byte-identical.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
@pytest.mark.parametrize("flag,value,named", [("--lr", "1e-2", "--lr"), ("--lora-alpha", "16", "--lora-alpha"),
                                              ("--seed", "1", "--seed"), ("--precision", "bf16-mixed", "precision")])
def test_a_setting_that_changes_the_result_is_refused_by_name(runs, flag, value, named):
    before = snapshot(runs / "stopped")
    result = run_cli(*RUN, "--output-dir", str(runs / "stopped"), "--resume", flag, value, cwd=runs)
    assert_one_sentence(result, named)
    assert "does not match this run" in result.stderr
    assert snapshot(runs / "stopped") == before


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
    _assert_bit_identical(_adapter(out), _adapter(runs / "whole"))
    # Now finished: resuming again says so and changes nothing.
    before = snapshot(out)
    again = run_cli(*RUN, "--output-dir", str(out), "--resume", cwd=tmp_path)
    assert_one_sentence(again, "already finished (4 of 4 steps)")
    assert snapshot(out) == before


@pytest.mark.slow
def test_ddp_killed_after_its_second_checkpoint_resumes_bit_identically(tmp_path):
    """Two ranks with dropout, so the resumed run must restore both ranks' random generators."""
    ddp = [arg if arg != "lora" else "lora_ddp" for arg in RUN] + ["--gpus", "2", "--batch-size", "1"]
    whole = run_cli(*ddp, "--output-dir", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *ddp, "--output-dir", str(out)], cwd=tmp_path,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-000002").exists() and job.poll() is None:
            assert time.monotonic() < deadline, "the run wrote no second checkpoint"
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks at once, as a lost node
        job.wait()
    assert not (out / "final").exists()
    resumed = run_cli(*ddp, "--output-dir", str(out), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing from" in resumed.stdout
    _assert_bit_identical(_adapter(out), _adapter(tmp_path / "whole"))
