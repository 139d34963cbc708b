"""A tiny random-weight Idefics2 (and Idefics3) that trains on a CPU in well under a second a step.

Every part of the real model is present -- SigLIP vision encoder, perceiver connector,
Mistral text model -- only narrower and shallower, so the same code paths (LoRA targets,
block lists, pipeline stages) run in tests and on the real 8B model. The processor is the
real Idefics2 one shipped in `idefics2_processor/`, with the image size shrunk to match.
"""

from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedModel,
    ProcessorMixin,
)

PROCESSOR_DIR = Path(__file__).parent / "idefics2_processor"
IMAGE_SIZE = 56  # pixels; 4x4 patches of 14
PATCH_SIZE = 14
IMAGE_SEQ_LEN = 4  # <image> tokens per image = perceiver latents
VOCAB_SIZE = 32004  # the shipped tokenizer: Mistral's 32000 + 3 image/utterance tokens + <pad>
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


def shipped_processor(config: Idefics2Config) -> ProcessorMixin:
    """The real Idefics2 processor shipped here, fitted to `config`: as many <image> tokens as the
    perceiver has latents, and images no larger than the vision encoder's (unchanged for the 8B)."""
    processor = AutoProcessor.from_pretrained(PROCESSOR_DIR)
    size = config.vision_config.image_size
    sizes = dict(processor.image_processor.size)
    processor.image_processor.size = {edge: min(pixels, size) for edge, pixels in sizes.items()}
    processor.image_seq_len = config.perceiver_config.resampler_n_latents
    return processor


def tiny_idefics3(seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """An Idefics3 of the same size, with an Idefics3 processor built on the shipped tokenizer.

    Idefics3 pixel-shuffles the patch grid by `scale_factor`, so 4x4 patches give 4 tokens.
    """
    idefics2 = AutoProcessor.from_pretrained(PROCESSOR_DIR)
    tokenizer = idefics2.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<global-img>"]}, replace_extra_special_tokens=False)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                                  chat_template=idefics2.chat_template)
    config = Idefics3Config(
        vision_config=_VISION,
        text_config=dict(_TEXT, model_type="llama", vocab_size=len(tokenizer), pad_token_id=PAD_TOKEN_ID),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
        tie_word_embeddings=False,
    )
    return build_tiny(seed, config), processor
