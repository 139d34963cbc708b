"""What a run may do with the folder it writes to: never destroy or adopt what it did not write.

A training run starts in an empty (or missing) `--output-dir`. A used one it refuses, unless
`--resume` (continue the run that is there) or `--overwrite` (replace it: delete what a run writes,
and only that). A folder is a run folder when it holds the `config.json` a run writes first.
`run.py merge` writes only into a new or empty `--output`.
"""

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from engine.outputs.publish import TMP_PREFIX, temporary
from engine.runtime import Runtime
from errors import UsageError

CONFIG = "config.json"  # written by every run before its first step: what makes a folder a run folder
SPLITS_JSON = "splits.json"  # each split's data_ids, where --split-by cut them
RUN_WRITES = ("checkpoints", "final", "base", "eval", "tensorboard", "summary.json", SPLITS_JSON,
              CONFIG)  # config.json last


def run_config(folder: Path, name: str = CONFIG) -> dict | None:
    """The run's settings `folder` holds in `name` (config.json, or an adapter's training_config.json): a JSON
    object naming its approach; else None."""
    try:
        settings = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) and "approach" in settings else None


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Check `out` for a new run, and on `overwrite` empty it of an earlier run; a UsageError names
    what is in the way. Call on the main rank, before any model or data loads."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --output-dir and --overwrite replaces it; give one of them.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a folder.")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    is_run = (out / CONFIG).is_file()
    if resume:
        if not is_run:
            raise UsageError(f"--resume: {out} holds no museft run (it has no {CONFIG}), so there is nothing to "
                             f"continue.")
        return
    if not overwrite:
        raise UsageError(f"--output-dir {out} already holds a run; continue it with --resume, replace it with "
                         f"--overwrite, or choose another folder." if is_run else
                         f"--output-dir {out} is not empty and holds no museft run (it has no {CONFIG}); choose "
                         f"another folder.")
    if not is_run:
        raise UsageError(f"--overwrite: {out} holds no museft run (it has no {CONFIG}), so none of it is ours to "
                         f"delete.")
    foreign = [path for path in entries if path.is_symlink() or
               not (path.name in RUN_WRITES or path.name.startswith(TMP_PREFIX))]
    if foreign:
        raise UsageError(f"--overwrite: {foreign[0]} was not written by a run, so {out} is left as it is; move it "
                         f"out first.")
    remove_run_writes(out)


def remove_run_writes(out: Path) -> None:
    """Delete what a run writes in `out`, and only that."""
    leftovers = [path for path in out.iterdir() if path.name.startswith(TMP_PREFIX)]
    for path in leftovers + [out / name for name in RUN_WRITES]:  # config.json last: an interrupted one can retry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@contextlib.contextmanager
def claimed(out: Path, config_json: str, runtime: Runtime, resume: bool) -> Iterator[None]:
    """A new run's config.json, created exclusively (by the main rank) before anything else lands in `out`,
    which `prepare` found empty: of two runs started at once into one folder, the second is refused. A
    resumed run keeps its own. Whatever a run that fails later leaves behind is then a run folder, which
    `--overwrite` may clear; but a new run that fails inside this block (its setup: a --lora-target that
    matches nothing) takes back what it wrote, so the corrected command finds the folder as the user left it."""
    new = runtime.is_main and not resume
    created = new and not out.exists()
    if new:
        out.mkdir(parents=True, exist_ok=True)
        try:
            with (out / CONFIG).open("x") as file:  # exclusive: of two runs started at once into one folder, one
                file.write(config_json)  # claims it
        except FileExistsError:
            raise UsageError(f"--output-dir {out} was claimed by another run that started at the same time; choose "
                             f"another folder.") from None
    try:
        yield
    except BaseException:
        if new:
            remove_run_writes(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise


def check_new(folder: Path, flag: str) -> None:
    """Refuse to write a new model folder where something already is (or where its temporary sibling is)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{flag} {folder} already exists and is not empty; choose a new folder.")
    tmp = temporary(folder)
    if tmp.exists() or tmp.is_symlink():
        raise UsageError(f"{flag} {folder}: {tmp} is in the way (left by an interrupted write?); remove it or "
                         f"choose another folder.")


def prepare_for_run(out: Path, resume: bool, overwrite: bool, runtime: Runtime) -> None:
    """`prepare` on the main rank; every other rank waits for it, and all of them raise its refusal."""
    problem = None
    if runtime.is_main:
        try:
            prepare(out, resume, overwrite)
        except UsageError as error:
            problem = str(error)
    problem = runtime.gather(problem)[0]  # also the barrier: no rank loads anything before the folder is ready
    if problem:
        raise UsageError(problem)
