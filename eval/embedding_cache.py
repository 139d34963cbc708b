"""A fixed judge's text embeddings, kept on disk: each reference is embedded once per judge, not once per run.

A run's evaluation embeds every reference twice (for the trained model's answers and the base model's), and the
next run on the same test split embeds them all again. With `--scorer base` or a folder, the judge is the same
model each time, so an embedding is a function of the judge and the text alone: computed once, it is read back.

The judge is known by its weights, not by its name: a digest of every tensor's name, shape, dtype and 4,096
evenly spaced values, with the device type (a GPU's kernels round otherwise than the CPU's). So a folder
re-written with other weights, or a tiny model drawn anew, is another judge; and hashing the whole 8B model
(16 GB) is not needed for that. `--scorer self` is never cached: each fine-tuned model is its own judge.

One file per judge, `$MUSEFT_CACHE/embeddings/<digest>.safetensors` (default `~/.cache/museft`), each text
under the SHA-256 of its UTF-8 bytes, in fp32 (the fair judge's pooling is fp32). Ranks that score their
share of the rows each write the file whole, renamed into place (engine/outputs/publish.py): the last one wins,
and a text another rank added is embedded again the next time, never read half-written.
"""

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.outputs.publish import write_file

SAMPLES = 4096  # values read of each tensor for the judge's digest


class EmbeddingCache:
    """The stored embeddings of one judge; `missing(texts)` says which to compute, `add` and `save` keep them."""

    def __init__(self, judge: nn.Module) -> None:
        folder = Path(os.environ.get("MUSEFT_CACHE", "~/.cache/museft")).expanduser() / "embeddings"
        self.path = folder / f"{judge_digest(judge)}.safetensors"
        self.stored: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            try:
                self.stored = load_file(self.path)
            except (SafetensorError, OSError):  # damaged by hand or a full disk: recomputed, then rewritten
                self.stored = {}
        self.added = False

    def get(self, text: str) -> torch.Tensor | None:
        return self.stored.get(_key(text))

    def add(self, text: str, embedding: torch.Tensor) -> None:
        self.stored[_key(text)] = embedding.detach().float().cpu().contiguous()
        self.added = True

    def save(self) -> None:
        if not self.added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file(self.path, lambda tmp: save_file(self.stored, str(tmp)))
        self.added = False


def judge_digest(judge: nn.Module) -> str:
    """What tells one judge's weights from another's, cheaply (module docstring)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(judge.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES].float().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{tensor.device.type}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
