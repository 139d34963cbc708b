"""The training loop: one readable function from config to OUT/final and OUT/summary.json.

Per optimizer step: collate this rank's micro-batches, count the answer tokens of the whole
global batch, accumulate summed losses divided by that count (so the gradient is the exact
global mean), clip, step. Every `eval_every` of the run: validation loss, TensorBoard point,
atomic checkpoint. Resume restores model, optimizer, scheduler and RNG; the data position is
the step number itself (see BatchPlan).
"""

import contextlib
import json
import random
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from engine import checkpoint
from engine.batches import BatchPlan
from engine.build import build, wrap_parallel
from engine.collate import Collator
from engine.config import TrainConfig
from engine.data_sources import load_splits
from engine.errors import UsageError
from engine.export import export_adapter, export_pretrained, export_pretrained_by_rank, export_pretrained_by_unit
from engine.loss import answer_token_count, summed_token_loss
from engine.metrics import Scalars, memory_breakdown, parameter_counts
from engine.optim import adamw, cosine_with_warmup, scaled_lr
from engine.launch import setup_runtime
from engine.runtime import Runtime, resolve_model
from engine.tensorboard_server import check_port_free, serve
from eval.evaluate import evaluate_run
from parallel import clip, fsdp
from parallel.pipeline import Pipeline, bubble
from quant import quantized_bytes


@record  # a rank's exception reaches the launching process's report
def train(config: TrainConfig) -> dict:
    runtime = setup_runtime(config)
    if config.parallel in ("fsdp", "pipeline") and runtime.world_size < 2:
        raise UsageError(f"--parallel {config.parallel} needs 2 or more ranks (--gpus N, or torchrun); this run has 1.")
    # Same seed on every rank and in every world size: adapters start identical, dropout matches.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    out = config.out
    if config.tensorboard and runtime.is_main:
        check_port_free(config.tensorboard_port)  # before any work, not after loading 8B weights
    splits = load_splits(config.dataset, limit_exhibits=config.limit_exhibits)
    # The tiny model's exact starting point goes to OUT/base, so any tool can rebuild it.
    model, processor = build(config, runtime, out / "base" if resolve_model(config.model, runtime.device) == "tiny" else None)
    pipelined = config.parallel == "pipeline"
    # FSDP and pipeline ranks each save and load their own part; otherwise the main rank saves all.
    sharded = config.parallel in ("fsdp", "pipeline")
    shard = checkpoint.Shard(runtime.rank, runtime.world_size) if sharded else checkpoint.Shard()
    # The ranks that split the data: every pipeline rank sees the whole batch.
    data = Runtime(runtime.device) if pipelined else runtime
    collator = Collator(processor, config.max_length)
    trained = wrap_parallel(model, config, runtime)  # what runs forward/backward; `model` is what gets saved
    plan = BatchPlan(len(splits["train"]), config.batch_size, config.grad_accum, data.world_size, config.seed)
    if plan.steps_per_epoch == 0:
        raise UsageError(f"the train split has {plan.num_rows} rows, fewer than one global batch of {plan.global_batch}.")
    total_steps = config.max_steps or plan.steps_per_epoch * config.epochs
    eval_interval = max(1, round(total_steps * config.eval_every))
    peak_lr = scaled_lr(config.lr, config.lr_scaling, plan.global_batch, config.lr_reference_batch)
    optimizer = adamw(trained.stage if pipelined else model, peak_lr, config.betas, config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, total_steps, config.warmup_ratio)
    fingerprint = {
        "approach": config.approach, "model": resolve_model(config.model, runtime.device),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "total_steps": total_steps, "global_batch": plan.global_batch, "shards": shard.count,
        "stages": runtime.gather(list(trained.stage.bounds)) if pipelined else None,
    }
    start_step = resume(out / "checkpoints", model, optimizer, scheduler, fingerprint, shard) if config.resume else 0
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())

    scalars = Scalars(out / "tensorboard", runtime.is_main, start_step)
    trainable, total = parameter_counts(model)
    scalars.text(start_step, "model/trainable_parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    server = serve(out / "tensorboard", config.tensorboard_port) if config.tensorboard and runtime.is_main \
        else contextlib.nullcontext()
    history = {"train_loss": [], "grad_norm": [], "val_loss": []}
    memory, step_times, samples, tokens, idle = {}, [], 0, 0, []
    started = time.perf_counter()
    with server as url:
        if url:
            print(f"TensorBoard: {url}")
        bar = tqdm(total=total_steps, initial=start_step, disable=not runtime.is_main, desc=config.approach)
        step = start_step
        while step < total_steps:
            tick = time.perf_counter()
            batches = [collator([splits["train"][i] for i in rows]) for rows in plan.micro_batches(step, data.rank)]
            if pipelined:
                loss, grad_norm, step_tokens = pipeline_step(trained, optimizer, batches, config, runtime.device)
                idle.append(trained.last_idle_fraction)
            else:
                loss, grad_norm, step_tokens = train_step(trained, optimizer, batches, runtime, config.max_grad_norm)
            memory = memory or memory_breakdown(model, optimizer)  # grads still exist: measured once
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_times.append(time.perf_counter() - tick)
            samples, tokens = samples + plan.global_batch, tokens + step_tokens
            history["train_loss"].append((step, loss))
            history["grad_norm"].append((step, grad_norm))
            lr = scheduler.get_last_lr()[0]
            throughput = {"throughput/samples_per_s": plan.global_batch / step_times[-1],
                          "throughput/tokens_per_s": step_tokens / step_times[-1]}
            scalars.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                               **throughput, "memory/peak_bytes": runtime.peak_memory_bytes()})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", samples_s=f"{throughput['throughput/samples_per_s']:.1f}")
            bar.update()
            stopping = config.stop_after_steps is not None and step - start_step >= config.stop_after_steps
            val_loss = None
            if step % eval_interval == 0 or step == total_steps:
                val_loss = evaluate(trained, splits["validation"], collator, data, config.batch_size, config.micro_batches)
                history["val_loss"].append((step, val_loss))
                scalars.log(step, {"eval/loss": val_loss})
            if (runtime.is_main or sharded) and (val_loss is not None or stopping):
                save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler, fingerprint, val_loss,
                                config.keep_last, shard)
            if stopping:
                break
        bar.close()
    wall = time.perf_counter() - started

    completed = step == total_steps
    if completed and (runtime.is_main or sharded):
        export_final(out, model, processor, config, fingerprint, runtime, shard)
    summary = {
        "approach": config.approach, "model": fingerprint["model"], "world_size": runtime.world_size,
        "completed": completed, "steps": step, "total_steps": total_steps,
        "final_train_loss": history["train_loss"][-1][1] if history["train_loss"] else None,
        "final_val_loss": history["val_loss"][-1][1] if history["val_loss"] else None,
        "wall_time_s": wall, "mean_step_time_s": sum(step_times) / max(1, len(step_times)),
        "samples_per_s": samples / wall if wall else 0.0, "tokens_per_s": tokens / wall if wall else 0.0,
        "trainable_params": trainable, "total_params": total,
        **quantized_summary(model),
        "ranks": runtime.gather({"rank": runtime.rank, "peak_memory_bytes": runtime.peak_memory_bytes(), **memory,
                                 **(pipeline_report(trained, idle) if pipelined else {})}),
        **({"theoretical_bubble": bubble(runtime.world_size, config.micro_batches * config.grad_accum)} if pipelined else {}),
        "history": history,
    }
    if runtime.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if completed and not config.skip_eval:
        del model, trained, optimizer  # the evaluated model is OUT/final, loaded afresh on every rank
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
        summary["eval"] = evaluate_run(config, runtime, scalars, step)
        if runtime.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    scalars.close()
    return summary


