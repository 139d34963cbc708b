"""Shared fixtures: the real processor is slow to load (a 3.5 MB tokenizer), so load it once."""

import ctypes
import fcntl
import hashlib
import os
import pickle
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Baseline scores are cached across runs; tests (and the runs they start) get a cache of their own, and so does each
# pytest-xdist worker (a worker inherits the controlling process's environment), so a test that counts what is cached
# sees only its own worker's runs.
if "PYTEST_XDIST_WORKER" in os.environ or "MUSEFT_CACHE" not in os.environ:
    os.environ["MUSEFT_CACHE"] = tempfile.mkdtemp(prefix="museft-cache-")
# Point-to-point traffic obeys NCCL's rules on gloo (parallel/p2p.py), in every rank a test starts.
os.environ.setdefault("MUSEFT_NCCL_RULES", "1")
# Offline: the hub is unreachable here, and huggingface_hub reads this once, as it is first imported (below, and by the
# fork server).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread a process, as torchrun gives its ranks: most tests run two or more processes on the machine's two cores,
# whose threads would otherwise contend (21% longer, measured on the DDP, precision and parallel tests). Read by torch
# as it is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# --compile's graphs run on aot_eager, not inductor: the same capture by dynamo and the same forward and backward
# graphs from AOT autograd, run by eager kernels, so a compiled run equals an eager one exactly, without inductor
# generating and building C++ for every graph (minutes a run on 2 cores; bench/compile_vs_eager.py runs inductor).
# Read by torch as dynamo is first imported (below, and by the fork server).
os.environ.setdefault("TORCH_COMPILE_OVERRIDE_BACKENDS", ">=0:aot_eager")
# glibc's malloc keeps what a process frees for its next allocations, as CUDA's caching allocator does on a GPU. By
# default a block over its mmap threshold (at most 32 MiB) is mapped afresh each time and every page of it zeroed by
# the kernel as it is first touched: each 33 MB chunk of the loss's logits, a step's activations, FSDP's gathered
# weights (engine/loss.py's chunked loss, forward and backward: 704 -> 566 ms a step, 372k page faults -> 26k).
# Read by glibc as a process starts (the pytest-xdist workers, the fork server, torchrun's processes); this process
# has started, so it is told by mallopt.
MALLOC_KEEPS = 1 << 30  # bytes: blocks up to this size come from the heap, which keeps up to this much free
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_KEEPS))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(MALLOC_KEEPS))
if sys.platform == "linux":  # the values the children get, whether set here or given
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))
    libc.mallopt(M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))

from engine.fork_server import start_fork_server
from models.tiny import build_tiny, tiny_processor


def pytest_configure(config):
    """Ranks fork from one server process that has torch, transformers and the engine imported, started here:
    a rank starts in a fraction of a second instead of ~10 s of imports, whether tests/harness.py spawns it or
    the engine's launcher does (engine/launch.py, whose own server on a GPU machine preloads only torch and
    transformers). Under pytest-xdist each worker starts its own; the process that hands them tests runs none."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    # Besides the engine: what its runs import only once they start (TensorBoard's writer, the charts' matplotlib),
    # and tests/harness.py, which the ranks' and commands' entry points are in (it reads the shipped processor).
    start_fork_server(["torch", "transformers", "engine.trainer", "finetune", "torch.utils.tensorboard",
                       "matplotlib.figure", "harness", "engine.frozen_imports"])


@pytest.fixture(scope="session")
def _processor():
    """One for the session, to read only."""
    return tiny_processor()


@pytest.fixture
def processor():
    """A processor of the test's own, so a test that changes padding side or sizes affects no other (a copy of the
    one read from the shipped files once a process: models/tiny.py)."""
    return tiny_processor()


@pytest.fixture
def tiny_model():
    """The built-in tiny Idefics2 with seed 0, fp32, in eval mode."""
    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """`one_process(approach, batch_size, **overrides)`: (rank 0's summary, the run's folder) of a one-process run
    of the engine (tests/harness.py `run_engine`): the reference that the parallel runs must reproduce, run once
    per test session for each setting, however many test files (and pytest-xdist workers) compare against it: the
    first worker to ask runs it under a file lock, in a folder all of them share, and the others read it. Read it,
    do not change it."""
    from harness import run_engine

    # A worker's base folder is popen-gwN inside the session's own; without xdist the session's own is the shared one.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    done = {}

    def run(approach: str, batch_size: int, **overrides) -> tuple[dict, Path]:
        key = repr((approach, batch_size, sorted(overrides.items())))
        if key not in done:
            folder = shared / f"one-process-{approach}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
            with open(f"{folder}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
                summary_file, out = folder / "summary.pickle", folder / "run"
                if not summary_file.exists():
                    folder.mkdir(exist_ok=True)
                    summary = run_engine(out, approach, batch_size=batch_size, gpus=None, **overrides)
                    summary_file.with_suffix(".tmp").write_bytes(pickle.dumps(summary))
                    summary_file.with_suffix(".tmp").rename(summary_file)
                done[key] = pickle.loads(summary_file.read_bytes()), out
        return done[key]

    return run
