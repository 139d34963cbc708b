"""parallel/p2p.py's NCCL rules on gloo: an op completes only once its peer posts the matching one, a
rank's groups complete in the order posted, and a wait that NCCL would never end fails in seconds.

One spawn of 2 ranks plays every case in turn (each spawn costs seconds); the tests share its results.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import spawn
from parallel import p2p

DEADLINE_S = 2.0
SLACK_S = 1.5  # a loaded CI machine's delay between the deadline and the error


def _timed(handle: p2p.Handle) -> tuple[str | None, float]:
    """The error that waiting on `handle` raised (None if it completed), and the seconds waited."""
    start = time.perf_counter()
    try:
        handle.wait()
        return None, time.perf_counter() - start
    except RuntimeError as error:
        return str(error), time.perf_counter() - start


def _every_case(rank: int, world: int) -> dict:
    os.environ[p2p.DEADLINE] = str(DEADLINE_S)
    peer, results = 1 - rank, {}

    def send(tensor: torch.Tensor) -> dist.P2POp:
        return dist.P2POp(dist.isend, tensor, peer)

    def receive(tensor: torch.Tensor) -> dist.P2POp:
        return dist.P2POp(dist.irecv, tensor, peer)

    # A send and the receive its peer's send matches, in one group on each rank.
    mine, theirs = torch.full((3,), float(rank)), torch.zeros(3)
    results["paired"] = (*_timed(p2p.exchange([send(mine), receive(theirs)])), theirs)

    # Rank 1 posts its receive only after rank 0 has given up waiting on the send; then the send completes.
    data = torch.arange(4.0) if rank == 0 else torch.zeros(4)
    if rank == 0:
        handle = p2p.exchange([send(data)])
        results["unmatched"] = _timed(handle)
    dist.barrier()
    if rank == 1:
        handle = p2p.exchange([receive(data)])
    results["late"] = (*_timed(handle), data)

    # Each rank sends, then receives what the other sent, in groups of their own: gloo lets it pass...
    os.environ[p2p.RULES] = "0"
    mine, theirs = torch.full((2,), float(rank)), torch.zeros(2)
    sent, received = p2p.exchange([send(mine)]), p2p.exchange([receive(theirs)])
    received.wait(), sent.wait()
    results["crossed on gloo"] = theirs
    # ...NCCL does not: each send waits for a receive queued behind the peer's own send.
    os.environ[p2p.RULES] = "1"
    p2p.exchange([send(mine)])
    results["crossed"] = _timed(p2p.exchange([receive(theirs)]))
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(2, _every_case, tmp_path_factory.mktemp("rules"))


def test_a_paired_group_completes_with_the_peers_data(ranks):
    for rank, result in enumerate(ranks):
        error, _, received = result["paired"]
        assert error is None
        assert torch.equal(received, torch.full((3,), float(1 - rank)))


def test_a_send_waits_for_its_receive_and_fails_at_the_deadline_naming_rank_and_op(ranks):
    error, waited = ranks[0]["unmatched"]
    assert DEADLINE_S <= waited < DEADLINE_S + SLACK_S
    assert error.startswith("rank 0: point-to-point group 1 (send of a torch.float32 (4,) tensor to rank 1)")
    assert "waits for rank 1 to start the matching receive" in error
    # Once the receive is posted, the same send completes and delivers.
    for result in ranks:
        assert result["late"][0] is None
    assert torch.equal(ranks[1]["late"][2], torch.arange(4.0))


def test_sends_posted_before_the_receives_they_wait_for_deadlock_and_fail_in_seconds(ranks):
    for rank, result in enumerate(ranks):
        assert torch.equal(result["crossed on gloo"], torch.full((2,), float(1 - rank)))
        error, waited = result["crossed"]
        assert DEADLINE_S <= waited < DEADLINE_S + SLACK_S
        assert error.startswith(f"rank {rank}: point-to-point group 3 (receive of a torch.float32 (2,) tensor "
                                f"from rank {1 - rank}, queued behind group 2)")
        assert f"its send of a torch.float32 (2,) tensor to rank {1 - rank} waits for rank {1 - rank}" in error


def _unpaired_schedule(rank: int, world: int, schedule: str, micro_batches: int) -> tuple[str | None, float]:
    """The traffic of 0a7e0f9's pipeline, which deadlocks on NCCL: the schedule's order (parallel.pipeline._order),
    each send posted alone as soon as its tensor exists, each receive posted alone and waited at once."""
    from parallel.pipeline import _order

    os.environ[p2p.DEADLINE] = str(DEADLINE_S)
    def tensor() -> torch.Tensor:  # an activation or its gradient
        return torch.zeros(2)

    previous, following = (rank - 1 if rank > 0 else None), (rank + 1 if rank < world - 1 else None)
    sends, start = [], time.perf_counter()
    try:
        for forward, _ in _order(schedule, world, rank, micro_batches):
            source, destination = (previous, following) if forward else (following, previous)
            if source is not None:
                p2p.exchange([dist.P2POp(dist.irecv, tensor(), source)]).wait()
            if destination is not None:
                sends.append(p2p.exchange([dist.P2POp(dist.isend, tensor(), destination)]))
        for send in sends:
            send.wait()
        return None, time.perf_counter() - start
    except RuntimeError as error:
        return str(error), time.perf_counter() - start


@pytest.mark.parametrize("rules, schedule, fails", [("0", "1f1b", False), ("1", "gpipe", False),
                                                    ("1", "1f1b", True)])
def test_the_old_unpaired_1f1b_fails_in_seconds_under_nccls_rules_and_passed_on_gloo(rules, schedule, fails,
                                                                                    tmp_path, monkeypatch):
    """On gloo (rules off) the old traffic completes, so every CPU test passed; under NCCL's rules its 1F1B
    deadlocks (stage 0 sends activation 1 before receiving gradient 0, stage 1 the reverse) and each rank fails
    within seconds, naming the op. GPipe's order never crosses: it passes either way."""
    monkeypatch.setenv(p2p.RULES, rules)
    results = spawn(2, _unpaired_schedule, tmp_path, schedule=schedule, micro_batches=4)
    for error, seconds in results:
        if fails:
            assert error is not None and "Under NCCL this rank would hang here" in error, error
            assert seconds < DEADLINE_S + SLACK_S + 1, seconds
        else:
            assert error is None, error
