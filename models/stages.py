"""Idefics2 / Idefics3 cut into contiguous pipeline stages, each rank holding only its own.

Stage 0 embeds the tokens, runs the vision encoder and connector and merges the image features
in, then runs the first decoder layers; middle stages run decoder layers; the last stage runs the
final norm and lm_head and returns the summed token loss. Between stages travels one tensor, the
hidden states (batch, sequence, hidden): the causal mask and rotary tables are recomputed on every
stage from the micro-batch, which every rank has. The last stage's loss function is passed in
(the engine's summed token loss), so this file knows the model and nothing of training.
"""

from collections.abc import Callable

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from errors import UsageError
from models.parts import decoder_layers

# (final hidden states, output layer, labels) -> the micro-batch's summed loss
Loss = Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]


class Stage(nn.Module):
    """Decoder layers [start, stop) of `model`, plus the inputs (first stage) or the head (last).

    Only this stage's modules are children, so `stage.parameters()` is what this rank trains.
    """

    def __init__(self, model: PreTrainedModel, start: int, stop: int, first: bool, last: bool, loss: Loss):
        super().__init__()
        inner = model.model
        self.__dict__["inner"] = inner  # its methods merge image features in; not a child
        self.first, self.last, self.bounds = first, last, (start, stop)
        self.layers = nn.ModuleList(decoder_layers(model)[start:stop])
        self.rotary = inner.text_model.rotary_emb
        self.text_config = inner.text_model.config
        if first:
            self.embed_tokens, self.vision_model, self.connector = \
                inner.text_model.embed_tokens, inner.vision_model, inner.connector
        if last:
            self.norm, self.lm_head, self.loss = inner.text_model.norm, model.lm_head, loss

    def forward(self, hidden: torch.Tensor | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.first:
            hidden = self._embed(batch)
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        # No cache, passed by position: transformers 5.17 names that argument past_key_values, later releases cache.
        mask = create_causal_mask(self.text_config, hidden, batch["attention_mask"], None, position_ids=positions)
        rotary = self.rotary(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        if self.last:
            return self.loss(self.norm(hidden), self.lm_head, batch["labels"])
        return hidden

    def _embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """As the model's own forward does: token embeddings with image features at the <image> slots."""
        embeds = self.embed_tokens(batch["input_ids"])
        if "pixel_values" not in batch:
            return embeds
        images = self.inner.get_image_features(batch["pixel_values"], batch.get("pixel_attention_mask"),
                                               return_dict=True).pooler_output
        images = torch.cat(images) if isinstance(images, (list, tuple)) else images
        return self.inner.inputs_merger(input_ids=batch["input_ids"], inputs_embeds=embeds,
                                        image_hidden_states=images.to(embeds.dtype))


def split_points(model: PreTrainedModel, stages: int, split: tuple[int, ...] = ()) -> list[int]:
    """The first decoder layer of every stage after the first: `split` checked, or balanced by parameters.

    Balanced means the largest stage (counting the embeddings, vision encoder and connector on the
    first, the norm and lm_head on the last) is as small as it can be, every stage with a layer.
    """
    layers = decoder_layers(model)
    check_split(split, stages, len(layers))
    if split:
        return list(split)
    sizes = [_numel(layer) for layer in layers]
    head = sum(_numel(m) for m in (model.model.text_model.norm, model.lm_head))
    inputs = _numel(model) - sum(sizes) - head
    # best[k][j]: the smallest possible largest stage when layers [0, j) form k stages; a tiny DP.
    best = {(1, j): inputs + sum(sizes[:j]) for j in range(1, len(layers) + 1)}
    cut = {}
    for k in range(2, stages + 1):
        for j in range(k, len(layers) + 1):
            options = [(max(best[k - 1, i], sum(sizes[i:j]) + (head if j == len(layers) else 0)), i)
                       for i in range(k - 1, j)]
            best[k, j], cut[k, j] = min(options)
    if stages == 1:
        return []
    points, j = [], len(layers)
    for k in range(stages, 1, -1):
        j = cut[k, j]
        points.append(j)
    return points[::-1]


def check_split(split: tuple[int, ...], stages: int, layers: int) -> None:
    """Refuses more stages than decoder `layers`, or a `split` that does not cut them into `stages` stages: the
    launcher asks this of the model's config before the run's folder is claimed."""
    if stages > layers:
        raise UsageError(f"{stages} pipeline stages need at least {stages} decoder layers; the model has {layers}.")
    if split and (len(split) != stages - 1 or list(split) != sorted(set(split)) or split[0] < 1
                  or split[-1] >= layers):
        raise UsageError(f"--split needs {stages - 1} increasing layer indices between 1 and {layers - 1} "
                         f"for {stages} stages, not {list(split)}.")


def stage(model: PreTrainedModel, points: list[int], rank: int, loss: Loss) -> Stage:
    """Rank `rank`'s stage of the split at `points`; the last one returns `loss(hidden, lm_head, labels)`."""
    bounds = [0, *points, len(decoder_layers(model))]
    return Stage(model, bounds[rank], bounds[rank + 1], first=rank == 0, last=rank == len(bounds) - 2, loss=loss)


def activation_shape(model: PreTrainedModel, dtype: torch.dtype | None = None) \
        -> Callable[[dict], tuple[torch.Size, torch.dtype]]:
    """What travels between any two stages for a micro-batch: the hidden states (batch, sequence,
    hidden size), in the embeddings' dtype, which the residual stream keeps as in the unsplit model;
    or in `dtype`, what the embeddings compute in when it is not their weights' (FSDP gathers them so)."""
    hidden_size = model.config.get_text_config().hidden_size
    dtype = dtype or model.get_input_embeddings().weight.dtype

    def shape(batch: dict) -> tuple[torch.Size, torch.dtype]:
        return torch.Size((*batch["input_ids"].shape, hidden_size)), dtype

    return shape


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
