"""Hugging Face-format model folders, written atomically so `from_pretrained` never sees half a model."""

import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin


def export_pretrained(model: PreTrainedModel, processor: ProcessorMixin, folder: Path, dtype: torch.dtype) -> Path:
    """Save config, sharded safetensors (in `dtype`: fp32 masters go out in the run's weight dtype)
    and the processor files to `folder`, replacing it only once the new copy is complete."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {name: tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
             for name, tensor in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=state, max_shard_size="2GB")
    processor.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
