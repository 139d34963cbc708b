"""NF4 Linear4bit against bitsandbytes' own quantizer and layer, and against the NF4 format itself."""

import copy
import itertools
import math
import os
import subprocess
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.tiny import build_tiny
from quant import Linear4bit, quantize, quantized_bytes
from tests.harness import ROOT

NF4 = bnbf.get_4bit_type("nf4", device="cpu")


def _linear(in_features: int, out_features: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("shape", [(192, 160), (33, 7)])  # >256 absmax blocks; odd count of weights
def test_dequantize_equals_bitsandbytes_bit_for_bit(shape):
    linear = _linear(*shape)
    packed, state = bnbf.quantize_4bit(linear.weight.detach(), blocksize=64, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8)
    assert state.state2.blocksize == 256
    layer = Linear4bit.from_linear(linear)
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(packed, state))


def test_forward_and_input_gradient_match_bitsandbytes_linear4bit():
    linear = _linear(256, 96)
    reference = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    reference.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True, blocksize=64)
    reference.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    reference = reference.to("cpu")  # Params4bit quantizes when moved
    layer = Linear4bit.from_linear(linear)
    x = torch.randn(5, 3, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(5, 3, 96)

    y, y_ref = layer(x), reference(x_ref)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def _phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _expected_nf4_error(block_size: int = 64) -> float:
    """Mean |w - dequantized w| / block absmax for gaussian weights, from the 16 NF4 values alone.

    Within the block, u = w / absmax is close to N(0, s^2) with s = 1 / E[max of 64 |N(0,1)|].
    Each u is rounded to the nearest NF4 value; if u is about uniform within a gap of width d
    between neighbouring values, its mean rounding error is d / 4, so the expected error is
    sum over the 15 gaps of P(u in gap) * d / 4; the block's own absmax (1 in 64) is exact.
    """
    step = 1e-3  # E[max] = integral over x of P(max > x)
    expected_max = sum(step * (1 - (2 * _phi(i * step) - 1) ** block_size) for i in range(10_000))
    s = 1 / expected_max
    code = NF4.tolist()
    error = sum((_phi(hi / s) - _phi(lo / s)) * (hi - lo) / 4 for lo, hi in itertools.pairwise(code))
    return error * (block_size - 1) / block_size


def test_round_trip_error_is_what_nf4_gives_on_gaussian_weights():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False)
    nn.init.normal_(linear.weight)
    weight = linear.weight.detach().view(-1, 64)
    dequantized = Linear4bit.from_linear(linear).dequantize().view(-1, 64)
    absmax = weight.abs().amax(dim=1, keepdim=True)
    error = ((weight - dequantized).abs() / absmax).mean().item()
    assert error == pytest.approx(_expected_nf4_error(), rel=0.1)


def test_every_value_is_an_nf4_code_times_its_double_quantized_absmax():
    linear = _linear(512, 128, bias=False)
    layer = Linear4bit.from_linear(linear)
    # The block absmax rebuilt by hand: 8-bit dynamic code, a scale per 256 blocks, plus the mean.
    block_scale = layer.nested_absmax.repeat_interleave(256)[: layer.absmax.numel()]
    absmax = bnbf.create_dynamic_map()[layer.absmax.long()] * block_scale + layer.offset
    dequantized = layer.dequantize().view(-1, 64)
    # Which code bitsandbytes should pick: the one nearest to w / (true block absmax).
    weight = linear.weight.detach().view(-1, 64)
    normalized = weight / weight.abs().amax(dim=1, keepdim=True)
    nearest = (normalized.unsqueeze(-1) - NF4).abs().argmin(dim=-1)
    assert torch.equal(dequantized, NF4[nearest] * absmax.unsqueeze(1))
    assert (absmax / weight.abs().amax(dim=1) - 1).abs().max() < 0.01


