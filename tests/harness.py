"""What more than one test file uses, in one place: test files import from here, never from each other.

- Paths: `ROOT` (the repository) and `SEED_RESULTS` (the original's results files, shipped in eval/).
- Multiprocess harness: `spawn(world, scenario, out, **kwargs)` runs `scenario(rank, world, **kwargs)` on
  `world` real gloo ranks on CPU (a rank's exception, or ranks still running after `DEADLINE_S`, fail the
  test) and returns every rank's result; `free_port` finds the port their rendezvous uses.
- A toy model and its data for those ranks: `Toy`, `toy_data(step)` (a global batch of `ROWS` rows,
  some labels `IGNORE`d), and `assert_close` for dicts of tensors (or None: no gradient).
- End-to-end runs of the engine: `run_engine` (3 steps of a tiny run, rank 0's summary), `FULL` (its
  settings for full fine-tuning), `SELECT` (a run choosing its checkpoint by its answers), `assert_same_curves`
  between two runs' summaries, and the exported `saved_weights` and `saved_logits` of a run's folder.
- The command line as a user runs it: `run_cli` (`python run.py ARGS`, forked from the tests' server),
  `assert_one_sentence`, and `snapshot` of a folder a failed command must leave as it was.
- `hand_made_run`: a finished, evaluated run's folder, written by hand, for the report's tests.

Under pytest's default import mode, tests/ is on sys.path (no __init__.py there), so `from harness import`
works in the test files and in the ranks they spawn, whose sys.path is their parent's.
"""

import hashlib
import json
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from models.processors import read_processor
from models.tiny import tiny_processor

ROOT = Path(__file__).resolve().parents[1]
SEED_RESULTS = ROOT / "eval" / "seed_results"

IGNORE = -100
ROWS = 24  # global batch: splits into 2 or 4 ranks times 2 micro-batches
DEADLINE_S = 120

# Read now, once in the tests' fork server, which imports this module (tests/conftest.py): no process forked from it
# reads the shipped files again, nor the same files as a tiny run writes them to OUT/base and OUT/final (0.3-0.8 s a
# read; models/processors.py keeps what a process read, by content).
with tempfile.TemporaryDirectory() as _written:
    tiny_processor().save_pretrained(_written)
    read_processor(_written)


# ---- the toy model and its data ---------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(self.norm(h))))


