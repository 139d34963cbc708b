"""A model without its weights, and a reader for slices of them: how FSDP ranks load only their shard.

The model is built with every parameter on the meta device (no memory, no init) while buffers
stay real: the rotary tables are computed in `__init__` and are not in the checkpoint. Each FSDP
rank then asks `SliceReader` for the element ranges its shards cover; safetensors reads those
rows from the memory-mapped files and nothing else.
"""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel, ProcessorMixin

from errors import UsageError
from models.load import BUILT_IN, SUPPORTED_TYPES, config_and_processor, load, use_real_pad_token
from models.processors import read_processor

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered; buffers do not. And no model
    initializes its weights: they come from a checkpoint or are fake (engine/plan/ranks.py), and initializing
    meta tensors is not free (torch draws each through its Python reference: 1.7 of 2.4 s building Idefics2-8B).
    transformers skips it itself only under a meta device context, which would take the buffers there too (the
    rotary tables, which a model computes as it is built); it still ties the weights it ties."""
    register, initialize = nn.Module.register_parameter, PreTrainedModel.initialize_weights

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        PreTrainedModel.initialize_weights = initialize


class SliceReader:
    """`reader(name, start, stop)`: elements [start, stop) of the flattened weight `name`, read
    from a folder's safetensors files (one `model.safetensors` or shards with an index)."""

    def __init__(self, folder: Path):
        index = folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise UsageError(f"{folder} holds no safetensors weights (model.safetensors or {INDEX}).")
        self.folder, self.weight_map, self.handles = folder, weight_map, {}

    def __call__(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self.weight_map:
            raise UsageError(f"the weights in {self.folder} have no tensor {name!r}; is it the same model type?")
        file = self.weight_map[name]
        if file not in self.handles:
            self.handles[file] = safe_open(self.folder / file, "pt")
        rows = self.handles[file].get_slice(name)
        shape = rows.get_shape()
        if len(shape) == 0:
            return rows[...].reshape(1)[start:stop]
        # Read whole rows of the leading dimension around the range, then trim: at most two rows extra.
        row = max(1, int(torch.Size(shape[1:]).numel()))
        first, last = start // row, -(-stop // row)
        return rows[first:last].reshape(-1)[start - first * row : stop - first * row]


def load_on_meta(folder: Path, dtype: torch.dtype, attn_implementation: str = "sdpa") \
        -> tuple[PreTrainedModel, ProcessorMixin, SliceReader]:
    """The model of a local Hugging Face folder with parameters on meta, its processor, and its weights' reader."""
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in SUPPORTED_TYPES:
        raise UsageError(f"{folder} is a {config.model_type!r} model; this engine fine-tunes "
                         f"{' and '.join(SUPPORTED_TYPES)} only.")
    config._attn_implementation = attn_implementation
    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    processor = read_processor(folder)
    use_real_pad_token(processor, model)
    return model, processor, SliceReader(folder)


def build_on_meta(spec: str, dtype: torch.dtype, attn_implementation: str = "sdpa") \
        -> tuple[PreTrainedModel, ProcessorMixin]:
    """The model `spec` names (as `models.load` takes it) with parameters on meta, and its processor:
    no weights are read or drawn (engine/plan/ranks.py fills them with fake tensors)."""
    config, processor = config_and_processor(spec)
    config._attn_implementation = attn_implementation
    with parameters_on_meta():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    use_real_pad_token(processor, model)
    return model, processor


def local_folder(spec: str) -> Path:
    """A folder as is; a hub id downloaded (config, processor and safetensors only) into the HF cache."""
    if Path(spec).is_dir():
        return Path(spec)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as error:  # the hub's many error types; all mean the same thing to the user
        raise UsageError(f"cannot fetch {spec!r} from the Hugging Face hub (is it reachable?): {error}") from error


def materialize(model: nn.Module, part: nn.Module, read: SliceReader, device: torch.device) -> None:
    """Read the weights of `part` (a piece of the weightless `model`) whole, onto `device`: a
    pipeline rank's own stage, while the other stages' parameters stay on meta. `read` may be
    quant.QuantizingReader, for the buffers of NF4 layers quantized on meta."""
    names = {id(tensor): name for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    for module in part.modules():
        for attr, param in module._parameters.items():
            if param is not None and param.is_meta:
                weight = read(names[id(param)], 0, param.numel()).view(param.shape).to(device, param.dtype)
                module._parameters[attr] = nn.Parameter(weight, requires_grad=param.requires_grad)
            elif param is not None and param.device != device:  # made real before loading: LoRA's A and B
                module._parameters[attr] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
        # Buffers one by one, not by part.to(), which would swap the parameters just set and cannot swap
        # fake ones (engine/plan/ranks.py): the rotary tables move; an empty NF4 layer's codes are read.
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                weight = read(names[id(buffer)], 0, buffer.numel()).view(buffer.shape)
                module._buffers[attr] = weight.to(device, buffer.dtype)
            elif buffer is not None:
                module._buffers[attr] = buffer.to(device)


def load_text_model(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, ProcessorMixin]:
    """The text decoder of the model `spec` names (as `models.load` takes it), alone on `device` in `dtype`,
    and the processor: what a judge embeds text with. A folder's or the hub's vision encoder, connector and
    lm_head are never read (1.3B parameters of the 8B: 2.4 GiB in bf16, what lets a 16 GB card judge).
    Random weights (a built-in tiny model, a config file) are drawn whole, in the order training drew them, and the
    rest dropped."""
    if spec in BUILT_IN or spec.endswith(".json"):
        model, processor = load(spec, dtype, device)
        return model.get_decoder(), processor
    model, processor, read = load_on_meta(local_folder(spec), dtype)
    decoder = model.get_decoder()
    materialize(model, decoder, read, device)
    return decoder, processor
