"""The training loop: one readable function from config to OUT/final and OUT/summary.json.

Per optimizer step: take this rank's micro-batches (collated ahead by --data-workers processes:
engine/data/loader.py), count the answer tokens of the whole global batch, let the strategy run forward
and backward with that divisor (so the gradient is the exact global mean), clip by the global norm,
step. Every `eval_every` of the run: validation loss (with --select-by a text metric, also that metric
of the answers to the select rows: engine/select.py), TensorBoard point, atomic checkpoint. A loss or
gradient norm of inf or nan stops the run at that step, before anything of it is saved. Resume restores
the trainable weights, optimizer, scheduler and RNG; the data position is the step number itself (see
BatchOrder). Everything that depends on the parallelism is the strategy's (engine/strategies/); nothing
here asks which one runs.
"""

import contextlib
import functools
import math
import random
import time
from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm
from transformers import ProcessorMixin

from engine.config import TrainConfig, result_settings
from engine.data.batches import BatchOrder
from engine.data.checks import check_data
from engine.data.collate import Collator
from engine.data.fingerprint import data_fingerprint
from engine.data.loader import Batches, RunBatches, batches_ahead
from engine.data.sources import data_settings, load_splits
from engine.device_memory import phase_peak
from engine.optim.optimizer import cosine_with_warmup, optimizer_for, scaled_lr
from engine.outputs import checkpoint
from engine.outputs.folder import SPLITS_JSON, claimed, prepare_for_run
from engine.outputs.publish import write_json
from engine.resume import refuse_finished, resume
from engine.runtime import Runtime, setup_runtime
from engine.select import Score, Selection, selection_for
from engine.step import train_step
from engine.strategies import Strategy, strategy_for
from engine.tensorboard import Scalars, check_port_free, serve
from errors import UsageError


@dataclass(kw_only=True)
class Run:
    """Everything a run builds before its first step."""
    config: TrainConfig
    runtime: Runtime
    strategy: Strategy
    processor: ProcessorMixin
    splits: dict
    order: BatchOrder  # which rows each step takes
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    fingerprint: dict
    start: int
    selection: Selection | None  # --select-by a text metric: the rows answered at every evaluation point


@record  # a rank's exception reaches the launching process's report
def train(config: TrainConfig, score: Score | None = None) -> dict:
    """The run, from its config to OUT/final and OUT/summary.json; `score`: the text metrics of answers, which
    --select-by other than val_loss needs (finetune.py gives eval/metrics.py's)."""
    run = setup(config, score)
    out, runtime = config.out, run.runtime
    scalars = Scalars(out / "tensorboard", enabled=runtime.is_main, resume_step=run.start)
    trainable, total = run.strategy.parameter_counts()
    scalars.text(run.start, "model/trainable_parameters",
                 f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    server = serve(out / "tensorboard", config.tensorboard_port) if config.tensorboard and runtime.is_main \
        else contextlib.nullcontext()
    started = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=run.start, disable=not runtime.is_main, desc=config.approach)
    # Closed on any error too, so an error message starts on a line of its own and no data worker outlives the loop.
    with server as url, bar, batches_of(run) as batches:
        if url:
            print(f"TensorBoard: {url}")
        step, history, stats = loop(run, scalars, bar, batches)
    wall = time.perf_counter() - started
    completed = step == run.total_steps
    phases = {"train": phase_peak(runtime.device)}  # each phase's own peak on a GPU, as the plan has them
    final = None
    if completed:
        final = chosen(run, run.strategy.export_final(run.processor, run.fingerprint), step)
        phases["export"] = phase_peak(runtime.device)
    # The rank's peak: its phases' on a GPU (each counted afresh); on the CPU the process's, never reset.
    peak = runtime.peak_memory_bytes() if None in phases.values() else max(phases.values())
    summary = {
        "approach": config.approach, "model": run.fingerprint["model"], "world_size": runtime.world_size,
        "completed": completed, "steps": step, "total_steps": run.total_steps,
        "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
        "final_val_loss": history["val_loss"][-1][1] if history["val_loss"] else None,
        "wall_time_s": wall, "mean_step_time_s": sum(stats["step_times"]) / max(1, len(stats["step_times"])),
        "mean_data_wait_s": stats["data_wait"] / max(1, len(stats["step_times"])),
        "mean_compute_s": stats["compute"] / max(1, len(stats["step_times"])),
        "samples_per_s": stats["rows"] / wall if wall else 0.0,
        "tokens_per_s": stats["tokens"] / wall if wall else 0.0,
        "select_time_s": stats["select_time"], "final": final,
        "trainable_params": trainable, "total_params": total, **run.strategy.quantized_summary(),
        "ranks": runtime.gather({"rank": runtime.rank, "peak_memory_bytes": peak, "phase_peak_bytes": phases,
                                 **stats["memory"], **run.strategy.rank_report()}),
        **run.strategy.run_report(), "history": history,
    }
    if runtime.is_main:
        write_json(out / "summary.json", summary)
    scalars.close()
    return summary


