"""An Idefics3 (SmolVLM) processor built offline, on the tokenizer and chat template shipped here.

Idefics3 splits a picture into a grid of tiles of the vision encoder's size, each one a run of `<image>`
tokens opened by `<fake_token_around_image><row_R_col_C>`, a row of tiles ended by a newline, and then
the whole picture scaled down to one tile, opened by `<fake_token_around_image><global-img>` and closed
by `<fake_token_around_image>`. SmolVLM's tokenizers hold `<global-img>` and the 36 `<row_R_col_C>` (a
grid of at most 6 x 6) as added special tokens, single tokens each; so does this one, added after the
shipped tokenizer's own, so a model's vocabulary must cover them too (models/tiny.py IDEFICS3_VOCAB_SIZE).
"""

from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor, ProcessorMixin

GLOBAL_IMAGE = "<global-img>"
TILE_TOKENS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
ADDED_TOKENS = (GLOBAL_IMAGE, *TILE_TOKENS)
# The picture is first scaled to this many tiles along its longer edge: SmolVLM's 2048 px of 512 px tiles,
# Idefics3-8B's 1456 px of 364 px tiles.
REAL_TILES_PER_EDGE = 4


def image_seq_len(config: Idefics3Config) -> int:
    """`<image>` tokens per tile: the vision encoder's patch grid, pixel-shuffled by `scale_factor` along each
    side (SmolVLM-256M: (512/16)^2 / 4^2 = 64; Idefics3-8B: (364/14)^2 / 2^2 = 169)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


def idefics3_processor(idefics2: ProcessorMixin, config: Idefics3Config) -> Idefics3Processor:
    """The real Idefics3 processor on `idefics2`'s tokenizer and chat template (both changed in place), fitted
    to `config`: tiles of the vision encoder's size, pictures scaled to `REAL_TILES_PER_EDGE` tiles, splitting
    on (as SmolVLM's and Idefics3-8B's processors have it)."""
    tokenizer = idefics2.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)}, replace_extra_special_tokens=False)
    # Idefics2's tokenizer_config.json says do_image_splitting=False, and transformers passes a tokenizer's init
    # settings to the image processor over its own: the text would count one tile a picture, the pixels five.
    tokenizer.init_kwargs.pop("do_image_splitting", None)
    tokenizer.init_kwargs["processor_class"] = "Idefics3Processor"
    tile = config.vision_config.image_size
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True,
                                                size={"longest_edge": REAL_TILES_PER_EDGE * tile},
                                                max_image_size={"longest_edge": tile})
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len(config),
                             chat_template=idefics2.chat_template)
