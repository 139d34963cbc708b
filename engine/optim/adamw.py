"""AdamW with lean state: moments in fp32, bf16 or 8-bit blocks; bf16 weights updated by stochastic rounding.

torch's AdamW applied to a bf16 weight rounds every update to the nearest bf16 value: an update
smaller than half the weight's bf16 step (2^-9 of its size; a 1e-5 update to a weight of 0.01 is
half of that) is lost every time, and the run drifts from its fp32 counterpart. Here the update is
done in fp32 and the result rounded up with the probability of its remainder (`stochastic_round`),
so the expected bf16 weight is the fp32 one. bf16 moments are rounded the same way: with beta2 =
0.999 the second moment's increments are far below its bf16 step and would never land.

8-bit moments are bitsandbytes' blockwise dynamic quantization (its functional API, which runs on
CPU as on CUDA, so CI tests it) in blocks of 256 with an fp32 scale each, the signed map for the
first moment and the unsigned one for the second, as its AdamW8bit: every tensor is dequantized,
updated in fp32 and quantized again with fresh block scales. Unlike AdamW8bit, small tensors are
not left in fp32, so the state is exactly 2 bytes a weight plus 8 bytes per 256.

The update is torch.optim.AdamW's, operation for operation, on slices of at most `SLICE` weights,
so the fp32 temporaries stay small even for Idefics2-8B's 131M-weight embedding. The rounding
draws from one seeded generator whose state is part of `state_dict`: a resumed run rounds
exactly as the uninterrupted one, and DDP replicas (same seed, same gradients) stay identical.
"""

import math
from collections import defaultdict
from collections.abc import Iterable

import torch

from quant.bnb import bnbf

MOMENTS = ("fp32", "bf16", "8bit")
BLOCK = 256  # weights per 8-bit block, as bitsandbytes' 8-bit optimizers
SLICE = BLOCK * 65536  # 16M weights: the fp32 temporaries of one slice are about 300 MB


