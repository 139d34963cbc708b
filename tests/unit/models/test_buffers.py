"""Every path that loads a model gives the buffers from_pretrained gives (issue 25): the rotary tables stay fp32
in a bf16 model. Cast to bf16 they put the 8B's RoPE phase 0.53 rad off at position 429, and the one-process and
DDP paths computed another model than FSDP and the pipeline, which read their weights onto a meta-built skeleton."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

import models
from models.lazy import load_on_meta, materialize
from models.tiny import build_tiny

BF16, CPU = torch.bfloat16, torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, _processor):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny(0).save_pretrained(folder)
    _processor.save_pretrained(folder)
    return folder


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_buffers())


def _assert_same_buffers(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = _buffers(model), _buffers(reference)
    assert ours.keys() == theirs.keys()
    for name, buffer in theirs.items():
        assert ours[name].dtype == buffer.dtype, name
        torch.testing.assert_close(ours[name], buffer, rtol=0, atol=0, msg=name)


def test_loading_a_folder_keeps_the_buffers_from_pretrained_keeps(saved):
    reference = AutoModelForImageTextToText.from_pretrained(saved, dtype=BF16)
    assert {b.dtype for b in _buffers(reference).values()} == {torch.float32}  # what is being protected
    model, _ = models.load(str(saved), BF16, CPU)
    assert {p.dtype for p in model.parameters()} == {BF16}
    _assert_same_buffers(model, reference)


def test_the_built_in_tiny_model_keeps_them_too(saved):
    reference = AutoModelForImageTextToText.from_pretrained(saved, dtype=BF16)
    model, _ = models.load("tiny", BF16, CPU)
    assert {p.dtype for p in model.parameters()} == {BF16}
    _assert_same_buffers(model, reference)


def test_the_path_fsdp_and_the_pipeline_read_through_gives_the_same_buffers(saved):
    """A meta-built skeleton whose weights each rank reads (models/lazy.py), materialised whole here."""
    reference = AutoModelForImageTextToText.from_pretrained(saved, dtype=BF16)
    model, _, read = load_on_meta(saved, BF16)
    materialize(model, model, read, CPU)
    _assert_same_buffers(model, reference)


def test_loading_goes_straight_to_the_device(saved, monkeypatch):
    """Every rank loaded the whole model into host memory first (the fp32 judge: 33.6 GB a rank)."""
    asked = []
    from_pretrained = AutoModelForImageTextToText.from_pretrained
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained",
                        lambda *args, **kwargs: asked.append(kwargs.get("device_map")) or
                        from_pretrained(*args, **kwargs))
    models.load(str(saved), BF16, CPU)
    assert asked == [CPU]
