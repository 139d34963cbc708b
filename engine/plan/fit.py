"""Whether a run fits: its plan on the widest batch of its data, phase by phase -- training, answering the
select rows of --select-by a text metric, and writing OUT/final (engine/plan/ranks.py), generating the
evaluation's answers and judging them (engine/plan/evaluation.py) -- against the GPU's memory, and the free disk
where it writes; the largest batch at which every phase fits; and the refusal, in one sentence, of a run that
does not, before any weight loads (engine/launch.py)."""

import dataclasses
import math
import shutil
from collections.abc import Collection
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.build import configure_processor
from engine.config import REAL_MODEL, TrainConfig
from engine.data.checks import row_lengths
from engine.data.collate import Collator
from engine.data.sources import data_settings, load_splits
from engine.loss import IGNORE
from engine.plan.evaluation import evaluation_plan, selecting_plan
from engine.plan.ranks import RankPlan, plan_ranks
from engine.precision import Precision, precision_for
from engine.strategies import STRATEGIES
from errors import UsageError
from models.load import config_and_processor

GIB = 2**30
SEARCH_LIMIT = 128  # rows: the largest batch the search tries
HEADROOM = 0.08  # of a GPU's memory, kept free: the CUDA context and the caching allocator's unused blocks
SHIPPED_8B = str(Path(__file__).resolve().parents[2] / "models" / "idefics2_8b_config.json")  # the repo's models/


def plan_run(config: TrainConfig, gpu: bool, budget: int | None, sequence_length: int | None = None,
             search: bool = True) -> dict:
    """The whole plan of a run as `run.py plan --json` prints it: each rank's training step, and each phase's
    peak per rank and on any rank (PHASES). `gpu`: plan for GPUs (bf16 weights and activation checkpointing by
    default, as a GPU run has them) or for this CPU; `budget`: the bytes a rank may use (None: fit is not
    judged); `search`: find the largest batch whose every phase fits even if this one does."""
    config = config.resolved(gpu)
    if config.model == REAL_MODEL:  # the same shapes as the hub's Idefics2-8B, without fetching it
        config = dataclasses.replace(config, model=SHIPPED_8B)
    precision = precision_for(config.precision, torch.device("cuda" if gpu else "cpu"))
    run = RunPhases(config, precision, gpu, WidestBatch(config, sequence_length))
    ranks, phases = run(config.batch_size)
    by_phase = {name: max(rank[name] for rank in phases) for name in phases[0]}  # the most on any rank
    peak = max(by_phase.values())
    plan = {"fits": None if budget is None else peak <= budget, "budget_bytes": budget, "peak_bytes": peak,
            "phases": by_phase, "largest_phase": max(by_phase, key=by_phase.get),
            "max_batch_size": None, "batch_size": config.batch_size, "sequence_length": run.widest.length,
            "device": "cuda" if gpu else "cpu", "precision": precision.name,
            "activation_checkpointing": bool(config.activation_checkpointing),
            "evaluation": None if run.evaluation is None else run.evaluation.describe(config.batch_size),
            "selection": None if run.selecting is None else run.selecting.describe(),
            "ranks": [dataclasses.asdict(rank) | {"phases": rank_phases}
                      for rank, rank_phases in zip(ranks, phases, strict=True)],
            "disk": disk_plan(config, ranks)}
    if budget is not None and (search or not plan["fits"]):
        plan["max_batch_size"] = max_batch_size(config, run, budget, peak)
    return plan


class RunPhases:
    """`run(batch_size)`: every rank's training plan at that batch, and each rank's peak in each phase."""

    def __init__(self, config: TrainConfig, precision: Precision, gpu: bool, widest: "WidestBatch"):
        self.config, self.precision, self.gpu, self.widest = config, precision, gpu, widest
        self.evaluation = evaluation_plan(config, precision, gpu)
        self.selecting = selecting_plan(config)

    def __call__(self, batch_size: int) -> tuple[list[RankPlan], list[dict[str, int]]]:
        sized = dataclasses.replace(self.config, batch_size=batch_size)
        ranks = plan_ranks(sized, self.precision, self.widest(batch_size), self.gpu, self.selecting)
        evaluation = {} if self.evaluation is None else self.evaluation.phases(batch_size)  # alike on every rank
        return ranks, [{"train": rank.peak_bytes, "export": rank.export_peak_bytes,
                        **({"select": rank.select_peak_bytes} if self.selecting else {}), **evaluation}
                       for rank in ranks]


