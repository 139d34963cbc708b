"""Load Idefics2 / Idefics3 and its processor from a hub id, a local folder, a built-in tiny config,
or a config file (random weights of that architecture: benchmarks and memory checks without a download)."""

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from errors import UsageError
from models.processors import read_processor
from models.tiny import (
    IDEFICS3_VOCAB_SIZE,
    IMAGE_TOKEN_ID,
    build_tiny,
    shipped_processor,
    tiny_idefics2_config,
    tiny_idefics3_config,
    tiny_idefics3_processor,
    tiny_processor,
)

SUPPORTED_TYPES = ("idefics2", "idefics3")
# The built-in models: random weights drawn from the seed alone, no files (their config, their processor).
BUILT_IN = {"tiny": (tiny_idefics2_config, tiny_processor),  # engine/config.py BUILT_IN_MODELS names these too
            "tiny-idefics3": (tiny_idefics3_config, tiny_idefics3_processor)}


def load(
    spec: str,
    dtype: torch.dtype,
    device: torch.device,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """`spec` is "tiny" or "tiny-idefics3", a local folder, a Hugging Face id, or an Idefics2 or Idefics3
    `config.json` file; weights land on `device` in `dtype`. Buffers keep their own dtype, as from_pretrained keeps
    them: the rotary tables stay fp32 (in bf16 the 8B's RoPE phase is 0.53 rad off at position 429)."""
    if spec in BUILT_IN:
        config, processor = config_and_processor(spec)
        model = build_tiny(seed, config)
        model.config._attn_implementation = attn_implementation
    elif spec.endswith(".json"):
        model, processor = _random_from_config(Path(spec), dtype, device, attn_implementation, seed)
    else:
        model, processor = _load_pretrained(spec, dtype, device, attn_implementation)
    use_real_pad_token(processor, model)
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model, processor


def config_and_processor(spec: str) -> tuple[PretrainedConfig, ProcessorMixin]:
    """The model's config and the processor `load` gives with it, without any weights: cheap enough to
    count a data set's tokens before the model is loaded."""
    if spec in BUILT_IN:
        config, processor = BUILT_IN[spec]
        return config(), processor()
    if spec.endswith(".json"):
        config = _json_config(Path(spec))
        return config, shipped_processor(config)
    return _pretrained_config(spec), read_processor(spec)


def _pretrained_config(spec: str) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as error:
        where = "local folder" if Path(spec).exists() else "Hugging Face id (is the hub reachable?)"
        raise UsageError(f"cannot load a model config from {spec!r} as a {where}: {error}") from error
    if config.model_type not in SUPPORTED_TYPES:
        raise UsageError(f"{spec!r} is a {config.model_type!r} model; this engine fine-tunes "
                         f"{' and '.join(SUPPORTED_TYPES)} only.")
    return config


def _json_config(path: Path) -> PretrainedConfig:
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read a model config from {str(path)!r}: {error}") from error
    if not isinstance(settings, dict):
        raise UsageError(f"{str(path)!r} holds a JSON {type(settings).__name__}, not a model config (an object).")
    if settings.get("model_type") not in SUPPORTED_TYPES:
        raise UsageError(f"{str(path)!r} is not an Idefics2 or Idefics3 config (its model_type is "
                         f"{settings.get('model_type')!r}); random weights come with a processor on the shipped "
                         "tokenizer, which this engine has for those two only.")
    for part in ("text_config", "vision_config", "perceiver_config"):
        if not isinstance(settings.get(part, {}), dict):
            raise UsageError(f"{str(path)!r}: its {part} must be an object of settings, not a "
                             f"{type(settings[part]).__name__}.")
    try:
        config = AutoConfig.for_model(**settings)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise UsageError(f"{str(path)!r} is not a config transformers can build ({error}).") from error
    check_shapes(config, str(path))
    if config.model_type == "idefics3":
        fit_to_shipped_tokenizer(config, str(path))
    return config


def fit_to_shipped_tokenizer(config: PretrainedConfig, where: str) -> None:
    """An Idefics3 config's random weights read the shipped tokenizer's ids, not its own tokenizer's (SmolVLM's
    <image> is 49190, ours 32001): the model looks for <image> where the processor puts it, and its vocabulary
    must hold the Idefics3 tokens the processor adds (models/idefics3_processor.py)."""
    vocab = config.text_config.vocab_size
    if vocab < IDEFICS3_VOCAB_SIZE:
        raise UsageError(f"{where!r}: its text_config.vocab_size {vocab} is smaller than the {IDEFICS3_VOCAB_SIZE} "
                         "tokens of the shipped tokenizer with Idefics3's image tokens.")
    config.image_token_id = IMAGE_TOKEN_ID


def check_shapes(config: PretrainedConfig, where: str) -> None:
    """Attention heads that divide their widths: a model whose don't fails only as it is built, or mid-step."""
    for part in ("text_config", "vision_config"):
        sub = getattr(config, part)
        if sub.hidden_size % sub.num_attention_heads:
            raise UsageError(f"{where!r}: its {part}.hidden_size {sub.hidden_size} is not a multiple of "
                             f"{part}.num_attention_heads {sub.num_attention_heads}.")
    text = config.text_config
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if text.num_attention_heads % kv_heads:
        raise UsageError(f"{where!r}: its text_config.num_attention_heads {text.num_attention_heads} is not a multiple "
                         f"of text_config.num_key_value_heads {kv_heads}.")


def _load_pretrained(spec: str, dtype: torch.dtype, device: torch.device,
                     attn_implementation: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    _pretrained_config(spec)
    processor = read_processor(spec)
    # Straight onto the device: loaded on the CPU first, every rank would hold the whole model in host memory.
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=dtype, device_map=device,
                                                        attn_implementation=attn_implementation)
    return model, processor


def _random_from_config(path: Path, dtype: torch.dtype, device: torch.device, attn_implementation: str,
                        seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Random weights drawn from `seed` alone, made directly on `device` in `dtype` (an 8B model in
    fp32 on the CPU first would take 32 GB), with the real processor of its family on the shipped tokenizer,
    fitted."""
    config = _json_config(path)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), shipped_processor(config)


def use_real_pad_token(processor: ProcessorMixin, model: PreTrainedModel) -> None:
    """Pad with a token the model has an embedding row for, reusing <unk> if need be.

    Adding a fresh <pad> row would give it random weights that leak into every padded batch.
    """
    tokenizer = processor.tokenizer
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= rows:
        tokenizer.pad_token = tokenizer.unk_token
    model.config.pad_token_id = tokenizer.pad_token_id
