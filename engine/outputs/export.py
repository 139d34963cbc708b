"""Hugging Face-format model folders, written atomically so `from_pretrained` never sees half a model."""

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import PreTrainedModel, ProcessorMixin

import lora
from engine.config import TrainConfig
from engine.outputs.publish import publish_folder, temporary


def export_pretrained(model: PreTrainedModel, processor: ProcessorMixin, folder: Path, dtype: torch.dtype,
                      replace: bool = True) -> Path:
    """Save config, sharded safetensors (in `dtype`: fp32 masters go out in the run's weight dtype)
    and the processor files to `folder`, replacing it only once the new copy is complete. `replace`:
    see `_publish`."""
    state = {name: _cast(tensor, dtype) for name, tensor in model.state_dict().items()}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state, max_shard_size="2GB")
        processor.save_pretrained(tmp)

    return _publish(folder, write, replace)


def export_pieces(model: PreTrainedModel, processor: ProcessorMixin, folder: Path, dtype: torch.dtype,
                  pieces: Iterable[dict[str, torch.Tensor]], count: int) -> Path:
    """`export_pretrained` from `count` pieces of the model's tensors by name, one safetensors file each, taken
    one at a time: the writer never holds the whole model (an FSDP run's units, gathered one by one)."""

    def write(tmp: Path) -> None:
        weight_map, total = {}, 0
        for index, piece in enumerate(pieces, start=1):
            file = piece_file(index, count)
            total += save_piece(piece, tmp / file, dtype)
            weight_map.update(dict.fromkeys(piece, file))
        write_index_and_config(tmp, model, processor, weight_map, total)

    return _publish(folder, write)


def piece_file(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {name for name, _ in model.named_parameters()}
    return {name: tensor for name, tensor in model.state_dict().items() if name not in params}


def save_piece(piece: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> int:
    """One safetensors file of a sharded Hugging Face folder; returns its tensor bytes."""
    piece = {name: _cast(tensor, dtype).contiguous() for name, tensor in piece.items()}
    save_file(piece, path, metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in piece.values())


def write_index_and_config(tmp: Path, model: PreTrainedModel, processor: ProcessorMixin, weight_map: dict[str, str],
                            total: int) -> None:
    """What `save_pretrained` writes besides the weights: the shard index, configs and processor."""
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if model.can_generate():
        model.generation_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor


def export_adapter(model: PreTrainedModel, processor: ProcessorMixin, folder: Path, base_model_name_or_path: str,
                   training_config: str, adapter: dict[str, torch.Tensor] | None = None) -> Path:
    """A PEFT-format adapter folder (megabytes), plus the processor and the run's config, which
    evaluation and `run.py merge` read (the base's quantization, the image size). `adapter`: the
    adapter tensors when the model holds only shards of them (FSDP)."""

    def write(tmp: Path) -> None:
        lora.save(model, tmp, base_model_name_or_path=base_model_name_or_path, adapter=adapter)
        processor.save_pretrained(tmp)
        (tmp / TRAINING_CONFIG).write_text(training_config)

    return _publish(folder, write)


TRAINING_CONFIG = "training_config.json"


def _publish(folder: Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Write into a temporary sibling, then swap it in whole.

    `replace`: `folder` and its temporary sibling are the caller's own (a run's OUT/final or OUT/base,
    inside the run's folder) and an old copy is deleted. Without it (`run.py merge`, a folder the user
    names) nothing is deleted that was there before: the sibling must not exist and `folder` must be
    missing or empty.
    """
    tmp = temporary(folder)
    if replace:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if folder.exists() and not replace:
            folder.rmdir()  # fails, deleting nothing, on a folder that is not empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made just now, by us
        raise
    return publish_folder(tmp, folder)


def recorded_base(config: TrainConfig) -> str:
    """The base an adapter records (adapter_config.json): OUT/base relative to OUT/final (`../base`), so that a
    run folder copied or moved whole still finds it; another folder by its absolute path; else the hub id."""
    base = Path(config.base_weights)
    if not base.exists():
        return config.base_weights
    if base.resolve().is_relative_to(config.out.resolve()):
        return os.path.relpath(base.resolve(), (config.out / "final").resolve())
    return str(base.resolve())


def named_base(adapter: Path) -> str | None:
    """The base an adapter folder names (adapter_config.json's base_model_name_or_path), a relative path taken
    from the adapter folder (OUT/final's `../base`); None if it names none."""
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    return str((adapter / base).resolve()) if base and base.startswith(("./", "../")) else base