def setup(config: TrainConfig, score: Score | None) -> Run:
    """Ranks, data, this rank's model as its strategy prepares it, optimizer and schedule; resumed
    from the last checkpoint on --resume."""
    runtime = setup_runtime(config)
    config = config.resolved(gpu=runtime.device.type == "cuda")
    # The data first: a refusal of it leaves the output folder as it was, even under --overwrite.
    splits = load_splits(**data_settings(config))
    described = check_data(splits, config, config.model)  # every image decodes, every row fits: before the model loads
    selection = selection_for(config, splits["validation"], score)  # --select-rows checked before the model loads
    prepare_for_run(config.out, config.resume, config.overwrite, runtime)  # before the model loads
    # Same seed on every rank and in every world size: adapters start identical, dropout matches.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.resume:
        refuse_finished(config.out)
    if config.tensorboard and runtime.is_main:
        check_port_free(config.tensorboard_port)  # before any work, not after loading 8B weights
    if runtime.is_main:
        print(described)  # what --image-longest-edge and --image-splitting cost a row, before any weight loads
    strategy = strategy_for(config, runtime)
    with claimed(config.out, config.to_json(), runtime, config.resume):  # config.json first, before OUT/base
        processor = strategy.build(config.base_copy)
        order = BatchOrder(len(splits["train"]), config.batch_size, config.grad_accum, strategy.data_ranks.world_size,
                           config.seed)
        total_steps = config.max_steps or order.steps_per_epoch * config.epochs
        peak_lr = scaled_lr(config.lr, config.lr_scaling, order.global_batch, config.lr_reference_batch)
        optimizer = optimizer_for(config, runtime.precision, strategy.parameters(), peak_lr)
        scheduler = cosine_with_warmup(optimizer, total_steps, config.warmup_ratio)
        fingerprint = {"approach": config.approach, "model": config.model, "total_steps": total_steps,
                       "trainable": sorted(n for n, p in strategy.model.named_parameters() if p.requires_grad),
                       "global_batch": order.global_batch, "world_size": runtime.world_size,
                       "precision": runtime.precision.name, "settings": result_settings(config),
                       "data": data_fingerprint(splits),
                       # A metric of answers up to another length is another metric (the flag itself may change).
                       **({"select_max_new_tokens": config.max_new_tokens} if selection else {}),
                       **strategy.fingerprint()}
        start = resume(config.out / "checkpoints", strategy, optimizer, scheduler, fingerprint) if config.resume \
            else 0
    if runtime.is_main:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "config.json").write_text(config.to_json())
        if config.split_by is not None:  # which rows --split-by put where: to read, and for tools
            write_json(config.out / SPLITS_JSON, {name: [str(data_id) for data_id in split["data_id"]]
                                                  for name, split in splits.items()})
    return Run(config=config, runtime=runtime, strategy=strategy, processor=processor, splits=splits, order=order,
               total_steps=total_steps, optimizer=optimizer, scheduler=scheduler, fingerprint=fingerprint, start=start,
               selection=selection)


