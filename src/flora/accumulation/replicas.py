"""Across replicas: ``reduce=True`` (one packed all-reduce of the compressed buffers per
cycle), the refusals that DDP and FSDP2 need, and :func:`check_agreement`, the one-collective
comparison of the replicas' options that ``flora.distributed``'s hook uses too.

Compression is linear and every replica draws the same projection in the same cycle, so
the sum over replicas of the compressed buffers is the compressed sum of their gradients;
``.grad`` receives the mean over replicas of the estimate, identical on every replica."""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._validation import check_process_group
from ..agreement import check_agreement
from ..compression import compressed_dim
from ..projection import state_dtype
from ..sharded import layout
from .cycle import Cycle
from .estimator import Slot, accumulate_compressed_, buffer_shape, estimate

__all__ = ["check_agreement", "check_reduce", "check_sharded", "is_ddp", "ddp_holding", "check_not_under_ddp",
           "DDPSyncGuard", "Replicas"]

# ------------------------------------------------------------------ refusals


def check_reduce(reduce: bool, process_group, exact_last: bool | None) -> None:
    if not reduce:
        if process_group is not None:
            raise ValueError("process_group applies to reduce=True only")
        return
    if exact_last:
        raise ValueError("exact_last=True with reduce=True would send the last micro-batch's full gradient "
                         "(more bytes than plain DDP); leave exact_last unset (reduce=True compresses every "
                         "micro-batch)")
    import torch.distributed as dist

    check_process_group(process_group)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("reduce=True needs torch.distributed: call torch.distributed.init_process_group() "
                           "(torchrun sets up its environment) before building the accumulator")


def check_sharded(name, p, rank, proj_dim, max_aspect_ratio, *, reduce: bool) -> None:
    """FSDP2 parameters: the hooks see this rank's rows after the reduce-scatter and
    compress them on their own, which needs the projected dimension to be the
    unsharded one (1, the columns; "auto" takes it)."""
    layout(p)  # Shard(0) or Replicate, else a clear error
    if reduce:
        raise ValueError(f"reduce=True is for replicas (DDP or none); {name!r} is an FSDP2 (DTensor) "
                         "parameter, whose gradients FSDP2 already reduce-scatters")
    if proj_dim == 0 and compressed_dim(tuple(p.shape), rank, proj_dim=0,
                                        max_aspect_ratio=max_aspect_ratio) is not None:
        raise ValueError(f"proj_dim=0 projects away the rows that FSDP2 shards ({name!r}, shape "
                         f"{tuple(p.shape)}): each rank would hold a part of every compressed sum. Use "
                         "proj_dim=1 or 'auto' (which takes the unsharded columns under FSDP2)")


