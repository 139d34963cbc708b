"""Fully sharded data parallelism by hand on torch.distributed: each rank keeps 1/N of every weight.

`fully_shard(model, blocks)` turns every block, plus a root unit holding every parameter outside the
blocks, into a unit. A unit's parameters are flattened into one buffer per kind (trainable in fp32,
the master copy; frozen in its own dtype), padded to a multiple of the world size, and each rank
keeps its 1/N slice as an `nn.Parameter`. Those shards are the model's only parameters afterwards:
the optimizer, its state, `model.state_dict()` and the gradients are all 1/N per rank. A model
built on the meta device is filled slice by slice from a `Read` function, so no rank ever holds
more than its shards.

A unit's forward all-gathers its shards (in `compute_dtype`) and points the original parameter names
at views of the full buffer; the gather's backward reduce-scatters the full gradient into the shard,
in `reduce_dtype` (fp32 unless told), as a SUM: the engine divides every rank's loss by the global
token count (see parallel/ddp.py), so the summed gradient is the global mean. The reduced shard is
added to the shard's gradient in the shard's own dtype. Frozen shards are gathered without
autograd, so they cost no gradient communication. Gradient accumulation needs no `no_sync`: each
micro-batch's backward reduce-scatters and the shard gradients accumulate.

Memory: a block runs under non-reentrant activation checkpointing together with its gather, so its
full weights and activations are dropped after its forward and rebuilt (re-gathered, recomputed) in
its backward: at any moment a rank holds its shards, the root unit and one block in full (two with
prefetch: the one computing and the next), plus the blocks' inputs. The root unit is gathered for the
whole forward (it encloses the blocks) and kept by autograd until backward. The price is one extra
forward of each block, as with activation checkpointing, which this includes: do not checkpoint the
blocks again.

Prefetch (`_Schedule`): as a unit starts computing, the next unit's all-gather is issued, so that it
runs during this unit's compute; a unit's reduce-scatter runs during the next unit's backward, its
full gradient (in the reduce dtype) kept until then. Each collective is the same as without prefetch,
only issued earlier or waited for later: the results are equal bit for bit.
"""

import functools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from parallel import clip

# The *_single names replace the *_tensor ones in recent torch; the pinned range starts before them.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# (parameter name, start, stop) -> elements [start, stop) of that weight, flattened: how a rank
# reads its slices of a model built on the meta device (models/lazy.py reads safetensors files).
Read = Callable[[str, int, int], torch.Tensor]

# A tensor a unit shards: (qualified name, owning module, the owner's table of it (`_parameters` or
# `_buffers`), attribute, tensor). Persistent buffers are weights too (an NF4 layer's packed codes).
Entry = tuple[str, nn.Module, str, str, torch.Tensor]