def loop(run: Run, scalars: Scalars, bar: tqdm, prepared: Batches) -> tuple[int, dict, dict]:
    """The steps from `run.start`, on the batches `prepared` for them; returns (the step reached, the loss history,
    timing and memory)."""
    config, strategy, order = run.config, run.strategy, run.order
    selection = run.selection
    history = {"train_loss": [], "grad_norm": [], "val_loss": [], **({selection.metric: []} if selection else {})}
    stats = {"step_times": [], "data_wait": 0.0, "compute": 0.0, "tokens": 0, "rows": 0, "memory": {},
             "select_time": 0.0}
    step = run.start
    while step < run.total_steps:
        tick = time.perf_counter()
        batches = prepared.step()
        waited = time.perf_counter() - tick  # for the workers' batches, or (--data-workers 0) for collating them
        stats["data_wait"] += waited
        rows = len(order.global_rows(step))  # a global batch, or fewer at an epoch's end
        loss, grad_norm, tokens = train_step(strategy, run.optimizer, batches, config.max_grad_norm)
        refuse_divergence(step + 1, config, training_loss=loss, gradient_norm=grad_norm)
        stats["memory"] = stats["memory"] or strategy.memory(run.optimizer)  # grads still exist: measured once
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - tick
        stats["step_times"].append(seconds)
        stats["compute"] += seconds - waited
        stats["tokens"] += tokens
        stats["rows"] += rows
        history["train_loss"].append((step, loss))
        history["grad_norm"].append((step, grad_norm))
        lr = run.scheduler.get_last_lr()[0]
        scalars.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                           "throughput/samples_per_s": rows / seconds,
                           "throughput/tokens_per_s": tokens / seconds,
                           "memory/peak_bytes": run.runtime.peak_memory_bytes(),
                           "time/data_wait_s": waited, "time/compute_s": seconds - waited})
        stopping = config.stop_after_steps is not None and step - run.start >= config.stop_after_steps
        val_loss, selected = None, {}
        if evaluates(run, step):
            val_loss = strategy.validation_loss(prepared.validation())
            refuse_divergence(step, config, validation_loss=val_loss)
            history["val_loss"].append((step, val_loss))
            scalars.log(step, {"eval/loss": val_loss})
            if selection is not None:
                tick = time.perf_counter()
                selected = {selection.metric: selection.measure(strategy, run.processor)}
                stats["select_time"] += time.perf_counter() - tick
                history[selection.metric].append((step, selected[selection.metric]))
                scalars.log(step, {f"select/{selection.metric}": selected[selection.metric]})
        shown = {name: f"{values[-1][1]:.3f}" for name, values in history.items()  # the latest of each
                 if name not in ("train_loss", "grad_norm") and values}
        bar.set_postfix(loss=f"{loss:.3f}", **shown, lr=f"{lr:.2e}", samples_s=f"{rows / seconds:.1f}")
        bar.update()
        if val_loss is not None or stopping:
            # Every rank's generators, for an exact resume.
            rng_by_rank = run.runtime.gather(checkpoint.rng_state(run.runtime.device))
            state = checkpoint.train_state(run.optimizer, run.scheduler, rng_by_rank)
            strategy.save_checkpoint(config.out / "checkpoints", step, state,
                                     dict(run.fingerprint, val_loss=val_loss, **selected), config.keep_last)
        if stopping:
            break
    return step, history, stats


def batches_of(run: Run) -> contextlib.AbstractContextManager[Batches]:
    """The run's batches in the loop's order, collated ahead by --data-workers processes (engine/data/loader.py)."""
    dataset = RunBatches(run.splits, Collator(run.processor, run.config.max_length), run.order,
                         run.strategy.data_ranks.rank)
    return batches_ahead(dataset, range(run.start, run.total_steps), functools.partial(evaluates, run),
                         run.config.data_workers, pin=run.runtime.device.type == "cuda")


def evaluates(run: Run, step: int) -> bool:
    """Whether the run measures the validation loss (and checkpoints) once `step` steps are done: every
    `eval_every` of the run, by HF Trainer's rounding (the original's cadence), and after the last step."""
    return step % max(1, math.ceil(run.total_steps * run.config.eval_every)) == 0 or step == run.total_steps


def chosen(run: Run, best: dict | None, step: int) -> dict:
    """What OUT/final holds, for summary.json: the best checkpoint's step and value (said in one line), or the
    last step's weights."""
    if best is None:
        return {"step": step, "select_by": None, "value": None}
    metric = run.config.select_by
    if run.runtime.is_main:
        print(f"final: step {best['step']} of {run.total_steps}, best {metric} {best[metric]:.4g}")
    return {"step": best["step"], "select_by": metric, "value": best[metric]}


def refuse_divergence(step: int, config: TrainConfig, **values: float) -> None:
    """Stops the run at `step` if a loss or gradient norm is inf or nan: before that step's checkpoint or the final
    export could save weights of nan. The numbers are global, so every rank stops here, together."""
    for name, value in values.items():
        if not math.isfinite(value):
            empty = "" if name == "validation_loss" else \
                ", or a batch holds no answer tokens (an empty answer, or too short a --max-length)"
            raise UsageError(f"step {step}: the {name.replace('_', ' ')} is {value:g}, so the run stopped before "
                             f"saving anything of it; the learning rate (--lr {config.lr:g}) is likely too "
                             f"high{empty}.")
