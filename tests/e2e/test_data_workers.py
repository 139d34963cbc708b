"""--data-workers end to end: batches collated ahead by worker processes train bit for bit the run that collated in
line, in one process and on two DDP ranks (each forking workers of its own); summary.json and TensorBoard hold each
step's wait for data and its compute time. tests/unit/engine/test_loader.py compares the batches themselves. Under
FSDP, the pipeline and pipeline+fsdp, runs resumed with workers equal one process (test_fsdp_runs.py and
test_pipeline_runs.py's resume tests)."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness import run_engine


def assert_timed(out) -> None:
    written = json.loads((out / "summary.json").read_text())
    assert written["mean_data_wait_s"] >= 0 and written["mean_compute_s"] > 0
    assert written["mean_data_wait_s"] + written["mean_compute_s"] == pytest.approx(written["mean_step_time_s"])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag in ("time/data_wait_s", "time/compute_s"):
        assert [event.step for event in events.Scalars(tag)] == [1, 2, 3], tag


@pytest.mark.slow
def test_workers_train_the_same_run_in_one_process(tmp_path, one_process):
    in_line, _ = one_process("lora", 4)  # --data-workers resolves to 0 on a CPU
    ahead = run_engine(tmp_path / "ahead", "lora", batch_size=4, gpus=None, data_workers=2)
    assert ahead["history"] == in_line["history"]  # exactly: losses and grad norms, train and validation
    assert_timed(tmp_path / "ahead")


@pytest.mark.slow
def test_workers_train_the_same_run_on_two_ddp_ranks(tmp_path):
    in_line = run_engine(tmp_path / "in-line", "lora_ddp", batch_size=2, gpus=2, data_workers=0)
    ahead = run_engine(tmp_path / "ahead", "lora_ddp", batch_size=2, gpus=2, data_workers=2)
    assert ahead["history"] == in_line["history"]
    assert_timed(tmp_path / "ahead")
