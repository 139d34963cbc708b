"""--compile: each of the model's repeated blocks compiled by torch.compile on its own (regional compilation, as
torchtitan compiles each TransformerBlock), never the whole model: the layers of one kind share one compiled
graph, so compile time does not grow with depth, and what runs between the blocks (embeddings, the image merge,
the chunked loss, FSDP's gathers, the pipeline's sends) stays eager.

What is compiled is each block's own forward, before anything wraps it: activation checkpointing, FSDP's
gathers and autocast then wrap the compiled forward from outside. torchtitan compiles around its checkpoint
wrapper instead; here an FSDP unit recomputes its all-gathers together with its block (parallel/fsdp.py), which
no compiled graph can hold, so the checkpoint sits outside the compiled region under every strategy alike: one
order, one graph per kind of block. A recompute in backward runs the compiled forward again, after checkpoint
has restored the RNG state, so dropout inside the graph draws the same masks again.

Inside a block: LoRA's adapters, and NF4 dequantization (bitsandbytes' kernels are torch ops with shapes known
to the compiler; quant/linear4bit.py keeps its code table a constant of the graph). Around it, besides those
above: DDP's hooks on the parameters' gradients. Generating with a KV cache (engine/greedy.py) runs the blocks
eagerly. `fullgraph=True`: a block that does not compile whole fails the run instead of running as eager pieces,
slower than the eager run it was meant to beat; `--attn-implementation flash_attention_2` is refused for that
(engine/config.py).
"""

import torch
import torch.nn as nn

# How many graphs dynamo may compile for one function before it gives up (with fullgraph, fails the run). A kind of
# block compiles a few: its first shape, then with the sequence length symbolic, without gradients for validation,
# for one row while a pipeline answers. transformers runs the vision and decoder layers' forwards through one
# wrapper function (GradientCheckpointingLayer), whose count they share: 8 there on a pipeline's first stage,
# torch's default limit.
RECOMPILE_LIMIT = 32


def compile_blocks(blocks: list[nn.Module]) -> None:
    """Each block's forward compiled on first call (an instance attribute: names and state dicts stay as they
    were). Nothing is traced here: a model still on the meta device is compiled as its weights run."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True)