class _AllGather:
    """An all-gather in flight: every rank's shard, cast to `dtype`, into one full buffer."""

    def __init__(self, shard: torch.Tensor, dtype: torch.dtype, group: dist.ProcessGroup | None):
        self.group = group
        self.sent = shard.detach().to(dtype)  # kept until the collective is done with it
        self.full = self.sent.new_empty(self.sent.numel() * dist.get_world_size(group))
        self.work = _all_gather(self.full, self.sent, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()  # on NCCL: the current stream waits for the gather, the host does not
        return self.full


class _Gather(torch.autograd.Function):
    """The all-gathered buffer in forward, the reduce-scatter of its gradient (a sum, in `reduce_dtype`) in backward.

    A frozen shard builds no autograd node (no input requires grad), so it never reduce-scatters.
    Without `overlap`, backward waits for the reduce-scatter and hands autograd the shard's gradient;
    with it, backward hands the reduce-scatter in flight to `overlap(work, reduced, grad)`, which adds
    `reduced` to the shard's `.grad` once it is done.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, gather: _AllGather, overlap: Callable | None,
                reduce_dtype: torch.dtype) -> torch.Tensor:
        # `shard` is an input only so that autograd gives it the gradient (or, frozen, builds no node).
        ctx.group, ctx.overlap, ctx.reduce_dtype = gather.group, overlap, reduce_dtype
        return gather.wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.to(ctx.reduce_dtype).contiguous()
        shard = grad.new_empty(grad.numel() // dist.get_world_size(ctx.group))
        work = _reduce_scatter(shard, grad, group=ctx.group, async_op=True)
        if ctx.overlap is None:
            work.wait()
            return shard, None, None, None  # autograd casts it to the shard's dtype
        ctx.overlap(work, shard, grad)
        return None, None, None, None


class _Flat:
    """Tensors of one unit of one kind (trainable parameters, frozen ones, buffers of one dtype), laid
    end to end; this rank keeps `shard`, a Parameter for parameters. Parameters are gathered in the
    unit's compute dtype, buffers (`cast` False) in their own: an NF4 code is not a number to round.

    A tensor on the meta device is read from `read` (only the elements inside this rank's slice); a
    real one is first broadcast from rank 0, since ranks may have initialised differently (seeds,
    LoRA's random A).
    """

    def __init__(self, params: list[Entry], dtype: torch.dtype, group: dist.ProcessGroup | None, read: Read | None,
                 device: torch.device):
        self.names = [name for name, *_ in params]
        self.owners = [(module, table, attr) for _, module, table, attr, _ in params]
        self.shapes = [param.shape for *_, param in params]
        self.sizes = [param.numel() for *_, param in params]
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        trainable, self.cast = params[0][4].requires_grad, params[0][2] == "_parameters"
        per_rank = -(-sum(self.sizes) // world)
        low, high = rank * per_rank, (rank + 1) * per_rank
        pieces, offset = [], 0
        with torch.no_grad():
            for name, *_, param in params:
                start, stop = max(low, offset) - offset, min(high, offset + param.numel()) - offset
                offset += param.numel()
                if param.is_meta and read is None:
                    raise ValueError(f"{name} is on the meta device and fully_shard was given nothing to read it from")
                if not param.is_meta:  # on `device` first: NCCL broadcasts GPU tensors only
                    param = param.detach().to(device)
                    dist.broadcast(param, src=_first_rank(group), group=group)
                if start < stop:
                    piece = read(name, start, stop) if param.is_meta else param.reshape(-1)[start:stop]
                    pieces.append(piece.to(device=device, dtype=dtype))
            shard = torch.zeros(per_rank, dtype=dtype, device=device)  # the tail past the last weight is padding
            if pieces:
                torch.cat(pieces, out=shard[:sum(p.numel() for p in pieces)])
        self.shard = nn.Parameter(shard, requires_grad=trainable) if self.cast else shard

    def views(self, full: torch.Tensor) -> Iterator[tuple[dict[str, torch.Tensor], str, torch.Tensor]]:
        """(the owner's table, attribute, the full tensor) of every tensor of the flat."""
        for (module, table, attr), shape, chunk in zip(self.owners, self.shapes,
                                                       full[:sum(self.sizes)].split(self.sizes), strict=True):
            yield getattr(module, table), attr, chunk.view(shape)


class _Unit:
    """A module whose own tensors (those of no other unit) are gathered around its forward."""

    def __init__(self, module: nn.Module, entries: list[Entry], compute_dtype: torch.dtype | None,
                 master_dtype: torch.dtype, reduce_dtype: torch.dtype, group: dist.ProcessGroup | None,
                 recompute: bool, read: Read | None, device: torch.device, schedule: "_Schedule"):
        self.compute_dtype, self.reduce_dtype, self.group = compute_dtype, reduce_dtype, group
        self.recompute, self.schedule = recompute, schedule
        params = [e for e in entries if e[2] == "_parameters"]
        trainable = [e for e in params if e[4].requires_grad]
        frozen = [e for e in params if not e[4].requires_grad]
        buffers = {dtype: [e for e in entries if e[2] == "_buffers" and e[4].dtype == dtype]
                   for dtype in dict.fromkeys(e[4].dtype for e in entries if e[2] == "_buffers")}
        # Trainable weights keep their master dtype; a frozen base keeps its own (first parameter's).
        kinds = [(trainable, master_dtype), (frozen, frozen[0][4].dtype if frozen else None), *(
            (kind, dtype) for dtype, kind in buffers.items())]
        self.flats = [_Flat(kind, dtype, group, read, device) for kind, dtype in kinds if kind]
        for flat in self.flats:
            for owner, table, attr in flat.owners:
                del getattr(owner, table)[attr]
            if flat.cast:
                module.register_parameter(f"fsdp_{'trainable' if flat.shard.requires_grad else 'frozen'}_shard",
                                          flat.shard)
            else:
                module.register_buffer(f"fsdp_{str(flat.shard.dtype).removeprefix('torch.')}_buffer_shard", flat.shard)
        self.forward = module.forward
        # An instance attribute, so module names (and state dict keys) stay as they were.
        module.forward = functools.update_wrapper(functools.partial(_Unit.sharded_forward, self), self.forward)

    def sharded_forward(self, *args, **kwargs):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.gathered_forward, *args, use_reentrant=False, **kwargs)
        return self.gathered_forward(*args, **kwargs)

    def gathered_forward(self, *args, **kwargs):
        # Plain tensors (not Parameters) stand in for the deleted names only while forward runs, in
        # each owner's parameter (or buffer) table: the one contract relied on is nn.Module's, that
        # attribute lookup reads those tables, so any module that reads its weights as attributes works.
        views = [v for flat, full in zip(self.flats, self.schedule.start(self), strict=True) for v in flat.views(full)]
        for table, attr, view in views:
            table[attr] = view
        try:
            return self.forward(*args, **kwargs)
        finally:
            for table, attr, _ in views:
                del table[attr]
            self.schedule.end(self)

    def all_gathers(self) -> list[_AllGather]:
        return [_AllGather(flat.shard, self.compute_dtype if flat.cast and self.compute_dtype else flat.shard.dtype,
                           self.group) for flat in self.flats]


def _in_backward() -> bool:
    # Only a checkpointed block recomputing runs a unit's forward inside backward.
    return torch._C._current_graph_task_id() != -1


def _following(order: list[_Unit], unit: _Unit) -> _Unit | None:
    """The unit after `unit` in `order`, where a unit is appended the first time it computes (then None)."""
    if unit not in order:
        order.append(unit)
        return None
    at = order.index(unit) + 1
    return order[at] if at < len(order) else None


class _Schedule:
    """When a model's units issue and wait for their collectives.

    With `prefetch`, a unit starting to compute issues the next unit's all-gathers, which that unit
    then waits for instead of issuing its own: at most two blocks are gathered at once, the one
    computing and the next (beside the root). A unit's reduce-scatter is waited for when the next one
    is issued, or when backward ends (an autograd engine callback, as torch's FSDP1 does), and only
    then added to its shard's `.grad`, as autograd would have: assigned, or added to the one there.

    The next unit is the one that came next the first time (FSDP2 records the order the same way),
    in forward and, apart, in backward's recomputes: the blocks need not be given in the order they
    run, and backward's order leaves out the blocks it never recomputes (a frozen vision tower). It
    depends on nothing but the units that ran, so every rank issues the same collectives in the same
    order. Gathers issued for a unit that then does not run next are waited for and dropped: when
    another unit starts, when the root's forward ends and when backward ends, so none outlives a step.
    """

    def __init__(self, prefetch: bool):
        self.prefetch = prefetch
        self.units: list[_Unit] = []  # fully_shard's, whose indices the events give
        self.orders: tuple[list[_Unit], list[_Unit]] = ([], [])  # forward, backward (see _following)
        self.ahead: tuple[_Unit, list[_AllGather]] | None = None
        self.reducing: list[tuple[_Unit, nn.Parameter, dist.Work, torch.Tensor, torch.Tensor]] = []
        self.finishing = -1  # the backward (autograd graph task) whose end will wait for the reduce-scatters
        # A list to log (event, unit index) into, for tests; None by default: training would grow it forever.
        self.events: list[tuple[str, int]] | None = None

    def start(self, unit: _Unit) -> list[torch.Tensor]:
        """`unit`'s full buffers, one per flat, as its compute starts; issues the next unit's gathers."""
        backward = _in_backward()
        if backward and self.prefetch:
            self._finish_with_this_backward()
        gathers = self._take(unit) or self._issue(unit)
        fulls = [_Gather.apply(flat.shard, gather, functools.partial(self._reducing, unit, flat.shard)
                               if self.prefetch else None, unit.reduce_dtype)
                 for flat, gather in zip(unit.flats, gathers, strict=True)]
        self._log("compute start", unit)
        following = _following(self.orders[backward], unit)
        if self.prefetch and following is not None:
            self.ahead = following, self._issue(following)
        return fulls

    def end(self, unit: _Unit) -> None:
        self._log("compute end", unit)
        if not unit.recompute:  # the root encloses the blocks: the forward is over
            self._drop_ahead()

    def _issue(self, unit: _Unit) -> list[_AllGather]:
        gathers = unit.all_gathers()
        self._log("gather issued", unit)
        return gathers

    def _take(self, unit: _Unit) -> list[_AllGather] | None:
        """The gathers issued ahead for `unit`, if they were; those of another unit are dropped."""
        if self.ahead is not None and self.ahead[0] is unit:
            gathers, self.ahead = self.ahead[1], None
            return gathers
        self._drop_ahead()
        return None

    def _drop_ahead(self) -> None:
        ahead, self.ahead = self.ahead, None
        for gather in ahead[1] if ahead else []:
            gather.wait()  # not abandoned: on NCCL its buffers must outlive the collective writing them

    def _reducing(self, unit: _Unit, shard: nn.Parameter, work: dist.Work, reduced: torch.Tensor,
                  grad: torch.Tensor) -> None:
        """_Gather.backward's reduce-scatter in flight; waits for the one before it."""
        self._log("reduce-scatter issued", unit)
        self._finish_with_this_backward()
        earlier, self.reducing = self.reducing, [(unit, shard, work, reduced, grad)]
        self._wait(earlier)

    @torch.no_grad()
    def _wait(self, reductions: list[tuple[_Unit, nn.Parameter, dist.Work, torch.Tensor, torch.Tensor]]) -> None:
        for unit, shard, work, reduced, _ in reductions:
            work.wait()
            self._log("reduce-scatter waited", unit)
            reduced = reduced.to(shard.dtype)  # autograd casts a gradient to its tensor's dtype too
            if shard.grad is None:
                shard.grad = reduced
            else:
                shard.grad += reduced

    def _finish_with_this_backward(self) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.finishing:  # an id, not a flag: a backward that raised never ran its callback
            self.finishing = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        reductions, self.reducing = self.reducing, []
        self._wait(reductions)  # before backward returns: the optimizer sees whole gradients
        self._drop_ahead()

    def _log(self, event: str, unit: _Unit) -> None:
        if self.events is not None:
            self.events.append((event, self.units.index(unit)))


def _entries(module: nn.Module, prefix: str, skip: set[int]) -> list[Entry]:
    """The parameters and persistent buffers of every module under `module` not in `skip`."""
    return [(f"{name}.{attr}" if name else attr, owner, table, attr, tensor)
            for name, owner in module.named_modules(prefix=prefix) if id(owner) not in skip
            for table in ("_parameters", "_buffers")
            for attr, tensor in getattr(owner, table).items() if tensor is not None and _sharded(owner, table, attr)]


def _sharded(owner: nn.Module, table: str, attr: str) -> bool:
    """Parameters and persistent buffers are sharded; a non-persistent buffer (rotary tables, computed
    at init, in no checkpoint) is kept whole on every rank."""
    return table == "_parameters" or attr not in owner._non_persistent_buffers_set


def _first_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_global_rank(group, 0) if group else 0


def fully_shard(model: nn.Module, blocks: list[nn.Module], compute_dtype: torch.dtype | None = None,
                process_group: dist.ProcessGroup | None = None, read: Read | None = None,
                device: torch.device | str = "cpu", master_dtype: torch.dtype = torch.float32,
                prefetch: bool = True, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shards `model` in place across `process_group`, one unit per block plus the root; returns it.

    Call on every rank with the same model structure; rank 0's real weights and buffers win.
    Persistent buffers are sharded as the parameters are (an NF4 layer's codes: `quant/`), each
    dtype its own flat. Tensors left on the meta device (a model built without weights) are filled from `read`,
    each rank reading only its own slices, so no rank ever holds the whole model. Shards land
    on `device`, trainable ones in `master_dtype`. Afterwards `model.parameters()` are the shards:
    build the optimizer on them, clip with `clip_grad_norm_`, export with `unit_state_dicts`. Tied
    parameters and nested blocks are refused. `prefetch` overlaps the collectives with compute (see
    `_Schedule`, which is `model.fsdp_schedule`); the results are the same without it, bit for bit.

    `reduce_dtype` is the dtype gradients are summed across ranks in, as FSDP2's
    `MixedPrecisionPolicy(reduce_dtype=...)`. fp32 by default, as torchtitan's `mixed_precision_reduce`:
    a bf16 sum rounds each rank's gradient and every partial sum to 8 significant bits (NCCL's ring
    rounds N-1 times over N ranks), so a rank's gradient under 2^-9 of the running sum is lost whole.
    bf16 halves the bytes on the wire, at about 2^-8 of relative error per element (more with more
    ranks). Either way the result is added to the shard's gradient in the shard's dtype.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    if len({id(param) for _, param in named}) != len(named):
        raise ValueError("fully_shard cannot shard a parameter shared between modules (tied weights)")
    inside = [{id(m) for m in block.modules()} for block in blocks]
    if sum(map(len, inside)) != len(set().union(*inside)):
        raise ValueError("blocks overlap (one contains another or they share a submodule); pass disjoint blocks")
    with torch.no_grad():
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and not _sharded(module, "_buffers", name):
                    module._buffers[name] = buffer = buffer.to(device)
                    dist.broadcast(buffer, src=_first_rank(process_group), group=process_group)
    prefixes = {id(module): name for name, module in model.named_modules()}
    units = [(block, _entries(block, prefixes[id(block)], set()), True) for block in blocks]
    units.append((model, _entries(model, "", set().union(*inside)), False))
    model.fsdp_schedule = schedule = _Schedule(prefetch)
    model.fsdp_units = schedule.units = [_Unit(module, entries, compute_dtype, master_dtype, reduce_dtype,
                                               process_group, recompute, read, torch.device(device), schedule)
                                         for module, entries, recompute in units if entries]
    return model


def unit_state_dicts(model: nn.Module, trainable_only: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """{original name: full tensor} of one unit at a time (the root last), for exports that never
    hold the whole model at once.

    A collective: every rank must iterate to the end; usually only rank 0 keeps what it gets.
    """
    for unit in model.fsdp_units:
        tensors = {}
        for flat in unit.flats:
            if trainable_only and not flat.shard.requires_grad:
                continue
            full = _AllGather(flat.shard, flat.shard.dtype, unit.group).wait()
            # Clones, so the unit's full buffer dies with this loop.
            views = zip(flat.names, flat.views(full), strict=True)
            tensors.update((name, view.clone()) for name, (_, _, view) in views)
        yield tensors


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scales the shards' gradients so that the global norm is at most `max_norm`; returns the norm before, on the
    device."""
    return clip.clip_grad_norm_(model.parameters(), max_norm, model.fsdp_units[0].group)
