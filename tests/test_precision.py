"""--precision bf16-mixed, the GPU's dtype path, run on the CPU: every approach and hybrid trains
under it, agrees with its fp32 run to bf16 rounding, and its parallel runs still equal one process.

Tolerances. bf16 keeps 8 bits of mantissa, so every matmul input under autocast is rounded by up to
2^-9 (0.2%) of its value. The untrained validation loss, a mean over hundreds of tokens, then agrees
with fp32 to about 1e-4 (measured: 1e-5 to 9e-5), and the first steps' gradients point the same way.
Adam divides each gradient element by its own running scale, so 2 steps with a non-zero learning rate
(the first step's warm-up rate is 0) move every weight by about the learning rate in both precisions:
the updates, flattened over all trained tensors, agree in direction (measured cosine > 0.9997) and
differ by a few percent in norm (measured 1.4% LoRA, 2.1% QLoRA, 3.2% full). An update that went
wrong -- nothing trained, a gradient lost or scaled -- has a cosine far below 0.99 and a norm
difference near 100%. Parallel bf16 runs against one process in bf16: the same rounding applies to
differently shaped batches (2 rows a rank instead of 4 rows), so losses agree to about 1e-3 (measured
at most 2.4e-3) and updates to about 1% (measured 0.2-1.2%), where fp32 runs agree to 1e-5.
"""

import json

import pytest
import torch

from engine.config import from_approach
from engine.precision import precision_for
from engine.runtime import Runtime
from engine.strategies import Single
from harness import FULL, run_engine, saved_weights

CPU = torch.device("cpu")
BF16 = "bf16-mixed"
SETTINGS = {"lora": {}, "qlora": {}, "full": FULL}  # the one-process approaches and their test settings


def test_bf16_mixed_keeps_masters_in_fp32_and_computes_in_bf16(processor):
    from engine.collate import Collator
    from engine.data_sources import load_splits

    config = from_approach("full", model="tiny", device="cpu", precision=BF16)
    strategy = Single(config, Runtime(CPU, precision=precision_for(BF16, CPU)))
    strategy.build(None)
    dtypes = {(p.requires_grad, p.dtype) for p in strategy.model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    batch = Collator(processor)([load_splits("musequest", limit_exhibits=1)["train"][0]])
    batch.pop("labels")
    assert strategy.forward(batch).dtype == torch.bfloat16  # lm_head ran under autocast
    assert precision_for("auto", torch.device("cuda")).name == BF16 and precision_for("auto", CPU).name == "fp32"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process runs by (approach, precision), each run once for the whole module."""
    runs = {}

    def run(approach: str, precision: str):
        if (approach, precision) not in runs:
            out = tmp_path_factory.mktemp(f"{approach}-{precision}")
            summary = run_engine(out, approach, 4, None, precision=precision, eval_every=1 / 3, **SETTINGS[approach])
            runs[approach, precision] = (out, summary)
        return runs[approach, precision]

    return run


def _updates(out) -> dict[str, torch.Tensor]:
    """What training changed: the final weights less the run's own starting point (OUT/base)."""
    final, base = saved_weights(out / "final"), saved_weights(out / "base")
    return {name: tensor.float() - (base[name].float() if name in base else 0) for name, tensor in final.items()}


def _assert_same_direction(got: dict, expected: dict, rel: float) -> None:
    names = [name for name, update in expected.items() if update.abs().sum() > 0]
    assert names and set(names) <= set(got)
    a = torch.cat([expected[name].flatten() for name in names])
    b = torch.cat([got[name].flatten() for name in names])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() / a.norm() < rel


def _values(summary: dict, key: str) -> list[float]:
    return [value for _, value in summary["history"][key]]


@pytest.mark.slow
@pytest.mark.parametrize("approach", list(SETTINGS))
def test_bf16_mixed_trains_and_agrees_with_fp32(approach, single):
    (out16, bf16), (out32, fp32) = single(approach, BF16), single(approach, "fp32")
    assert json.loads((out16 / "config.json").read_text())["precision"] == BF16
    untrained = _values(bf16, "val_loss")[0]  # the first step's learning rate is 0: validation 1 is the start
    assert untrained == pytest.approx(_values(fp32, "val_loss")[0], rel=1e-3)
    assert _values(bf16, "val_loss")[-1] < untrained - 0.1
    _assert_same_direction(_updates(out16), _updates(out32), rel=0.1)


# (approach, its flags, batch size per rank, the one-process approach it must equal)
PARALLEL = [
    ("lora_ddp", {}, "lora"),
    ("full_fsdp", FULL, "full"),
    ("full_mp", dict(FULL, micro_batches=2), "full"),
    ("lora", dict(parallel="fsdp"), "lora"),
    ("qlora", dict(parallel="ddp"), "qlora"),
]


@pytest.mark.slow
@pytest.mark.parametrize("approach,flags,reference", PARALLEL, ids=[f"{a}-{f.get('parallel', '')}" for a, f, _ in PARALLEL])
def test_parallel_bf16_mixed_equals_one_process(approach, flags, reference, single, tmp_path):
    # Data-parallel ranks take 2 rows each; every pipeline stage sees the whole batch of 4.
    batch_size = 4 if approach == "full_mp" else 2
    summary = run_engine(tmp_path, approach, batch_size, 2, precision=BF16, eval_every=1 / 3, **flags)
    out, expected = single(reference, BF16)
    for key in ("train_loss", "val_loss"):
        assert _values(summary, key) == pytest.approx(_values(expected, key), rel=5e-3), key
    _assert_same_direction(_updates(tmp_path), _updates(out), rel=0.05)