def stochastic_round(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`value` (fp32) to bf16, rounded away from zero with probability (remainder / bf16 step).

    bf16 is fp32 without the low 16 bits: adding 16 uniform random bits and truncating carries into
    the kept bits exactly with that probability, for either sign (the bits are sign and magnitude).
    """
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    bits = (value.contiguous().view(torch.int32) + noise).bitwise_and_(-65536)
    return bits.view(torch.float32).to(torch.bfloat16)


def _kind(param: torch.Tensor) -> tuple:
    """What an update's allocations depend on: the weight's and gradient's dtypes and the size."""
    return param.dtype, param.grad.dtype, param.numel()


def _block_scales(state: dict, name: str, part: slice, stored: torch.Tensor) -> torch.Tensor:
    """The fp32 scales of the 8-bit blocks that slice `part` of moment `name` (its codes: `stored`) spans;
    slices start on a block boundary (SLICE is a multiple of BLOCK)."""
    return state[f"{name}_scale"][part.start // BLOCK:-(-(part.start + stored.numel()) // BLOCK)]


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, moments: str = "fp32", seed: int = 0):
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, not {moments!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments, self.seed = moments, seed
        self.generator: torch.Generator | None = None  # made on the parameters' device at the first step
        self.maps: dict[bool, torch.Tensor] = {}  # signed?: bitsandbytes' dynamic 8-bit map

    def _rounding(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self.generator

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)

    @torch.no_grad()
    def plan_step(self) -> None:
        """A step as the planner needs it (engine/plan/ranks.py): every parameter's state as `step` leaves it, and
        the update's arithmetic for the last parameter of each kind (dtypes and size) alone. An update frees what it
        allocates before the next begins, so a step holds the most at the last update of some kind, with the state
        of every parameter before it made: the same most as `step`'s. Idefics2-8B's 566 updates on fake bf16
        weights were 10 s of a 40 s plan, and they are of at most 16 kinds."""
        updated = [(param, group) for group in self.param_groups for param in group["params"]
                   if param.grad is not None]
        last = {_kind(param): index for index, (param, _) in enumerate(updated)}
        for index, (param, group) in enumerate(updated):
            if last[_kind(param)] == index:
                self._update(param, group)
            else:
                self._state(param)["step"] += 1

    def start_state(self) -> None:
        """Every parameter's state as a first step leaves it, without the step's arithmetic: for the planner
        (engine/plan/ranks.py), where only what the state holds matters, and the arithmetic on Idefics2-8B's fake
        bf16 weights took 9 s of a 37 s plan."""
        for group in self.param_groups:
            for param in group["params"]:
                self._state(param)["step"] = 1

    def _state(self, param: torch.nn.Parameter) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = 0
            for name in ("exp_avg", "exp_avg_sq"):
                state.update(self._empty_moment(name, param))
        return state

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        state = self._state(param)
        state["step"] += 1
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bias1, bias2_sqrt = 1 - beta1 ** state["step"], math.sqrt(1 - beta2 ** state["step"])
        weights, grads = param.view(-1), param.grad.reshape(-1)
        for start in range(0, weights.numel(), SLICE):
            part = slice(start, start + SLICE)
            grad = grads[part].float()
            exp_avg, exp_avg_sq = self._read(state, "exp_avg", part), self._read(state, "exp_avg_sq", part)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            weight = weights[part].float()  # the weight itself when it is fp32
            weight.mul_(1 - lr * decay)
            weight.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
            if weights[part].dtype != torch.float32:  # else `weight` is the weight, updated in place
                weights[part].copy_(self._round(weight))
            self._write(state, "exp_avg", part, exp_avg)
            self._write(state, "exp_avg_sq", part, exp_avg_sq)

    # ---- where the moments live -------------------------------------------------------------------

    def _empty_moment(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.moments == "8bit":  # code 0 of either map is 0.0 only with a zero scale; scales start at 0
            self._map(name, param.device)  # made with the first state, as the state it quantizes with
            return {name: torch.zeros(param.numel(), dtype=torch.uint8, device=param.device),
                    f"{name}_scale": torch.zeros(-(-param.numel() // BLOCK), device=param.device)}
        dtype = torch.bfloat16 if self.moments == "bf16" else torch.float32
        return {name: torch.zeros(param.numel(), dtype=dtype, device=param.device)}

    def _map(self, name: str, device: torch.device) -> torch.Tensor:
        signed = name == "exp_avg"  # the second moment is never negative: all 256 codes for magnitudes
        if signed not in self.maps:
            self.maps[signed] = bnbf.create_dynamic_map(signed=signed).to(device)
        return self.maps[signed]

    def _read(self, state: dict, name: str, part: slice) -> torch.Tensor:
        """The fp32 value of a slice of a moment (a new tensor unless the moment is fp32)."""
        stored = state[name][part]
        if self.moments != "8bit":
            return stored.float()
        return bnbf.dequantize_blockwise(stored, absmax=_block_scales(state, name, part, stored),
                                         code=self._map(name, stored.device), blocksize=BLOCK)

    def _write(self, state: dict, name: str, part: slice, value: torch.Tensor) -> None:
        stored = state[name][part]
        if self.moments == "8bit":
            bnbf.quantize_blockwise(value, code=self._map(name, value.device),
                                    absmax=_block_scales(state, name, part, stored), out=stored, blocksize=BLOCK)
        elif stored.dtype != torch.float32:  # an fp32 moment was `value` itself, updated in place
            stored.copy_(self._round(value))

    def _round(self, value: torch.Tensor) -> torch.Tensor:
        return stochastic_round(value, self._rounding(value.device))

    # ---- checkpoints: exact, dtypes kept ------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's layout (state by parameter index) plus the rounding generator. Loaded by
        `load_state_dict` below, which keeps every dtype: torch's would cast 8-bit codes to floats."""
        params = [p for group in self.param_groups for p in group["params"]]
        return {"state": {index: dict(self.state[p]) for index, p in enumerate(params) if p in self.state},
                "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups],
                "moments": self.moments, "rounding": self._rounding(params[0].device).get_state()}

    def load_state_dict(self, saved: dict) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        if saved.get("moments") != self.moments or len(saved["param_groups"]) != len(self.param_groups):
            raise ValueError("the saved optimizer state is not of this optimizer's kind")
        for group, settings in zip(self.param_groups, saved["param_groups"], strict=True):
            group.update(settings)
        self.state = defaultdict(dict, {
            params[index]: {k: v.to(params[index].device) if torch.is_tensor(v) else v for k, v in state.items()}
            for index, state in saved["state"].items()})
        self._rounding(params[0].device).set_state(saved["rounding"])
