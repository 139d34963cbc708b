"""`run.py merge`: fold a LoRA adapter into its base and write a standalone Hugging Face model.

For a QLoRA adapter the base is quantized to NF4 and dequantized again before merging: the
adapter learnt to correct the NF4 weights, not the original bf16 ones, so that is what it is
folded into (as users do to deploy QLoRA).
"""

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, PreTrainedModel, ProcessorMixin

import lora
import models
from errors import UsageError
from engine.export import TRAINING_CONFIG, export_pretrained
from engine.output_folder import check_new
from engine.precision import precision_for
from engine.runtime import pick_device
from models.targets import QUANT_SKIP, VISION_ENCODER
from quant import dequantize, quantize


def merge_adapter(adapter: Path, output: Path, model_spec: str | None = None, device: str = "auto") -> Path:
    check_new(output, "--output")  # before anything loads; merge never deletes what is there
    target = pick_device(device, 1)
    dtype = precision_for("auto", target).frozen_dtype
    model, processor = load_merged(adapter, model_spec, target, dtype)
    return export_pretrained(model, processor, output, dtype, replace=False)


def load_merged(adapter: Path, model_spec: str | None, device: torch.device, dtype: torch.dtype) \
        -> tuple[PreTrainedModel, ProcessorMixin]:
    """The adapter's base (from adapter_config.json unless `model_spec`) with the adapter folded in,
    in `dtype`; the processor is the run's (image size, splitting)."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise UsageError(f"{adapter} is not an adapter folder: it has no adapter_config.json.")
    base = model_spec or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{config_file} names no base model; give one with --model.")
    training = json.loads((adapter / TRAINING_CONFIG).read_text()) if (adapter / TRAINING_CONFIG).is_file() else {}
    model, processor = models.load(base, dtype, device)
    if training.get("quant") == "nf4":
        quantize(model, skip=QUANT_SKIP + ([VISION_ENCODER] if training.get("quant_keep_vision") else []))
        dequantize(model, dtype)
    lora.load(model, adapter)
    lora.merge_and_unload(model)
    if (adapter / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(adapter)
    return model, processor
