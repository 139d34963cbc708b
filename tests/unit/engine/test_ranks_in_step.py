"""Ranks stay in step when one rank's batch has no picture and the vision encoder trains (issue 25).

That rank skipped the vision units: under FSDP it gathered fewer units than the other, under DDP its vision
buckets were summed last instead of first. gloo may pair such collectives wrongly or fail; NCCL waits for ever.
Here every collective each rank issues is recorded and the sequences must be the same; DDP's summed gradients
and an FSDP SGD step must equal one process on both ranks' batches.
"""

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from harness import IGNORE, spawn

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_gather")


def _batches() -> list[dict]:
    """Rank 0's batch: a question without a picture; rank 1's: a question about one."""
    from models.tiny import tiny_processor

    processor = tiny_processor()
    batches = []
    for picture in (None, Image.new("RGB", (64, 64), (200, 30, 30))):
        content = [{"type": "text", "text": "Which exhibit is this?"}]
        content = content if picture is None else [{"type": "image"}, *content]
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": "The Wright Flyer."}]}]
        text = processor.apply_chat_template(messages)
        batch = dict(processor(text=[text], images=None if picture is None else [[picture]], return_tensors="pt"))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        batches.append(batch)
    return batches


def _model():
    from engine.loss import loss_forward
    from models.tiny import build_tiny

    model = build_tiny(0)
    for param in model.parameters():
        param.requires_grad_(True)  # the vision encoder and connector train too
    loss_forward(model)
    return model


def _record_collectives() -> list[tuple]:
    calls = []
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def recorded(tensor, *args, _name=name, _real=real, **kwargs):
            first = tensor[0] if isinstance(tensor, list) else tensor
            calls.append((_name, first.numel(), str(first.dtype)))
            return _real(tensor, *args, **kwargs)

        setattr(dist, name, recorded)
    return calls


def _one_step(rank: int, world: int, wrapper: str) -> dict:
    from models.parts import blocks
    from parallel.ddp import DataParallel
    from parallel.fsdp import fully_shard, unit_state_dicts

    calls = _record_collectives()
    model = _model()
    # Buckets of 1 MB: several, as the 8B model has (in one bucket the order could not differ).
    wrapped = DataParallel(model, bucket_cap_mb=1) if wrapper == "ddp" else fully_shard(model, blocks(model))
    loss = wrapped(**_batches()[rank])
    loss.backward()
    result = {"calls": calls, "loss": loss.item()}
    if wrapper == "ddp":
        result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    else:
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.1 * param.grad
        result["weights"] = {name: t.clone() for unit in unit_state_dicts(model) for name, t in unit.items()}
    return result


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_a_rank_without_a_picture_runs_the_same_collectives_and_sums_the_same_gradients(wrapper, tmp_path):
    ranks = spawn(2, _one_step, tmp_path, wrapper=wrapper)
    assert ranks[0]["calls"] == ranks[1]["calls"], "the ranks issued different collectives"
    model = _model()
    total = sum(model(**batch) for batch in _batches())  # one process, both batches; the ranks sum gradients
    total.backward()
    if wrapper == "ddp":
        for name, param in model.named_parameters():
            torch.testing.assert_close(ranks[0]["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    else:
        with torch.no_grad():
            expected = {name: param - 0.1 * param.grad for name, param in model.named_parameters()}
        got = ranks[0]["weights"]
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
