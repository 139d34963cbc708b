"""The lean-memory pieces against independent references: stochastic rounding, the lean AdamW
(torch's AdamW, bitsandbytes' AdamW8bit), and the answer-only chunked loss (F.cross_entropy over
the full logits)."""

import io

import bitsandbytes as bnb
import pytest
import torch

import engine.loss
from engine.loss import IGNORE, answer_loss, logits_loss
from engine.optim.adamw import AdamW, stochastic_round
from engine.optim.offload import HostAdamW
from engine.plan.memory_trace import MemoryTrace
from lora.lora_linear import LoRALinear


def _bf16_neighbours(value: float) -> tuple[float, float]:
    """The bf16 numbers just below and above `value` (truncation of the fp32 bits, and one step up)."""
    low = torch.tensor([value]).view(torch.int32).bitwise_and(-65536).view(torch.float32)
    high = (low.view(torch.int32) + 65536).view(torch.float32)
    return float(low) if value > 0 else float(high), float(high) if value > 0 else float(low)


@pytest.mark.parametrize("value", [1.0 + 2**-10, -0.3, 1e-5, 12345.678, -7.77e-3])
def test_stochastic_rounding_is_unbiased(value):
    draws = 200_000
    x = torch.full((draws,), value)
    rounded = stochastic_round(x, torch.Generator().manual_seed(0)).double()
    low, high = _bf16_neighbours(float(x[0]))
    assert set(rounded.unique().tolist()) <= {low, high}  # always one of the two neighbours
    # Each draw is `low` plus a Bernoulli(p) times the step, p = the remainder's share of the step:
    # the mean of `draws` has standard deviation step * sqrt(p (1 - p) / draws); allow 5 of them.
    step, exact = high - low, float(x[0].double())
    p = (exact - low) / step
    sigma = abs(step) * (p * (1 - p) / draws) ** 0.5
    assert abs(float(rounded.mean()) - exact) <= 5 * sigma + 1e-12 * abs(exact)


