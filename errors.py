"""What ends a command with one sentence on stderr instead of a traceback, and its exit status.

Raise UsageError for anything the user can fix (flags, dataset columns, checkpoints, a run that
diverged); let real bugs raise what they raise. run.py shows every failure in `explain` as
`error: <one sentence>` and exits with its status:

    0    done
    1    a file or folder could not be written or read: a full disk, a read-only or forbidden folder,
         a file where a folder belongs (the sentence names the path and the system's error); or another
         rank of the run went away (its process or machine died), so this one cannot go on; or a rank this
         process started failed with no sentence of its own (killed, or a bug); or a collective between the
         ranks timed out
    2    a UsageError: bad input, refused before any work, or a diverged run, stopped before saving
    130  interrupted by Ctrl-C (SIGINT)
    143  stopped by SIGTERM

Anything else is a bug: its traceback is shown (exit 1). `--debug`, or MUSEFT_DEBUG=1 in the
environment, shows the traceback of every failure before its sentence, with the same status.
"""

import errno
import os
import re
import signal
from pathlib import Path


class UsageError(Exception):
    """Bad input the user can fix; the message is shown as-is."""


class DiskError(Exception):
    """A file that could not be written or read, as the sentence `explain` gives its OSError (exit 1): what a
    rank raises instead of its OSError, so that the parent that started the ranks can show the sentence."""


class RankFailed(Exception):
    """A rank this process started failed without a sentence of its own (killed by a signal, or a bug, whose
    traceback is shown): every rank was stopped (exit 1, as when another rank went away)."""


class Terminated(BaseException):
    """SIGTERM, raised by run.py's handler so that a run unwinds as after Ctrl-C: a BaseException, like
    KeyboardInterrupt, so that no `except Exception` catches it."""


# What gloo, torch's TCP store and NCCL say when the process at the other end of a connection has gone. NCCL's
# words come through torch's DistBackendError: ncclRemoteError's "remote process exited or there was a network
# error", ncclSystemError's "unexpected exit of a remote peer", and an aborted communicator after a peer failed.
PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection was likely closed"
                       r"|remote process exited or there was a network error|unexpected exit of a remote peer"
                       r"|NCCL communicator was aborted")
# A collective that no peer completed in time: NCCL's watchdog, gloo's wait. Not necessarily a lost peer.
TIMED_OUT = re.compile(r"Watchdog caught collective operation timeout|Timed out waiting \d+ms")


# The OSErrors of a disk or a path, and what to do about each; any other OSError is left to its traceback.
DISK_ERRORS = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.EROFS: "choose a folder you can write to",
    errno.EACCES: "choose a folder you can write to",
    errno.EPERM: "choose a folder you can write to",
    errno.ENOTDIR: "a file stands where a folder belongs; choose another path",
    errno.EEXIST: "a file stands where a folder belongs; choose another path",
    errno.EISDIR: "a folder stands where a file belongs; choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "choose another folder",
    errno.EIO: "the disk may be failing; choose another folder",
}


def debug() -> bool:
    """Whether to show tracebacks too: --debug, or MUSEFT_DEBUG=1 in the environment (inherited by ranks)."""
    return os.environ.get("MUSEFT_DEBUG", "") not in ("", "0")


def explain(error: BaseException, where: Path | str | None = None, resumable: bool = False) -> tuple[int, str] | None:
    """(exit status, one sentence) for a failure the user should read as a sentence; None for a bug.

    `where` is the folder being written, named when an OSError names no file (a write that fills the disk);
    `resumable` adds --resume's advice to an interruption.
    """
    sigval = getattr(error, "sigval", None)  # torch elastic's SignalException, in the parent of spawned ranks
    after = "; the checkpoints already written are whole, and --resume continues from the newest" if resumable else ""
    if isinstance(error, UsageError):
        return 2, str(error)
    if isinstance(error, (DiskError, RankFailed)):
        return 1, str(error)
    if isinstance(error, KeyboardInterrupt) or sigval == signal.SIGINT:
        return 130, f"interrupted by Ctrl-C{after}."
    if isinstance(error, Terminated) or sigval == signal.SIGTERM:
        return 143, f"stopped by SIGTERM{after}."
    if lost_peer(error):
        return 1, f"another rank of this run went away (its process ended, or its machine or network failed; its " \
                  f"own output may say why), so this one stopped too{after}."
    if isinstance(error, RuntimeError) and TIMED_OUT.search(str(error)):
        return 1, f"a collective operation between the ranks timed out: another rank is stuck, far slower, or ran " \
                  f"different collectives (look at its own output; TORCH_NCCL_TRACE_BUFFER_SIZE=2000 makes NCCL dump " \
                  f"what each rank last ran){after}."
    disk = os_error(error)
    if disk is not None and disk.errno in DISK_ERRORS:
        what = f"use {disk.filename}" if disk.filename is not None else f"write under {where}" if where else "write"
        return 1, f"cannot {what}: {disk.strerror} ({errno.errorcode[disk.errno]}); {DISK_ERRORS[disk.errno]}."
    return None


def lost_peer(error: BaseException) -> bool:
    """Whether torch.distributed failed because another rank's process or machine went away (not this rank's
    fault: a spawning parent names the rank that did fail instead)."""
    return isinstance(error, RuntimeError) and PEER_GONE.search(str(error)) is not None


def os_error(error: BaseException) -> OSError | None:
    """The OSError a failure comes down to: itself; the one torch.save was writing when its clean-up raised a
    RuntimeError (so it goes on a full disk); or the one a library written in Rust words as "(os error 28)"
    (safetensors' SafetensorError, the plain Exception of tokenizers' save)."""
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        return error.__context__
    code = None if isinstance(error, OSError) else re.search(r"\(os error (\d+)\)", str(error))
    if code:
        return OSError(int(code[1]), os.strerror(int(code[1])))
    return error if isinstance(error, OSError) else None
