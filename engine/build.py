"""What every strategy does to a model the same way: load it (whole, or without weights), and
apply the approach's base-weight format and adapter choices.

Which of these loaders a rank uses, and how the model is then wrapped, sharded or split, is the
strategy's (engine/strategies/); nothing here asks which parallelism runs.
"""

from pathlib import Path

import torch
import torch.nn as nn
from transformers import PreTrainedModel, ProcessorMixin

import lora
import models
from engine.config import TrainConfig
from engine.metrics import parameter_counts
from engine.outputs.export import export_pretrained
from engine.runtime import Runtime
from models.lazy import SliceReader, load_on_meta, local_folder
from models.targets import QUANT_SKIP, VISION_ENCODER
from quant import Linear4bit, QuantizingReader, quantize

LINEAR_LAYERS = (nn.Linear, Linear4bit)


def load_whole(config: TrainConfig, runtime: Runtime, base_copy: Path | None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Every weight, on this rank's device. `base_copy` is where the tiny model's untouched starting
    weights and processor go (written once, by the main rank, before quantization or adapters)."""
    # An NF4 base is loaded on the CPU and quantized layer by layer onto the device, so the
    # accelerator never holds the whole bf16 model.
    load_device = torch.device("cpu") if config.quantized else runtime.device
    model, processor = models.load(config.model, runtime.precision.frozen_dtype,
                                   load_device, attn_implementation=config.attn_implementation, seed=config.seed)
    configure_processor(processor, config)
    if base_copy is not None and runtime.is_main and not base_copy.exists():
        export_pretrained(model, processor, base_copy, runtime.precision.frozen_dtype)
    return model, processor


def load_without_weights(config: TrainConfig, runtime: Runtime, base_copy: Path | None) \
        -> tuple[PreTrainedModel, ProcessorMixin, SliceReader]:
    """The model with parameters on the meta device, and a reader of its weight files from which
    each rank takes only its shard or stage. The main rank first fetches the files (or, for the
    tiny model, writes them to `base_copy`); the others wait for it."""
    folder = None
    if runtime.is_main:
        if base_copy is not None:
            if not base_copy.exists():
                cpu = Runtime(torch.device("cpu"), precision=runtime.precision)
                model, processor = load_whole(config, cpu, base_copy)
                del model
            folder = base_copy
        else:
            folder = local_folder(config.model)
    folder = Path(runtime.from_main(str(folder)))  # also the barrier: the files are complete now
    model, processor, read = load_on_meta(folder, runtime.precision.frozen_dtype, config.attn_implementation)
    configure_processor(processor, config)
    return model, processor, read


def apply_approach(model: PreTrainedModel, config: TrainConfig, runtime: Runtime) -> None:
    """NF4 base, LoRA or the modules full fine-tuning trains, and fp32 masters for what trains."""
    if config.quantized:
        quantize(model, skip=QUANT_SKIP + ([VISION_ENCODER] if config.quant_keep_vision else []), device=runtime.device)
        tensors = [*model.parameters(), *model.buffers()]
        # The layers left unquantized; not asked of a plan's fake tensors, which it cannot move, nor of
        # a model without weights yet (its strategy reads them onto the device, QuantizingReader).
        if not any(t.is_meta for t in tensors) and any(t.device != runtime.device for t in tensors):
            model.to(runtime.device)
    if config.trains_adapter:
        add_lora(model, config)
    else:
        mark_trainable(model, config.train_modules)
    runtime.precision.keep_masters(model)
    if runtime.is_main:
        trainable, total = parameter_counts(model)
        if config.base_copy is not None:
            family = "Idefics3" if config.model.endswith("idefics3") else "Idefics2"
            print(f"model: the built-in {config.model} stand-in, {total / 1e6:.1f}M random parameters in {family}'s "
                  f"shape, not {family} itself: it shows the engine at work, and its answers mean nothing")
        print(f"{config.approach}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")


def quantizing(read: SliceReader, model: PreTrainedModel, device: torch.device) -> QuantizingReader:
    """`read` for a model built without weights, whose NF4 layers `apply_approach` left empty: those
    are read by quantizing their float weights onto `device`, as `load_whole`'s model was."""
    layers = {path: module.base if isinstance(module, lora.LoRALinear) else module
              for path, module in model.named_modules()}
    return QuantizingReader(read, {path: layer for path, layer in layers.items() if isinstance(layer, Linear4bit)},
                            device)


def add_lora(model: PreTrainedModel, config: TrainConfig) -> list[str]:
    """Wrap the target linears (quantized or not) in LoRA and freeze everything else."""
    # Adapters start from the seed alone, whatever loading drew from the RNG (FSDP draws nothing).
    torch.manual_seed(config.seed)
    paths = models.matching_modules(model, list(config.lora_target), kind=LINEAR_LAYERS)
    return lora.inject(model, paths, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       rslora=config.lora_rslora, init=config.lora_init)


def configure_processor(processor: ProcessorMixin, config: TrainConfig) -> None:
    """Image splitting and size are memory knobs; they are saved with the run so evaluation matches."""
    image_processor = processor.image_processor
    if config.image_splitting is not None:  # else the processor's own choice, as its model was trained
        image_processor.do_image_splitting = config.image_splitting
    # Idefics2-8B's tokenizer_config.json holds do_image_splitting too, and transformers passes the tokenizer's
    # init settings to the image processor over its own: the text would count 5 crops an image, the pixels 1.
    if "do_image_splitting" in processor.tokenizer.init_kwargs:
        processor.tokenizer.init_kwargs["do_image_splitting"] = image_processor.do_image_splitting
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
