"""Activation checkpointing applied to a model's blocks from outside.

Non-reentrant checkpointing is used on purpose: the reentrant variant drops gradients when
a block's inputs do not require grad -- exactly the case of LoRA on a frozen base, where it
silently trains nothing.
"""

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of keeping them."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
