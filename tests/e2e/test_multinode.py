"""The two-node torchrun line of docs/multinode.md, run as two torchrun agents on this one machine: one CPU rank
each, a c10d rendezvous on 127.0.0.1, one output folder as a shared filesystem would give. DDP, FSDP and the
pipeline then equal one process, and a node that dies ends the other within a minute with one sentence.

The reference is the one-process run of the same flags (run.main in this process; the whole batch on one rank):
the cheapest run that shares nothing with torchrun, its rendezvous or torch.distributed, so a rank numbering,
device or output-folder mix-up across nodes shows as a different curve or weights. Tolerances are those of
test_ddp_runs, test_fsdp_runs and test_pipeline_runs (which explain them) for the same 3 steps on one node.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import run
from errors import explain
from harness import ROOT, assert_same_curves, saved_weights

# run_engine's settings (tests/harness.py), as flags; with --max-steps, the command of every run here
TINY = ["--model", "tiny", "--device", "cpu", "--limit-exhibits", "2", "--eval-every", "1", "--lora-dropout", "0",
         "--lora-target", "projections", "lm_head", "--final", "last", "--skip-eval"]
LORA = ["--lr", "5e-3"]
FULL = ["--train-modules", "all", "--lr", "1e-3"]
# approach: (its two-node flags, the one-process flags of the same global batch of 4 rows)
APPROACHES = {
    "lora_ddp": (["--approach", "lora_ddp", "--batch-size", "2", *LORA],
                 ["--approach", "lora", "--batch-size", "4", *LORA]),
    "full_fsdp": (["--approach", "full_fsdp", "--batch-size", "2", *FULL],
                  ["--approach", "full", "--batch-size", "4", *FULL]),
    "full_mp": (["--approach", "full_mp", "--batch-size", "4", *FULL],  # every stage sees the whole batch
                ["--approach", "full", "--batch-size", "4", *FULL]),
}
LOST_PEER = "error: another rank of this run went away"
STOPPED = "error: stopped by SIGTERM"  # by its own agent
PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")


def docs_line() -> tuple[list[str], list[str]]:
    """The torchrun line of docs/multinode.md, as a shell splits it: torchrun's options, and run.py's flags."""
    block = (ROOT / "docs" / "multinode.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    [line] = [line for line in block.splitlines() if line.startswith("torchrun ")]
    words = shlex.split(line, comments=True)
    script = words.index("run.py")
    return words[1:script], words[script + 1:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it (torchrun starts each worker in a session of its own); none once it ended."""
    try:
        children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []
    return [pid, *(process for child in children for process in descendants(child))]


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL to a node's agent and its workers at once, as when the machine dies."""
    for pid in descendants(agent.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class TwoNodes:
    """The line of docs/multinode.md on each of two 'machines', node 0's agent started first so that it holds the
    rendezvous: as written, but one CPU rank a node, this machine's free port and a run id of its own; `flags` follow
    the line's own (a repeated flag's last value counts). Each agent's stdout and stderr go to files in `logs`;
    `result(node)` waits for one agent."""

    def __init__(self, flags: list[str], out: Path, logs: Path):
        self.logs, port = logs, free_port()
        torchrun, script = docs_line()
        assert torchrun[torchrun.index("--nnodes") + 1] == "2", torchrun
        for option, value in {"--nproc_per_node": "1", "--rdzv-endpoint": f"127.0.0.1:{port}",
                              "--rdzv-id": uuid.uuid4().hex}.items():
            torchrun[torchrun.index(option) + 1] = value  # the docs' line must still name each
        line = [sys.executable, "-m", "torch.distributed.run", *torchrun, str(ROOT / "run.py"), *script, *flags,
                "--output-dir", str(out)]
        self.agents = [self._start(0, line)]
        deadline = time.monotonic() + 60
        while not listening(port):
            assert self.agents[0].poll() is None and time.monotonic() < deadline, self.stderr(0)
            time.sleep(0.1)
        self.agents.append(self._start(1, line))

    def _start(self, node: int, line: list[str]) -> subprocess.Popen:
        with open(self.logs / f"node{node}.out", "w") as stdout, open(self.logs / f"node{node}.err", "w") as stderr:
            return subprocess.Popen(line, stdout=stdout, stderr=stderr, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                                    cwd=self.logs)

    def stderr(self, node: int) -> str:
        return (self.logs / f"node{node}.err").read_text()

    def result(self, node: int, timeout: float) -> subprocess.CompletedProcess:
        self.agents[node].wait(timeout=timeout)
        stdout = (self.logs / f"node{node}.out").read_text()
        return subprocess.CompletedProcess(self.agents[node].args, self.agents[node].returncode, stdout,
                                           self.stderr(node))

    def kill(self) -> None:
        for agent in self.agents:
            kill_node(agent)
            agent.wait()


@pytest.fixture
def two_nodes(tmp_path) -> Iterator[Callable[[list[str], Path], TwoNodes]]:
    """Starts TwoNodes; whatever is left of them when the test ends is killed."""
    started = []

    def start(flags: list[str], out: Path) -> TwoNodes:
        logs = tmp_path / f"logs{len(started)}"
        logs.mkdir()
        started.append(TwoNodes(flags, out, logs))
        return started[-1]

    yield start
    for nodes in started:
        nodes.kill()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Callable[[tuple[str, ...]], Path]:
    """The output folder of the one-process run of some flags, run once per module (FSDP and the pipeline share
    full fine-tuning's)."""
    folders = {}

    def folder(flags: tuple[str, ...]) -> Path:
        if flags not in folders:
            out = tmp_path_factory.mktemp("one-process")
            assert run.main([*flags, "--output-dir", str(out)]) == 0
            folders[flags] = out
        return folders[flags]

    return folder


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("approach", APPROACHES)
def test_the_two_node_line_equals_one_process(approach, one_process, two_nodes, tmp_path):
    two_node_flags, reference_flags = APPROACHES[approach]
    out = tmp_path / "one_folder"
    nodes = two_nodes([*TINY, "--max-steps", "3", *two_node_flags], out)
    for node in (0, 1):
        result = nodes.result(node, timeout=180)
        assert result.returncode == 0, f"node {node}: {result.stderr[-3000:]}"
    reference = one_process((*TINY, "--max-steps", "3", *reference_flags))
    ours, expected = summary(out), summary(reference)
    assert ours["world_size"] == 2 and len(ours["ranks"]) == 2 and ours["completed"]
    assert_same_curves(ours, expected)
    weights, reference_weights = saved_weights(out / "final"), saved_weights(reference / "final")
    assert weights.keys() == reference_weights.keys() and weights
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=5e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dies", [1, 0])
def test_a_node_that_dies_ends_the_other_within_a_minute_with_one_sentence(dies, two_nodes, tmp_path):
    """A node dies mid-training (its agent and worker SIGKILLed). The other's worker says so in one sentence and
    its agent exits non-zero, with no process left. The only traceback is torchrun's own: its report of the failed
    worker, which repeats the sentence; or, when node 0 dies and takes the rendezvous with it, the agent's own
    failure, after it stopped its worker (whose sentence is then that, unless it lost its peer first)."""
    nodes = two_nodes([*TINY, "--max-steps", "500", *APPROACHES["lora_ddp"][0]], tmp_path / "one_folder")
    deadline = time.monotonic() + 120
    while not any(re.search(r"\| *[1-9]\d*/500", nodes.stderr(node)) for node in (0, 1)):  # a step is done
        assert all(agent.poll() is None for agent in nodes.agents) and time.monotonic() < deadline, nodes.stderr(0)
        time.sleep(0.2)
    survivor = 1 - dies
    processes = descendants(nodes.agents[survivor].pid)
    kill_node(nodes.agents[dies])
    killed = time.monotonic()
    result = nodes.result(survivor, timeout=60)
    assert time.monotonic() - killed < 60 and result.returncode != 0
    assert not any(running(pid) for pid in processes)
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not PROGRESS_BAR.search(line)]
    sentences = [line for line in lines if line.startswith("error: ")]
    assert len(sentences) == 1, result.stderr[-3000:]
    sentence = sentences[0]
    assert sentence.startswith(LOST_PEER) or dies == 0 and sentence.startswith(STOPPED), sentence
    assert sentence.endswith("--resume continues from the newest."), sentence
    reported = "ChildFailedError" in result.stderr  # torchrun's report of its failed worker
    assert reported or dies == 0, result.stderr[-3000:]
    if reported:
        assert f"traceback : {sentence.removeprefix('error: ')}" in result.stderr, result.stderr[-3000:]
    assert not re.search(rf'File "{re.escape(str(ROOT))}/(?!\.venv/)', result.stderr), result.stderr[-3000:]


# What gloo and torch's TCP store raise when the process at the other end went away (torch 2.13's words).
PEER_WENT_AWAY = [
    RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:7599. "
                 "This is typically caused by a remote worker crashing."),
    RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:15746: Connection reset "
                 "by peer. This is typically caused by a remote worker hanging or bugs in the application."),
    dist.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown "
                          "or crash?"),
]


def test_a_lost_peer_is_a_sentence_and_other_runtime_errors_stay_bugs():
    for error in PEER_WENT_AWAY:
        status, sentence = explain(error, resumable=True)
        assert status == 1 and sentence.startswith(LOST_PEER.removeprefix("error: ")), sentence
    assert explain(RuntimeError("CUDA error: an illegal memory access was encountered")) is None
