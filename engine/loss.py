"""Next-token cross-entropy summed over answer tokens, for exact normalisation.

The trainer divides each micro-batch's sum by the answer-token count of the whole global
batch (all micro-batches, all ranks), so the gradient is the same however the batch is cut.
"""

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels shifted left by one, as the loss sees them."""
    return int((labels[:, 1:] != IGNORE).sum())


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over labelled positions, in fp32.

    The labels move left by one, not the logits: slicing off the logits' last position would copy
    the whole (batch, sequence, vocabulary) tensor in forward and again in backward (bench/run.py
    measured that as a quarter of a tiny-model step on the CPU). The last position gets no label.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
