"""The fork servers that start ranks freeze what their imports made (engine/frozen_imports.py), so that no rank's
garbage collection walks and copies it. A fork server passes over a preloaded module that fails to import, so a
renamed module or a dropped name would go unnoticed but for these."""

import gc
import multiprocessing
import subprocess
import sys

import pytest

from engine import launch
from engine.config import from_approach
from harness import ROOT, spawn


def _freeze_count(rank: int, world: int) -> int:
    return gc.get_freeze_count()


def test_the_launchers_server_imports_the_freeze_last(monkeypatch, tmp_path):
    preloaded = []

    def record(names: list[str]) -> None:
        preloaded.extend(names)
        raise InterruptedError  # stops before any rank starts

    monkeypatch.setattr(multiprocessing, "set_forkserver_preload", record)
    config = from_approach("lora_ddp", model="tiny", gpus=2, device="cpu", output_dir=str(tmp_path))
    with pytest.raises(InterruptedError):
        launch.launch(config, _freeze_count)
    assert preloaded[-1] == "engine.frozen_imports"
    frozen = subprocess.run([sys.executable, "-c", "import gc, engine.frozen_imports; print(gc.get_freeze_count())"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    assert int(frozen.stdout) > 0


def test_ranks_the_tests_start_hold_their_servers_imports_frozen(tmp_path):
    """More than torch's and transformers' objects: the server's imports, not what a rank made itself."""
    assert all(count > 100_000 for count in spawn(2, _freeze_count, tmp_path))