def is_ddp(module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


def ddp_holding(ids: set[int]) -> nn.Module | None:
    """A live DistributedDataParallel whose module holds one of these parameters (DDP
    keeps no registry: looked for among the collector's objects, once; one that
    ``gc.freeze()`` moved out of the collector's reach is not seen)."""
    import gc
    import weakref

    from torch.nn.parallel import DistributedDataParallel

    # DDP is an ABC (torch's Joinable): issubclass per object went through abc in Python,
    # about 1 s a scan in a process that has imported dynamo; one test per type instead
    # (by id: a metaclass may make its classes unhashable; every type here is alive).
    is_ddp_type: dict[int, bool] = {}
    found = []
    for obj in gc.get_objects():
        t = type(obj)
        hit = is_ddp_type.get(id(t))
        if hit is None:
            hit = is_ddp_type[id(t)] = issubclass(t, DistributedDataParallel)
        if hit:
            module = getattr(obj, "module", None)
            if isinstance(module, nn.Module) and any(
                    id(p) in ids and not getattr(p, "_ddp_ignored", False) for p in module.parameters()):
                found.append(weakref.ref(obj))
    if not found:
        return None
    del obj
    gc.collect()  # a wrapper dropped but not yet collected does not count
    return next((ddp for ddp in (ref() for ref in found) if ddp is not None), None)


def check_not_under_ddp(ids: set[int]) -> None:
    """Fused mode, first backward: refuse a model that DDP wrapped after the accumulator
    was built (each replica would step on its own gradient before DDP averages it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ddp = ddp_holding(ids)
        if ddp is not None:
            raise RuntimeError(
                f"CompressedAccumulator(fused=True) on the parameters of a module inside {type(ddp).__name__} "
                f"(world size {dist.get_world_size()}): built on that module (accelerate's unwrap_model(), "
                "ddp_model.module), or before the model was wrapped, or a DDP model you no longer use is still "
                "alive (held by a variable, a notebook's output history, a removed accumulator's; delete it "
                "and run gc.collect()). The optimizer would step "
                "inside backward on this replica's own gradient, before DDP averages it, and the replicas would "
                "drift apart. Build the accumulator on the DDP model itself (CompressedAccumulator(ddp_model, ..., "
                "fused=True)): it then steps each bucket on its mean over replicas. Nothing was "
                "accumulated or stepped")


NO_SYNC = ("CompressedAccumulator(tau={tau}) in normal mode on a model that {ddp} wraps: this {when} is "
           "micro-batch {i} of the cycle's {tau}, and DDP synchronises its backward. Only the cycle's last backward "
           "may synchronise: DDP would all-reduce each gradient and write the mean back into a .grad that the "
           "accumulator has already compressed and freed. Run the first tau - 1 micro-batches (forward and "
           "backward) under ddp_model.no_sync(), as accelerate's accumulate() and the HF Trainer do, or build the "
           "accumulator on the DDP model with fused=True, which needs no no_sync(). A short last cycle (fewer than "
           "tau micro-batches left): run all of it under no_sync() and close it with finish_cycle() (or the "
           "step), which averages its estimates over the replicas; a full cycle's tau-th micro-batch must "
           "synchronise (under no_sync() nothing averages it, as in plain DDP). accelerate synchronises every "
           "micro-batch under GradientAccumulationPlugin(sync_each_batch=True): use fused=True there. {nothing}")


# DDP(static_graph=True) learns the graph in its first backward, which must synchronise: one
# under no_sync() first fails inside DDP's reducer (INTERNAL ASSERT expect_autograd_hooks_)
STATIC_FIRST = ("CompressedAccumulator in normal mode on a {ddp} built with static_graph=True: this forward runs "
                "under no_sync() before DDP's first synchronised backward, which static_graph needs to record the "
                "graph (DDP itself would fail in its reducer: INTERNAL ASSERT 'expect_autograd_hooks_'). Build DDP "
                "without static_graph=True, or run one synchronised step before accumulating. Nothing of this "
                "forward pass ran")


class DDPSyncGuard:
    """Normal mode under DDP: a forward pre-hook on the DDP model (before DDP's own, which
    prepares the reducer) that refuses a forward whose backward DDP would synchronise,
    unless it is the cycle's last micro-batch (or accelerate, driving the accumulation,
    ends the cycle there). Without it DDP's copy into the accumulator's placeholder fails
    with "more than one element of the written-to tensor refers to a single memory
    location"."""

    def __init__(self, engine, ddp: nn.Module, used: bool = False):
        import weakref

        self.engine, self.name, self.ddp = engine, type(ddp).__name__, weakref.ref(ddp)
        # Whether the DDP model's forward has run with gradients since: a wrapper that is
        # alive but not called (a notebook's output history holds one; probe Z124) would
        # otherwise close the cycle at every backward of the unwrapped module, as its
        # require_backward_grad_sync is True outside no_sync().
        self.used = used
        self.handle = ddp.register_forward_pre_hook(self.check, prepend=True)
        self.post = ddp.register_forward_hook(self.settle_unused)

    @property
    def group(self):
        """The DDP model's process group (None once the model is gone)."""
        ddp = self.ddp()
        return None if ddp is None else ddp.process_group

    @property
    def synchronising(self) -> bool:
        """DDP synchronises a backward run now (read in the backward: no_sync() around the
        forward and the backward, as DDP's documentation writes it)."""
        ddp = self.ddp()
        return self.used and ddp is not None and bool(getattr(ddp, "require_backward_grad_sync", False))

    def check(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        self.used = True
        if getattr(module, "require_backward_grad_sync", False):
            self.refuse_early("forward pass", "Nothing of this forward pass ran")
        elif getattr(module, "static_graph", False) and not getattr(module, "_static_graph_delay_allreduce_enqueued",
                                                                     True):
            raise RuntimeError(STATIC_FIRST.format(ddp=self.name))

    def refuse_early(self, when: str, nothing: str) -> None:
        from .integrations import accelerate_syncs

        eng = self.engine
        i = eng.micro_step()
        if i + 1 < eng.opts.tau and not accelerate_syncs(eng.cycle, eng.opts.tau):
            raise RuntimeError(NO_SYNC.format(tau=eng.opts.tau, ddp=self.name, when=when, i=i + 1, nothing=nothing))

    def settle_unused(self, module, args, output) -> None:
        """The synchronised micro-batch under ``find_unused_parameters=True``: DDP marks the
        parameters this forward did not reach ready when backward starts, and all-reduces
        their ``.grad`` as it is then. One with a partial sum from the cycle's earlier
        micro-batches must have its estimate there by then (a placeholder would be averaged
        as zeros), and its part of the cycle is complete: DDP averages it. In a cycle loaded
        by ``load_state_dict``, what DDP does not know of is averaged here
        (:func:`~flora.accumulation.ddp.average_unrecorded`)."""
        if not (torch.is_grad_enabled() and getattr(module, "require_backward_grad_sync", False)
                and getattr(module, "find_unused_parameters", False)):
            return
        reached = None
        if self.engine.cycle.lagging():
            reached = params_reached(output)
            self.engine.settle_unreached(reached)
        if self.engine.cycle.loaded is not None:  # every replica (each loaded this cycle)
            self.engine.settle_loaded(params_reached(output) if reached is None else reached, module)

    def remove(self) -> None:
        self.handle.remove()
        self.post.remove()


def params_reached(output) -> set[int]:
    """The ids of the leaf tensors that a backward from ``output``'s tensors reaches: the
    parameters DDP finds used (it searches from the same tensors, ``_find_tensors``)."""
    from torch.nn.parallel.distributed import _find_tensors

    reached: set[int] = set()
    seen: set = set()
    stack = []
    for t in _find_tensors(output):
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif t.requires_grad:
            reached.add(id(t))
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf's gradient lands here
        if variable is not None:
            reached.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return reached


# ------------------------------------------------------------------ reduce=True


class Replicas:
    """``reduce=True``: every micro-batch is summed (compressed, or dense in ``.grad`` or,
    fused, in a buffer); the cycle's collective runs after the ``tau``-th backward or at
    ``finish_cycle``. ``opts`` is the accumulator's options; ``ddp`` the DDP model it was
    given, if any (a synchronising backward would all-reduce what the hooks freed)."""

    def __init__(self, slots: list[Slot], opts, ddp: nn.Module | None):
        self.slots, self.opts, self.ddp = slots, opts, ddp
        self.agreed = False  # the replicas' options are compared at the first collective
        self.agreed_tau = opts.tau  # and again at one after tau changed (net: set and set back is no change)
        self.group = opts.process_group  # None: DDP's own, looked for at the first collective
        if ddp is not None and getattr(ddp, "static_graph", False) and not getattr(
                ddp, "_static_graph_delay_allreduce_enqueued", True):
            raise ValueError(
                f"CompressedAccumulator(reduce=True) on a {type(ddp).__name__} built with static_graph=True: DDP "
                "records its graph in its first synchronised backward, and reduce=True runs none (every "
                "micro-batch under no_sync()), so DDP's reducer would fail at the first backward (torch's "
                "INTERNAL ASSERT 'expect_autograd_hooks_'). Build DDP without static_graph=True, or run one "
                "synchronised step before building the accumulator")

    def process_group(self):
        """The group the cycle's collective runs over: ``process_group=``, else that of the DDP
        model holding these parameters (a data-parallel subgroup: before 2026-12-05 the default
        group, which mixed in other groups' replicas, found by probe Z24), else the default."""
        import torch.distributed as dist

        if self.group is None:
            ddp = self.ddp if self.ddp is not None else ddp_holding({id(s.param) for s in self.slots})
            self.group = ddp.process_group if ddp is not None else dist.group.WORLD
        return self.group

    def accumulate(self, c: Cycle, k: int, g: torch.Tensor, a: Callable[[int], torch.Tensor], grads) -> None:
        """One micro-batch's gradient ``g`` of slot ``k`` into the cycle's sums (``a``: the
        slot's projection; ``grads``: the cycle seen from ``.grad``, a ``GradView``)."""
        slot = self.slots[k]
        p = slot.param
        if self.ddp is not None and getattr(self.ddp, "require_backward_grad_sync", False):
            raise RuntimeError("CompressedAccumulator(reduce=True) on a DDP model: run every micro-batch under "
                               "ddp_model.no_sync() (the accumulator all-reduces the compressed buffers itself; "
                               "DDP's synchronisation would all-reduce the freed gradients). Under accelerate's "
                               "accumulate(), which synchronises a cycle's last micro-batch, add "
                               "accelerator.no_sync(model) around every micro-batch too")
        buf = c.buffers.get(k)
        if slot.dim is not None:
            c.buffers[k] = accumulate_compressed_(buf, g, a(k), slot.dim)
            grads.park(c, k)
        elif self.opts.fused:  # dense parameters' sums live here in fused mode (.grad is None between cycles)
            c.buffers[k] = g if buf is None else buf.add_(g)
            p.grad = None
        c.counts[k] += 1
        grads.seen(c, k)

    def layout(self) -> list[tuple[int, torch.Size | tuple[int, int]]]:
        """(slot, shape on the wire) of every attached parameter, in order: the packed
        buffer of a cycle holds these, then one gradient count per parameter."""
        return [(k, buffer_shape(s, self.opts.rank)) for k, s in enumerate(self.slots)]

    def wire_dtype(self) -> torch.dtype:
        dtypes = [s.param.dtype if s.dim is None else state_dtype(s.param.dtype) for s in self.slots]
        return functools.reduce(torch.promote_types, dtypes, torch.float32)

    def communication_bytes(self) -> int:
        numel = sum(math.prod(shape) for _, shape in self.layout()) + len(self.slots)
        return numel * torch.empty((), dtype=self.wire_dtype()).element_size()

    def reduce_cycle(self, c: Cycle, a: Callable[[int], torch.Tensor],
                     step: Callable[[torch.Tensor], None] | None) -> None:
        """The collective of a cycle: pack, all-reduce (mean over replicas), write every
        estimate into ``.grad`` (fused: ``step`` it). The caller closes the cycle."""
        import torch.distributed as dist

        opts = self.opts
        group = self.process_group()
        device = self.slots[0].param.device
        wire = self.wire_dtype()
        layout = self.layout()
        pieces = []
        for k, shape in layout:
            s = self.slots[k]
            t = c.buffers.get(k) if (s.dim is not None or opts.fused) else (s.param.grad if c.counts[k] else None)
            pieces.append(torch.zeros(math.prod(shape), dtype=wire, device=device) if t is None
                          else t.detach().reshape(-1).to(device=device, dtype=wire))
        n_data = sum(t.numel() for t in pieces)
        flat = torch.cat(pieces + [torch.tensor(c.counts, dtype=wire, device=device)])
        del pieces
        if not self.agreed or opts.tau != self.agreed_tau:  # tau set since (on every replica alike)
            signature = repr([(s.index, s.dim, tuple(s.param.shape)) for s in self.slots]).encode()
            check_agreement("CompressedAccumulator(reduce=True)", {
                "rank": opts.rank, "tau": opts.tau, "seed": opts.seed, "projection": opts.projection,
                "cycle": c.number, "parameters (indices, shapes, compressed dims)": zlib.crc32(signature),
                "wire dtype": str(wire).removeprefix("torch.")}, device=device, group=group)
            self.agreed, self.agreed_tau = True, opts.tau
        flat[:n_data].div_(dist.get_world_size(group))  # the mean, divided first as DDP does
        dist.all_reduce(flat, group=group)
        totals = flat[n_data:].tolist()
        c.buffers.clear()
        offset = 0
        for k, shape in layout:
            s, n = self.slots[k], math.prod(shape)
            view, offset = flat[offset:offset + n].view(shape), offset + n
            p = s.param
            if not totals[k]:  # no replica had a gradient for it: left alone, as DDP does
                continue
            if s.dim is not None:
                p.grad = estimate(s, view.to(state_dtype(p.dtype)), a(k), c.gradient_dtype(k, p))
            elif p.grad is not None and not opts.fused:
                p.grad.copy_(view.view(p.shape))
            else:
                p.grad = view.view(p.shape).to(c.gradient_dtype(k, p), copy=True)
            if step is not None:
                step(p)
        del flat
