"""The model's repeated blocks, asked for by activation checkpointing (and later FSDP/pipeline)."""

import torch.nn as nn
from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The text model's decoder layers, where nearly all activation memory of a VLM step lives."""
    return list(model.model.text_model.layers)