def _regression(dtype: torch.dtype, make, lr: float, steps: int = 50) -> tuple[torch.Tensor, list[float]]:
    """A least-squares fit of 32x32 weights by `make(params, lr)`; the weights (fp32) and every step's
    loss. The loss is computed in fp32 from the stored weights, so only their rounding differs."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 32).to(dtype))
    x = torch.randn(256, 32)
    target = x @ torch.randn(32, 32) * 0.5
    optimizer, losses = make([weight], lr), []
    for _ in range(steps):
        loss = (x @ weight.float().T - target).square().mean()
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return weight.detach().float(), losses


def test_bf16_adamw_with_stochastic_rounding_tracks_fp32_where_plain_bf16_stalls():
    lr = 1e-4  # a fine-tuning step: a few hundredths of these weights' bf16 step
    _, fp32 = _regression(torch.float32, lambda p, lr: torch.optim.AdamW(p, lr=lr), lr)
    _, rounded = _regression(torch.bfloat16, lambda p, lr: AdamW(p, lr=lr, moments="bf16"), lr)
    _, plain = _regression(torch.bfloat16, lambda p, lr: torch.optim.AdamW(p, lr=lr), lr)  # rounds to nearest

    def gap(losses):
        return max(abs(a - b) for a, b in zip(losses, fp32, strict=True))

    assert gap(plain) > 0.5 * (fp32[0] - fp32[-1])  # plain bf16 loses most of the progress
    assert gap(rounded) < 0.1 * gap(plain)


def _steps(make, dtype=torch.float32, steps=12) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3000, 7).to(dtype))  # 21000 weights: 82 blocks, the last partial
    optimizer = make([param])
    for step in range(steps):
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        optimizer.step()
    return param.detach().float(), optimizer


def test_fp32_moments_are_torch_adamw_bit_for_bit():
    ours, _ = _steps(lambda p: AdamW(p, lr=1e-3, weight_decay=0.01))
    torchs, _ = _steps(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
    assert torch.equal(ours, torchs)


def test_8bit_moments_match_bitsandbytes_adamw8bit():
    ours, optimizer = _steps(lambda p: AdamW(p, lr=1e-3, weight_decay=0.01, moments="8bit"))
    theirs, _ = _steps(lambda p: bnb.optim.AdamW8bit(p, lr=1e-3, weight_decay=0.01, min_8bit_size=0))
    exact, _ = _steps(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01))
    # Both quantize the same moments with the same maps and blocks: they differ by far less than
    # either differs from fp32 moments (the 8-bit error itself).
    assert (ours - theirs).abs().max() < 0.1 * (theirs - exact).abs().max()
    state = next(iter(optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_scale"].numel() == -(-21000 // 256)


SAVABLE = {  # optimizers whose state_dict must continue a run bit for bit, and the dtype of their weights
    "8bit, bf16 weights": (lambda p, seed: AdamW(p, lr=1e-3, moments="8bit", seed=seed), torch.bfloat16),
    "bf16": (lambda p, seed: AdamW(p, lr=1e-3, moments="bf16", seed=seed), torch.bfloat16),
    "8bit, fp32 weights": (lambda p, seed: AdamW(p, lr=1e-3, moments="8bit", seed=seed), torch.float32),
    "offloaded": (lambda p, seed: HostAdamW([{"params": p}], lr=1e-3), torch.bfloat16),
}


@pytest.mark.parametrize("kind", list(SAVABLE))
def test_a_saved_and_reloaded_optimizer_continues_bit_identically(kind):
    make, dtype = SAVABLE[kind]
    straight, _ = _steps(lambda p: make(p, 3), dtype, steps=6)
    half, optimizer = _steps(lambda p: make(p, 3), dtype, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    param = torch.nn.Parameter(half.to(dtype))
    resumed = make([param], 99)  # a seed is overridden by the saved generator
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for step in range(3, 6):
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        resumed.step()
    assert torch.equal(param.detach().float(), straight)


@pytest.mark.parametrize("moments, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("8bit", torch.bfloat16)])
def test_the_planners_step_holds_what_a_step_holds(moments, dtype):
    """`plan_step` updates one parameter of each kind: over a first and a second step of parameters of repeated
    kinds, the most held and what stays held are a real `step`'s, byte for byte, as MemoryTrace counts them. Updating
    each kind's first parameter instead of its last would miss the first step's peak, with all the state made."""
    def held(planned: bool) -> list[tuple[int, int]]:
        shapes = [(1000, 3), (50,), (300, 7), (1000, 3), (50,), (300, 7)]
        with MemoryTrace() as trace:
            params = [torch.nn.Parameter(torch.ones(shape, dtype=dtype)) for shape in shapes]
            optimizer = AdamW(params, lr=1e-3, moments=moments)
            counts = []
            for _ in range(2):
                for param in params:
                    param.grad = torch.ones_like(param)
                trace.at_peak_of(lambda: 0)
                optimizer.plan_step() if planned else optimizer.step()
                counts.append((trace.peak, trace.live))
        return counts

    assert held(planned=True) == held(planned=False)


def test_8bit_state_keeps_its_dtypes_through_a_reload():
    _, optimizer = _steps(lambda p: AdamW(p, lr=1e-3, moments="8bit"), torch.bfloat16, steps=1)
    reloaded = AdamW([torch.nn.Parameter(torch.zeros(3000, 7, dtype=torch.bfloat16))], lr=1e-3, moments="8bit")
    reloaded.load_state_dict(optimizer.state_dict())  # torch's own would cast the codes to bf16
    state = next(iter(reloaded.state.values()))
    assert (state["exp_avg"].dtype, state["exp_avg_scale"].dtype) == (torch.uint8, torch.float32)


def test_offloaded_masters_follow_fp32_adamw_exactly_and_the_device_holds_them_rounded():
    """bf16 weights on the device; gradients from real backwards, cleared by zero_grad between steps
    (a device gradient left over would accumulate into the next step's)."""
    torch.manual_seed(0)
    device = torch.nn.Parameter(torch.randn(300, 7).bfloat16())
    reference = torch.nn.Parameter(device.detach().float())
    offloaded = HostAdamW([{"params": [device]}], lr=1e-3, weight_decay=0.01)
    plain = torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.01)
    for step in range(5):
        target = torch.randn(300, 7, generator=torch.Generator().manual_seed(step))
        (device.float() * target).sum().backward()
        reference.grad = device.grad.float()
        offloaded.step(), plain.step()
        offloaded.zero_grad(), plain.zero_grad()
        assert device.grad is None
    master = offloaded.param_groups[0]["params"][0]
    assert torch.equal(master, reference) and master.device.type == "cpu" and master.dtype == torch.float32
    assert torch.equal(device, reference.detach().bfloat16())


