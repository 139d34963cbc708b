"""An adapter folder's model, as evaluation answers with it and as `run.py merge` writes it.

`load_adapted` (evaluation, `run.py ask`) gives the model that trained. A LoRA adapter is folded into
its base on the device: the base alone fits there, as it did in training. A QLoRA adapter stays
unmerged on its NF4 base, which is loaded on the CPU and quantized layer by layer onto the device
as training did (engine/build.py): the device holds the NF4 model, never the whole float one (which a
16 GB card cannot hold for the 8B), and the answers are the training model's own.

`load_merged` (`run.py merge`) folds either into a standalone float model. A QLoRA adapter learnt to
correct the NF4 weights, not the original float ones, so that is what it is folded into (as users do
to deploy QLoRA): the base is quantized on the device as in training, then dequantized and merged on
the CPU, where the whole float model is written from.
"""

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

import lora
import models
from engine.outputs.export import TRAINING_CONFIG, export_pretrained, named_base
from engine.outputs.folder import check_new
from engine.precision import precision_for
from engine.runtime import pick_device
from errors import UsageError
from models.processors import read_processor
from models.targets import QUANT_SKIP, VISION_ENCODER
from quant import dequantize, quantize

CPU = torch.device("cpu")


def merge_adapter(adapter: Path, output: Path, model_spec: str | None = None, device: str = "auto") -> Path:
    check_new(output, "--output")  # before anything loads; merge never deletes what is there
    target = pick_device(device, 1)
    dtype = precision_for("auto", target).frozen_dtype
    model, processor = load_merged(adapter, model_spec, target, dtype)
    return export_pretrained(model, processor, output, dtype, replace=False)


def load_adapted(adapter: Path, model_spec: str | None, device: torch.device, dtype: torch.dtype) \
        -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model as it trained, on `device` in `dtype`: the adapter's base (from adapter_config.json
    unless `model_spec`) with LoRA folded in, or QLoRA's NF4 base with the adapter beside it; the
    processor is the run's (image size, splitting)."""
    base, training = _adapter_base(adapter, model_spec)
    if training.get("quant") == "nf4":
        model, processor = load_nf4_base(base, bool(training.get("quant_keep_vision")), device, dtype)
        lora.load(model, adapter)
    else:
        model, processor = models.load(base, dtype, device)
        lora.load(model, adapter)
        lora.merge_and_unload(model)
    return model, _run_processor(adapter, processor)


def load_merged(adapter: Path, model_spec: str | None, device: torch.device, dtype: torch.dtype) \
        -> tuple[PreTrainedModel, ProcessorMixin]:
    """The adapter folded into its base, in `dtype`: on `device` for LoRA, on the CPU for QLoRA (its
    NF4 base quantized on `device`, as in training, and dequantized on the CPU)."""
    base, training = _adapter_base(adapter, model_spec)
    if training.get("quant") != "nf4":
        return load_adapted(adapter, model_spec, device, dtype)
    model, processor = load_nf4_base(base, bool(training.get("quant_keep_vision")), device, dtype)
    model.to(CPU)
    dequantize(model, dtype)
    lora.load(model, adapter)
    lora.merge_and_unload(model)
    return model, _run_processor(adapter, processor)


def _adapter_base(adapter: Path, model_spec: str | None) -> tuple[str, dict]:
    """The base model to load (`model_spec`, else the adapter's own) and the run's training config ({} if none)."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UsageError(f"{adapter} is not an adapter folder: it has no adapter_config.json.")
    base = model_spec or named_base(adapter)
    if not base:
        raise UsageError(f"{config_file} names no base model; give one with --model.")
    training = json.loads((adapter / TRAINING_CONFIG).read_text()) if (adapter / TRAINING_CONFIG).is_file() else {}
    return base, training


def load_nf4_base(base: str, keep_vision: bool, device: torch.device, dtype: torch.dtype) \
        -> tuple[PreTrainedModel, ProcessorMixin]:
    """QLoRA's base as it trained, on `device`: loaded on the CPU in `dtype`, its linears quantized to NF4
    one at a time onto `device` as training quantized them (the same layers, on the same kind of device),
    then the layers training kept in float (lm_head, norms, embeddings) moved there too."""
    model, processor = models.load(base, dtype, CPU)
    quantize(model, skip=QUANT_SKIP + ([VISION_ENCODER] if keep_vision else []), device=device)
    return model.to(device), processor


def _run_processor(adapter: Path, base_processor: ProcessorMixin) -> ProcessorMixin:
    """The processor the run saved beside its adapter, else the base's."""
    if (adapter / "processor_config.json").is_file():
        return read_processor(adapter)
    return base_processor
