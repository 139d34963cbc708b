"""Our side of every comparison: the engine's own strategy, optimizer and training step.

Nothing here re-implements the engine: `strategy_for`, `adamw` and `train_step` are what `run.py`
trains with, for the approach's preset settings (LoRA r=8, alpha 64, dropout 0.1 on the
projections; full fine-tuning of the projections; the pipeline's 4 micro-batches), so a ratio
against a peer is a ratio against what users run.
"""

from pathlib import Path

from transformers import ProcessorMixin

from measure import Batches, Contender
from engine.config import TrainConfig, from_approach
from engine.optim import adamw
from engine.runtime import Runtime
from engine.strategies import strategy_for
from engine.trainer import train_step

LR = 1e-4


def engine_config(approach: str, spec: str, runtime: Runtime, workdir: Path) -> TrainConfig:
    return from_approach(approach, model=spec, gpus=runtime.world_size, device=runtime.device.type,
                         output_dir=str(workdir / approach), skip_eval=True, lr=LR)


def engine_contender(config: TrainConfig, runtime: Runtime, workdir: Path) -> tuple[Contender, ProcessorMixin]:
    """The approach as `run.py` builds it, and its processor (which collates everyone's batches).

    FSDP and pipeline ranks read their slices from weight files: the main rank writes the model's
    random starting weights to `workdir/base` first, as the engine does for the tiny model."""
    strategy = strategy_for(config, runtime)
    processor = strategy.build(workdir / "base" if config.parallel in ("fsdp", "pipeline") else None)
    optimizer = adamw(strategy.parameters(), config.lr, config.betas, config.weight_decay)

    def step(batches: Batches) -> None:
        train_step(strategy, optimizer, batches, config.max_grad_norm)

    return Contender(strategy.model, optimizer, step), processor
