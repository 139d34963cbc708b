"""A tiny random-weight Idefics2 (and Idefics3) that trains on a CPU in well under a second a step.

Every part of the real model is present -- SigLIP vision encoder, perceiver connector,
Mistral text model -- only narrower and shallower, so the same code paths (LoRA targets,
block lists, pipeline stages) run in tests and on the real 8B model. The processor is the
real Idefics2 one shipped in `idefics2_processor/`, with the image size shrunk to match.
The tiny Idefics3 (`--model tiny-idefics3`, SmolVLM's architecture) has the same vision encoder and
text widths, a pixel-shuffle connector, and the real Idefics3 processor on the same tokenizer
(models/idefics3_processor.py), splitting each picture into up to 2 x 2 tiles and the whole.
"""

import copy
from pathlib import Path

import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from models.idefics3_processor import ADDED_TOKENS, idefics3_processor
from models.processors import read_processor

PROCESSOR_DIR = Path(__file__).parent / "idefics2_processor"
IMAGE_SIZE = 56  # pixels; 4x4 patches of 14
PATCH_SIZE = 14
IMAGE_SEQ_LEN = 4  # <image> tokens per image = perceiver latents (Idefics3: 4x4 patches pixel-shuffled by 2)
VOCAB_SIZE = 32004  # the shipped tokenizer: Mistral's 32000 + 3 image/utterance tokens + <pad>
IDEFICS3_VOCAB_SIZE = VOCAB_SIZE + len(ADDED_TOKENS)  # and Idefics3's <global-img> and <row_R_col_C> tokens
IDEFICS3_TILES_PER_EDGE = 2  # not the real 4: 5 tiles a picture, not 17, keep the tiny runs quick
IMAGE_TOKEN_ID = 32001
PAD_TOKEN_ID = 32003

_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
)
_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
)


def tiny_idefics2_config() -> Idefics2Config:
    return Idefics2Config(
        vision_config=_VISION,
        perceiver_config=dict(
            hidden_size=_TEXT["hidden_size"], resampler_n_latents=IMAGE_SEQ_LEN, resampler_depth=1,
            resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1,
        ),
        text_config=dict(_TEXT, vocab_size=VOCAB_SIZE, pad_token_id=PAD_TOKEN_ID),
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
    )


def build_tiny(seed: int, config: Idefics2Config | Idefics3Config | None = None) -> PreTrainedModel:
    """Random weights that depend on `seed` alone, never on the caller's RNG state."""
    config = config or tiny_idefics2_config()
    idefics3 = config.model_type == "idefics3"
    model_class = Idefics3ForConditionalGeneration if idefics3 else Idefics2ForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def tiny_processor() -> ProcessorMixin:
    """The real Idefics2 processor with the tiny model's image size and token count."""
    return shipped_processor(tiny_idefics2_config())


def shipped_processor(config: PreTrainedConfig) -> ProcessorMixin:
    """The real processor of `config`'s family on the tokenizer shipped here, fitted to `config`.

    Idefics2: as many <image> tokens as the perceiver has latents, and images no larger than the vision
    encoder's (unchanged for the 8B). Idefics3: models/idefics3_processor.py."""
    if config.model_type == "idefics3":  # adds its tokens to the compiled tokenizer: a whole copy of its own
        return idefics3_processor(copy.deepcopy(read_processor(PROCESSOR_DIR)), config)
    processor = read_processor(PROCESSOR_DIR)
    size = config.vision_config.image_size
    sizes = dict(processor.image_processor.size)
    processor.image_processor.size = {edge: min(pixels, size) for edge, pixels in sizes.items()}
    processor.image_seq_len = config.perceiver_config.resampler_n_latents
    return processor


def tiny_idefics3_config() -> Idefics3Config:
    """Idefics3's shape at the tiny widths: the vocabulary covers the Idefics3 tokens, and the connector's
    pixel shuffle by 2 turns a tile's 4 x 4 patches into IMAGE_SEQ_LEN tokens."""
    return Idefics3Config(
        vision_config=_VISION,
        text_config=dict(_TEXT, model_type="llama", vocab_size=IDEFICS3_VOCAB_SIZE, pad_token_id=PAD_TOKEN_ID),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
        tie_word_embeddings=False,
    )


def tiny_idefics3_processor() -> ProcessorMixin:
    """The real Idefics3 processor fitted to the tiny Idefics3: 56-pixel tiles, a picture scaled to 2 tiles along
    its longer edge (112 px), so a square one becomes 2 x 2 tiles and the whole."""
    processor = shipped_processor(tiny_idefics3_config())
    processor.image_processor.size = {"longest_edge": IDEFICS3_TILES_PER_EDGE * IMAGE_SIZE}
    return processor


def tiny_idefics3(seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The tiny Idefics3 with random weights from `seed`, and its processor."""
    return build_tiny(seed, tiny_idefics3_config()), tiny_idefics3_processor()
