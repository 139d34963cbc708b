"""NF4 (4-bit NormalFloat) frozen linear layers for QLoRA, on bitsandbytes.functional."""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes warns that an optional fused kernel package
# (`kernels`) is missing. We never call that kernel (we dequantize, then multiply), so the
# warning would only alarm users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from quant.linear4bit import Linear4bit  # noqa: E402 (imported after the logger is quieted)
from quant.quantize import QuantizingReader, dequantize, quantize, quantized_bytes  # noqa: E402 (likewise)

__all__ = ["Linear4bit", "QuantizingReader", "dequantize", "quantize", "quantized_bytes"]
