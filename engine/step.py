"""One optimizer step: what the training loop (engine/trainer.py), the memory planner (engine/plan/ranks.py)
and the benchmarks (bench/ours.py) share, so that each of them runs exactly the step a run takes."""

import torch

from engine.loss import answer_token_count
from engine.strategies import Strategy


def train_step(strategy: Strategy, optimizer: torch.optim.Optimizer, batches: list[dict],
               max_grad_norm: float) -> tuple[float, float, int]:
    """Forward/backward this rank's micro-batches, clip, step. Returns (global loss, grad norm, global tokens)."""
    strategy.set_training()
    answer_tokens = int(strategy.data_ranks.sum_over_ranks(sum(answer_token_count(b["labels"]) for b in batches)))
    loss = strategy.forward_backward(batches, answer_tokens)
    grad_norm = strategy.clip_(max_grad_norm)
    optimizer.step()
    return loss, grad_norm, answer_tokens
