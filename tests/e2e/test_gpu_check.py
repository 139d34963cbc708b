"""bench/gpu_check.py's CPU dry run, so the GPU check cannot rot where no GPU is (issue 25)."""

import json
import sys

import pytest

from harness import ROOT, run_cli

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check


@pytest.mark.slow
def test_the_dry_run_stops_resumes_exports_and_scores_every_one_gpu_approach(tmp_path, monkeypatch, capsys):
    # The script's own main, whose `python run.py` commands fork from the tests' server (no imports of their own).
    monkeypatch.setattr(gpu_check, "run_py", lambda *args: run_cli(*args, cwd=ROOT, timeout=600))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--out", str(tmp_path)])
    assert gpu_check.main() == 0, capsys.readouterr().out
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    for name in ("lora", "qlora", "full bf16 adamw8bit"):
        assert checks[name]["result"] == "pass" and checks[name]["steps"] == 2 and checks[name]["rows"] == 4, name
        assert (tmp_path / name.replace(" ", "_") / "final").is_dir()
        wait, step = (float(seconds) for seconds in checks[name]["data wait / step"].removesuffix(" s").split(" / "))
        assert 0 < wait < step, name
        assert [part.split()[0] for part in checks[name]["planned GiB"].split(" / ")] == \
            ["train", "export", "generate", "judge"], name
    assert checks["ddp and fsdp on a one-rank group"]["result"] == "pass"
    assert {checks[name]["result"] for name in checks if "x2" in name or "kernels" in name} == {"skip"}


def test_a_run_that_fails_is_a_failed_check_with_its_sentence(tmp_path):
    row = gpu_check.check_run("bad", ["--approach", "no-such-approach"], "tiny", "cpu", tmp_path)
    assert row["result"] == "fail" and "unknown approach" in row["why"]


def test_one_rank_wrappers_that_lose_a_gradient_fail_the_check(monkeypatch):
    """The one-rank group check compares against the bare model: a DDP that drops its reduced gradient is caught."""
    from parallel import ddp

    finish = ddp._Bucket.finish

    def losing(bucket) -> None:
        finish(bucket)
        for param in bucket.params:
            param.grad.zero_()

    monkeypatch.setattr(ddp._Bucket, "finish", losing)
    row = gpu_check.check_one_rank_group("cpu")
    assert row["result"] == "fail" and row["ddp max diff"] > 1e-3 and row["fsdp max diff"] <= 1e-5
