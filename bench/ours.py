"""Our side of every comparison: the engine's own strategy, optimizer and training step.

Nothing here re-implements the engine: `strategy_for`, `optimizer_for` and `train_step` are what `run.py`
trains with, for the approach's preset settings (LoRA r=8, alpha 64, dropout 0.1 on the
projections; full fine-tuning of the projections; the pipeline's 4 micro-batches), so a ratio
against a peer is a ratio against what users run.

A benchmark case is an approach ("full"), a hybrid of issue 18 ("qlora_fsdp": an approach with
other choices of adapter, base-weight format or parallelism, `HYBRIDS`), or either with one of
the engine's options ("full+bf16"): `OPTIONS` holds each option's settings, and bench/peers.py
reads them off the config to build the matching peer. An option no peer has (`AGAINST_OURS`) is
also measured against ours without it, in the same spawn.
"""

from pathlib import Path

import torch
import torch.nn as nn
from measure import Batches, Contender
from transformers import ProcessorMixin

from engine.config import APPROACHES, TrainConfig, from_approach
from engine.optim.optimizer import optimizer_for
from engine.runtime import Runtime
from engine.step import train_step
from engine.strategies import strategy_for
from engine.strategies.base import ReadsOwnPiece

LR = 1e-4
OPTIONS = {  # a case's "+option" -> the engine settings it overrides
    "bf16": {"precision": "bf16"},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "checkpointing": {"activation_checkpointing": True},
    "no_prefetch": {"fsdp_prefetch": False},
}
AGAINST_OURS = {"no_prefetch": "ours with prefetch"}  # option -> ours without it, in words
HYBRIDS = {  # case -> the approach it starts from and the choices it changes
    "lora_pipe": ("lora", {"parallel": "pipeline"}),
    "qlora_pipe": ("qlora", {"parallel": "pipeline"}),
    "qlora_fsdp": ("qlora", {"parallel": "fsdp"}),
    "full_pipe_fsdp": ("full_mp", {"parallel": "pipeline+fsdp", "stages": 2}),
}


def settings(case: str) -> tuple[str, dict]:
    """The case's approach preset and the engine settings it overrides."""
    name, _, option = case.partition("+")
    approach, choices = HYBRIDS.get(name, (name, {}))
    return approach, {**choices, **(OPTIONS[option] if option else {})}


def baseline_of(case: str) -> tuple[str, str] | None:
    """For an option measured against ours without it: the case without it, and that in words; else None."""
    name, _, option = case.partition("+")
    return (name, AGAINST_OURS[option]) if option in AGAINST_OURS else None


def world_of(case: str, cpu_ranks: int, gpus: int) -> int:
    """The case's ranks: 1 for one device; else every GPU, or on the CPU `cpu_ranks` (per stage under
    pipeline+fsdp)."""
    approach, overrides = settings(case)
    if overrides.get("parallel", APPROACHES[approach][2]) == "none":
        return 1
    return gpus or cpu_ranks * overrides.get("stages", 1)


def pipeline_stages(config: TrainConfig, world: int) -> int:
    """How many stages the model is cut into: one per rank on the pipeline, `stages` under pipeline+fsdp
    (its ranks stage-major: stage 0's shards first); 1 without a pipeline."""
    if config.parallel == "pipeline+fsdp":
        return config.stages
    return world if config.parallel == "pipeline" else 1


def engine_config(case: str, spec: str, device: torch.device, world: int, workdir: Path) -> TrainConfig:
    """The case's approach preset with its hybrid's choices and its option's settings."""
    approach, overrides = settings(case)
    return from_approach(approach, model=spec, gpus=world, device=device.type, output_dir=str(workdir / case),
                         skip_eval=True, lr=LR, **overrides)


def engine_contender(config: TrainConfig, runtime: Runtime, workdir: Path) -> tuple[Contender, ProcessorMixin]:
    """The approach as `run.py` builds it, and its processor (which collates everyone's batches).

    FSDP and pipeline ranks read their slices from weight files: the main rank writes the model's
    random starting weights to `workdir/base` first, as the engine does for the tiny model."""
    strategy = strategy_for(config, runtime)
    processor = strategy.build(workdir / "base" if isinstance(strategy, ReadsOwnPiece) else None)
    optimizer = optimizer_for(config, strategy.precision, strategy.parameters(), config.lr)

    def step(batches: Batches) -> None:
        train_step(strategy, optimizer, batches, config.max_grad_norm)

    # What this rank holds: the parts it runs (the model, or its stage: under pipeline+fsdp the stage's own
    # shards are no parameters of the model), as the engine's own memory report counts them.
    return Contender(nn.ModuleList(strategy.parts), optimizer, step), processor
