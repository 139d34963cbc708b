"""Hand-written LoRA: wrap linear layers by path, merge, and save/load PEFT-format adapters."""

from lora.inject import adapter_state_dict, base_layers, inject, lora_modules, merge, merge_and_unload, unmerge
from lora.lora_linear import LoRALinear
from lora.peft_format import load, save

__all__ = ["LoRALinear", "adapter_state_dict", "base_layers", "inject", "load", "lora_modules", "merge",
           "merge_and_unload", "save", "unmerge"]
