"""fully_shard on real gloo groups of 2 and 4 processes, against one unsharded process on the whole batch.

The harness (spawned ranks, files, deadline) and the data are tests/harness.py's. Ranks start from
different seeds, so the equalities also prove that rank 0's weights and buffers were broadcast.
"""

import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import parallel.fsdp as fsdp
from harness import IGNORE, ROWS, assert_close, spawn, toy_data
from parallel.fsdp import clip_grad_norm_, fully_shard, unit_state_dicts


class _Block(nn.Module):
    def __init__(self, adapter: bool):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)
        # A LoRA-like pair beside `up`: small and trainable while the rest is frozen.
        self.a, self.b = (nn.Linear(16, 2, bias=False), nn.Linear(2, 32, bias=False)) if adapter else (None, None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = self.norm(h)
        up = self.up(n) + (self.b(self.a(n)) if self.a else 0)
        return h + self.down(F.gelu(up))


class _Toy(nn.Module):
    def __init__(self, seed: int, lora: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(_Block(lora) for _ in range(4))
        self.head = nn.Linear(16, 3)
        self.register_buffer("scale", torch.full((16,), 1.0 + seed))
        if lora:
            self.requires_grad_(False)
            for module in [self.head, *(m for block in self.blocks for m in (block.a, block.b))]:
                module.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _sharded_toy(seed: int, lora: bool = False) -> _Toy:
    model = _Toy(seed, lora)
    return fully_shard(model, list(model.blocks))


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for unit in unit_state_dicts(model) for name, tensor in unit.items()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _train(rank: int, world: int, sharded: bool = True, steps: int = 3, lora: bool = False,
           max_norm: float = math.inf) -> dict:
    """`steps` AdamW steps on this rank's rows: every grad norm, final full weights, per-rank bytes."""
    model = _sharded_toy(rank, lora) if sharded else _Toy(rank, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    norms, memory = [], {}
    for step in range(steps):
        x, y = toy_data(step)
        count = (y != IGNORE).sum()
        rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
        (F.cross_entropy(model(x[rows]), y[rows], ignore_index=IGNORE, reduction="sum") / count).backward()
        norms.append(clip_grad_norm_(model, max_norm) if sharded
                     else float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        optimizer.step()
        memory = {"params": _bytes(model.parameters()), "grads": _bytes(p.grad for p in model.parameters()),
                  "optimizer": _bytes(t for state in optimizer.state.values() for t in state.values() if t.dim())}
        optimizer.zero_grad(set_to_none=True)
    # Persistent buffers are sharded and gathered as the parameters are.
    weights = _full(model) if sharded else {n: t.detach().clone() for n, t in model.state_dict().items()}
    return {"norms": norms, "weights": weights, "memory": memory}


@pytest.mark.parametrize("world", [2, 4])
def test_three_clipped_adamw_steps_equal_one_process_with_one_nth_of_the_bytes(world, tmp_path):
    expected = _train(0, 1, sharded=False, max_norm=0.05)
    assert min(expected["norms"]) > 0.05  # the clip really scales, so its global norm must be right
    unit = _bytes(_Block(adapter=False).parameters())  # the largest unit; padding is far smaller
    for result in spawn(world, _train, tmp_path, max_norm=0.05):
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-5)
        assert_close(result["weights"], expected["weights"])
        for kind, size in result["memory"].items():
            assert expected["memory"][kind] / world <= size <= expected["memory"][kind] / world + unit, kind


def _from_meta(rank: int, world: int, folder: Path) -> dict:
    """The toy built without weights and filled from a safetensors file, counting what this rank reads."""
    from models.lazy import SliceReader, parameters_on_meta

    if rank == 0:
        save_file(dict(_Toy(seed=0).named_parameters()), folder / "model.safetensors")
    torch.distributed.barrier()
    with parameters_on_meta():
        model = _Toy(seed=0)  # buffers are real; rank 0's seed-0 values are broadcast anyway
    reader, read = SliceReader(folder), []

    def counting(name: str, start: int, stop: int) -> torch.Tensor:
        read.append(stop - start)
        return reader(name, start, stop)

    fully_shard(model, list(model.blocks), read=counting)
    return {"weights": _full(model), "read": sum(read), "held": _bytes(model.parameters()) // 4}


def test_a_model_built_without_weights_reads_only_its_shards(tmp_path):
    expected = dict(_Toy(seed=0).state_dict())  # the persistent buffer too, sharded though real
    total = sum(p.numel() for p in expected.values())
    for result in spawn(2, _from_meta, tmp_path, folder=tmp_path):
        assert_close(result["weights"], {name: param.detach() for name, param in expected.items()})
        assert result["read"] <= result["held"] <= total / 2 + 2 * 6  # its shards (plus padding), never the rest


@pytest.mark.parametrize("world", [2, 4])
def test_frozen_base_equals_one_process_and_stays_unchanged(world, tmp_path):
    expected = _train(0, 1, sharded=False, lora=True)
    initial = dict(_Toy(seed=0, lora=True).named_parameters())
    for result in spawn(world, _train, tmp_path, lora=True):
        assert result["norms"] == pytest.approx(expected["norms"], rel=1e-5)
        for name, weight in expected["weights"].items():
            # Adam's first step is about lr * sign(gradient): one element whose gradient is 2.5e-7 of
            # 0.1 moves 1e-5 apart under 4-rank summation rounding. A wrong gradient would move 1e-2.
            torch.testing.assert_close(result["weights"][name], weight, rtol=1e-5, atol=1e-4, msg=name)
        for name, param in initial.items():
            assert torch.equal(result["weights"][name], param) != param.requires_grad, name


def _traced(rank: int, world: int) -> dict:
    """Reduce-scatters per backward, and gathered buffers still alive after each block's forward."""
    alive, reduced = [], []
    gather, reduce_scatter = fsdp._all_gather, fsdp._reduce_scatter

    def traced_gather(full, shard, **kwargs):
        alive.append(weakref.ref(full))
        return gather(full, shard, **kwargs)

    def traced_reduce_scatter(shard, full, **kwargs):
        reduced.append(full.numel())
        return reduce_scatter(shard, full, **kwargs)

    fsdp._all_gather, fsdp._reduce_scatter = traced_gather, traced_reduce_scatter
    model = _sharded_toy(rank, lora=True)
    after_block = []
    for block in model.blocks:
        block.register_forward_hook(lambda *_: after_block.append(sum(ref() is not None for ref in alive)))
    x, y = toy_data(0)
    F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
    return {"after_block": after_block, "reduced": reduced}


def test_blocks_free_their_weights_and_frozen_shards_cost_no_gradient_traffic(tmp_path):
    for result in spawn(2, _traced, tmp_path):
        # The root's two buffers (trainable head, frozen embedding) live through the forward; a block's
        # two die with its forward, give or take gloo's worker thread releasing the last collective's.
        assert max(result["after_block"]) <= 4, result["after_block"]
        # One reduce-scatter per trainable buffer: four adapters and the head; none for the frozen base.
        assert len(result["reduced"]) == 5


def _bf16_norm(rank: int, world: int, sharded: bool = True) -> dict:
    """Gradient norm of one bf16 backward: the sharded model gathers bf16, the reference is cast to bf16."""
    model = _Toy(rank)
    model.scale = model.scale.bfloat16()
    model = fully_shard(model, list(model.blocks), torch.bfloat16) if sharded else model.bfloat16()
    x, y = toy_data(0)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    logits = model(x[rows].bfloat16()).float()
    (F.cross_entropy(logits, y[rows], ignore_index=IGNORE, reduction="sum") / (y != IGNORE).sum()).backward()
    norm = (clip_grad_norm_(model, math.inf) if sharded
            else float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)))
    return {"norm": norm, "dtypes": {p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters()}}


def test_bf16_compute_keeps_fp32_shards_and_gradients(tmp_path):
    expected = _bf16_norm(0, 1, sharded=False)
    for result in spawn(2, _bf16_norm, tmp_path):
        assert result["dtypes"] == {torch.float32}
        assert result["norm"] == pytest.approx(expected["norm"], rel=1e-2)  # bf16 rounding, summed in another order


def _resumed(rank: int, world: int, folder: Path) -> dict:
    """The shards' state dict saved after one step loads into a freshly sharded model."""
    model = _sharded_toy(rank)
    x, y = toy_data(0)
    F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    torch.save(model.state_dict(), folder / f"shards{rank}.pt")
    fresh = _sharded_toy(rank + 10)
    fresh.load_state_dict(torch.load(folder / f"shards{rank}.pt"))
    return {"saved": _full(model), "loaded": _full(fresh)}


def test_per_rank_shards_resume_exactly(tmp_path):
    for result in spawn(2, _resumed, tmp_path, folder=tmp_path):
        assert_close(result["loaded"], result["saved"])
        assert torch.equal(result["loaded"]["scale"], torch.ones(16))  # rank 0's seed-0 buffer, sharded and saved


# ---- the tiny Idefics2 ------------------------------------------------------------------------

def _idefics2_sgd_step(rank: int, world: int, batch_file: Path) -> dict:
    """Weights after one SGD step of lr 1, so that weights before minus after are the gradients."""
    from engine.loss import answer_token_count, summed_token_loss
    from models.tiny import build_tiny

    model = build_tiny(seed=rank).train()
    model.model.vision_model.requires_grad_(False)  # frozen blocks and a root with both kinds
    if world > 1:
        inner = model.model
        fully_shard(model, [*inner.text_model.layers, *inner.vision_model.encoder.layers,
                            *inner.connector.perceiver_resampler.layers])
    batch = torch.load(batch_file)
    labels = batch.pop("labels")
    rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    logits = model(**{k: v[rows] for k, v in batch.items()}, use_cache=False).logits
    (summed_token_loss(logits, labels[rows]) / answer_token_count(labels)).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    return _full(model) if world > 1 else {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tiny_idefics2_step_equals_one_process(processor, tmp_path):
    from PIL import Image

    from models.tiny import build_tiny

    dialogs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {i}?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"Answer {i} is longer."}]}]
               for i in range(2)]
    images = [[Image.new("RGB", (56 + 8 * i, 56), (90 * i, 60, 200))] for i in range(2)]
    batch = dict(processor(text=[processor.apply_chat_template(d) for d in dialogs], images=images,
                           padding=True, return_tensors="pt"))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    labels[:, : labels.shape[1] // 2] = IGNORE
    torch.save(dict(batch, labels=labels), tmp_path / "batch.pt")

    initial = {n: p.detach() for n, p in build_tiny(seed=0).named_parameters()}
    expected = _idefics2_sgd_step(0, 1, tmp_path / "batch.pt")
    moved = {name for name, weight in initial.items() if not torch.equal(weight, expected[name])}
    assert "model.text_model.layers.0.self_attn.q_proj.weight" in moved
    assert "model.connector.perceiver_resampler.layers.0.mlp.down_proj.weight" in moved
    assert not any(name.startswith("model.vision_model.") for name in moved)
    for result in spawn(2, _idefics2_sgd_step, tmp_path, batch_file=tmp_path / "batch.pt"):
        assert result.keys() == expected.keys()
        for name, weight in initial.items():
            torch.testing.assert_close(weight - result[name], weight - expected[name], rtol=1e-4, atol=1e-6, msg=name)
