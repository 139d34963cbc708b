"""Loss normalisation and the optimisation defaults, against values worked out independently."""

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from engine.loss import IGNORE, answer_token_count, summed_token_loss
from engine.optim.optimizer import adamw, cosine_with_warmup, scaled_lr, warmup_steps


def test_summed_loss_matches_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[IGNORE, 1, 2]])  # position t predicts labels[t + 1]
    # position 0 predicts label 1 from logits [2, 0, 0]; position 1 predicts label 2 from [0, 1, 0]
    expected = -math.log(1 / (math.e**2 + 2)) - math.log(1 / (1 + math.e + 1))
    assert answer_token_count(labels) == 2
    assert torch.isclose(summed_token_loss(logits, labels), torch.tensor(expected))


def test_ignored_positions_carry_no_loss():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE)
    assert answer_token_count(labels) == 0
    assert summed_token_loss(logits, labels) == 0


def test_schedule_matches_hf_cosine_with_warmup():
    total = 37
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    ours_schedule = cosine_with_warmup(ours, total, 0.03)
    theirs_schedule = get_cosine_schedule_with_warmup(theirs, warmup_steps(total, 0.03), total)
    for _ in range(total):
        assert math.isclose(ours_schedule.get_last_lr()[0], theirs_schedule.get_last_lr()[0], rel_tol=1e-12,
                            abs_tol=1e-18)
        ours.step(), theirs.step()
        ours_schedule.step(), theirs_schedule.step()
    assert warmup_steps(100, 0.03) == 3


def test_adamw_does_not_decay_biases_or_norm_scales():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    optimizer = adamw(model.parameters(), 1e-3, (0.9, 0.999), 0.01)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 2  # linear bias + norm bias; frozen scale left out


def test_lr_scaling_by_global_batch_over_the_reference_batch():
    assert scaled_lr(1e-5, "none", 16, 4) == 1e-5
    assert scaled_lr(1e-5, "sqrt", 16, 4) == pytest.approx(2e-5)
    # The original's FSDP runs, from its one-GPU full fine-tuning batch of 10 at 1e-5 (its README's footnote 5)
    assert round(scaled_lr(1e-5, "sqrt", 2 * 14, 10), 6) == 1.7e-5 and scaled_lr(1e-5, "sqrt", 4 * 10, 10) == 2e-5
    from engine.config import TrainConfig
    assert TrainConfig().lr_reference_batch == 10
    assert scaled_lr(1e-5, "linear", 16, 4) == pytest.approx(4e-5)
    assert scaled_lr(1e-5, "sqrt", 8, 8) == 1e-5  # a global batch of the reference size needs no scaling
