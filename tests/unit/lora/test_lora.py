"""LoRA: hand-worked scales, merge round trips, and numerics and files checked against PEFT."""

import json

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file, save_file

import lora
from engine.metrics import parameter_counts
from errors import UsageError
from models.targets import matching_modules
from models.tiny import build_tiny

R, ALPHA = 4, 8


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))


def randomise_lora_b(model: nn.Module, seed: int = 1) -> None:
    """A fresh adapter has B = 0 and changes nothing; give it something to change (ours or PEFT's)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def tiny_with_lora(rslora: bool = True, targets: tuple[str, ...] = ("projections",)) -> nn.Module:
    model = build_tiny(0)
    lora.inject(model, matching_modules(model, list(targets)), r=R, alpha=ALPHA, dropout=0.0, rslora=rslora)
    randomise_lora_b(model)
    return model


def peft_tiny(rslora: bool = True) -> nn.Module:
    base = build_tiny(0)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, use_rslora=rslora,
                        target_modules=matching_modules(base, ["projections"]), init_lora_weights="gaussian")
    return get_peft_model(base, config)


@pytest.fixture
def batch(processor) -> dict[str, torch.Tensor]:
    """One image and a question, so the connector's adapters take part as well as the text model's."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(text=[text], images=[[Image.new("RGB", (70, 50), (200, 40, 90))]], return_tensors="pt"))


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def test_fresh_adapter_changes_nothing_and_keeps_the_base_names():
    model = small_mlp()
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    x = torch.randn(3, 6)
    expected = model(x)
    assert lora.inject(model, ["0", "2"], r=2, alpha=4) == ["0", "2"]
    adapter_keys = {f"{p}.lora_{m}.weight" for p in ("0", "2") for m in "AB"}
    assert set(model.state_dict()) == set(base_state) | adapter_keys
    assert set(lora.adapter_state_dict(model)) == adapter_keys
    assert torch.equal(model(x), expected)
    result = model.load_state_dict(base_state, strict=False)  # a base checkpoint loads into a wrapped model
    assert sorted(result.missing_keys) == sorted(adapter_keys) and not result.unexpected_keys


def test_casts_reach_the_shared_base_tensors():
    model = small_mlp()
    lora.inject(model, ["0"], r=2, alpha=4)
    model.double()
    wrapped = model[0]
    assert wrapped.base.weight is wrapped.weight and wrapped.weight.dtype == torch.float64
    assert wrapped.lora_A.weight.dtype == torch.float64
    model.eval()
    assert not wrapped.base.training


def test_a_quantized_base_keeps_its_names_and_its_own_cast_rules():
    pytest.importorskip("bitsandbytes")
    from quant import Linear4bit

    base = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    keys, x = set(base.state_dict()), torch.randn(3, 64)
    layer = lora.LoRALinear(base, r=2, alpha=4)
    assert set(layer.state_dict()) == keys | {"lora_A.weight", "lora_B.weight"}
    assert torch.equal(layer(x), base(x))
    layer.to(torch.bfloat16)  # Linear4bit's own _apply: new compute dtype, quant state untouched
    assert base.compute_dtype == torch.bfloat16 and layer.nested_absmax.dtype == torch.float32


@pytest.mark.parametrize("rslora, expected", [(False, 11.5 + 1 * 7), (True, 11.5 + 2 * 7)])
def test_scale_is_alpha_over_r_or_over_sqrt_r(rslora, expected):
    # base: 1*3 + 2*4 + 0.5 = 11.5; B A x = (1,1,1,1) . (3,4,0,0) = 7; alpha/r = 4/4, alpha/sqrt(r) = 4/2.
    linear = nn.Linear(2, 1)
    layer = lora.LoRALinear(linear, r=4, alpha=4, rslora=rslora)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
        linear.bias.fill_(0.5)
        layer.lora_A.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        layer.lora_B.weight.fill_(1.0)
    assert layer(torch.tensor([[3.0, 4.0]])).item() == pytest.approx(expected)


