"""One optimizer step: what the training loop (engine/trainer.py), the memory planner (engine/plan/ranks.py)
and the benchmarks (bench/ours.py) share, so that each of them runs exactly the step a run takes."""

import torch

from engine.loss import answer_token_count
from engine.strategies import Strategy


def train_step(strategy: Strategy, optimizer: torch.optim.Optimizer, batches: list[dict],
               max_grad_norm: float) -> tuple[float, float, int]:
    """Forward/backward this rank's micro-batches, clip, step. Returns (global loss, grad norm, global tokens).

    The host waits for the device once, at the end, to read those three numbers together: the token count, the
    losses and the norm stay on the device until then (on a GPU, the host queues the whole step ahead of it)."""
    strategy.set_training()
    local = sum(answer_token_count(batch["labels"]) for batch in batches)  # on the host, where batches are collated
    tokens = strategy.data_ranks.summed(torch.full((), local, dtype=torch.float64, device=strategy.runtime.device))
    loss = strategy.forward_backward(batches, tokens.float())  # exact: counts below 2**24 are whole in fp32
    grad_norm = strategy.clip_(max_grad_norm)
    optimizer.step()
    loss, grad_norm, tokens = torch.stack([loss.double(), grad_norm.double(), tokens]).tolist()
    return loss, grad_norm, int(tokens)
