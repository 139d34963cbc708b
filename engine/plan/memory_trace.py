"""The bytes a stretch of PyTorch code holds on its device, counted op by op: real or fake tensors.

`MemoryTrace` sees every aten op's outputs (a TorchDispatchMode, below autograd, so backward's ops
and the tensors autograd saves are seen too) and counts each new tensor storage once, until it is
freed. Its `peak` is the most those storages held at once. On a GPU, PyTorch's caching allocator
rounds every block up to 512 bytes; `granularity` does the same, so a CUDA plan counts as CUDA does.

`RealShapes` lets a step run on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data)
while the batch stays real: an op whose tensors are all real runs for real (token ids, masks:
small), and an op that indexes a fake tensor with a real boolean mask gets the mask's positions,
so the shapes that depend on the data (how many images are real, which tokens carry loss) are
exact. A fake's value asked for by Python (`loss.item()` for a log line) reads as 0.
"""

import weakref
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

CUDA_BLOCK = 512  # bytes: the smallest block of PyTorch's CUDA caching allocator
_DEVICE = torch.ops.prim.device.default  # over half the ops a plan's step dispatches


class MemoryTrace(TorchDispatchMode):
    def __init__(self, granularity: int = 1):
        super().__init__()
        self.granularity, self._at_peak = granularity, lambda: 0
        self.live = self.peak = self.at_peak = 0  # at_peak: what `at_peak()` said when the peak was reached
        self._seen: set[int] = set()  # storages counted, by the address of their StorageImpl
        self._ignoring = False

    def at_peak_of(self, measure: Callable[[], int]) -> None:
        """From now, the peak is counted afresh and `measure()` is taken whenever it is reached."""
        self._at_peak, self.peak, self.at_peak = measure, self.live, measure()

    def ignoring(self, run: Callable[[], object]) -> object:
        """`run()` with what it allocates left uncounted (host memory, in a plan of a GPU run)."""
        self._ignoring = True
        try:
            return run()
        finally:
            self._ignoring = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:  # a fake tensor's device, asked by C++ (autograd, argument parsing): no storage
            return args[0].device  # what the modes below would answer, without a trip through each (51 -> 15 us)
        out = func(*args, **(kwargs or {}))
        if self._ignoring:
            return out
        for tensor in tensors_in(out):
            if tensor.device.type != "meta":
                self._count(tensor.untyped_storage())
        if self.live > self.peak:
            self.peak, self.at_peak = self.live, self._at_peak()
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._seen:
            return
        size = -(-storage.nbytes() // self.granularity) * self.granularity
        self._seen.add(key)
        self.live += size
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class RealShapes(TorchDispatchMode):
    """Under a FakeTensorMode: real tensors drive the data-dependent shapes of fake ones (see above)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _DEVICE:
            return args[0].device
        kwargs = kwargs or {}
        tensors = tensors_in((args, kwargs))
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0.0 if args[0].is_floating_point() else 0
        if func in _MASKED:
            args = (args[0], _positions(args[1]), *args[2:])
        return func(*args, **kwargs)


def tensors_in(value: object) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs (nested tuples, lists and dicts): what pytree's tree_flatten
    would find, at a fifth of its cost, which was a tenth of an 8B plan's time."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in tensors_in(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in tensors_in(item)]
    return []


_MASKED = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
           torch.ops.aten._index_put_impl_.default}


def _positions(indices: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Boolean masks among `indices` as the integer positions they select, one index per masked dimension."""
    def expand(index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool and not isinstance(index, FakeTensor):
            with _disable_current_modes():
                return list(index.nonzero().unbind(1))
        return [index]

    return [position for index in indices for position in expand(index)]

