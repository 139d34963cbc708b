"""fully_shard's prefetch (parallel/fsdp.py's _Schedule) on 2 gloo ranks, against the same model without it:
the same bits, and an event log in which each gather is issued while the unit before it computes and each
reduce-scatter is waited for during the next unit's backward.

Units are numbered as in `model.fsdp_units`: the toy's four blocks 0-3, then the root 4. The first step
records the order units run in, so prefetching starts with the second.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from harness import IGNORE, ROWS, Toy, spawn, toy_data
from parallel.fsdp import clip_grad_norm_, fully_shard

BLOCKS = range(4)


def _toy_steps(rank: int, world: int, prefetch: bool) -> dict:
    """3 clipped AdamW steps (the second of 2 micro-batches), with forwards no step foresaw in between;
    the shards, grad norms, and the events of the last step's forward and backward."""
    model = Toy(seed=rank)
    fully_shard(model, list(model.blocks), prefetch=prefetch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.fsdp_schedule.events = events = []
    norms, marks = [], []
    for step, micro_batches in enumerate([1, 2, 1]):
        x, y = toy_data(step)
        for rows in torch.arange(ROWS).tensor_split(world * micro_batches)[rank::world]:
            marks = [len(events)]
            loss = F.cross_entropy(model(x[rows]), y[rows], ignore_index=IGNORE, reduction="sum")
            marks.append(len(events))
            (loss / (y != IGNORE).sum()).backward()
            marks.append(len(events))
        norms.append(clip_grad_norm_(model, 0.05))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model(x)
            model.blocks[2](torch.ones(2, 16))  # alone: the gather it issues for block 3 is never used
    return {"shards": {name: p.detach().clone() for name, p in model.named_parameters()}, "norms": norms,
            "forward": events[marks[0]:marks[1]], "backward": events[marks[1]:marks[2]]}


def _most_blocks_gathered(forward: list, backward: list) -> int:
    """From the log: a block is gathered from its gather's issue until its compute ends in forward, and
    until its backward is done (its reduce-scatter issued) in backward."""
    gathered, most = set(), 0
    for events, done in ((forward, "compute end"), (backward, "reduce-scatter issued")):
        for event, unit in events:
            if unit in BLOCKS and event == "gather issued":
                gathered.add(unit)
            elif event == done:
                gathered.discard(unit)
            most = max(most, len(gathered))
    return most


@pytest.mark.slow
def test_prefetch_changes_no_bit_and_overlaps_each_collective_with_a_neighbours_compute(ranks):
    for result in ranks:
        on, off = result["toy"][True], result["toy"][False]
        assert on["norms"] == off["norms"] and min(on["norms"]) > 0.05  # clipped: every step's global norm counts
        for name, shard in off["shards"].items():
            assert torch.equal(on["shards"][name], shard), name

        forward, backward = on["forward"], on["backward"]
        for block in BLOCKS[:-1]:  # forward: the next block's gather is issued while this one computes
            assert forward.index(("gather issued", block + 1)) < forward.index(("compute end", block))
            assert off["forward"].index(("gather issued", block + 1)) > off["forward"].index(("compute end", block))
        for block in BLOCKS[1:]:  # backward, recomputing in reverse: the same, one block back
            assert backward.index(("gather issued", block - 1)) < backward.index(("compute end", block))
            assert off["backward"].index(("gather issued", block - 1)) > off["backward"].index(("compute end", block))
            # Its reduce-scatter runs during the block before it: waited only once that one computes.
            assert (backward.index(("reduce-scatter issued", block)) < backward.index(("compute start", block - 1))
                    < backward.index(("reduce-scatter waited", block)))
        # Every unit's reduce-scatter, issued and waited for before backward returned.
        reduce_scatters = [(event.split()[-1], unit) for event, unit in backward if event.startswith("reduce")]
        assert sorted(reduce_scatters) == sorted((when, unit) for when in ("issued", "waited") for unit in range(5))
        assert _most_blocks_gathered(forward, backward) == 2


# ---- the tiny Idefics2 ------------------------------------------------------------------------

def _idefics2_steps(rank: int, world: int) -> dict:
    """Shards after two SGD steps with prefetch and without, and the units each second backward gathered."""
    from models import blocks
    from models.tiny import IMAGE_SEQ_LEN, IMAGE_SIZE, IMAGE_TOKEN_ID, build_tiny

    generator = torch.Generator().manual_seed(rank)  # one row per rank: an image's tokens, then text
    text = torch.randint(0, 32000, (1, 12), generator=generator)
    ids = torch.cat([torch.full((1, IMAGE_SEQ_LEN), IMAGE_TOKEN_ID), text], dim=1)
    pixels = torch.rand(1, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    result = {}
    for prefetch in (True, False):
        model = build_tiny(seed=rank).train()
        model.model.vision_model.requires_grad_(False)  # frozen blocks, which backward never recomputes
        fully_shard(model, blocks(model), prefetch=prefetch)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        for _ in range(2):
            logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
            model.fsdp_schedule.events = events = []
            F.cross_entropy(logits[0, IMAGE_SEQ_LEN:-1], ids[0, IMAGE_SEQ_LEN + 1:]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result[prefetch] = {name: p.detach().clone() for name, p in model.named_parameters()}
        result[prefetch, "backward"] = events
    result["vision layers"] = len(model.model.vision_model.encoder.layers)
    return result


@pytest.mark.slow
def test_tiny_idefics2_steps_with_prefetch_equal_those_without(ranks):
    for result in ranks:
        steps = result["idefics2"]
        for name, shard in steps[False].items():
            assert torch.equal(steps[True][name], shard), name
        # The same units gathered in backward, none of the frozen vision layers it never recomputes;
        # each but the first as the one recomputed before it started.
        gathered = {prefetch: [unit for event, unit in steps[prefetch, "backward"] if event == "gather issued"]
                    for prefetch in (True, False)}
        assert sorted(gathered[True]) == sorted(gathered[False]) and min(gathered[True]) >= steps["vision layers"]
        events = steps[True, "backward"]
        ahead = [unit for (before, _), (event, unit) in itertools.pairwise(events)
                 if before == "compute start" and event == "gather issued"]
        assert ahead == gathered[True][1:]


# ---- both on one pair of ranks: starting them is most of the time -------------------------------

def _both(rank: int, world: int) -> dict:
    return {"toy": {prefetch: _toy_steps(rank, world, prefetch) for prefetch in (True, False)},
            "idefics2": _idefics2_steps(rank, world)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(2, _both, tmp_path_factory.mktemp("ranks"))
