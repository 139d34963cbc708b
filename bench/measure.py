"""How every contender is measured, ours and the peers alike, on one rank.

A contender is a model, its optimizer and a `step(batches)` that runs one optimizer step
(forward, backward, clip, update) on this rank's micro-batches; the caller clears gradients.
Step time is the median of the timed steps after warm-up. Memory is counted in bytes of tensors,
not read from the process, so it is exact on a CPU and comparable between contenders that share a
process:

- params: every parameter and buffer this rank holds (a sharded one: its local shard; NF4 weights
  with their quant state), between steps;
- grads and optimizer: gradients after a step's backward, and the optimizer's state tensors (one
  shared by several parameters' states, as bitsandbytes' quantization maps, once);
- activations: the peak bytes autograd keeps for backward during a step (saved tensors, counted
  once per storage, not counting the storage of params), from `torch.autograd.graph` hooks. Inside
  activation-checkpointed blocks nothing is kept (and so nothing counted) but their inputs, which
  are not saved tensors either. Weights gathered by FSDP and kept for backward do count.

On a GPU the allocator's peak during a step is reported too (`peak_bytes`).
"""

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode

Batches = list[dict[str, torch.Tensor]]


@dataclass
class Contender:
    model: nn.Module  # what holds this rank's weights
    optimizer: torch.optim.Optimizer
    step: Callable[[Batches], None]


@dataclass
class Measurement:
    step_s: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    peak_bytes: int | None = None  # the CUDA allocator's peak during a step
    flops: float | None = None  # counted matmul FLOPs of one step (forward and backward)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tensor_bytes(tensors: Iterable[torch.Tensor], quant_states: Iterable[object] = ()) -> int:
    """Bytes held on this rank: a DTensor counts its local shard, a meta tensor nothing, and every
    bitsandbytes 4-bit quant state (absmax, nested absmax and code), a tensor's own or of `quant_states`, once."""
    total, states = 0, {id(state): state for state in quant_states}
    for tensor in tensors:
        tensor = _local(tensor)
        if tensor.is_meta:
            continue
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            states[id(state)] = state
    for state in states.values():
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
            state = state.state2 if state.nested else None
    return total


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """params, grads and optimizer bytes this rank holds now (grads: call after a backward). A bitsandbytes
    4-bit layer whose weight FSDP sharded keeps the quant state itself (its shard is a plain tensor)."""
    params = list(model.parameters())
    layer_states = [m.quant_state for m in model.modules() if getattr(m, "quant_state", None) is not None]
    return {
        "param_bytes": tensor_bytes([*params, *model.buffers()], layer_states),
        "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
        "optimizer_bytes": tensor_bytes({id(t): t for s in optimizer.state.values() for t in s.values()
                                         if torch.is_tensor(t)}.values()),
    }


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward while they are alive, and their peak.

    A storage saved by several operations counts once; it stops counting when autograd has
    released its last saved reference (after the backward that used it, or with the graph).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {_local(t).untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = self.peak = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> "SavedTensors":
        super().__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = _local(tensor).untyped_storage()
        pointer = storage.data_ptr()
        if tensor.is_meta or pointer in self.excluded or pointer == 0:
            return tensor
        return _Counted(self, tensor, pointer, storage.nbytes())

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Counted) else packed


class _Counted:
    """One saved reference; when autograd drops it, its storage may stop counting."""

    def __init__(self, meter: SavedTensors, tensor: torch.Tensor, pointer: int, nbytes: int):
        self.meter, self.tensor, self.pointer = meter, tensor, pointer
        entry = meter.live.setdefault(pointer, [0, nbytes])
        if entry[0] == 0:
            meter.current += nbytes
            meter.peak = max(meter.peak, meter.current)
        entry[0] += 1

    def __del__(self):
        entry = self.meter.live[self.pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.meter.current -= entry[1]
            del self.meter.live[self.pointer]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(contender: Contender, batches: Batches, device: torch.device, count_flops: bool) -> Measurement:
    """One step with memory and (on request) FLOPs counted; the step time is filled in later."""
    persistent = [*contender.model.parameters(), *contender.model.buffers()]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flop_counter = FlopCounterMode(display=False) if count_flops else None
    with SavedTensors(exclude=persistent) as saved, flop_counter or contextlib.nullcontext():
        contender.step(batches)
    _synchronize(device)
    held = held_bytes(contender.model, contender.optimizer)
    contender.optimizer.zero_grad(set_to_none=True)
    return Measurement(step_s=0.0, activation_bytes=saved.peak, **held,
                       peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                       flops=float(flop_counter.get_total_flops()) if flop_counter else None)


def measure(contenders: dict[str, Contender], batches: Batches, device: torch.device, warmup: int, steps: int,
            count_flops: bool = False) -> dict[str, Measurement]:
    """Warm-up steps, one counted step, then `steps` timed steps of each contender, taking turns a
    step at a time (each round starting with the next one), so load from elsewhere on the machine
    falls on all of them alike. Every rank must call this with the same contenders."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name].step(batches)
            contenders[name].optimizer.zero_grad(set_to_none=True)
    results = {name: _profile(contenders[name], batches, device, count_flops) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(steps):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            _synchronize(device)
            start = time.perf_counter()
            contenders[name].step(batches)
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            contenders[name].optimizer.zero_grad(set_to_none=True)
    for name in names:
        results[name].step_s = statistics.median(times[name])
    return results
