"""What a GPU plan, traced on CPU fake tensors, must do as CUDA does (engine/plan/ranks.py).

Fake CUDA tensors cannot run backward without a GPU, so a GPU run's step is planned on CPU fakes.
Two of CPU's kernels keep different tensors from CUDA's, and each context below makes the CPU
keep what CUDA keeps while a GPU is planned:

- dropout: CUDA keeps a 1-byte mask for backward; the CPU keeps the scaled noise in the input's dtype.
- autocast: CUDA's autocast runs layer_norm, softmax, log_softmax, exp, pow, sum and the others of
  its fp32 lists in fp32 (ATen/autocast_mode.h: AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE); CPU
  autocast leaves them in bf16, so their outputs, and what backward saves of them, are half as wide.
"""

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

# CUDA autocast's fp32 policy: floating inputs narrower than fp32 are cast to fp32 first.
CUDA_FP32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
             "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
             "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
             "cosine_similarity", "dist", "pdist", "renorm", "logsumexp", "upsample_nearest1d",
             "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d",
             "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
             "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa")
# Its fp32_set_opt_dtype policy: without a dtype argument, a floating input computes into fp32 (no copy of it).
CUDA_FP32_OUTPUT = ("softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
                    "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList")
NARROW = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def cuda_dropout(gpu: bool) -> Iterator[None]:
    """Dropout as CUDA runs it, with a 1-byte mask kept for backward. The values differ, the shapes and
    dtypes a GPU allocates do not."""
    if not gpu:
        yield
        return
    dropout = F.dropout

    def fused(input, p=0.5, training=True, inplace=False):
        return torch.native_dropout(input, p, training)[0] if training and p > 0 else input

    F.dropout = fused
    try:
        yield
    finally:
        F.dropout = dropout


@contextlib.contextmanager
def cuda_autocast(gpu: bool) -> Iterator[None]:
    """CPU autocast runs CUDA autocast's fp32 ops in fp32 too: a kernel of ours at the AutocastCPU dispatch
    key (where autocast's own kernels sit, above autograd, so backward sees the casts) for every such op
    that CPU autocast lets through untouched. Ops that CPU autocast handles itself (the losses, prod,
    cdist: fp32 on both) keep CPU's kernel."""
    if not gpu:
        yield
        return
    library = torch.library.Library("aten", "IMPL")
    for names, kernel in ((CUDA_FP32, _fp32_inputs), (CUDA_FP32_OUTPUT, _fp32_output)):
        for name in names:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCPU"):
                library.impl(name, kernel(_overload(name)), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


def _overload(name: str) -> torch._ops.OpOverload:
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _below_autocast() -> contextlib.AbstractContextManager:
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def _fp32_inputs(op: torch._ops.OpOverload) -> Callable:
    def widen(value):
        if isinstance(value, (list, tuple)):
            return [widen(item) for item in value]
        return value.float() if isinstance(value, torch.Tensor) and value.dtype in NARROW else value

    def kernel(*args, **kwargs):
        with _below_autocast():
            return op(*map(widen, args), **{key: widen(value) for key, value in kwargs.items()})
    return kernel


def _fp32_output(op: torch._ops.OpOverload) -> Callable:
    position = next(i for i, argument in enumerate(op._schema.arguments) if argument.name == "dtype")

    def kernel(*args, **kwargs):
        given = args[position] if len(args) > position else kwargs.get("dtype")
        first = args[0]
        if given is None and first.is_floating_point() and first.dtype != torch.float64:
            kwargs = {**kwargs, "dtype": torch.float32}
        with _below_autocast():
            return op(*args, **kwargs)
    return kernel