class WidestBatch:
    """Batches of n copies of the data set's longest training row, as the collator makes them: the
    widest batch a run will see (or rows cut or padded to `sequence_length` tokens)."""

    def __init__(self, config: TrainConfig, sequence_length: int | None):
        model_config, processor = config_and_processor(config.model)
        context = model_config.text_config.max_position_embeddings
        if sequence_length is not None and sequence_length > context:
            raise UsageError(f"--sequence-length {sequence_length} is past the model's context of {context} tokens.")
        configure_processor(processor, config)
        train = load_splits(**data_settings(config))["train"]
        lengths = row_lengths(train, processor)
        self.row = train[max(range(len(lengths)), key=lengths.__getitem__)]
        self.rows = len(train)
        limit = min(filter(None, (config.max_length, sequence_length)), default=None)
        self.collator, self.pad = Collator(processor, limit), processor.tokenizer.pad_token_id
        self.length = sequence_length or self.collator([self.row])["input_ids"].shape[1]

    def __call__(self, rows: int) -> dict[str, torch.Tensor]:
        batch = self.collator([self.row] * rows)
        extra = self.length - batch["input_ids"].shape[1]
        for key, fill in (("input_ids", self.pad), ("attention_mask", 0), ("labels", IGNORE)):
            batch[key] = F.pad(batch[key], (extra, 0), value=fill)  # left, as the collator pads
        return batch


def max_batch_size(config: TrainConfig, run: RunPhases, budget: int, planned_peak: int) -> int:
    """The largest batch (a multiple of --micro-batches for a pipeline; at most the train split's rows and
    SEARCH_LIMIT) whose every phase fits `budget`; 0 if a phase that no batch changes does not. The peak
    grows about linearly with the batch, so each next try is where the line through the last two meets the
    budget, kept strictly between the largest batch known to fit and the smallest known not to: a handful
    of plans of seconds each."""
    unit = STRATEGIES[config.parallel].batch_multiple(config)
    known = {config.batch_size: planned_peak}

    def peak(batch: int) -> int:
        if batch not in known:
            known[batch] = max(max(rank.values()) for rank in run(batch)[1])
        return known[batch]

    # Batches known to fit and not to; the search stops at the split's rows or SEARCH_LIMIT (the plan runs
    # the real pixels of its batch for real: a few hundred rows of 8B images are gigabytes here).
    fits, over = 0, min(run.widest.rows, SEARCH_LIMIT) // unit * unit + unit
    batch = config.batch_size
    while over - fits > unit:
        if peak(batch) <= budget:
            fits = batch
        else:
            over = batch
        others = [b for b in known if b != batch]
        other = min(others, key=lambda b: abs(b - batch)) if others else (batch + unit if batch == unit else unit)
        slope = max(1.0, (peak(batch) - peak(other)) / (batch - other))
        guess = (batch + int((budget - peak(batch)) / slope)) // unit * unit
        batch = min(max(guess, fits + unit), over - unit)
        if batch in known:  # the line points where it has been: halve the interval instead
            batch = (fits + over) // 2 // unit * unit
            if batch <= fits:
                break
    return fits


def disk_plan(config: TrainConfig, ranks: list[RankPlan]) -> dict:
    """What the run writes at most at once, against the free space where it writes: checkpoints (every
    rank's piece: the trainable weights and the optimizer state), the final export and, for the tiny
    model, OUT/base."""
    checkpoint = sum(rank.checkpoint_bytes for rank in ranks)
    kept = config.keep_last + 2  # --keep-last, the best one, and the one being written before the oldest goes
    export = ranks[0].export_bytes
    base = ranks[0].model_bytes if config.base_copy is not None else 0
    folder = config.out
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    total = checkpoint * kept + export + base
    return {"checkpoint_bytes": checkpoint, "checkpoints_kept": kept, "export_bytes": export, "base_bytes": base,
            "total_bytes": total, "free_bytes": free, "fits": total <= free}


