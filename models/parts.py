"""The model's repeated blocks, asked for by activation checkpointing, FSDP and (later) the pipeline."""

import torch.nn as nn
from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The text model's decoder layers, where nearly all activation memory of a VLM step lives."""
    return list(model.model.text_model.layers)


def connector_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """The modality projection, then the perceiver's layers (Idefics3 has no perceiver: its connector is
    a pixel shuffle and one projection). The projection widens every image patch to the text model's
    width: on Idefics2-8B its activations are the largest of the step after the decoder's."""
    perceiver = getattr(model.model.connector, "perceiver_resampler", None)
    return [model.model.connector.modality_projection, *(perceiver.layers if perceiver else [])]


def blocks(model: PreTrainedModel) -> list[nn.Module]:
    """Every repeated layer and the connector's, vision encoder first, in the order a forward runs them:
    FSDP's units."""
    return [*model.model.vision_model.encoder.layers, *connector_blocks(model), *decoder_layers(model)]


def checkpointed_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """What activation checkpointing recomputes: the blocks whose activations backward keeps, i.e.
    all but vision layers when nothing in or before them trains (then backward stops at the connector)."""
    vision = model.model.vision_model.encoder.layers
    trains = any(p.requires_grad for p in model.model.vision_model.parameters())
    return [*(vision if trains else []), *connector_blocks(model), *decoder_layers(model)]
