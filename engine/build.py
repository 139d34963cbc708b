"""Turn a TrainConfig into a model ready to train: load, pick what trains, precision, checkpointing.

This is where an approach's adapter and base-weight choices are applied to the loaded
model; the training loop never asks which approach it runs.
"""

import torch
import torch.nn as nn
from transformers import PreTrainedModel, ProcessorMixin

import models
from engine.activation_checkpoint import apply_activation_checkpointing
from engine.config import TrainConfig
from engine.runtime import Runtime, resolve_model
from models.parts import decoder_layers


def build(config: TrainConfig, runtime: Runtime) -> tuple[PreTrainedModel, ProcessorMixin]:
    model, processor = models.load(
        resolve_model(config.model, runtime.device), runtime.weight_dtype, runtime.device,
        attn_implementation=config.attn_implementation, seed=config.seed,
    )
    configure_processor(processor, config)
    mark_trainable(model, config.train_modules)
    keep_trainable_in_fp32(model)
    if config.activation_checkpointing:
        apply_activation_checkpointing(decoder_layers(model))
    return model, processor


def wrap_parallel(model: nn.Module, parallel: str) -> nn.Module:
    """The module that runs forward/backward: the model itself, or a parallel wrapper around it."""
    if parallel == "ddp":
        from parallel.ddp import DataParallel

        return DataParallel(model)
    return model


def configure_processor(processor: ProcessorMixin, config: TrainConfig) -> None:
    """Image splitting and size are memory knobs; they are saved with the run so evaluation matches."""
    image_processor = processor.image_processor
    image_processor.do_image_splitting = config.image_splitting
    size = dict(image_processor.size)
    if config.image_shortest_edge:
        size["shortest_edge"] = config.image_shortest_edge
    if config.image_longest_edge:
        size["longest_edge"] = config.image_longest_edge
    image_processor.size = size


def mark_trainable(model: PreTrainedModel, module_sets: tuple[str, ...]) -> list[str]:
    """Full fine-tuning trains the chosen modules' parameters (`all`: every parameter); freeze the rest."""
    if "all" in module_sets:
        chosen = {name for name, _ in model.named_parameters()}
    else:
        paths = models.matching_modules(model, list(module_sets))
        chosen = {f"{path}.{name}" for path in paths for name, _ in model.get_submodule(path).named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)


def keep_trainable_in_fp32(model: PreTrainedModel) -> None:
    """fp32 master weights (and so fp32 optimizer state) for whatever trains, even on a bf16 base:
    a 1e-5 update to a bf16 weight rounds away, which is how the original's pure-bf16 run stalled."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