def refuse_if_unfit_before_loading(config: TrainConfig, ranks: int, gpu: bool) -> None:
    """A GPU run, or one given --memory-budget, is planned before anything loads and refused if it cannot fit."""
    config = dataclasses.replace(config, gpus=ranks)
    refuse_if_unfit(config, plan_run(config, gpu, budget_for(gpu, config.memory_budget, None), search=False))


def readable(size: int) -> str:
    """Bytes in the largest unit that is at least 1 of them ("1.5 GiB", "40.0 MiB", "512 bytes")."""
    for unit, exponent in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 2**exponent:
            return f"{size / 2**exponent:.1f} {unit}"
    return f"{size} bytes"


def refuse_if_unfit(config: TrainConfig, plan: dict) -> None:
    """One sentence before anything loads: the predicted peak against the budget and what would fit, or
    the bytes the run writes against the free disk."""
    disk = plan["disk"]
    if not disk["fits"]:
        raise UsageError(
            f"this run would write up to {readable(disk['total_bytes'])} to {config.out} "
            f"({disk['checkpoints_kept']} checkpoints of {readable(disk['checkpoint_bytes'])} at once: "
            f"--keep-last {config.keep_last}, the best "
            f"and the one being written; the final export of {readable(disk['export_bytes'])}), but the disk there "
            f"has only {readable(disk['free_bytes'])} free; lower --keep-last or free space.")
    if plan["fits"] is False:
        over = {name: peak for name, peak in plan["phases"].items() if peak > plan["budget_bytes"]}
        where = " and ".join(f"{PHASES[name]} ({readable(peak)})" for name, peak in over.items())
        raise UsageError(f"the plan's peak per GPU is over the budget of {readable(plan['budget_bytes'])} while "
                         f"{where}; {remedies(config, plan, over)} (run.py plan shows the numbers).")


PHASES = {"train": "training", "select": "answering the select rows at an evaluation point",
          "export": "writing OUT/final", "generate": "generating the evaluation's answers",
          "judge": "scoring them"}  # what a run does in each phase of its plan, as a sentence names it


def remedies(config: TrainConfig, plan: dict, over: Collection[str]) -> str:
    """What would make the phases `over` the budget fit, as flags."""
    options = []
    if plan["max_batch_size"]:  # the largest batch at which every phase fits
        rows = plan["max_batch_size"]
        options.append(f"--batch-size {rows} --grad-accum {math.ceil(config.batch_size * config.grad_accum / rows)}")
    if "train" in over and not plan["activation_checkpointing"]:
        options.append("--activation-checkpointing")
    if {"train", "export"} & set(over):  # what training holds: the optimizer state, the trained weights
        if config.optimizer == "adamw" and config.optimizer_offload == "none":
            options.append("--optimizer adamw8bit")
        if plan["precision"] == "bf16-mixed" and not config.trains_adapter:
            options.append("--precision bf16")
        if not STRATEGIES[config.parallel].whole_model_per_rank:
            options.append("more GPUs (--gpus)")
        elif not config.trains_adapter:
            options.append("--approach full_fsdp with more GPUs")
    if {"generate", "select"} & set(over):  # generate: every GPU holds a whole model to evaluate, whatever the GPUs
        options.append("a lower --max-new-tokens")
    if "select" in over:
        options.append("--select-by val_loss")
    if "judge" in over and config.scorer != "self":
        options.append("--scorer self")
    if {"generate", "judge"} & set(over):
        options.append("--skip-eval (and run.py eval on a larger GPU)")
    return "try " + ", or ".join(options) if options else "no flag of this build makes it fit"


def budget_for(gpu: bool, memory_budget: float | None, gpu_memory: float | None) -> int | None:
    """The bytes a rank may use: --memory-budget as given; else the GPU's memory (--gpu-memory, or the
    visible GPU's) less the headroom; None on a CPU or with no GPU to ask."""
    if memory_budget is not None:
        return int(memory_budget * GIB)
    if gpu_memory is None and gpu and torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(0).total_memory / GIB
    return None if gpu_memory is None or not gpu else int(gpu_memory * (1 - HEADROOM) * GIB)


