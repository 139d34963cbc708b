"""NF4 (4-bit NormalFloat) frozen linear layers for QLoRA, on bitsandbytes.functional."""

from quant.linear4bit import Linear4bit
from quant.quantize import QuantizingReader, dequantize, quantize, quantized_bytes

__all__ = ["Linear4bit", "QuantizingReader", "dequantize", "quantize", "quantized_bytes"]