def train_step(model, optimizer, batches: list[dict], runtime: Runtime, max_grad_norm: float) -> tuple[float, float, int]:
    """Forward/backward this rank's micro-batches, clip, step. Returns (global loss, grad norm, global tokens).

    Each micro-batch's summed loss is divided by the answer tokens of the whole global batch, so
    summing gradients over micro-batches and ranks gives exactly the global token mean.
    """
    model.train()
    answer_tokens = int(runtime.sum_over_ranks(sum(answer_token_count(b["labels"]) for b in batches)))
    local_loss = 0.0
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        # Gradients are reduced across ranks once, after the last micro-batch.
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with runtime.autocast():
                logits = model(**batch, use_cache=False).logits
            loss = summed_token_loss(logits, labels) / answer_tokens
            loss.backward()
        local_loss += loss.item()
    grad_norm = clip_gradients(model, max_grad_norm)
    optimizer.step()
    return runtime.sum_over_ranks(local_loss), grad_norm, answer_tokens


def clip_gradients(model, max_norm: float) -> float:
    """Clip to the global gradient norm and return it; FSDP's shards sum their squares over ranks."""
    if hasattr(model, "fsdp_units"):
        return fsdp.clip_grad_norm_(model, max_norm)
    return float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))


def pipeline_step(pipeline: Pipeline, optimizer, batches: list[dict], config: TrainConfig,
                  device: torch.device) -> tuple[float, float, int]:
    """`train_step` for a pipeline stage: every rank has the whole batch, cut into micro-batches
    that flow through the stages; each stage clips by the norm over all stages and steps its own part."""
    pipeline.stage.train()
    answer_tokens = sum(answer_token_count(b["labels"]) for b in batches)
    micro = [piece for batch in batches for piece in micro_batches(batch, config.micro_batches, device)]
    loss = pipeline.train_step(micro, answer_tokens)
    grad_norm = clip.clip_grad_norm_([p for p in pipeline.stage.parameters() if p.requires_grad], config.max_grad_norm)
    optimizer.step()
    return loss, grad_norm, answer_tokens


