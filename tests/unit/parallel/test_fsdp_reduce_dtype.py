"""--fsdp-reduce-dtype: gradients summed across ranks in bf16 against fp32, on 2 gloo ranks (tests/harness.py's
Toy), the flag reaching every unit that the FSDP strategies build, and refused where nothing is sharded.

The bound, worked out for 2 ranks: rank i sends its fp32 gradient g_i rounded to bf16, b_i, with
|b_i - g_i| <= u|g_i| (u = 2^-8, bf16's 8 significant bits rounded to nearest); the sum b_1 + b_2 is
rounded once more, by u|b_1 + b_2|. Against the fp32 sum t (itself within 2^-24 of g_1 + g_2), with
A = |g_1| + |g_2|: |bf16 - t| <= u(|t| + A)(1 + 2^-7). Where the gradients agree in sign, A = |t|: a
relative error of 2^-7, twice a single rounding's; where they cancel, A bounds it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import parallel.fsdp as fsdp
from engine.build import apply_approach
from engine.config import from_approach
from engine.plan.ranks import fake_world
from engine.precision import PRECISIONS
from engine.runtime import Runtime
from engine.strategies import strategy_for
from errors import UsageError
from harness import IGNORE, ROWS, Toy, spawn, toy_data
from models.lazy import build_on_meta

U = 2.0**-8

# name: (reduce dtype, prefetch, what each rank hands the reduce-scatter)
RUNS = {"fp32": (torch.float32, True, False), "bf16": (torch.bfloat16, True, False),
        "bf16, no prefetch": (torch.bfloat16, False, False), "A": (torch.float32, False, True)}


def _reduced(rank: int, world: int) -> dict:
    """Every run's shard gradients after one backward, laid end to end, and what it handed reduce_scatter; run A
    sums every rank's |gradient| instead (the bound's A, laid out as the shards' gradients)."""
    reduce_scatter, results = fsdp._reduce_scatter, {}
    for name, (dtype, prefetch, absolute) in RUNS.items():
        sent = []

        def counted(shard, full, absolute=absolute, sent=sent, **kwargs):
            sent.append((full.dtype, full.numel() * full.element_size()))
            return reduce_scatter(shard, full.abs() if absolute else full, **kwargs)

        fsdp._reduce_scatter = counted
        model = Toy(rank)
        fsdp.fully_shard(model, list(model.blocks), reduce_dtype=dtype, prefetch=prefetch)
        x, y = toy_data(0)
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        loss = F.cross_entropy(model(x[rows]), y[rows], ignore_index=IGNORE, reduction="sum") / (y != IGNORE).sum()
        loss.backward()
        results[name] = {"grads": torch.cat([p.grad for p in model.parameters()]),
                         "dtypes": {p.grad.dtype for p in model.parameters()}, "sent": sent}
    fsdp._reduce_scatter = reduce_scatter
    return results


def test_bf16_reduction_is_within_its_rounding_of_fp32_with_half_the_bytes(tmp_path):
    for result in spawn(2, _reduced, tmp_path):
        fp32, bf16, scale = (result[name]["grads"] for name in ("fp32", "bf16", "A"))
        assert result["bf16"]["dtypes"] == {torch.float32}  # added to the fp32 shards' gradients in fp32
        assert torch.equal(result["bf16, no prefetch"]["grads"], bf16)
        assert not torch.equal(bf16, fp32)
        assert ((bf16 - fp32).abs() <= U * (fp32.abs() + scale) * (1 + 2**-7)).all()
        assert {dtype for dtype, _ in result["bf16"]["sent"]} == {torch.bfloat16}
        assert 2 * sum(size for _, size in result["bf16"]["sent"]) == sum(size for _, size in result["fp32"]["sent"])


@pytest.mark.parametrize("parallel, extra", [("fsdp", {}), ("pipeline+fsdp", {"stages": 2})])
def test_the_flag_reaches_every_unit(parallel, extra):
    """The strategies build their units as the plan does, on a fake world of 2 ranks."""
    config = from_approach(approach="full", model="tiny", parallel=parallel, gpus=2, fsdp_reduce_dtype="bf16",
                           device="cpu", **extra)
    precision = PRECISIONS["fp32"]
    model, _ = build_on_meta(config.model, precision.frozen_dtype, config.attn_implementation)
    with fake_world(0, 2), FakeTensorMode(allow_non_fake_inputs=True):
        runtime = Runtime(torch.device("cpu"), 0, 2, precision)
        strategy = strategy_for(config, runtime)
        strategy.adopt(model, read=lambda name, start, stop: torch.empty(stop - start))
        apply_approach(model, config, runtime)
        strategy.prepare(model)
    assert {unit.reduce_dtype for part in strategy.parts for unit in part.fsdp_units} == {torch.bfloat16}


@pytest.mark.parametrize("approach, extra", [("lora", {}), ("lora_ddp", {"gpus": 2}), ("full_mp", {"gpus": 2})])
def test_the_fsdp_flags_are_refused_where_nothing_is_sharded(approach, extra):
    """Without FSDP no gradient is reduce-scattered and no block gathered: a changed --fsdp-* flag would do nothing."""
    for flags, spelled in (({"fsdp_reduce_dtype": "bf16"}, "--fsdp-reduce-dtype"),
                           ({"fsdp_prefetch": False}, "--no-fsdp-prefetch")):
        with pytest.raises(UsageError, match=f"^{spelled} is for runs sharded by FSDP .* so it would change nothing"):
            from_approach(approach, **extra, **flags)
        from_approach("full_fsdp", gpus=2, **flags)  # where it applies, taken
