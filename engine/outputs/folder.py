"""What a run may do with the folder it writes to: never destroy or adopt what it did not write.

A training run starts in an empty (or missing) `--output-dir`. A used one it refuses, unless
`--resume` (continue the run that is there) or `--overwrite` (replace it: delete what a run writes,
and only that). A folder is a run folder when it holds the `config.json` a run writes first.
`run.py merge` writes only into a new or empty `--output`.
"""

import shutil
from pathlib import Path

from engine.outputs.publish import TMP_PREFIX, temporary
from engine.runtime import Runtime
from errors import UsageError

CONFIG = "config.json"  # written by every run before its first step: what makes a folder a run folder
RUN_WRITES = ("checkpoints", "final", "base", "eval", "tensorboard", "summary.json", CONFIG)  # config.json last


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
    leftovers = [path for path in entries if path.name.startswith(TMP_PREFIX)]
    for path in leftovers + [out / name for name in RUN_WRITES]:  # config.json last: an interrupted one can retry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def claim(out: Path, config_json: str) -> None:
    """A new run's config.json, written before anything else lands in `out` (a resumed run keeps
    its own until it has started): whatever a run that fails later leaves behind is then a run
    folder, which `--overwrite` may clear."""
    if not (out / CONFIG).is_file():
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(config_json)


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
