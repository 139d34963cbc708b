"""Hugging Face-format model folders, written atomically so `from_pretrained` never sees half a model."""

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

import lora


def export_pretrained(model: PreTrainedModel, processor: ProcessorMixin, folder: Path, dtype: torch.dtype) -> Path:
    """Save config, sharded safetensors (in `dtype`: fp32 masters go out in the run's weight dtype)
    and the processor files to `folder`, replacing it only once the new copy is complete."""
    state = {name: tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
             for name, tensor in model.state_dict().items()}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state, max_shard_size="2GB")
        processor.save_pretrained(tmp)

    return _publish(folder, write)


def export_adapter(model: PreTrainedModel, processor: ProcessorMixin, folder: Path, base_model_name_or_path: str,
                   training_config: str) -> Path:
    """A PEFT-format adapter folder (megabytes), plus the processor and the run's config, which
    evaluation and `run.py merge` read (the base's quantization, the image size)."""

    def write(tmp: Path) -> None:
        lora.save(model, tmp, base_model_name_or_path=base_model_name_or_path)
        processor.save_pretrained(tmp)
        (tmp / TRAINING_CONFIG).write_text(training_config)

    return _publish(folder, write)


TRAINING_CONFIG = "training_config.json"


def _publish(folder: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling, then swap it in whole."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
