"""bench/gpu_check.py's CPU dry run, so the GPU check cannot rot where no GPU is (issue 25)."""

import json
import subprocess
import sys

import pytest

from harness import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_the_dry_run_stops_resumes_exports_and_scores_every_one_gpu_approach(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    for name in ("lora", "qlora", "full bf16 adamw8bit"):
        assert checks[name]["result"] == "pass" and checks[name]["steps"] == 2 and checks[name]["rows"] == 4, name
        assert (tmp_path / name.replace(" ", "_") / "final").is_dir()
    assert {checks[name]["result"] for name in checks if "x2" in name or "kernels" in name} == {"skip"}


def test_a_run_that_fails_is_a_failed_check_with_its_sentence(tmp_path):
    row = gpu_check.check_run("bad", ["--approach", "no-such-approach"], "tiny", "cpu", tmp_path)
    assert row["result"] == "fail" and "unknown approach" in row["why"]
