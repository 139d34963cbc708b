"""Every file and folder a run writes appears whole or not at all: written under a temporary sibling
name, then renamed over the final one. A run killed midway leaves only a `.tmp-` sibling, which the
run folder's checks recognise as its own leftover (engine/outputs/folder.py)."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"


def temporary(path: Path) -> Path:
    """Where `path` is written before it is published: a sibling that no reader looks for."""
    return path.with_name(TMP_PREFIX + path.name)


def publish_folder(tmp: Path, folder: Path) -> Path:
    """Swap the folder `tmp`, written whole, in as `folder`, replacing an old copy (the caller's own)."""
    for path in (tmp, *tmp.rglob("*")):
        respect_umask(path)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(a temporary path)`, then rename it to `path`, so that a reader never sees half a file, and a failed
    write leaves none. The temporary name is this process's own: two processes writing one file (a shared cache
    of baseline scores) each publish a whole one."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        write(tmp)
        respect_umask(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written temporary is left beside the file
        tmp.unlink(missing_ok=True)
        raise


def respect_umask(path: Path) -> None:
    """The mode the user's umask gives a new file or folder: safetensors creates its files 0600 whatever it is
    (so another user of a shared machine could not read a model that every other file of its folder shares)."""
    if not path.is_symlink():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~UMASK)


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: set back at once, when the module is imported
    os.umask(mask)
    return mask


UMASK = _umask()


def write_json(path: Path, value: object) -> None:
    write_file(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))
