"""One strategy per `--parallel` value, built once from the config; the training loop only calls it."""

from engine.config import TrainConfig
from engine.runtime import Runtime
from engine.strategies.base import Strategy
from engine.strategies.ddp import DDP
from engine.strategies.fsdp import FSDP
from engine.strategies.pipeline import PipelineParallel
from engine.strategies.pipeline_fsdp import PipelineFSDP

STRATEGIES: dict[str, type[Strategy]] = {"none": Strategy, "ddp": DDP, "fsdp": FSDP, "pipeline": PipelineParallel,
                                        "pipeline+fsdp": PipelineFSDP}


def strategy_for(config: TrainConfig, runtime: Runtime) -> Strategy:
    return STRATEGIES[config.parallel](config, runtime)


__all__ = ["DDP", "FSDP", "PipelineFSDP", "PipelineParallel", "STRATEGIES", "Strategy", "strategy_for"]
