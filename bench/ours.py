"""Our side of every comparison: the engine's own strategy, optimizer and training step.

Nothing here re-implements the engine: `strategy_for`, `optimizer_for` and `train_step` are what `run.py`
trains with, for the approach's preset settings (LoRA r=8, alpha 64, dropout 0.1 on the
projections; full fine-tuning of the projections; the pipeline's 4 micro-batches), so a ratio
against a peer is a ratio against what users run.

A benchmark case is an approach ("full") or an approach and one of the engine's options
("full+bf16"): `OPTIONS` holds each option's settings, and bench/peers.py reads them off the
config to build the matching peer.
"""

from pathlib import Path

import torch
from transformers import ProcessorMixin

from measure import Batches, Contender
from engine.config import TrainConfig, from_approach
from engine.optim import optimizer_for
from engine.runtime import Runtime
from engine.strategies import strategy_for
from engine.trainer import train_step

LR = 1e-4
OPTIONS = {  # a case's "+option" -> the engine settings it overrides
    "bf16": {"precision": "bf16"},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "checkpointing": {"activation_checkpointing": True},
}


def approach_of(case: str) -> str:
    return case.partition("+")[0]


def engine_config(case: str, spec: str, device: torch.device, world: int, workdir: Path) -> TrainConfig:
    """The case's approach preset with its option's settings (none for a bare approach)."""
    approach, _, option = case.partition("+")
    return from_approach(approach, model=spec, gpus=world, device=device.type, output_dir=str(workdir / case),
                         skip_eval=True, lr=LR, **(OPTIONS[option] if option else {}))


def engine_contender(config: TrainConfig, runtime: Runtime, workdir: Path) -> tuple[Contender, ProcessorMixin]:
    """The approach as `run.py` builds it, and its processor (which collates everyone's batches).

    FSDP and pipeline ranks read their slices from weight files: the main rank writes the model's
    random starting weights to `workdir/base` first, as the engine does for the tiny model."""
    strategy = strategy_for(config, runtime)
    processor = strategy.build(workdir / "base" if config.parallel in ("fsdp", "pipeline") else None)
    optimizer = optimizer_for(config, strategy.precision, strategy.parameters(), config.lr)

    def step(batches: Batches) -> None:
        train_step(strategy, optimizer, batches, config.max_grad_norm)

    return Contender(strategy.model, optimizer, step), processor
