"""Point-to-point traffic in groups that complete as NCCL completes them, and a CPU mode that holds gloo to it.

NCCL's rules. Each `batch_isend_irecv` group is queued on its process group's stream: its ops run
together and the group completes when all of them have, and a rank's next group starts only then.
An op may wait (on the GPU) until its peer runs the matching op; a send is not done when its data
is on the wire (large ones never are, and the first between two ranks sets up their connection).
So two ranks that each post a send before the receive that the other's send matches can wait for
each other until the watchdog kills the job. gloo buffers sends and completes each op on its own,
so such code passes every CPU test.

`exchange(ops)` posts one group through `dist.batch_isend_irecv` and returns a `Handle`. With
MUSEFT_NCCL_RULES=1 in the environment (the test suite sets it, spawned ranks inherit it), the real
gloo ops still carry the data, but a group counts as complete only when NCCL's surely is: a thread
per process group (its "stream") starts this rank's groups one at a time, in the order posted;
starting one publishes each of its ops in the default store, and an op completes once its peer's
matching op (the n-th message between the two, that way) is published too. So the mode is as strict
as NCCL at its strictest. A wait that lasts longer than MUSEFT_NCCL_DEADLINE_S (default 10) raises
an error naming the rank and the op that NCCL would hang on.
"""

import atexit
import os
import queue
import threading
import time
from collections import Counter

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

RULES = "MUSEFT_NCCL_RULES"
DEADLINE = "MUSEFT_NCCL_DEADLINE_S"
_POLL_S = 0.002  # how often a stream asks the store whether its peers have started their ops


class Handle:
    """A posted group: `wait()` returns once every op in it has completed; `is_completed()` asks without waiting."""

    def __init__(self, works: list[dist.Work]):
        self.works, self.waited = works, False

    def wait(self) -> None:
        if not self.waited:  # a gloo receive waited twice waits for a second message
            for work in self.works:
                work.wait()
            self.waited = True

    def is_completed(self) -> bool:
        return self.waited or all(work.is_completed() for work in self.works)


def exchange(ops: list[dist.P2POp]) -> Handle:
    """Posts `ops` (one process group's) as one group, whose ops complete together."""
    works = dist.batch_isend_irecv(ops)
    # (A plan's ranks play alone in a "fake" group, engine/plan/ranks.py: no peer ever posts there.)
    if os.environ.get(RULES, "0") in ("", "0") or dist.get_backend(ops[0].group) == "fake":
        return Handle(works)
    return _stream(ops[0].group).post(ops, works)


def _describe(op: dist.P2POp) -> str:
    """'send of a torch.float32 (2, 16) tensor to rank 1', as the errors here name an op."""
    what, way = ("send", "to") if op.op is dist.isend else ("receive", "from")
    return f"{what} of a {op.tensor.dtype} {tuple(op.tensor.shape)} tensor {way} rank {op.peer}"


class _Group(Handle):
    """A group under NCCL's rules: complete once the stream has matched all its ops (and every earlier group's)."""

    def __init__(self, stream: "_Stream", number: int, ops: list[dist.P2POp], works: list[dist.Work]):
        super().__init__(works)
        self.stream, self.number, self.ops = stream, number, ops
        self.done = threading.Event()
        self.mine: list[str] = []  # the store keys that say this rank's ops have started
        self.theirs: dict[str, dist.P2POp] = {}  # the keys that will say their peers' have, and which op each matches

    def wait(self) -> None:
        deadline = float(os.environ.get(DEADLINE, "10"))
        if not self.done.wait(deadline):
            raise RuntimeError(self.stream.stuck(self, deadline))
        super().wait()  # the gloo ops: their peers' are posted, so these finish at once

    def is_completed(self) -> bool:
        if self.done.is_set():
            super().wait()
        return self.waited


class _Stream:
    """NCCL's stream of one process group on this rank: groups start in order, each once the one before completes."""

    def __init__(self, group: dist.ProcessGroup):
        self.store, self.rank, self.name = c10d._get_default_store(), dist.get_rank(), group.group_name
        self.messages: Counter[tuple[int, int]] = Counter()  # (source, destination) -> ops posted between them
        self.posted = 0
        self.current: _Group | None = None  # the group the stream is running
        self.queue: queue.Queue[_Group] = queue.Queue()
        self.error: Exception | None = None
        # Set at exit: a thread left polling the store's client as the interpreter ends aborts the process
        # (SIGABRT), which would hide the error that ended it, e.g. a deadlock found here.
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"nccl-rules {self.name}")
        self.thread.start()

    def post(self, ops: list[dist.P2POp], works: list[dist.Work]) -> _Group:
        group = _Group(self, self.posted, ops, works)
        self.posted += 1
        for op in ops:
            pair = (self.rank, op.peer) if op.op is dist.isend else (op.peer, self.rank)
            key = f"museft-nccl-rules/{self.name}/{pair[0]}>{pair[1]}/{self.messages[pair]}"
            self.messages[pair] += 1
            mine, theirs = ("send", "recv") if op.op is dist.isend else ("recv", "send")
            group.mine.append(f"{key}/{mine}")
            group.theirs[f"{key}/{theirs}"] = op
        self.queue.put(group)
        return group

    def _run(self) -> None:
        try:
            while True:
                self.current = group = self.queue.get()
                for key in group.mine:
                    self.store.set(key, b"")
                waiting = list(group.theirs)
                while waiting:
                    if self.stopped.is_set():
                        return
                    time.sleep(_POLL_S)
                    waiting = [key for key in waiting if not self.store.check([key])]
                for key in group.theirs:  # each key is read by one rank, once: the store stays small
                    self.store.delete_key(key)
                group.done.set()
        except Exception as error:  # the store is gone (the process group was destroyed): nothing left to run
            self.error = error

    def stuck(self, group: _Group, deadline: float) -> str:
        """Why `group` has not completed: the first op of the running group whose peer has not started the match."""
        current = self.current
        unmatched = [op for key, op in current.theirs.items() if not self.store.check([key])] if current else []
        behind = "" if current in (None, group) else f", queued behind group {current.number}"
        if not unmatched:
            cause = f"the stream stopped ({self.error})"
        else:
            op = unmatched[0]
            match = "receive" if op.op is dist.isend else "send"
            cause = f"its {_describe(op)} waits for rank {op.peer} to start the matching {match}"
        ops = "; ".join(map(_describe, group.ops))
        return (f"rank {self.rank}: point-to-point group {group.number} ({ops}{behind}) did not complete within "
                f"{deadline:g} s: {cause}. Under NCCL this rank would hang here ({RULES}=1 applies NCCL's rules "
                f"on gloo; {DEADLINE} sets this wait).")


_streams: dict[str, _Stream] = {}  # by process group name


def _stream(group: dist.ProcessGroup) -> _Stream:
    """This process group's stream; a new one after `init_process_group` made a new default store."""
    stream = _streams.get(group.group_name)
    if stream is None or stream.store is not c10d._get_default_store():
        stream = _streams[group.group_name] = _Stream(group)
    return stream


@atexit.register
def _stop_streams() -> None:
    for stream in _streams.values():
        stream.stopped.set()
        stream.thread.join(timeout=1)
