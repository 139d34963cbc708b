"""The model's repeated blocks, asked for by activation checkpointing, FSDP and (later) the pipeline."""

import torch.nn as nn
from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The text model's decoder layers, where nearly all activation memory of a VLM step lives."""
    return list(model.model.text_model.layers)


def blocks(model: PreTrainedModel) -> list[nn.Module]:
    """Every repeated layer, vision encoder first, in the order a forward runs them: FSDP's units.

    Idefics3 has no perceiver (its connector is a pixel shuffle and one projection).
    """
    perceiver = getattr(model.model.connector, "perceiver_resampler", None)
    return [*model.model.vision_model.encoder.layers, *(perceiver.layers if perceiver else []),
            *decoder_layers(model)]