def test_adapter_runs_in_the_input_dtype():
    layer = lora.LoRALinear(nn.Linear(6, 5).to(torch.bfloat16), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer(torch.randn(3, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_merge_matches_the_adapter_and_unmerge_restores_the_weight():
    model = small_mlp()
    original = model[0].weight.detach().clone()
    lora.inject(model, ["0", "2"], r=2, alpha=4, dropout=0.0)
    randomise_lora_b(model)
    x = torch.randn(3, 6)
    with_adapter = model(x)
    lora.merge(model)
    lora.merge(model)  # a second merge must not add the update twice
    assert not torch.allclose(model[0].weight, original)
    torch.testing.assert_close(model(x), with_adapter)
    lora.unmerge(model)
    torch.testing.assert_close(model[0].weight, original)
    torch.testing.assert_close(model(x), with_adapter)


def test_merge_refuses_a_base_without_a_float_weight():
    class IntLinear(nn.Module):
        in_features, out_features = 6, 5

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(5, 6, dtype=torch.uint8))

        def forward(self, x):
            return x @ self.weight.to(x.dtype).T

    layer = lora.LoRALinear(IntLinear(), r=2, alpha=4)
    assert set(layer.state_dict()) == {"weight", "lora_A.weight", "lora_B.weight"}
    with pytest.raises(TypeError, match="not a float"):
        layer.merge()


def test_merged_tiny_idefics2_gives_the_adapter_logits(batch):
    model = tiny_with_lora()
    base_keys = set(build_tiny(0).state_dict())
    with_adapter = logits(model, batch)
    assert not torch.allclose(with_adapter, logits(build_tiny(0), batch), atol=1e-3)  # the adapter does something
    lora.merge(model)
    # Merging reorders float sums in 38 layers; the adapter's effect is well above this tolerance.
    torch.testing.assert_close(logits(model, batch), with_adapter, atol=1e-4, rtol=1e-4)
    lora.unmerge(model)
    unloaded = lora.merge_and_unload(model)
    assert len(unloaded) == len(matching_modules(build_tiny(0), ["projections"]))
    assert not lora.lora_modules(model) and set(model.state_dict()) == base_keys
    torch.testing.assert_close(logits(model, batch), with_adapter, atol=1e-4, rtol=1e-4)


def test_only_adapter_parameters_get_gradients(batch):
    model = tiny_with_lora().train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert param.requires_grad == is_adapter, name
        assert (param.grad is not None and param.grad.abs().sum() > 0) == is_adapter, name
    trainable, total = parameter_counts(model)
    assert trainable == sum(R * (m.in_features + m.out_features) for m in lora.lora_modules(model).values())
    assert total == sum(p.numel() for p in build_tiny(0).parameters()) + trainable


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_peft_for_the_same_weights(rslora, batch):
    ours, reference = tiny_with_lora(rslora), peft_tiny(rslora)
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for name, tensor in lora.adapter_state_dict(ours).items():
            theirs["base_model.model." + name.replace(".weight", ".default.weight")].copy_(tensor)
    torch.testing.assert_close(logits(ours, batch), logits(reference, batch), atol=1e-5, rtol=1e-5)


def test_our_adapter_loads_in_peft(tmp_path, batch):
    ours = tiny_with_lora()
    lora.save(ours, tmp_path, base_model_name_or_path="tiny")
    reference = PeftModel.from_pretrained(build_tiny(0), tmp_path)
    torch.testing.assert_close(logits(reference, batch), logits(ours, batch), atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_in_ours_with_the_same_file_keys(tmp_path, batch):
    reference = peft_tiny()
    randomise_lora_b(reference)
    reference.save_pretrained(tmp_path / "peft")
    lora.save(tiny_with_lora(), tmp_path / "ours", base_model_name_or_path="tiny")
    assert set(load_file(tmp_path / "peft" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    model = build_tiny(0)
    assert len(lora.load(model, tmp_path / "peft")) == len(lora.lora_modules(model))
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=1e-5, rtol=1e-5)


def test_regex_target_modules_mean_what_they_mean_to_peft(tmp_path, batch):
    pattern = r"model\.text_model\.layers\.\d+\.self_attn\.(q|v)_proj"
    ours = tiny_with_lora(targets=(pattern,))
    lora.save(ours, tmp_path, base_model_name_or_path="tiny", target_modules=pattern)
    model = build_tiny(0)
    assert lora.load(model, tmp_path) == list(lora.lora_modules(ours))
    torch.testing.assert_close(logits(model, batch), logits(ours, batch))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build_tiny(0), tmp_path), batch), logits(ours, batch),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly"):
        lora.save(ours, tmp_path, base_model_name_or_path="tiny", target_modules=["q_proj"])


def _rewrite_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | changes))


def _drop_first_tensor(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(dict(sorted(tensors.items())[1:]), folder / "adapter_model.safetensors")


@pytest.mark.parametrize("spoil, message", [
    (lambda folder: (folder / "adapter_config.json").unlink(), "has no adapter_config.json"),
    (lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"not safetensors"), "cannot read"),
    (lambda folder: (folder / "adapter_config.json").write_text("{"), "not a LoRA config"),
    (_drop_first_tensor, "1 tensors missing"),
    (lambda folder: _rewrite_config(folder, r=8), "has shape"),
    (lambda folder: _rewrite_config(folder, target_modules=["fc1"]), "does not fit"),
    (lambda folder: _rewrite_config(folder, target_modules=["no_such_proj"]), "match no linear"),
    (lambda folder: _rewrite_config(folder, use_dora=True), "only plain LoRA"),
    (lambda folder: _rewrite_config(folder, init_lora_weights="pissa"), "only plain LoRA"),
])
def test_a_bad_adapter_folder_is_refused_and_leaves_the_model_alone(tmp_path, spoil, message):
    lora.save(tiny_with_lora(), tmp_path, base_model_name_or_path="tiny")
    spoil(tmp_path)
    model = build_tiny(0)
    with pytest.raises(UsageError, match=message):
        lora.load(model, tmp_path)
    assert not lora.lora_modules(model)
