"""DataParallel on real gloo groups of 2 and 4 processes, against one process on the whole batch.

Each scenario runs in ranks started by harness.spawn, which save their results to a file; the
parent asserts. The toy model and its data are harness's too. Ranks start from different seeds, so
the equalities also prove that parameters and buffers were broadcast from rank 0. Losses are summed
and divided by the whole global batch's label count, as the engine does, so per-rank gradients SUM
to the single-process gradient.
"""

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness import IGNORE, ROWS, Toy, assert_close, spawn, toy_data
from parallel import DataParallel

SMALL_BUCKETS_MB = 0.002  # about 2 KB: the toy model's gradients fill several buckets


# ---- the toy's training ----------------------------------------------------------------------

def _freeze_bottom(model: Toy) -> None:
    for module in (model.embed, model.blocks[0]):
        module.requires_grad_(False)


def _train(rank: int, world: int, parallel: str = "none", steps: int = 1, micro: int = 1,
           checkpointed: bool = False, frozen: bool = False) -> dict:
    """`steps` AdamW steps on this rank's rows; the first step's gradients, every grad norm, final weights."""
    model = Toy(seed=rank, checkpointed=checkpointed)
    if frozen:
        _freeze_bottom(model)
    if parallel == "ours":
        trained = DataParallel(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    elif parallel == "torch":
        trained = DistributedDataParallel(model, bucket_cap_mb=SMALL_BUCKETS_MB, find_unused_parameters=True)
    else:
        trained = model
    # torch's DDP averages over ranks; ours sums, which our loss normalisation expects.
    loss_scale = world if parallel == "torch" else 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    first_grads, norms = None, []
    for step in range(steps):
        x, y = toy_data(step)
        count = (y != IGNORE).sum()
        per_rank = ROWS // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        for index, (xb, yb) in enumerate(zip(x[rows].chunk(micro), y[rows].chunk(micro), strict=True)):
            last = index == micro - 1
            with contextlib.nullcontext() if last else trained.no_sync():
                loss = F.cross_entropy(trained(xb), yb, ignore_index=IGNORE, reduction="sum") / count
                (loss * loss_scale).backward()
        first_grads = first_grads or {n: None if p.grad is None else p.grad.clone()
                                      for n, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, math.inf)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"grads": first_grads, "norms": norms, "weights": weights}


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
def test_gradients_equal_one_process_on_the_whole_batch(world, tmp_path):
    expected = _train(0, 1)["grads"]
    assert expected["unused.weight"] is None
    for result in spawn(world, _train, tmp_path, parallel="ours"):
        assert_close(result["grads"], expected)


@pytest.mark.parametrize("world", [2, 4])
def test_three_adamw_steps_equal_one_process_with_the_whole_batch(world, tmp_path):
    expected = _train(0, 1, steps=3)
    for result in spawn(world, _train, tmp_path, parallel="ours", steps=3):
        # Adam is blind to a constant gradient scale (sum vs mean); the norm is not.
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-5)
        assert_close(result["weights"], expected["weights"])


@pytest.mark.parametrize("world", [2, 4])
def test_no_sync_accumulation_equals_one_big_batch(world, tmp_path):
    expected = _train(0, 1)["grads"]
    for result in spawn(world, _train, tmp_path, parallel="ours", micro=2):
        assert_close(result["grads"], expected)


def _ours_and_torch(rank: int, world: int) -> dict:
    return {kind: _train(rank, world, kind, steps=3)["weights"] for kind in ("ours", "torch")}


def test_same_weights_as_torch_distributed_data_parallel(tmp_path):
    for result in spawn(2, _ours_and_torch, tmp_path):
        assert_close(result["ours"], result["torch"])


def _launch_order(rank: int, world: int) -> list[str]:
    """Events of the second backward (the first sets the order of the buckets): each all-reduce launch, and the
    moment the first layer's gradient is made."""
    events = []
    all_reduce = dist.all_reduce

    def recorded(*args, **kwargs):
        events.append("all_reduce")
        return all_reduce(*args, **kwargs)

    dist.all_reduce = recorded
    model = Toy(seed=rank)
    trained = DataParallel(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    model.embed.register_full_backward_pre_hook(lambda *_: events.append("first layer"))
    x, y = toy_data(0)
    F.cross_entropy(trained(x), y, ignore_index=IGNORE, reduction="sum").backward()  # learns the buckets' order
    events.clear()
    F.cross_entropy(trained(x), y, ignore_index=IGNORE, reduction="sum").backward()
    events.append("backward returned")
    return events


def test_buckets_are_reduced_while_backward_still_runs(tmp_path):
    for events in spawn(2, _launch_order, tmp_path):
        assert events.count("all_reduce") >= 3
        assert events.index("all_reduce") < events.index("first layer") < events.index("backward returned")


@pytest.mark.parametrize("world", [2, 4])
def test_frozen_parameters_neither_hang_nor_change(world, tmp_path):
    expected = _train(0, 1, steps=2, frozen=True)
    initial = Toy(seed=0).state_dict()
    for result in spawn(world, _train, tmp_path, parallel="ours", steps=2, frozen=True):
        assert_close(result["weights"], expected["weights"])
        for name in ("embed.weight", "blocks.0.up.weight"):
            assert result["grads"][name] is None
            assert torch.equal(result["weights"][name], initial[name])


def test_activation_checkpointing_keeps_gradients_exact(tmp_path):
    expected = _train(0, 1)["grads"]
    for result in spawn(2, _train, tmp_path, parallel="ours", checkpointed=True, micro=2):
        assert_close(result["grads"], expected)


# ---- the tiny Idefics2 ------------------------------------------------------------------------

def _idefics2_grads(rank: int, world: int, batch_file: Path) -> dict:
    from engine.loss import answer_token_count, summed_token_loss
    from models.tiny import build_tiny

    model = build_tiny(seed=rank).train()
    model.model.vision_model.requires_grad_(False)  # a frozen base under trainable parts, as with LoRA
    model.model.text_model.embed_tokens.requires_grad_(False)
    trained = DataParallel(model) if world > 1 else model
    batch = torch.load(batch_file)
    labels = batch.pop("labels")
    count = answer_token_count(labels)
    rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    logits = trained(**{k: v[rows] for k, v in batch.items()}, use_cache=False).logits
    (summed_token_loss(logits, labels[rows]) / count).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_tiny_idefics2_partly_frozen_gradients_equal_one_process(processor, tmp_path):
    from PIL import Image

    questions = ["What is this?", "Describe the colours.", "Is it red?", "Which shape do you see here?"]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
         {"role": "assistant", "content": [{"type": "text", "text": f"An answer number {i}."}]}])
        for i, q in enumerate(questions)]
    images = [[Image.new("RGB", (60 + 10 * i, 50), (40 * i, 90, 200))] for i in range(len(texts))]
    batch = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE
    labels[:, : labels.shape[1] // 2] = IGNORE  # only the tail carries loss, like an answer
    torch.save(dict(batch, labels=labels), tmp_path / "batch.pt")

    expected = _idefics2_grads(0, 1, tmp_path / "batch.pt")
    assert expected["model.vision_model.embeddings.patch_embedding.weight"] is None
    for grads in spawn(2, _idefics2_grads, tmp_path, batch_file=tmp_path / "batch.pt"):
        assert_close(grads, expected)
