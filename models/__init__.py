"""Everything that knows Idefics2 and Idefics3: loading, the tiny configs, module paths and blocks."""

from models.load import BUILT_IN, load, use_real_pad_token
from models.parts import blocks, checkpointed_blocks, decoder_layers
from models.targets import PRESETS, matching_modules
from models.tiny import build_tiny, tiny_idefics3, tiny_processor

__all__ = ["BUILT_IN", "PRESETS", "blocks", "build_tiny", "checkpointed_blocks", "decoder_layers", "load",
           "matching_modules", "tiny_idefics3", "tiny_processor", "use_real_pad_token"]
