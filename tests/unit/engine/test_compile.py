"""--compile's pieces that need no run: the composition it refuses, and an NF4 layer compiled whole.

The runs (a compiled run against an eager one) are tests/e2e/test_compile_runs.py. Compiled graphs run on aot_eager
in the suite (tests/conftest.py), so a compiled forward equals the eager one exactly.
"""

import pytest
import torch
import torch.nn as nn

from engine.compile import compile_blocks
from engine.config import from_approach
from errors import UsageError
from quant import Linear4bit, linear4bit


def test_flash_attention_is_refused_in_one_sentence():
    with pytest.raises(UsageError, match=r"^--compile compiles each layer as one graph, .* use --attn-implementation "
                                         r"sdpa with --compile\.$"):
        from_approach("lora", compile=True, attn_implementation="flash_attention_2")


def test_an_nf4_layer_compiles_whole_before_any_eager_dequantization(monkeypatch):
    """On a fresh rank the first dequantization runs inside a compiled block: it must not build bitsandbytes' code
    table there (its tolist() cannot be traced, and fullgraph fails the run)."""
    torch.manual_seed(0)
    eager, compiled = (Linear4bit.from_linear(nn.Linear(128, 64)) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    monkeypatch.setattr(linear4bit, "_dynamic_maps", {})  # no table on any device yet
    compile_blocks([compiled])
    x = torch.randn(3, 128)
    outputs = []
    for layer in (compiled, eager):
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        out.square().sum().backward()
        outputs.append((out, inputs.grad))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
