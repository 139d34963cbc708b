"""What each rank of a run will hold on its device, worked out before any weight exists.

Every rank's training step runs as the engine runs it -- the strategy's own build, sharding or
stage, the approach, the optimizer, `train_step` -- on fake tensors (shapes and dtypes, no data:
engine/plan/memory_trace.py), with the real batch that will be the widest of the data set. Ranks of a
parallel run are played one at a time in one process, each in a fake process group of the run's
size, so every collective has its real shapes. An 8B model costs no memory; a step of it takes seconds to trace.

A GPU plan runs on CPU fakes (fake CUDA tensors cannot run backward without a GPU), corrected for
what differs on CUDA: the caching allocator's 512-byte blocks, the fused AdamW kernel (the engine's
choice on a GPU: no temporaries), dropout's 1-byte masks (CPU keeps a mask as wide as the input), and
autocast's fp32 ops (CUDA runs layer_norm, softmax and others in fp32 where CPU keeps bf16):
engine/plan/cuda_rules.py.

Per rank: the bytes of parameters (by dtype), buffers, gradients and optimizer state; the bytes held
between steps (everything still live after the optimizer step and zero_grad -- weights, optimizer
state, DDP's buckets -- what torch.cuda.memory_allocated() says then); the peak, the most live at once
during a step; and the activations at that peak: what the step had added by then, less the
gradients (saved activations, gathered weights, communication buffers, temporaries, the batch); and with
--select-by a text metric, the most held while the training model answers the select rows (`select_added`).
"""

import collections
import contextlib
import dataclasses
import gc
import io
from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.build import apply_approach
from engine.config import TrainConfig
from engine.metrics import memory_breakdown
from engine.optim.adamw import AdamW
from engine.optim.optimizer import optimizer_for
from engine.plan.cuda_rules import cuda_autocast, cuda_dropout
from engine.plan.evaluation import Selecting, answer
from engine.plan.memory_trace import CUDA_BLOCK, MemoryTrace, RealShapes
from engine.precision import Precision
from engine.runtime import Runtime
from engine.select import evaluating
from engine.step import train_step
from engine.strategies import FSDP, STRATEGIES, PipelineParallel, Strategy, strategy_for
from models.lazy import build_on_meta
from parallel import fsdp

CPU = torch.device("cpu")


@dataclasses.dataclass(kw_only=True)
class RankPlan:
    rank: int
    param_bytes: int
    param_bytes_by_dtype: dict[str, int]
    buffer_bytes: int  # NF4 weights (buffers, not parameters) and rotary tables
    grad_bytes: int
    optimizer_bytes: int  # on the device
    host_optimizer_bytes: int  # --optimizer-offload cpu on a GPU: fp32 masters and moments, and the pinned slots
    held_bytes: int  # between steps: parameters, buffers, optimizer state
    activation_bytes: int
    peak_bytes: int
    checkpoint_bytes: int  # this rank's piece of a checkpoint (0: another rank writes it)
    model_bytes: int  # the whole model in the frozen weights' dtype: a full export, or OUT/base
    export_bytes: int  # OUT/final: the whole model, or the adapter
    export_peak_bytes: int  # the most held while OUT/final is written: what training holds, and the export's copies
    select_peak_bytes: int  # --select-by a text metric: the most held while answering the select rows; else 0


def plan_ranks(config: TrainConfig, precision: Precision, batch: dict[str, torch.Tensor], gpu: bool,
               selecting: Selecting | None = None) -> list[RankPlan]:
    """Each rank's plan for one step on `batch` (one rank's micro-batch; a pipeline's whole batch), and for
    `selecting`'s answers. Replicas and shards are alike, so rank 0 stands for all of them; pipeline stages are
    each planned."""
    world = config.gpus or 1
    ranks = range(1) if STRATEGIES[config.parallel].alike_ranks else range(world)
    plans = [plan_rank(config, precision, batch, rank, world, gpu, selecting) for rank in ranks]
    return [dataclasses.replace(plans[0], rank=rank) for rank in range(world)] if len(plans) == 1 else plans