# ---- the loss ------------------------------------------------------------------------------------


def _loss_inputs(head_kind: str, dtype=torch.float32):
    """Hidden states, an output layer (plain and trained, plain and frozen, or frozen with a LoRA
    adapter) and labels with prompt and padding positions."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=generator).to(dtype).requires_grad_()
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=generator) * 0.3)
    head.weight.requires_grad_(head_kind == "trained")
    if head_kind == "adapter":
        head = LoRALinear(head, r=4, alpha=8)
        with torch.no_grad():
            head.lora_A.weight.copy_(torch.randn(4, 16, generator=generator) * 0.1)
            head.lora_B.weight.copy_(torch.randn(50, 4, generator=generator) * 0.1)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[:, :4] = IGNORE  # prompt
    labels[2, 8:] = IGNORE  # padding
    return hidden, head, labels


@pytest.mark.parametrize("head_kind", ["trained", "frozen", "adapter"])
def test_chunked_answer_loss_equals_cross_entropy_over_full_logits(head_kind, monkeypatch):
    monkeypatch.setattr(engine.loss, "CHUNK", 5)  # 17 answer positions: four chunks, the last partial
    results = []
    for loss_fn in (answer_loss, logits_loss):
        hidden, head, labels = _loss_inputs(head_kind)
        loss = loss_fn(hidden, head, labels)
        (loss * 0.7).backward()  # a scale, as the trainer's division by the global token count
        results.append((loss, hidden.grad, {n: p.grad for n, p in head.named_parameters() if p.requires_grad}))
    (loss, grad_hidden, grads), (expected, expected_hidden, expected_grads) = results
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_hidden, expected_hidden)
    assert grads.keys() == expected_grads.keys() == {"trained": {"weight"}, "frozen": set(),
                                                     "adapter": {"lora_A.weight", "lora_B.weight"}}[head_kind]
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name])
    with torch.no_grad():  # validation: no gradients worked out
        torch.testing.assert_close(answer_loss(*_loss_inputs(head_kind)), expected.detach())


def test_chunked_answer_loss_under_bf16_autocast_matches_autocast_full_logits(monkeypatch):
    monkeypatch.setattr(engine.loss, "CHUNK", 5)
    results = []
    for loss_fn in (answer_loss, logits_loss):
        hidden, head, labels = _loss_inputs("trained", torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(hidden, head, labels)
        loss.backward()
        results.append((loss, hidden.grad, head.weight.grad))
    for ours, theirs in zip(*results, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


def test_the_loss_keeps_nothing_of_vocabulary_size_for_backward():
    """What autograd saves for backward holds no tensor with a vocabulary-sized dimension: neither
    the logits nor their gradient exist beyond one chunk in forward."""
    hidden, head, labels = _loss_inputs("frozen")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        answer_loss(hidden, head, labels)
    assert saved and all(50 not in shape for shape in saved)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        logits_loss(hidden, head, labels)
    assert any(50 in shape for shape in saved)  # the check can fail: the plain loss does keep logits