def micro_batches(batch: dict[str, torch.Tensor], count: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into `count` micro-batches of rows (fewer if it has fewer rows)."""
    pieces = {key: value.to(device).chunk(count) for key, value in batch.items()}
    return [{key: chunks[i] for key, chunks in pieces.items()} for i in range(len(pieces["input_ids"]))]


def pipeline_report(pipeline: Pipeline, idle: list[float]) -> dict:
    """This rank's stage (its decoder layers) and the measured fraction of its step time spent waiting."""
    return {"decoder_layers": list(pipeline.stage.bounds), "idle_fraction": sum(idle) / max(1, len(idle))}


@torch.no_grad()
def evaluate(model, split, collator: Collator, data: Runtime, batch_size: int, pipeline_micro_batches: int) -> float:
    """Validation loss averaged over every answer token of the split (not over batches or ranks).

    Every rank runs the same number of forwards, since an FSDP forward is a collective: a rank
    whose rows have run out repeats the split's first batch and does not count it. Pipeline ranks
    (`data` of one rank) all run every batch, each stage its part.
    """
    pipelined = isinstance(model, Pipeline)
    (model.stage if pipelined else model).eval()
    loss_sum, count = 0.0, 0
    stride = batch_size * data.world_size
    for start in range(data.rank * batch_size, -(-len(split) // stride) * stride, stride):
        counted = start < len(split)
        rows = range(start, min(start + batch_size, len(split))) if counted else range(min(batch_size, len(split)))
        batch = {k: v.to(data.device) for k, v in collator([split[i] for i in rows]).items()}
        if pipelined:
            loss = model.evaluate(micro_batches(batch, pipeline_micro_batches, data.device))
        else:
            with data.autocast():
                loss = float(summed_token_loss(model(**{k: v for k, v in batch.items() if k != "labels"},
                                                     use_cache=False).logits, batch["labels"]))
        if counted:
            loss_sum += loss
            count += answer_token_count(batch["labels"])
    return data.sum_over_ranks(loss_sum) / max(1, data.sum_over_ranks(count))


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: this rank's trainable tensors (a pipeline rank's others are on meta)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not p.is_meta}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, fingerprint: dict,
                    val_loss: float | None, keep_last: int, shard: checkpoint.Shard) -> None:
    train_state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    checkpoint.save(folder, step, _trainable_state(model), train_state, dict(fingerprint, val_loss=val_loss), keep_last,
                    shard)


def load_trainable(model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = _trainable_state(model)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        raise UsageError(f"checkpoint {source} does not hold this model's trainable tensors (missing {missing}).")
    with torch.no_grad():
        for name, param in expected.items():
            if tensors[name].shape != param.shape:
                raise UsageError(f"checkpoint {source}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model's is {tuple(param.shape)}.")
            param.copy_(tensors[name])


def resume(folder: Path, model, optimizer, scheduler, fingerprint: dict, shard: checkpoint.Shard) -> int:
    """Restore the newest complete checkpoint; returns the step to continue from (0 if none)."""
    saved = checkpoint.complete(folder)
    if not saved:
        print(f"--resume: no checkpoint in {folder}; starting from step 0.")
        return 0
    tensors, state, meta = checkpoint.load(saved[-1], fingerprint, shard)
    load_trainable(model, tensors, saved[-1])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    print(f"--resume: continuing from {saved[-1]} (step {meta['step']}).")
    return meta["step"]


def export_final(out: Path, model, processor, config: TrainConfig, fingerprint: dict, runtime: Runtime,
                 shard: checkpoint.Shard) -> None:
    """OUT/final: the best checkpoint's weights (lowest validation loss) or the last ones; for an
    adapter, a PEFT folder whose base is OUT/base (tiny) or the model's id/folder. Under FSDP every
    rank takes part (the weights are gathered unit by unit) and the main rank writes."""
    best = checkpoint.best(out / "checkpoints") if config.final == "best" else None
    if best is not None:
        tensors, _, _ = checkpoint.load(best, fingerprint, shard)
        load_trainable(model, tensors, best)
    if config.adapter == "lora":
        adapter = {k: v for unit in fsdp.unit_state_dicts(model, trainable_only=True) for k, v in unit.items()} \
            if config.parallel == "fsdp" else None
        base = fingerprint["model"]
        base = str((out / "base").resolve()) if base == "tiny" else str(Path(base).resolve()) if Path(base).exists() else base
        if runtime.is_main:
            export_adapter(model, processor, out / "final", base, config.to_json(), adapter)
    elif config.parallel == "pipeline":
        export_pretrained_by_rank(model, processor, out / "final", runtime.weight_dtype, runtime.rank, runtime.world_size)
    elif config.parallel == "fsdp":
        export_pretrained_by_unit(model, processor, out / "final", runtime.weight_dtype, write=runtime.is_main)
    else:
        export_pretrained(model, processor, out / "final", runtime.weight_dtype)


def quantized_summary(model) -> dict:
    """NF4 bytes against the bf16 bytes of the same weights (QLoRA runs only)."""
    stored, bf16 = quantized_bytes(model)
    return {"quantized_weight_bytes": stored, "quantized_weight_bf16_bytes": bf16,
            "quantized_ratio": stored / bf16} if bf16 else {}