def plan_rank(config: TrainConfig, precision: Precision, batch: dict[str, torch.Tensor], rank: int, world: int,
              gpu: bool, selecting: Selecting | None = None) -> RankPlan:
    model, _ = build_on_meta(config.model, precision.frozen_dtype, config.attn_implementation)
    # A GPU run with --optimizer-offload cpu keeps the masters and moments in host memory and steps there.
    on_host = gpu and config.optimizer_offload == "cpu"
    trace = MemoryTrace(CUDA_BLOCK if gpu else 1)  # from the first weight on: the state a step replaces is seen freed
    with fake_world(rank, world), FakeTensorMode(allow_non_fake_inputs=True), RealShapes(), cuda_dropout(gpu), \
            cuda_autocast(gpu), contextlib.redirect_stdout(io.StringIO()), trace:  # (stdout: apply_approach's line)
        runtime = Runtime(CPU, rank, world, precision)
        strategy = strategy_for(config, runtime)
        strategy.adopt(model, read=lambda name, start, stop: torch.empty(stop - start))
        apply_approach(model, config, runtime)
        strategy.prepare(model)
        make = partial(optimizer_for, config, precision, strategy.parameters(), config.lr, fused=gpu or None)
        optimizer = trace.ignoring(make) if on_host else make()
        step = partial(traced_step, trace, strategy, optimizer, batch, config, on_host)
        if strategy.first_step_differs:
            steps = [step()]
        else:  # the first step is the second's ops with less held: only the optimizer state it leaves is needed
            first = partial(with_state, optimizer, strategy)
            trace.ignoring(first) if on_host else first()
            steps = []
        steps.append(step())
        host_bytes = optimizer.host_bytes() if on_host else 0  # engine/optim/offload.py
        held = trace.live  # between steps, as torch.cuda.memory_allocated() after one
        select_peak = held + select_added(trace, strategy, selecting) if selecting else 0
        export_peak = held + export_added(trace, strategy, precision, config.trains_adapter)
        by_dtype = collections.Counter()
        for p in (p for part in strategy.parts for p in part.parameters()):
            by_dtype[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
        trainable, total = strategy.parameter_counts()
        writes = strategy.writes_checkpoints
    model_bytes = total * precision.frozen_dtype.itemsize
    export = trainable * precision.trained_dtype.itemsize if config.trains_adapter else model_bytes
    peak, activations = at_fullest(steps)
    memory = steps[-1].memory  # while the gradients exist, as a run measures it
    optimizer_bytes = 0 if on_host else memory["optimizer_bytes"]
    return RankPlan(rank=rank, param_bytes=memory["param_bytes"], param_bytes_by_dtype=dict(by_dtype),
                    buffer_bytes=memory["buffer_bytes"], grad_bytes=memory["grad_bytes"],
                    optimizer_bytes=optimizer_bytes,
                    host_optimizer_bytes=host_bytes, held_bytes=held,
                    activation_bytes=activations, peak_bytes=peak,
                    checkpoint_bytes=memory["grad_bytes"] + memory["optimizer_bytes"] if writes else 0,
                    model_bytes=model_bytes, export_bytes=export, export_peak_bytes=export_peak,
                    select_peak_bytes=select_peak)


@dataclasses.dataclass
class TracedStep:
    memory: dict[str, int]  # memory_breakdown while the step's gradients exist
    before: int  # bytes live as the step began
    peak: int  # the most live during the step
    grads: int  # the gradients' bytes at that moment


def traced_step(trace: MemoryTrace, strategy, optimizer: torch.optim.Optimizer, batch: dict, config: TrainConfig,
                on_host: bool = False) -> TracedStep:
    """One `train_step` and its zero_grad under `trace` (entered before the model was built); `on_host`: the
    optimizer's step is the host's, not counted. On a GPU the batch is copied there: a plan's batch is real
    CPU tensors, copied here too, so that they count."""
    params = [p for part in strategy.parts for p in part.parameters()]
    trace.at_peak_of(lambda: sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))
    before = trace.live
    step = optimizer.step
    planned = optimizer.plan_step if isinstance(optimizer, AdamW) else step  # the engine's: the same most, sooner
    optimizer.step = (lambda: trace.ignoring(planned)) if on_host else planned
    batch = {key: value.clone() for key, value in batch.items()}
    train_step(strategy, optimizer, [batch] * min(config.grad_accum, 2), config.max_grad_norm)
    memory = memory_breakdown(strategy.parts, optimizer)
    optimizer.zero_grad(set_to_none=True)
    optimizer.step = step
    return TracedStep(memory, before, trace.peak, trace.at_peak)


