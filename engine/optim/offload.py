"""`--optimizer-offload cpu`: AdamW's fp32 master weights and moments in host memory, stepped on the CPU.

The device keeps only what forward and backward need: the trained weights in the precision's dtype
and their gradients, 4 bytes a trained weight under `--precision bf16` against 16 for fp32 masters
and moments on the device. Because the masters are fp32, no update is lost to bf16 rounding and none
needs stochastic rounding: the masters follow fp32 AdamW exactly. The masters are part of
`state_dict`: a resumed run continues from them, not from the rounded device weights.

A step goes chunk by chunk (consecutive parameters, `CHUNK_BYTES` of device weights, a larger one
alone) so that the copies overlap the CPU's work: chunk k+1's gradients come to the host while the
CPU steps chunk k, and chunk k's updated weights go back while it steps chunk k+1. Each copy is one
DMA between the device and one of two pinned slots, on a side CUDA stream; the host waits only for
the event of the chunk it is about to step, and the compute stream waits for the side stream before
the next forward reads the weights. The rest stays on the host: a slot's gradients are widened to
fp32 there (bf16 to fp32 is exact) and the updated masters rounded into the slot there (to nearest,
as a device copy would), so nothing of this allocates device memory. AdamW is elementwise, so
stepping by chunks gives the serial step's results bit for bit. What a step costs is the CPU's update
(torch's multi-tensor kernel) plus the first chunk's copy in and the last one's copy out; the rest of
the PCIe traffic hides behind the update.

Host memory (`host_bytes`, which the plan counts): the masters and both moments, 12 bytes a trained
weight, pageable, and the two slots, pinned, each a power of two bytes (the size torch's caching host
allocator would round it to anyway), at least the largest chunk. While a chunk steps, its gradients
widened to fp32 are a transient chunk's worth more.
"""

import contextlib

import torch
import torch.nn as nn

CHUNK_BYTES = 32 * 2**20  # device bytes of weights a chunk holds: tens of chunks per GB to overlap, few Python calls
ALIGN = 64  # a weight's offset in a slot, in bytes: every dtype's view of the slot starts aligned


class HostAdamW(torch.optim.AdamW):
    """torch's AdamW over host fp32 copies of `groups`' parameters, which it keeps updated."""

    def __init__(self, groups: list[dict], chunk_bytes: int = CHUNK_BYTES, **settings):
        params = [param for group in groups for param in group["params"]]
        device = next((param.device for param in params if param.is_cuda), None)
        self.pairs = [(param, _host_master(param)) for param in params]
        masters = iter(master for _, master in self.pairs)
        super().__init__([dict(group, params=[next(masters) for _ in group["params"]]) for group in groups],
                         foreach=True, **settings)
        # (device weight, host master, byte offset in a slot) of each chunk's parameters.
        self.chunks = _chunks(self.pairs, chunk_bytes)
        size = _power_of_two(max((offset + _nbytes(param) for chunk in self.chunks
                                  for param, _, offset in chunk), default=0))
        self.slots = [torch.empty(size, dtype=torch.uint8, pin_memory=device is not None) for _ in range(2)]
        self.stream = None if device is None else torch.cuda.Stream(device)  # None: CPU weights, copies are done

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if self.stream is not None:  # backward's gradients are written, its reads of the weights done
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        landed = [self._to_host(k) for k in range(min(2, len(self.chunks)))]  # chunk k's event is landed[k]
        for k, chunk in enumerate(self.chunks):
            slot = self.slots[k % 2]
            if landed[k] is not None:
                landed[k].synchronize()  # this chunk's gradients only: the next chunk's may still be copying
            for param, master, offset in chunk:
                if param.grad is not None:  # without one, AdamW skips the master, and it is not copied back
                    master.grad = _view(slot, offset, param).to(torch.float32)  # an fp32 slot as it is
            super().step()
            updated = [(param, master, offset) for param, master, offset in chunk if master.grad is not None]
            for param, master, offset in updated:
                master.grad = None  # before the slot it may view is overwritten
                _view(slot, offset, param).copy_(master)
            with self._side():
                for param, _, offset in updated:
                    param.copy_(_view(slot, offset, param), non_blocking=True)
            if k + 2 < len(self.chunks):  # into this slot: the side stream runs it after the copies out of it
                landed.append(self._to_host(k + 2))
        if self.stream is not None:  # the next forward reads the updated weights
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def _to_host(self, k: int) -> torch.cuda.Event | None:
        """Issues chunk `k`'s gradient copies into its slot; the event at which they will have landed (None when
        they already have)."""
        slot = self.slots[k % 2]
        with self._side():
            for param, _, offset in self.chunks[k]:
                if param.grad is not None:
                    _view(slot, offset, param).copy_(param.grad, non_blocking=True)
        return None if self.stream is None else self.stream.record_event()

    def _side(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    def host_bytes(self) -> int:
        """What this optimizer keeps in host memory: the masters, their AdamW state, the two slots."""
        state = [t for s in self.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(_nbytes(t) for t in [*(master for _, master in self.pairs), *state, *self.slots])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The device weights' gradients: the ones backward accumulates into (the masters have none)."""
        super().zero_grad(set_to_none)
        for param, _ in self.pairs:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict:
        return dict(super().state_dict(), masters=[master.detach() for _, master in self.pairs])

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        with torch.no_grad():
            for (param, master), saved in zip(self.pairs, state_dict.pop("masters"), strict=True):
                master.copy_(saved)
                param.copy_(master)
        super().load_state_dict(state_dict)


def _host_master(param: nn.Parameter) -> nn.Parameter:
    # Pageable: only the slots take part in DMA.
    return nn.Parameter(param.detach().to("cpu", torch.float32, copy=True))


def _chunks(pairs: list[tuple[nn.Parameter, nn.Parameter]],
            limit: int) -> list[list[tuple[nn.Parameter, nn.Parameter, int]]]:
    """`pairs` in consecutive runs of at most `limit` device bytes (a larger weight alone), with each weight's
    offset in a slot."""
    chunks, end = [], 0
    for param, master in pairs:
        if not chunks or (end and end + _nbytes(param) > limit):
            chunks.append([])
            end = 0
        chunks[-1].append((param, master, end))
        end = -(-(end + _nbytes(param)) // ALIGN) * ALIGN
    return chunks


def _view(slot: torch.Tensor, offset: int, param: nn.Parameter) -> torch.Tensor:
    """The bytes of `slot` that hold `param`'s gradient, then its updated weight, in its dtype and shape."""
    return slot[offset:offset + _nbytes(param)].view(param.dtype).view(param.shape)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _power_of_two(size: int) -> int:
    return 1 << max(size - 1, 0).bit_length()
