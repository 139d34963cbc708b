"""Turn a TrainConfig into a model ready to train: load, quantize, add adapters or pick what
trains, precision, activation checkpointing, parallel wrapping.

This is where an approach's three choices are applied to the loaded model; the training loop
never asks which approach it runs.
"""

from pathlib import Path

import torch
import torch.nn as nn
from transformers import PreTrainedModel, ProcessorMixin

import lora
import models
from engine.activation_checkpoint import apply_activation_checkpointing
from engine.config import TrainConfig
from engine.export import export_pretrained
from engine.metrics import parameter_counts
from engine.runtime import Runtime, resolve_model
from models.parts import decoder_layers
from models.targets import QUANT_SKIP, VISION_ENCODER
from quant import Linear4bit, quantize

LINEAR_LAYERS = (nn.Linear, Linear4bit)


def build(config: TrainConfig, runtime: Runtime, base_copy: Path | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model to train and its processor; with `base_copy`, the untouched starting weights and
    processor are first written there (before quantization or adapters change the modules)."""
    # An NF4 base is loaded on the CPU and quantized layer by layer onto the device, so the
    # accelerator never holds the whole bf16 model.
    load_device = torch.device("cpu") if config.quant == "nf4" else runtime.device
    model, processor = models.load(
        resolve_model(config.model, runtime.device), runtime.weight_dtype, load_device,
        attn_implementation=config.attn_implementation, seed=config.seed,
    )
    configure_processor(processor, config)
    if base_copy is not None:
        export_pretrained(model, processor, base_copy, runtime.weight_dtype)
    if config.quant == "nf4":
        quantize(model, skip=QUANT_SKIP + ([VISION_ENCODER] if config.quant_keep_vision else []), device=runtime.device)
        model.to(runtime.device)
    if config.adapter == "lora":
        add_lora(model, config)
    else:
        mark_trainable(model, config.train_modules)
    keep_trainable_in_fp32(model)
    if config.activation_checkpointing:
        apply_activation_checkpointing(decoder_layers(model))
    if runtime.is_main:
        trainable, total = parameter_counts(model)
        print(f"{config.approach}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model, processor


def add_lora(model: PreTrainedModel, config: TrainConfig) -> list[str]:
    """Wrap the target linears (quantized or not) in LoRA and freeze everything else."""
    paths = models.matching_modules(model, list(config.lora_target), kind=LINEAR_LAYERS)
    return lora.inject(model, paths, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       rslora=config.lora_rslora, init=config.lora_init)


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
