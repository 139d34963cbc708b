"""A training step waits for the device once (issue 30): what the host reads of a device tensor -- a loss's
`.item()`, a norm's `float`, a boolean mask's positions, `tolist` -- makes a GPU's host wait until the device
has caught up, so it can queue nothing ahead. On the CPU there is no such wait to see, so the reads are recorded
instead: every op that hands the host a tensor's values, with the code of ours that asked for it. The step's one
read is engine/step.py's, of its three numbers at the end; reads of the labels, which stay on the host where they
were collated, wait for nothing and are allowed by name."""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import IGNORE, ROOT, Toy, spawn, toy_data

OURS = tuple(str(ROOT / package) + "/" for package in ("engine", "parallel", "lora", "quant", "models"))
# Ops whose result the host must wait for: a value (item, float), or a count of positions (a mask's nonzero).
READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
         torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.masked_select.default}
HOST_LABELS = {"answer_token_count", "answer_positions"}  # engine/loss.py: on the labels, which stay on the host
STEP_END = ("step.py", "train_step")


class HostReads(TorchDispatchMode):
    """Records (file name, function) of our code that asked for each read: the innermost frame of ours, unless a
    library's own code (transformers') stands between, which is not ours to count."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        reads = self

        def tolist(tensor):  # reads the whole tensor, below the dispatcher: recorded here
            reads.record()
            return reads._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *args):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.record()
        return func(*args, **(kwargs or {}))

    def record(self) -> None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/optim/" in frame.filename:
                return  # AdamW's step count: a host tensor but in its fused kernel (the engine's on a GPU), unread
            if "site-packages" in frame.filename and "/torch/" not in frame.filename:
                return  # transformers' own reads (which pictures are padding, attention masks): counted on a GPU
            if frame.filename.startswith(OURS):
                self.sites.append((Path(frame.filename).name, frame.name))
                return


def ours(sites: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The reads that make the host wait: all but the step's end and the host labels' own."""
    return [site for site in sites if site != STEP_END and site[1] not in HOST_LABELS]


@pytest.mark.parametrize("approach", ["lora", "full"])
def test_one_step_reads_the_device_once(tmp_path, approach):
    from engine.config import from_approach
    from engine.data.collate import Collator
    from engine.data.sources import data_settings, load_splits
    from engine.optim.optimizer import optimizer_for
    from engine.runtime import Runtime
    from engine.step import train_step
    from engine.strategies import strategy_for

    config = from_approach(approach, model="tiny", device="cpu", limit_exhibits=4, grad_accum=2,
                           output_dir=str(tmp_path / "run")).resolved(gpu=False)
    strategy = strategy_for(config, Runtime(torch.device("cpu")))
    processor = strategy.build(config.base_copy)
    optimizer = optimizer_for(config, strategy.runtime.precision, strategy.parameters(), 1e-3)
    train = load_splits(**data_settings(config))["train"]
    batches = [Collator(processor)([train[0], train[1]]), Collator(processor)([train[2]])]
    with HostReads() as reads:
        loss, norm, tokens = train_step(strategy, optimizer, batches, config.max_grad_norm)
    assert reads.sites.count(STEP_END) == 1 and ours(reads.sites) == [], reads.sites
    assert tokens == sum(int((batch["labels"][:, 1:] != IGNORE).sum()) for batch in batches)
    assert loss > 0 and norm > 0


def _ddp_backward(rank: int, world: int, unused_trains: bool) -> dict:
    from parallel.ddp import DataParallel

    model = Toy(seed=rank)
    model.unused.requires_grad_(unused_trains)
    wrapped = DataParallel(model, bucket_cap_mb=0.001)  # a bucket a parameter or two: the reads are per bucket
    for step in range(2):  # the first backward also agrees the buckets' order (an object broadcast reads sizes)
        x, y = toy_data(step)
        with HostReads() as reads:
            loss = torch.nn.functional.cross_entropy(wrapped(x[rank::world]), y[rank::world], ignore_index=IGNORE,
                                                     reduction="sum")
            loss.backward()
    return {"sites": reads.sites, "unused_grad": model.unused.weight.grad}


@pytest.mark.parametrize("unused_trains", [False, True])
def test_ddp_reads_which_parameters_were_used_only_where_one_was_not(tmp_path, unused_trains):
    """Every trained parameter used on this rank: the summed gradients are every one's, nothing is read. A trained
    layer no rank ran (the toy's `unused`): its bucket's flags are read, and it keeps no gradient, as in one
    process."""
    for result in spawn(2, _ddp_backward, tmp_path, unused_trains=unused_trains):
        reads = [site for site in result["sites"] if site[0] == "ddp.py"]
        assert result["unused_grad"] is None
        assert set(reads) == ({("ddp.py", "finish")} if unused_trains else set()), result["sites"]