class Toy(nn.Module):
    """Transformer-ish residual blocks, a buffer in the forward, and a layer that is never called."""

    def __init__(self, seed: int, checkpointed: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(_Block() for _ in range(4))
        self.head = nn.Linear(16, 3)
        self.unused = nn.Linear(16, 16)
        self.register_buffer("scale", torch.full((16,), 1.0 + seed))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return self.head(h)


def toy_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(ROWS, 8, generator=generator)
    y = torch.randint(0, 3, (ROWS,), generator=generator)
    y[torch.rand(ROWS, generator=generator) < 0.3] = IGNORE  # uneven label counts across ranks
    return x, y


# ---- running ranks ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: Path, scenario, kwargs: dict, environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a lost peer fails the collective, not hangs it
    try:
        torch.save(scenario(rank, world, **kwargs), out / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while a peer still talks to it (that aborted once)
    finally:
        dist.destroy_process_group()


def spawn(world: int, scenario, out: Path, **kwargs) -> list[dict]:
    """Every rank's result of `scenario(rank, world, **kwargs)`; a rank's exception fails the test."""
    # Forked from the server tests/conftest.py starts: a rank starts in a fraction of a second. A forked rank has
    # the server's environment, so each rank takes its parent's as it is now.
    ranks = mp.start_processes(_rank_main, args=(world, free_port(), out, scenario, kwargs, dict(os.environ)),
                               nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + DEADLINE_S
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {DEADLINE_S} s")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if tensor is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# ---- the command line, as a user runs it -------------------------------------------------------

def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd`, as a process of its own whose stdout, stderr and exit status are the
    command's, but forked from the tests' server (tests/conftest.py), which has torch, transformers and the
    engine imported: the command starts without ~6 s of imports. Offline (conftest.py), so an unreachable hub
    fails at once instead of after its retries."""
    argv = [str(ROOT / "run.py"), *args]
    with tempfile.TemporaryDirectory() as streams:
        out, err = Path(streams) / "stdout", Path(streams) / "stderr"
        command = mp.get_context("forkserver").Process(target=_run_py, args=(argv, str(cwd), dict(os.environ),
                                                                             out, err))
        command.start()
        command.join(timeout)
        if command.exitcode is None:
            command.kill()
            command.join()
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        return subprocess.CompletedProcess([sys.executable, *argv], command.exitcode, out.read_text(),
                                           err.read_text())


def _run_py(argv: list[str], cwd: str, env: dict[str, str], out: Path, err: Path) -> None:
    """run.py as `python run.py` runs it, in this forked process: its directory, environment and argv; its
    stdout and stderr (the file descriptors, so the ranks it starts write there too) into `out` and `err`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for descriptor, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, descriptor)
        os.close(opened)
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")  # its sys.exit(status) is this process's exit status
    except Exception:  # as Python shows an uncaught exception, and its status
        traceback.print_exc()
        sys.exit(1)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes): what a failed command must leave as it was."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_one_sentence(result: subprocess.CompletedProcess, message: str, code: int = 2) -> None:
    """The command failed with `code` and printed one line on stderr holding `message`, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert message in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]


# ---- end-to-end runs of the engine ------------------------------------------------------------

FULL = dict(train_modules=("all",), lr=1e-3)
# --select-by: 4 steps, an evaluation point after each, the whole validation split (5 rows) answered 8 tokens long, the
# checkpoint whose answers score best by chrF kept as OUT/final (tests/e2e/test_select_by.py says why each).
SELECT = dict(max_steps=4, eval_every=0.25, max_new_tokens=8, select_rows=5, final="best", keep_last=4, lr=5e-3,
              train_modules=("all",), select_by="chrf")


def run_engine(out, approach: str, batch_size: int, gpus: int | None, **overrides) -> dict:
    """3 steps on 2 exhibits, dropout off, one evaluation; rank 0's summary. A bf16 run multiplies as a GPU does
    (`Bf16MatmulsAsOnGpu`), on every rank."""
    # Imported here, not above: the trainer takes seconds to import, and every rank that `spawn`
    # starts imports this module.
    from engine.config import from_approach
    from engine.launch import launch
    from finetune import finetune

    settings = dict(model="tiny", limit_exhibits=2, batch_size=batch_size, max_steps=3, eval_every=1.0, lr=5e-3,
                    lora_dropout=0.0, lora_target=("projections", "lm_head"), output_dir=str(out), device="cpu",
                    gpus=gpus, final="last", skip_eval=True)
    config = from_approach(approach, **dict(settings, **overrides))
    return launch(config, finetune_bf16_as_on_gpu if config.precision.startswith("bf16") else finetune)


class Bf16MatmulsAsOnGpu(TorchDispatchMode):
    """bf16 matrix products on the CPU computed as a GPU's tensor cores (and oneDNN on a CPU with bf16
    instructions) compute them: the bf16 inputs multiplied exactly and summed in fp32, the result rounded
    once to bf16. Here that is an fp32 kernel on the widened inputs. Without bf16 instructions (AVX2 only,
    as on this machine) torch falls back to its own bf16 GEMM, 6x slower than fp32 for the tiny model's
    output layer forward and 30-50x for its input gradient: the precision tests spent 7 of the suite's
    19 minutes in it. Every dtype a test sees is the same, and the values differ only by summation order."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
               torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.MATMULS and all(type(a) in (torch.Tensor, nn.Parameter) and a.dtype == torch.bfloat16
                                        and a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor)):
            widened = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*widened, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


@record
def finetune_bf16_as_on_gpu(config) -> dict:
    """The engine's worker (finetune.py, inside its own `record`) with `Bf16MatmulsAsOnGpu` on: a module-level
    function, as launch asks."""
    from finetune import finetune

    with Bf16MatmulsAsOnGpu():
        return finetune.__wrapped__(config)


def saved_weights(folder) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def saved_logits(folder, batch: dict) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    with torch.no_grad():
        return AutoModelForImageTextToText.from_pretrained(folder).eval()(**batch, use_cache=False).logits


def assert_same_curves(got: dict, expected: dict, validation: float = 1e-5) -> None:
    """The two summaries' losses and grad norms, step by step (test_fsdp_runs explains the tolerances;
    `validation`, the relative one of the validation loss after the last step, can be looser)."""
    for key, rel in (("train_loss", 1e-5), ("val_loss", validation), ("grad_norm", 1e-3)):
        values = [v for _, v in expected["history"][key]]
        assert [v for _, v in got["history"][key]] == pytest.approx(values, rel=rel), key


# ---- run folders written by hand --------------------------------------------------------------

def hand_made_run(folder: Path, lr: float, answer: str) -> Path:
    """A run folder as training and evaluation leave it (summary.json, config.json, eval/), written by hand."""
    (folder / "eval").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "approach": "lora", "world_size": 2, "wall_time_s": 9.0, "trainable_params": 10, "total_params": 100,
        "samples_per_s": 1.5, "tokens_per_s": 300.0, "history": {"train_loss": [[1, 10.4], [2, 9.8]],
                                                                 "val_loss": [[2, 9.9]]},
        "ranks": [{"rank": 0, "peak_memory_bytes": 2**30}, {"rank": 1, "peak_memory_bytes": 2**29}]}))
    (folder / "config.json").write_text(json.dumps({"dataset": "musequest", "lr": lr, "seed": 0, "approach": "lora"}))
    rows = [{"data_id": "3", "item_name": "1-decadrachm-syracuse-about-400-bce", "image_name": "1-decadrachm-syracuse-"
             "about-400-bce-1.jpg", "user_question": "Can you describe this exhibit?", "model_generated_answer": answer,
             "ground_truth_answer": "A coin."}]
    from eval.results_csv import write_results

    write_results(folder / "eval" / "results.csv", rows, [0.25])
    (folder / "eval" / "results.json").write_text(json.dumps({"score": 0.25, "baseline_score": 0.5, "scorer": "base"}))
    return folder
