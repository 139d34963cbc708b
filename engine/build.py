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
from models.lazy import SliceReader, load_on_meta, local_folder, materialize
from models.parts import decoder_layers
from models.stages import Stage, split_points, stage
from models.targets import QUANT_SKIP, VISION_ENCODER
from parallel.fsdp import fully_shard
from quant import Linear4bit, quantize

LINEAR_LAYERS = (nn.Linear, Linear4bit)


def build(config: TrainConfig, runtime: Runtime, base_copy: Path | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model to train and its processor. `base_copy` is where the tiny model's untouched starting
    weights and processor go (written once, by the main rank, before quantization or adapters)."""
    spec = resolve_model(config.model, runtime.device)
    if config.parallel in ("fsdp", "pipeline"):
        model, processor, read = load_without_weights(spec, config, runtime, base_copy)
    else:
        # An NF4 base is loaded on the CPU and quantized layer by layer onto the device, so the
        # accelerator never holds the whole bf16 model.
        load_device = torch.device("cpu") if config.quant == "nf4" else runtime.device
        model, processor = models.load(spec, runtime.weight_dtype, load_device,
                                       attn_implementation=config.attn_implementation, seed=config.seed)
        configure_processor(processor, config)
        if base_copy is not None and runtime.is_main and not base_copy.exists():
            export_pretrained(model, processor, base_copy, runtime.weight_dtype)
    if config.quant == "nf4":
        quantize(model, skip=QUANT_SKIP + ([VISION_ENCODER] if config.quant_keep_vision else []), device=runtime.device)
        model.to(runtime.device)
    if config.adapter == "lora":
        add_lora(model, config)
    else:
        mark_trainable(model, config.train_modules)
    keep_trainable_in_fp32(model)
    if runtime.is_main:
        trainable, total = parameter_counts(model)
        print(f"{config.approach}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if config.parallel == "fsdp":
        # Every block is recomputed in backward by FSDP itself, which is activation checkpointing.
        fully_shard(model, models.blocks(model), runtime.weight_dtype, read=read, device=runtime.device)
    elif config.parallel == "pipeline":
        materialize(model, pipeline_stage(model, config, runtime), read, runtime.device)  # the rest stays on meta
    if config.activation_checkpointing and config.parallel != "fsdp":
        apply_activation_checkpointing(decoder_layers(model))
    return model, processor


def pipeline_stage(model: PreTrainedModel, config: TrainConfig, runtime: Runtime) -> Stage:
    """This rank's stage: the split of `--split`, or balanced by parameters over the ranks."""
    return stage(model, split_points(model, runtime.world_size, config.split), runtime.rank)


def load_without_weights(spec: str, config: TrainConfig, runtime: Runtime, base_copy: Path | None) \
        -> tuple[PreTrainedModel, ProcessorMixin, SliceReader]:
    """FSDP's and the pipeline's start: the model with parameters on the meta device, and a reader
    of its weight files from which each rank takes only its shard or stage. The main rank first fetches the files (or, for the
    tiny model, writes them to `base_copy`); the others wait for it."""
    folder = None
    if runtime.is_main:
        if base_copy is not None:
            if not base_copy.exists():
                model, processor = models.load(spec, runtime.weight_dtype, torch.device("cpu"), seed=config.seed)
                configure_processor(processor, config)
                export_pretrained(model, processor, base_copy, runtime.weight_dtype)
                del model
            folder = base_copy
        else:
            folder = local_folder(spec)
    folder = Path(runtime.gather(str(folder))[0])  # also the barrier: the files are complete now
    model, processor, read = load_on_meta(folder, runtime.weight_dtype, config.attn_implementation)
    configure_processor(processor, config)
    return model, processor, read


def add_lora(model: PreTrainedModel, config: TrainConfig) -> list[str]:
    """Wrap the target linears (quantized or not) in LoRA and freeze everything else."""
    # Adapters start from the seed alone, whatever loading drew from the RNG (FSDP draws nothing).
    torch.manual_seed(config.seed)
    paths = models.matching_modules(model, list(config.lora_target), kind=LINEAR_LAYERS)
    return lora.inject(model, paths, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       rslora=config.lora_rslora, init=config.lora_init)


def wrap_parallel(model: nn.Module, config: TrainConfig, runtime: Runtime) -> nn.Module:
    """What runs forward/backward: the model itself (FSDP shards it in place, in build), a DDP
    wrapper around it, or this rank's pipeline stage."""
    if config.parallel == "ddp":
        from parallel.ddp import DataParallel

        return DataParallel(model)
    if config.parallel == "pipeline":
        from parallel.pipeline import Pipeline

        hidden_size = model.config.get_text_config().hidden_size
        # Every stage's output keeps the embeddings' dtype, as in the unsplit model's residual stream.
        dtype = model.get_input_embeddings().weight.dtype

        def activation_shape(batch: dict) -> tuple[torch.Size, torch.dtype]:
            return torch.Size((*batch["input_ids"].shape, hidden_size)), dtype

        return Pipeline(pipeline_stage(model, config, runtime), activation_shape, config.schedule, device=runtime.device)
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