def describe(config: TrainConfig, plan: dict) -> str:
    """The plan as a table, one row per rank, each phase's peak, and the verdicts."""
    unit, size = ("GiB", GIB) if plan["peak_bytes"] >= GIB else ("MiB", 2**20)

    def gib(value: int) -> str:
        return f"{value / size:.2f}"

    def disk_gib(value: int) -> str:
        return f"{value / GIB:.2f}"

    ranks, device = plan["ranks"], "GPU" if plan["device"] == "cuda" else "rank"
    where = f"{len(ranks)} {device}{'s' if len(ranks) > 1 else ''}"
    lines = [f"plan: {config.approach} on {where}, batch {plan['batch_size']}, {plan['sequence_length']} tokens a row, "
             f"{plan['precision']}, activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}",
             "", f"| rank | parameters {unit} | gradients | optimizer | activations | training peak | held between "
                 "steps | writing OUT/final |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rank in ranks:
        dtypes = ", ".join(f"{name} {gib(size)}" for name, size in rank["param_bytes_by_dtype"].items())
        lines.append(f"| {rank['rank']} | {gib(rank['param_bytes'])} ({dtypes}) | {gib(rank['grad_bytes'])} | "
                     f"{gib(rank['optimizer_bytes'])} | {gib(rank['activation_bytes'])} | {gib(rank['peak_bytes'])} | "
                     f"{gib(rank['held_bytes'])} | {gib(rank['export_peak_bytes'])} |")
    lines.append("")
    evaluation = plan["evaluation"]
    if evaluation is None:
        lines.append("evaluation: none (--skip-eval)")
    else:
        judge = "the evaluated model itself, one text at a time" if evaluation["scorer"] == "self" else \
            f"the {evaluation['scorer']} model, {evaluation['judge_texts']} texts at once"
        whole = "" if STRATEGIES[config.parallel].whole_model_per_rank else " (a whole model, not its shard or stage)"
        lines.append(f"evaluation: each {device} holds one model at a time{whole}, answering {evaluation['rows']} rows "
                     f"at once ({evaluation['prompt_tokens']} prompt tokens + {evaluation['new_tokens']} new, KV "
                     f"cache included), then judged by {judge} of {evaluation['judge_tokens']} tokens")
    selection = plan["selection"]
    if selection is not None:
        lines.append(f"selection by {selection['metric']}: at every evaluation point the training model answers the "
                     f"first {selection['rows']} validation rows ({selection['prompt_tokens']} prompt tokens + "
                     f"{selection['new_tokens']} new), beside what training holds")
    phases = ", ".join(f"{name} {gib(peak)}" for name, peak in plan["phases"].items())
    lines.append(f"peak per {device}, by phase: {phases} {unit}; the largest: {plan['largest_phase']}")
    if plan["fits"] is None:
        lines.append("give --gpu-memory GiB (the card's memory) or --memory-budget GiB to judge the fit"
                     if plan["device"] == "cuda" else "give --memory-budget GiB to judge the fit")
    else:
        over = [name for name, peak in plan["phases"].items() if peak > plan["budget_bytes"]]
        verdict = "fits: every phase" if plan["fits"] else f"does not fit: {', '.join(over)} over"
        lines.append(f"{verdict} {gib(plan['budget_bytes'])} {unit} usable; the largest batch at which every phase "
                     f"fits: {plan['max_batch_size']}")
    disk = plan["disk"]
    lines.append(f"disk: up to {disk_gib(disk['total_bytes'])} GiB ({disk['checkpoints_kept']} checkpoints of "
                 f"{disk_gib(disk['checkpoint_bytes'])} GiB, export {disk_gib(disk['export_bytes'])} GiB"
                 f"{', OUT/base ' + disk_gib(disk['base_bytes']) + ' GiB' if disk['base_bytes'] else ''}) of "
                 f"{disk_gib(disk['free_bytes'])} GiB free at {config.out}: "
                 f"{'fits' if disk['fits'] else 'does not fit'}")
    return "\n".join(lines)
