"""Next-token cross-entropy summed over answer tokens, for exact normalisation.

The trainer divides each micro-batch's sum by the answer-token count of the whole global
batch (all micro-batches, all ranks), so the gradient is the same however the batch is cut.

The training loss never builds the logits of the whole batch (batch x sequence x vocabulary, the
largest activation of a VLM step: 128 of the tiny model's ~160 MiB): `answer_loss` applies the
output layer only at positions that carry loss (prompt, image and padding tokens carry none), in
chunks of `CHUNK` positions. For a plain linear output layer it works out each chunk's gradient in
the forward pass itself, so neither the logits nor their gradient ever exist beyond one chunk, and
nothing is recomputed. An output layer with an adapter (`--lora-target ... lm_head`) runs as a
module, chunk by chunk, and autograd keeps the answer positions' logits for backward (recomputing
them instead would need the layer's weights after its forward, which FSDP has freed by then).
"""

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100
CHUNK = 256  # positions whose logits exist at once: 33 MB of fp32 for Idefics2's 32k vocabulary


def answer_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry loss: labels shifted left by one, as the loss sees them."""
    return int((labels[:, 1:] != IGNORE).sum())


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """What each position predicts: the labels moved left by one; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over labelled positions of full logits, in fp32.

    The labels move left by one, not the logits: slicing off the logits' last position would copy
    the whole (batch, sequence, vocabulary) tensor in forward and again in backward.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), next_tokens(labels).flatten(), ignore_index=IGNORE,
                           reduction="sum")


def logits_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The plain way, with the full logits: what `answer_loss` must equal, and the peers' loss in bench/."""
    return summed_token_loss(head(hidden), labels)


def answer_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """`summed_token_loss(head(hidden), labels)` without the full logits: the output layer `head` applied
    at answer positions only, chunk by chunk."""
    answers, targets = answer_positions(hidden, labels)
    chunks = zip(answers.split(CHUNK), targets.split(CHUNK), strict=True)
    if type(head) is not nn.Linear or head.bias is not None:
        return sum((F.cross_entropy(head(h).float(), t, reduction="sum") for h, t in chunks),
                   torch.zeros((), device=hidden.device))
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else answers.dtype
    if torch.is_grad_enabled() and (answers.requires_grad or head.weight.requires_grad):
        return _ChunkedLoss.apply(answers, head.weight, targets, dtype)
    with torch.no_grad():
        return sum((_picked(_log_probs(h, head.weight, dtype), t).sum() for h, t in chunks),
                   torch.zeros((), device=hidden.device))


def answer_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of the positions that carry loss, and their targets, on the hidden states' device. The
    positions are found where the labels are: the strategies keep them on the host, where they were collated, so
    that finding them waits for nothing (on the device, a boolean mask's count is data the host must wait for)."""
    targets = next_tokens(labels).flatten()
    positions = (targets != IGNORE).nonzero().squeeze(1)
    answers = hidden.flatten(0, 1).index_select(0, positions.to(hidden.device, non_blocking=True))
    return answers, targets.index_select(0, positions).to(hidden.device, non_blocking=True)


def _log_probs(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Log-softmax of one chunk's logits: the matmul in `dtype` (autocast's, if on), the rest in fp32,
    as F.cross_entropy over `.float()` logits computes it."""
    return (hidden.to(dtype) @ weight.to(dtype).T).float().log_softmax(-1)


def _picked(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's negative log-probability of its target: its cross-entropy."""
    return -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes, chunk by chunk, the loss and its gradient with respect to the answers'
    hidden states and to the output layer (the gradient of summed cross-entropy by the logits is
    softmax minus one-hot); backward only scales them. The matmuls are the three of an autograd
    step (logits, and two for the gradients), in the same dtypes."""

    @staticmethod
    def forward(ctx, answers: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        grad_answers = torch.zeros_like(answers) if answers.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), device=answers.device)
        compute_weight = weight.to(dtype)
        for start in range(0, len(answers), CHUNK):
            rows = slice(start, start + CHUNK)
            log_probs = _log_probs(answers[rows], compute_weight, dtype)
            total += _picked(log_probs, targets[rows]).sum()
            grad = log_probs.exp_()  # the softmax, in place: one chunk-sized tensor at a time
            grad[torch.arange(len(grad), device=grad.device), targets[rows]] -= 1
            grad = grad.to(dtype)
            if grad_answers is not None:
                grad_answers[rows] = grad @ compute_weight
            if grad_weight is not None:
                grad_weight += (grad.T @ answers[rows].to(dtype)).float()
        ctx.save_for_backward(grad_answers, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_answers, grad_weight = ctx.saved_tensors
        return (None if grad_answers is None else grad_answers * grad_total,
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype), None, None)


def loss_forward(model: nn.Module) -> None:
    """`model(labels=..., **inputs)` returns `answer_loss` instead of logits: installed from outside, as
    activation checkpointing and autocast are, so that wrappers around the model's forward (FSDP's
    gathers, DDP) enclose the loss too. Without labels it is the model's own forward, logits and all, inside
    the same wrappers: generating while training (engine/select.py) needs the logits."""
    base, head, own = model.model, model.get_output_embeddings(), model.forward
    blank = _blank_image(base) if any(p.requires_grad for part in (base.vision_model, base.connector)
                                      for p in part.parameters()) else None

    def forward(labels: torch.Tensor | None = None, **inputs):
        if labels is None:
            return own(**inputs)
        # A batch without a picture skips the vision encoder and connector. When they train, the ranks must still
        # run them in step: the FSDP units each gathers and the DDP buckets each sums, in the same order, or NCCL
        # waits for ever. So such a batch sends one blank picture through them first, where a picture goes, and
        # adds its features times zero: their gradients are the zeros a text-only batch gives.
        in_step = None
        if blank is not None and "pixel_values" not in inputs:
            images = base.get_image_features(blank.to(inputs["input_ids"].device), return_dict=True).pooler_output
            in_step = sum(features.float().sum() for features in (images if isinstance(images, (list, tuple))
                                                                   else [images]))
        hidden = base(**inputs, use_cache=False).last_hidden_state
        loss = answer_loss(hidden, head, labels)
        return loss if in_step is None else loss + 0 * in_step

    # generate reads the forward's signature: whether to pass position_ids (left padding), and more. It is the own
    # forward's but for mm_encoder_outputs, which would make generate encode the pictures before and outside the
    # forward, where FSDP has not gathered the vision embeddings and connector: given the pixels, the forward does.
    signature = inspect.signature(own)
    kept = [parameter for name, parameter in signature.parameters.items() if name != "mm_encoder_outputs"]
    forward.__signature__ = signature.replace(parameters=kept)
    model.forward = forward


def _blank_image(base: nn.Module) -> torch.Tensor:
    """One grey picture of the vision encoder's size (all-zero pictures count as padding and are dropped)."""
    size = base.config.vision_config.image_size
    return torch.full((1, 1, 3, size, size), 0.5)