def export_added(trace: MemoryTrace, strategy: Strategy, precision: Precision, adapter: bool) -> int:
    """What writing OUT/final adds on this rank's device to what training holds, as engine/outputs/export.py writes
    each strategy's (the best checkpoint it reads first goes to the CPU, then into the weights in place).
    A whole model is cast to the frozen dtype wherever it is in another, the casts of a piece kept until it
    is written: the main rank's whole model at once, a pipeline stage's own weights, or under FSDP one unit
    at a time, each first gathered whole (pipeline+fsdp gathers its stage's units all), the writer keeping
    its last unit while it gathers the next: as the writer, rank 0 stands for FSDP's other ranks, which
    drop each unit as they get it. An adapter goes
    to the CPU tensor by tensor, once FSDP has gathered it whole; a pipeline's stages send theirs to the main
    rank by all_gather_object, whose pickled bytes NCCL carries in device buffers, one sent and one received
    from every rank, each as large as the largest stage's: counted as the whole adapter's bytes each (the
    fake group cannot carry objects)."""
    def cast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().to(precision.frozen_dtype) if tensor.is_floating_point() else tensor
                for name, tensor in tensors.items()}

    gc.collect()  # the step's reference cycles go now, not at a moment inside the export that the count would miss
    before = trace.live
    trace.at_peak_of(lambda: 0)
    held = []  # what the export keeps while it writes
    if isinstance(strategy, PipelineParallel):
        own = strategy.stage_weights(trainable_only=adapter)
        if adapter:
            pickled = strategy.parameter_counts()[0] * precision.trained_dtype.itemsize
            held.append(torch.empty((strategy.runtime.world_size + 1) * pickled, dtype=torch.uint8))
        elif own is not None:
            held.append(cast(own))
    elif isinstance(strategy, FSDP) and adapter:
        held.extend(fsdp.unit_state_dicts(strategy.model, trainable_only=True))  # every unit's adapter at once
    elif isinstance(strategy, FSDP):
        for unit in fsdp.unit_state_dicts(strategy.model):  # the writer keeps a unit while it gathers the next
            cast(unit)
    elif strategy.runtime.is_main and not adapter:
        cast(strategy.model.state_dict())
    return trace.peak - before


def select_added(trace: MemoryTrace, strategy: Strategy, selecting: Selecting) -> int:
    """What answering the select rows at an evaluation point adds to what training holds (engine/select.py: the
    training model in evaluation mode, its own forward), planned as evaluation's generate phase is: a prefill over
    the widest select prompt and all its new tokens, the KV cache at its full length (engine/plan/evaluation.py
    `answer`); for a pipeline, whose stages keep no cache, one forward of that whole sequence, stage by stage."""
    gc.collect()  # the step's reference cycles go now, not at a moment inside the answers that the count would miss
    before = trace.live
    trace.at_peak_of(lambda: 0)
    prompt = {key: value.clone() for key, value in selecting.prompt(selecting.rows(strategy)).items()}
    with evaluating(strategy.parts), torch.no_grad():
        if isinstance(strategy, PipelineParallel):
            strategy.next_token(selecting.processor, prompt)
        else:
            answer(strategy.model, prompt)
    return trace.peak - before


def with_state(optimizer: torch.optim.Optimizer, strategy: Strategy) -> None:
    """The optimizer's state as a first step leaves it (the engine's AdamW makes it; torch's takes one step on
    gradients of zeros): tracing the whole first step (half a plan's time on Idefics2-8B) would show nothing more
    where it runs the second step's ops with no optimizer state held until its end (`first_step_differs` False;
    tests/unit/engine/test_plan.py holds the plan to two real steps)."""
    if isinstance(optimizer, AdamW):  # the engine's: its state made as a step makes it, without the arithmetic
        optimizer.start_state()
        return
    params = strategy.parameters()
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def at_fullest(steps: list[TracedStep]) -> tuple[int, int]:
    """(the peak, the activations at it) of the fullest of `steps` (the first has no optimizer state until its
    end): what the step had added by then, less the gradients alive at that moment."""
    fullest = max(steps, key=lambda step: step.peak)
    return fullest.peak, fullest.peak - fullest.before - fullest.grads


@contextlib.contextmanager
def fake_world(rank: int, world: int) -> Iterator[None]:
    """This process as `rank` of a `world` whose collectives do nothing but have the real shapes."""
    if world == 1:
        yield
        return
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()

