"""The server a run's ranks fork from (engine/launch.py), and the test suite's (tests/conftest.py): stdlib only, so
that a process can start one before it imports anything heavy."""

import multiprocessing
import multiprocessing.forkserver
import os
import sys
from pathlib import Path


def start_fork_server(modules: list[str]) -> None:
    """The server ranks fork from, started now with `modules` imported, if none is running yet.

    Python before 3.12.8 starts it on the default path of `python -c` (the current folder, not this process's
    sys.path: CPython issue 117378) and skips a module it cannot find without a word: run from another folder,
    every rank imported the engine itself, seconds each. The server gets this process's own folders (those outside
    Python's installation) on PYTHONPATH; its ranks do not keep that variable (`_rank` takes the launcher's)."""
    multiprocessing.set_forkserver_preload(modules)
    installed = [Path(prefix).resolve() for prefix in (sys.prefix, sys.base_prefix)]
    folders = [Path(entry).resolve() for entry in sys.path]  # "" is the current folder
    own = [str(folder) for folder in folders if not any(folder.is_relative_to(i) for i in installed)]
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*own, *([before] if before else [])])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
