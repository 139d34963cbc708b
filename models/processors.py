"""Processors read from local folders, once a process for each content of their files.

A rank reads the same tokenizer (Idefics2's is 3.4 MB of JSON, compiled: 0.3-0.8 s a read here) from the shipped
files, OUT/base, OUT/final and the judge's base; a plan reads it up to 5 times. `read_processor` reads a folder's
files once for each content, and gives every caller a copy whose settings are its own (`settings_copy`).
"""

import copy
import hashlib
import json
from pathlib import Path

from transformers import AutoProcessor, ProcessorMixin

# Files no processor reads: weights and their index, and the configs of a model, its training and its adapter.
# config.json counts by its model_type alone, and only where no file of the processor names its class.
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz", ".index.json")
NOT_READ = {"config.json", "generation_config.json", "adapter_config.json", "training_config.json"}
HASHED_UP_TO = 64 << 20  # bytes: a larger file (none a processor reads) counts by its size and time instead

_READ: dict[str, ProcessorMixin] = {}


def read_processor(spec: str | Path) -> ProcessorMixin:
    """`AutoProcessor.from_pretrained(spec)`; from a local folder, a copy of what this process read from files of the
    same content (under another folder's name_or_path, perhaps: nothing of the engine reads it as a place)."""
    folder = Path(spec)
    if not folder.is_dir():
        return AutoProcessor.from_pretrained(spec)  # a hub id: the hub's own cache
    key = _content(folder)
    if key not in _READ:
        _READ[key] = AutoProcessor.from_pretrained(folder)
    return settings_copy(_READ[key])


def settings_copy(processor: ProcessorMixin) -> ProcessorMixin:
    """A copy whose settings (sizes, padding side, pad token) are its own, sharing what nothing changes once it is
    loaded: the compiled tokenizer, whose padding and truncation the Python tokenizer sets before every call, and
    the vocabulary and merges it was compiled from. 0.3 ms, where a whole copy takes as long as a read."""
    tokenizer = processor.tokenizer
    shared = [tokenizer._tokenizer, getattr(tokenizer, "_vocab", None), getattr(tokenizer, "_merges", None)]
    return copy.deepcopy(processor, {id(part): part for part in shared if part is not None})


def _content(folder: Path) -> str:
    digest, named = hashlib.sha256(), False
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.endswith(WEIGHTS) or path.name in NOT_READ:
            continue
        stat = path.stat()
        content = path.read_bytes() if stat.st_size <= HASHED_UP_TO else f"{stat.st_size} {stat.st_mtime_ns}".encode()
        named = named or b'"processor_class"' in content
        digest.update(f"{path.name}\0{len(content)}\0".encode() + content)
    if not named and (folder / "config.json").is_file():  # the class comes from the model's type
        digest.update(str(json.loads((folder / "config.json").read_text()).get("model_type")).encode())
    return digest.hexdigest()
