"""Checkpoints: rotation keeps the newest K and the best; a save killed midway loses nothing."""

import json

import pytest
import torch

from engine.outputs import checkpoint
from errors import UsageError

META = {"approach": "full", "model": "tiny"}


def _save(folder, step, val_loss, keep_last=2, value=None):
    tensors = {"w": torch.full((3,), float(step if value is None else value))}
    return checkpoint.save(folder, step, tensors, {"step": step}, dict(META, val_loss=val_loss), keep_last)


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    for step, val_loss in zip(range(1, 6), [5.0, 3.0, 4.0, 6.0, None], strict=True):
        _save(tmp_path, step, val_loss)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-000002", "step-000004", "step-000005"]
    assert checkpoint.best(tmp_path).name == "step-000002"


def test_load_round_trips_and_checks_the_run(tmp_path):
    path = _save(tmp_path, 7, 1.5)
    tensors, state, meta = checkpoint.load(path, META)
    assert torch.equal(tensors["w"], torch.full((3,), 7.0)) and state == {"step": 7} and meta["step"] == 7
    with pytest.raises(UsageError, match="does not match this run: its model is 'tiny'"):
        checkpoint.load(path, {"model": "HuggingFaceM4/idefics2-8b"})


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    _save(tmp_path, 1, 2.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while train_state.pt is being written

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 1.0)
    monkeypatch.undo()
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-000001"]
    tensors, _, _ = checkpoint.load(checkpoint.complete(tmp_path)[-1], META)
    assert torch.equal(tensors["w"], torch.full((3,), 1.0))
    # The next save clears the half-written folder.
    assert list(tmp_path.glob(".tmp-*"))
    _save(tmp_path, 3, 0.5)
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_checkpoints_are_refused_clearly(tmp_path):
    path = _save(tmp_path, 1, 2.0)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match="is damaged: model.safetensors cannot be read"):
        checkpoint.load(path, META)
    (path / "meta.json").write_text("{")
    with pytest.raises(UsageError, match="cannot read meta.json"):
        checkpoint.load(path, META)


def test_meta_records_step_and_validation_loss(tmp_path):
    path = _save(tmp_path, 4, 0.25)
    assert json.loads((path / "meta.json").read_text()) == dict(META, val_loss=0.25, step=4)


def test_a_damaged_older_checkpoint_blocks_neither_the_best_nor_the_next_save(tmp_path):
    _save(tmp_path, 1, 1.0)  # the best so far
    _save(tmp_path, 2, 2.0)
    (tmp_path / "step-000001" / "meta.json").write_text("{")  # damaged after it was written
    assert checkpoint.best(tmp_path).name == "step-000002"  # a damaged checkpoint is no candidate
    _save(tmp_path, 3, 3.0)  # rotation reads every meta.json: it must not stop at the damaged one
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-000002", "step-000003"]


def test_the_train_state_is_read_into_host_memory(tmp_path, monkeypatch):
    """On CUDA a torch.load without map_location puts tensors saved from cuda:0 back on cuda:0, on every rank that
    resumes from rank 0's file, beside the live optimizer: every read maps to the CPU."""
    path = _save(tmp_path, 1, None)
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: seen.append(kwargs.get("map_location")) or
                        load(*args, **kwargs))
    assert checkpoint.load(path, META)[1] == {"step": 1}
    assert seen == ["cpu"]


def test_every_torch_load_in_the_product_maps_explicitly():
    """A guard beside the test above: no torch.load anywhere in the product lands where its tensors were saved."""
    import ast

    from harness import ROOT

    files = [ROOT / "run.py", *(path for folder in ("engine", "models", "parallel", "quant", "lora", "eval")
                                for path in (ROOT / folder).rglob("*.py"))]
    calls = [(path.name, node.lineno) for path in files for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
             and "map_location" not in {keyword.arg for keyword in node.keywords}]
    assert calls == []


def test_the_final_export_reads_the_weights_only(tmp_path, monkeypatch):
    """--final best reloads the best checkpoint's weights while the live optimizer is still held: reading its train
    state too (AdamW's moments, twice the trained weights) is what took 8B full fine-tuning on one H200 from 87.6 to
    145.1 GiB. Nothing else in a run without --resume reads a train state."""
    from harness import run_engine

    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args[0]) or load(*args, **kwargs))
    run_engine(tmp_path, "lora", batch_size=2, gpus=None, final="best", max_steps=2, eval_every=0.5)
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert loads == []


def test_each_rank_saves_and_restores_its_own_gpus_generator_only(monkeypatch):
    """Asking every visible GPU (get_rng_state_all) makes a CUDA context on each of them from every rank."""
    asked, set_on = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(device) or torch.zeros(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on.append(device))
    for every in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, every, lambda *args, every=every: pytest.fail(f"{every} touches every GPU"))
    gpu = torch.device("cuda", 3)
    state = checkpoint.rng_state(gpu)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_state = checkpoint.train_state(optimizer, scheduler, [None, state])
    checkpoint.restore_train_state(train_state, optimizer, scheduler, rank=1, device=gpu)
    assert asked == [gpu] and set_on == [gpu]
    assert checkpoint.rng_state(torch.device("cpu"))["cuda"] is None


@pytest.mark.parametrize("kind", ["adamw", "bf16 moments", "adamw8bit"])
def test_a_resumed_ranks_optimizer_state_lands_on_its_own_device(tmp_path, monkeypatch, kind):
    """Rank 0's train state, read into host memory, goes to each resuming rank's own parameters' device (the meta
    device stands for that rank's GPU here), every dtype kept (8-bit codes stay uint8; torch's own load would cast
    them to the parameter's float dtype). (The offloaded optimizer's state lives on the host by design.)"""
    from engine.optim.adamw import AdamW
    from engine.optim.optimizer import adamw

    def trained(device: str) -> torch.optim.Optimizer:
        weight = torch.nn.Parameter(torch.ones(4096, device=device, dtype=torch.bfloat16 if kind == "bf16 moments"
                                               else torch.float32))
        moments = {"bf16 moments": "bf16", "adamw8bit": "8bit"}.get(kind, "fp32")
        return adamw([weight], 1e-3, (0.9, 0.999), 0.0, moments, seed=0)

    saved = trained("cpu")
    saved.param_groups[0]["params"][0].grad = torch.full((4096,), 0.5, dtype=saved.param_groups[0]["params"][0].dtype)
    saved.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(saved, lambda step: 1.0)
    state = checkpoint.train_state(saved, scheduler, [checkpoint.rng_state(torch.device("cpu"))])
    path = checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)}, state, dict(META, val_loss=None), 1)
    read = checkpoint.load(path, META)[1]
    # The meta device has no random generator; the rounding one is made on the parameters' device on a GPU.
    monkeypatch.setattr(AdamW, "_rounding", lambda self, device: torch.Generator().manual_seed(0))
    resumed = trained("meta")
    checkpoint.restore_train_state(read, resumed, torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 1.0),
                                   rank=0, device=torch.device("meta"))
    placed = {(name, str(value.device), value.dtype) for param, per_param in resumed.state.items()
              for name, value in per_param.items() if torch.is_tensor(value) and value.dim() > 0}
    kept = {(name, value.dtype) for per_param in saved.state.values() for name, value in per_param.items()
            if torch.is_tensor(value) and value.dim() > 0}
    assert placed and {(name, dtype) for name, _, dtype in placed} == kept
    assert {device for _, device, _ in placed} == {"meta"}
