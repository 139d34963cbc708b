"""bitsandbytes' functional API, imported quietly: every module of the engine imports it from here.

On a CPU with AVX512-BF16, importing bitsandbytes fetches an optional fused kernel from the Hugging
Face Hub (the `kernels` package). Offline, `kernels` warns that it skips the publisher check and
bitsandbytes that the kernel failed to load. We never call that kernel (we dequantize, then
multiply), so the two lines would only stand before a run's own output and alarm users. Both are
logged while bitsandbytes is first imported, so the loggers are quieted before that import.
"""

import logging

for _name in ("kernels", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import bitsandbytes.functional as bnbf  # noqa: E402 (imported after the loggers are quieted)

__all__ = ["bnbf"]