def test_backward_saves_the_packed_weight_not_a_dequantized_one():
    layer = Linear4bit.from_linear(_linear(512, 256))
    saved_bytes = []
    x = torch.randn(1, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved_bytes.append(t.numel() * t.element_size()) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert 0 < sum(saved_bytes) < 256 * 512 * 0.6  # about half a byte per weight, not 4
    torch.testing.assert_close(x.grad, layer.dequantize().sum(dim=0, keepdim=True))
    assert [p.requires_grad for p in layer.parameters()] == [False]  # only the bias is a parameter


def test_cast_changes_compute_dtype_but_not_the_quant_state():
    layer = Linear4bit.from_linear(_linear(128, 64))
    fp32 = layer.dequantize()
    nested_absmax = layer.nested_absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.nested_absmax, nested_absmax)
    assert torch.equal(layer.dequantize(), fp32.to(torch.bfloat16))
    assert layer(torch.randn(2, 128)).dtype == torch.float32  # output in the input's dtype


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The model with every Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    for path, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize()
            if module.bias is not None:
                linear.bias.data = module.bias.data
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, linear)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    input_ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_quantize_tiny_idefics2(tiny_model):
    linears = sum(isinstance(m, nn.Linear) for m in tiny_model.modules())
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        quantize(tiny_model, skip=["^lm_heads$"])
    assert quantize(tiny_model, skip=["^lm_head$"]) == linears - 1
    assert isinstance(tiny_model.lm_head, nn.Linear)
    assert not any(type(m) is nn.Linear for name, m in tiny_model.named_modules() if name != "lm_head")
    stored, bf16 = quantized_bytes(tiny_model.modules())
    assert stored / bf16 <= 0.30
    logits = _logits(tiny_model)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(_dequantized_copy(copy.deepcopy(tiny_model))))


def test_state_dict_round_trips_through_safetensors(tiny_model, tmp_path):
    quantize(tiny_model, skip=lambda path: path == "lm_head")
    save_file(tiny_model.state_dict(), tmp_path / "quantized.safetensors")
    other = build_tiny(seed=1)
    quantize(other, skip=["lm_head"])
    other.load_state_dict(load_file(tmp_path / "quantized.safetensors"))
    layers = [(a, b) for a, b in zip(tiny_model.modules(), other.modules(), strict=True) if isinstance(a, Linear4bit)]
    assert layers and all(torch.equal(a.dequantize(), b.dequantize()) for a, b in layers)
    assert torch.equal(_logits(tiny_model), _logits(other))


def test_meta_model_loads_a_cached_quantized_state_dict(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    quantize(model)
    save_file(model.state_dict(), tmp_path / "quantized.safetensors")
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    assert quantize(empty) == 2
    empty.load_state_dict(load_file(tmp_path / "quantized.safetensors"), assign=True)
    x = torch.randn(4, 64)
    assert torch.equal(empty(x), model(x))


def test_adapter_on_the_quantized_base_trains_while_the_base_gets_no_gradient():
    first, second = Linear4bit.from_linear(_linear(32, 48, seed=1)), Linear4bit.from_linear(_linear(48, 16, seed=2))
    down = nn.Parameter(torch.randn(4, 32) * 0.1)  # a rank-4 add-on beside the first layer
    up = nn.Parameter(torch.randn(48, 4) * 0.1)
    x = torch.randn(6, 32)

    def run(layer1, layer2):
        return layer2(layer1(x) + x @ down.T @ up.T).square().sum()

    run(first, second).backward()
    grads = down.grad.clone(), up.grad.clone()
    down.grad = up.grad = None
    # The same network with plain fp32 linears holding the dequantized weights.
    plain = [nn.Linear(q.in_features, q.out_features) for q in (first, second)]
    for p, q in zip(plain, (first, second), strict=True):
        p.weight.data, p.bias.data = q.dequantize(), q.bias.data
    run(*plain).backward()

    torch.testing.assert_close(grads, (down.grad, up.grad))
    for layer in (first, second):
        assert all(p.grad is None for p in layer.parameters())
        assert all(not b.requires_grad for b in layer.buffers())



# Makes bitsandbytes believe the CPU has AVX512-BF16, as the CI's does: `has_avx512bf16` is replaced once
# bitsandbytes.functional is loaded, before bitsandbytes' CPU backend asks it, then run.py runs as `python run.py`.
AS_ON_AN_AVX512_BF16_CPU = """
import importlib.abc, importlib.machinery, runpy, sys

class Patched(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module
        def exec_module(module):
            run_module(module)
            module.has_avx512bf16 = lambda: True
            print("bitsandbytes sees AVX512-BF16")
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Patched())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # an end-to-end run
def test_a_run_on_an_avx512_bf16_cpu_offline_prints_nothing_of_bitsandbytes_optional_kernel(tmp_path):
    """On such a CPU, importing bitsandbytes fetches an optional kernel from the Hugging Face Hub; offline,
    `kernels` and bitsandbytes each printed a line about it before the run's own output."""
    command = [sys.executable, "-c", AS_ON_AN_AVX512_BF16_CPU, str(ROOT / "run.py"), "--approach", "qlora",
               "--model", "tiny", "--device", "cpu", "--limit-exhibits", "2", "--max-steps", "1", "--batch-size", "2",
               "--skip-eval", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bitsandbytes sees AVX512-BF16" in result.stdout
    assert "kernels-community" not in result.stderr, result.stderr[-2000:]
