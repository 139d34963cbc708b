"""Nothing lost, nothing silently wrong: every way a command can fail ends in one sentence on stderr and the
exit status of errors.py (1 a file, 2 bad input or a diverged run, 130 Ctrl-C, 143 SIGTERM), never a traceback
unless --debug or MUSEFT_DEBUG=1 asks for one, and the files that were there before are left as they were.

A training run's progress bar shares stderr with the error; `sentence_only` drops the bar's lines before
`assert_one_sentence` looks at what is left.
"""

import errno
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file

import run
from engine.config import from_approach
from engine.launch import launch
from engine.outputs import checkpoint
from engine.outputs.export import save_piece
from engine.outputs.publish import write_json
from engine.runtime import setup_runtime
from engine.tensorboard import Scalars
from errors import DiskError, UsageError, explain
from eval.results_csv import write_results
from harness import ROOT, assert_one_sentence, hand_made_run, run_cli, snapshot

CHEAP = ["--limit-exhibits", "2", "--max-steps", "2", "--batch-size", "2", "--skip-eval", "--eval-every", "1",
         "--model", "tiny", "--device", "cpu"]
PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")  # tqdm's "lora:  50%|█████     | 1/2 [...]"


def sentence_only(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result` with the progress bar's lines (tqdm writes them with \\r or \\n) taken out of stderr."""
    pieces = re.split(r"[\r\n]", result.stderr)
    stderr = "\n".join(piece for piece in pieces if piece.strip() and not PROGRESS_BAR.search(piece))
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout, stderr + "\n")


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """run.main(ARGS) in this process, as a CompletedProcess for `assert_one_sentence`: fast, for what fails early."""
    code = run.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


# ---- numerical flags: refused before any work ----------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--lr", "inf"], "--lr must be finite and above 0, not inf."),
    (["--lr", "nan"], "--lr must be finite and above 0, not nan."),
    (["--lr", "0"], "--lr must be finite and above 0, not 0."),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be above 0, not -1."),
    (["--warmup-ratio", "2"], "--warmup-ratio must be at least 0 and at most 1, not 2."),
    (["--weight-decay", "-0.01"], "--weight-decay must be finite and at least 0, not -0.01."),
    (["--lora-dropout", "1"], "--lora-dropout must be at least 0 and below 1, not 1."),
    (["--lora-alpha", "0"], "--lora-alpha must be finite and above 0, not 0."),
    (["--eval-every", "0"], "--eval-every must be above 0 and at most 1, not 0."),
    (["--eval-every", "1.5"], "--eval-every must be above 0 and at most 1, not 1.5."),
    (["--tensorboard-port", "70000"], "--tensorboard-port must be at least 1 and at most 65535, not 70000."),
    (["--tensorboard-port", "0"], "--tensorboard-port must be at least 1 and at most 65535, not 0."),
    (["--attn-implementation", "flash"],
     "--attn-implementation must be sdpa, eager or flash_attention_2, not 'flash'."),
])
def test_an_out_of_range_flag_is_refused_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_one_sentence(in_process(capsys, *CHEAP, *args, "--output-dir", "out"), message)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_flags_inside_their_range_pass():
    config = from_approach("lora", lr=1e-3, max_grad_norm=float("inf"), warmup_ratio=1.0, weight_decay=0.0,
                           lora_dropout=0.0, eval_every=1.0, tensorboard_port=65535, attn_implementation="eager")
    assert config.max_grad_norm == float("inf")  # inf: no clipping


def test_an_out_of_range_flag_through_the_command_line(tmp_path):
    assert_one_sentence(run_cli("--lr", "inf", "--output-dir", "out", cwd=tmp_path),
                        "error: --lr must be finite and above 0, not inf.")
    assert not (tmp_path / "out").exists()


# ---- divergence: stopped at the step, nothing of nan saved ----------------------------------------------------

@pytest.mark.slow
def test_a_diverging_run_stops_at_the_step_and_saves_no_nan(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = sentence_only(run_cli(*CHEAP, "--lr", "1e30", "--output-dir", "out", cwd=tmp_path))
    assert_one_sentence(result, "the learning rate (--lr 1e+30) is likely too high")
    assert re.search(r"error: step \d: the (training loss|gradient norm|validation loss) is (nan|inf|-inf), so the "
                     r"run stopped before saving anything of it", result.stderr), result.stderr
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    for weights in out.rglob("*.safetensors"):  # OUT/base, and any checkpoint of a step before the divergence
        assert all(torch.isfinite(tensor).all() for tensor in load_file(weights).values()), weights
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == before


def test_divergence_is_checked_for_every_number_it_names():
    from engine.trainer import refuse_divergence

    config = from_approach("lora", lr=0.5)
    refuse_divergence(3, config, training_loss=2.0, gradient_norm=0.0)
    with pytest.raises(UsageError, match=r"^step 3: the gradient norm is inf, .*\(--lr 0\.5\) is likely too high, "
                                         r"or a batch holds no answer tokens"):
        refuse_divergence(3, config, training_loss=2.0, gradient_norm=float("inf"))
    with pytest.raises(UsageError, match=r"^step 4: the validation loss is nan, .* is likely too high\.$"):
        refuse_divergence(4, config, validation_loss=float("nan"))


# ---- Ctrl-C and SIGTERM ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sent,code,message", [(signal.SIGINT, 130, "error: interrupted by Ctrl-C; "),
                                               (signal.SIGTERM, 143, "error: stopped by SIGTERM; ")])
def test_a_signal_mid_training_is_one_sentence_and_its_exit_status(sent, code, message, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "run.py"), *CHEAP, "--max-steps", "500", "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists():  # written last before the first step
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    time.sleep(1)
    written = snapshot(out / "base")
    process.send_signal(sent)
    stdout, stderr = process.communicate(timeout=60)
    result = sentence_only(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    assert_one_sentence(result, message + "the checkpoints already written are whole", code)
    assert snapshot(out / "base") == written


# ---- files and folders that cannot be written --------------------------------------------------------------------

@pytest.mark.slow
def test_an_output_dir_under_a_file_is_one_sentence_naming_it(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    before = snapshot(tmp_path)
    result = sentence_only(run_cli(*CHEAP, "--output-dir", "a_file/run", cwd=tmp_path))
    assert_one_sentence(result, "Not a directory (ENOTDIR); a file stands where a folder belongs", 1)
    assert "error: cannot use a_file/run" in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs, where not even root may make a folder")
def test_a_folder_nobody_may_write_is_one_sentence_naming_it(tmp_path):
    # chmod does not stop root, who runs these tests; sysfs refuses a new folder to everyone (EPERM, or EACCES).
    # `report` is the cheapest command that writes: a subcommand fails the same way as training.
    hand_made_run(tmp_path / "run", 1e-3, "x")
    before = snapshot(tmp_path)
    result = run_cli("report", "run", "--output", f"/sys/museft-test-{os.getpid()}/report", cwd=tmp_path)
    assert_one_sentence(result, f"error: cannot use /sys/museft-test-{os.getpid()}: ", 1)
    assert re.search(r"\((EPERM|EACCES|EROFS)\); choose a folder you can write to\.$", result.stderr.strip())
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_is_one_sentence(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    written = {}

    def full_disk(tensors, path, *args, **kwargs):
        written.update(snapshot(out / "base"))  # what the run had written when the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write names no file

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    result = sentence_only(in_process(capsys, *CHEAP, "--output-dir", str(out)))
    assert_one_sentence(result, f"error: cannot write under {out}: No space left on device (ENOSPC); free some "
                                f"space or choose another folder.", 1)
    assert written and snapshot(out / "base") == written
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("step-*"))


def test_a_really_full_disk_under_every_kind_of_writer_is_a_disk_error(tmp_path, processor):
    """Every library the engine writes with, on a full disk: safetensors (a SafetensorError), torch.save (a
    RuntimeError raised in its clean-up), the tokenizer's save (a plain Exception, "(os error 28)"), Python's
    own files (JSON, the results CSV), Pillow (the report's pictures) and TensorBoard's event files."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a 64 KiB tmpfs here (needs root): the monkeypatched full disk above stands in")
    big = torch.ones(100_000)

    def event_files() -> None:
        scalars = Scalars(small / "tensorboard")
        for step in range(200):
            scalars.text(step, "text", "x" * 1000)
        scalars.close()

    writers = {
        "checkpoint weights": lambda: checkpoint.save(small / "checkpoints", 1, {"w": big}, {}, {}, keep_last=2),
        "checkpoint state": lambda: checkpoint.save(small / "checkpoints", 1, {"w": torch.ones(2)}, {"m": big}, {},
                                                    keep_last=2),
        "export piece": lambda: save_piece({"w": big}, small / "model.safetensors", torch.float32),
        "processor": lambda: processor.save_pretrained(small / "final"),
        "json": lambda: write_json(small / "summary.json", list(range(100_000))),
        "results csv": lambda: write_results(small / "results.csv", [{"item_name": "x" * 1000}] * 100, [0.5] * 100),
        "picture": lambda: Image.effect_noise((1000, 1000), 50).save(small / "row-0.jpg", quality=95),
        "event files": event_files,
    }
    try:
        for name, write in writers.items():
            with pytest.raises(Exception) as failed:
                write()
            assert explain(failed.value, small) == (1, f"cannot write under {small}: No space left on device "
                                                       f"(ENOSPC); free some space or choose another folder."), name
            if name in ("json", "results csv"):  # a file written whole leaves no half-written temporary
                assert not list(small.iterdir()), name
            for path in small.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---- a damaged checkpoint ------------------------------------------------------------------------------------------

GARBAGE = {
    "random bytes": bytes(range(256)) * 8,
    "empty": b"",
    "text": b"hello\n",
    "a pickled object": pickle.dumps(Path("x")),  # torch's refusal of it advises weights_only=False
    "a tensor, not a state": None,
}


@pytest.mark.parametrize("garbage", GARBAGE)
def test_a_garbage_train_state_is_damaged_and_never_unpickled_unsafely(garbage, tmp_path):
    saved = checkpoint.save(tmp_path / "checkpoints", 1, {"w": torch.ones(2)}, {"optimizer": {}}, {}, keep_last=2)
    if GARBAGE[garbage] is None:
        torch.save(torch.ones(2), saved / "train_state.pt")
    else:
        (saved / "train_state.pt").write_bytes(GARBAGE[garbage])
    with pytest.raises(checkpoint.DamagedCheckpoint) as refused:
        checkpoint.load(saved, {})
    message = str(refused.value)
    assert message.startswith(f"checkpoint {saved} is damaged: train_state.pt cannot be read as a training state (")
    assert "weights_only" not in message and "\n" not in message and message.endswith(").")


# ---- a failure on a spawned rank: the rank's own sentence ------------------------------------------------------------

def _usage_error_on_rank_one(config):
    runtime = setup_runtime(config)
    if runtime.rank == 1:
        raise UsageError("rank one's own sentence.")
    dist.barrier()  # rank 0 waits here until the failure ends every rank


def _full_disk_on_rank_one(config):
    runtime = setup_runtime(config)
    if runtime.rank == 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(config.out / "checkpoints"))
    dist.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("worker,kind,message", [
    (_usage_error_on_rank_one, UsageError, "rank one's own sentence."),
    (_full_disk_on_rank_one, DiskError, "cannot use out/checkpoints: No space left on device (ENOSPC); free some "
                                        "space or choose another folder."),
])
def test_a_rank_failure_reaches_the_user_as_the_ranks_sentence(worker, kind, message, capfd):
    with pytest.raises(kind) as failed:
        launch(from_approach("lora_ddp", gpus=2, device="cpu", output_dir="out"), worker)
    assert str(failed.value) == message  # not "rank 1 failed ...", nor "UsageError: ..."
    assert "Traceback" not in capfd.readouterr().err  # torch's launcher logged none of the rank's traceback


# ---- --debug and MUSEFT_DEBUG=1: the traceback too -------------------------------------------------------------------

def test_museft_debug_shows_the_traceback_and_keeps_the_status(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSEFT_DEBUG", "1")
    result = run_cli("--lr", "inf", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr and "UsageError" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --lr must be finite and above 0, not inf."


def test_the_debug_flag_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUSEFT_DEBUG", "0")  # off; and --debug's setting it (for the ranks) is undone after the test
    result = in_process(capsys, "--warmup-ratio", "2", "--debug", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --warmup-ratio must be")
