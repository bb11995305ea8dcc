"""Fused mode under DDP: the optimizer steps each gradient bucket as soon as its mean over
replicas exists.

The mean exists only when the bucket's all-reduce completes, so a communication hook
(``DistributedDataParallel.register_comm_hook``) runs the all-reduce (DDP's own, or
another hook such as ``flora.distributed.projection_hook``), waits for it, writes each
parameter's slice of the result into its ``.grad``, steps the bucket's parameters and
frees their gradients (the model of torch's ``ddp_comm_hooks.optimizer_overlap_hooks``).
The reducer is told that the optimizer runs in backward, so that it does not copy the
buckets back into ``.grad`` afterwards.

Accumulation: the accumulator decides which micro-batch synchronises (a forward pre-hook
sets DDP's ``require_backward_grad_sync``): the first ``tau - 1`` of a cycle run without
DDP's all-reduce and are compressed locally; on the ``tau``-th, each parameter's local
estimate (``decompress(C) + G``) is in ``.grad`` when DDP reads it, and compression being
linear, DDP's mean of the estimates is the estimate of the mean. A cycle whose last
backward was not synchronised (a short cycle closed by ``finish_cycle()``, or one that
accelerate ended) is averaged by one packed all-reduce of its estimates instead.

Normal mode, :func:`average_unrecorded`: a cycle resumed from a checkpoint under
``find_unused_parameters=True`` averages what the freshly built DDP has no record of."""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..layout import bucket_gradients
from .cycle import Cycle
from .estimator import Slot

__all__ = ["DDPSteps", "average_unrecorded", "check_ddp_fused", "mean_over_replicas"]


def check_ddp_fused(ddp: nn.Module, slots: list[Slot], comm_hook) -> None:
    """Before anything changes: the accumulator must hold every parameter DDP averages
    (the reducer frees every gradient it averages), and DDP must have no hook yet."""
    mine = {id(s.param) for s in slots}
    theirs = [n for n, p in ddp.module.named_parameters()
              if p.requires_grad and not getattr(p, "_ddp_ignored", False) and id(p) not in mine]
    if theirs:
        raise ValueError(f"CompressedAccumulator(fused=True) on a DistributedDataParallel model must hold every "
                         f"parameter DDP averages; {theirs[:5]} are not given (DDP frees every gradient it "
                         "averages once the optimizer runs in backward)")
    if getattr(ddp, "find_unused_parameters", False):
        raise ValueError("CompressedAccumulator(fused=True) on a DistributedDataParallel model built with "
                         "find_unused_parameters=True: a parameter that one replica did not use would step on the "
                         "others only (its bucket's mean arrives before DDP knows which replicas used it), and the "
                         "replicas would drift apart. Build DDP with find_unused_parameters=False, or use "
                         "reduce=True on the unwrapped model, which counts each parameter's gradients per replica")
    if getattr(ddp, "static_graph", False):
        raise ValueError("CompressedAccumulator(fused=True) on a DistributedDataParallel model built with "
                         "static_graph=True: fused mode skips DDP's synchronisation on the first tau - 1 "
                         "micro-batches, and static_graph records the graph in a first backward that must "
                         "synchronise (DDP fails in its reducer: INTERNAL ASSERT 'expect_autograd_hooks_'). Build "
                         "DDP without static_graph=True")
    if getattr(ddp, "_comm_hooks", None):
        raise ValueError("CompressedAccumulator(fused=True): this DistributedDataParallel model already has a "
                         "communication hook, and DDP takes one only; pass it as comm_hook=(state, hook) instead, "
                         "and the accumulator runs it before each bucket's step")
    if comm_hook is not None and not (isinstance(comm_hook, tuple) and len(comm_hook) == 2 and callable(comm_hook[1])):
        raise TypeError(f"comm_hook must be a (state, hook) pair, as DistributedDataParallel.register_comm_hook "
                        f"takes them; got {comm_hook!r}")


REMOVED = ("this DistributedDataParallel model was given to a fused CompressedAccumulator that has since been "
           "removed; DDP keeps the communication hook and the optimizer-in-backward mode it set (neither can be "
           "undone), so it would no longer produce gradients: wrap the module in a new DistributedDataParallel")


def _comm_hook(state, bucket):
    """The hook DDP calls (``state``: a weak reference to the :class:`DDPSteps`)."""
    steps = state()
    if steps is None or steps.removed:
        raise RuntimeError(REMOVED)
    return steps.hook(bucket)


class DDPSteps:
    """Steps a DDP model's buckets inside backward for the accumulator's engine."""

    def __init__(self, engine, ddp: nn.Module, comm_hook):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.engine, self.ddp = engine, ddp
        self.group = ddp.process_group
        # A hook cannot see DDP's group: one left at None (a state of None, as torch's
        # allreduce_hook takes; a state whose process_group is None, as flora's ProjectionState
        # or torch's PowerSGDState) takes it, else a DDP on a subgroup was averaged over the
        # default group (probe Z24)
        if comm_hook is not None and comm_hook[0] is None:
            comm_hook = (self.group, comm_hook[1])
        elif comm_hook is not None and getattr(comm_hook[0], "process_group", False) is None:
            comm_hook[0].process_group = self.group
        self.inner = comm_hook if comm_hook is not None else (self.group, allreduce_hook)
        self.slot_of = {id(s.param): k for k, s in enumerate(engine.slots)}
        # The reducer keeps its hook and state in C++, out of the garbage collector's sight:
        # they must not hold the model (or it is never freed, and its reducer is destroyed
        # during interpreter shutdown, which can abort the process).
        ddp.register_comm_hook(weakref.ref(self), _comm_hook)
        self.removed = False
        ddp.reducer._set_optimizer_in_backward()  # no copy of the buckets into .grad after backward
        self.handle = ddp.register_forward_pre_hook(self.before_forward)
        self.synced = False  # whether DDP synchronises the running backward pass

    def remove(self) -> None:
        self.handle.remove()  # DDP keeps the communication hook: it cannot be unregistered
        self.removed = True
        # The pre-hook may have left synchronisation off (removed mid-cycle, or after a short
        # cycle): the next backward would then run unsynchronised, each replica on its own
        # gradients, instead of reaching the hook that refuses it.
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = True
        # A removed accumulator kept in a variable must not keep the DDP model alive: a
        # later accumulator on its module would find it and refuse (probe Z124).
        self.ddp = None

    def before_forward(self, module, args) -> None:
        eng = self.engine
        if torch.is_grad_enabled():
            self.synced = eng.micro_step() + 1 >= eng.opts.tau
            self.ddp.require_backward_grad_sync = self.synced

    def hook(self, bucket):
        out = self.inner[1](self.inner[0], bucket).wait()  # the mean over replicas: the step needs it now
        if isinstance(out, (list, tuple)):
            out = out[0]
        eng = self.engine
        params = []
        with eng.lock:
            for p, view in zip(bucket.parameters(), bucket_gradients(bucket, out)):
                k = self.slot_of.get(id(p))
                if k is None or k not in eng.cycle.done or p.grad is None:
                    continue
                want = eng.cycle.gradient_dtype(k, p)
                p.grad = view if view.dtype == want else view.to(want)
                params.append(p)
            eng.stepper.step_bucket(params, eng.cycle)
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut

    def settle(self) -> None:
        """End of a backward pass that DDP did not synchronise (the forward pre-hook saw
        no cycle end coming, but accelerate ended it): the parameters whose cycle ended
        are averaged and stepped here."""
        c = self.engine.cycle
        if self.synced or not c.done:
            return
        self.sync_and_step([k for k in sorted(c.done) if self.engine.slots[k].param.grad is not None])

    def sync_and_step(self, ks: list[int]) -> None:
        """The mean over replicas of slots ``ks``'s ``.grad`` (:func:`mean_over_replicas`),
        then their step."""
        eng = self.engine
        eng.stepper.step_bucket(mean_over_replicas(eng.slots, ks, self.group), eng.cycle)


def mean_over_replicas(slots: list[Slot], ks: list[int], group) -> list[torch.Tensor]:
    """Replace slots ``ks``'s ``.grad`` by its mean over the replicas of ``group`` (DDP's
    average: a replica without a slot's gradient counts as zeros), in one packed
    all-reduce over every slot, since replicas may differ in which got a gradient. A slot
    no replica had keeps none. Every replica must call it. Returns the parameters that
    now hold a gradient."""
    chosen = set(ks)
    dev = slots[0].param.device
    wire = torch.float64 if any(s.param.dtype in (torch.float64, torch.complex128) for s in slots) else torch.float32
    # a complex gradient travels as its real view (a cast had dropped its imaginary part: review Z117)
    pieces = [(_real(slots[k].param.grad.detach()).reshape(-1).to(wire) if k in chosen
               else torch.zeros(_real_numel(slots[k].param), dtype=wire, device=dev))
              for k in range(len(slots))]
    flat = torch.cat(pieces + [torch.tensor([float(k in chosen) for k in range(len(slots))], dtype=wire,
                                            device=dev)])
    del pieces
    flat[:-len(slots)].div_(dist.get_world_size(group))
    dist.all_reduce(flat, group=group)
    got = flat[-len(slots):].tolist()
    offset, params = 0, []
    for k, s in enumerate(slots):
        n = _real_numel(s.param)
        if got[k]:
            g = torch.empty_like(s.param)
            _real(g).copy_(flat[offset:offset + n].view(_real(g).shape))
            s.param.grad = g
            params.append(s.param)
        offset += n
    return params


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _real_numel(p: torch.Tensor) -> int:
    return math.prod(p.shape) * (2 if p.is_complex() else 1)


@torch.no_grad()
def average_unrecorded(slots: list[Slot], c: Cycle, reached: set[int], group, *, as_view: bool) -> None:
    """Normal mode under DDP(find_unused_parameters=True), the synchronised forward of
    cycle ``c``, loaded by ``load_state_dict`` (``c.loaded``: the slots that had gradients
    before the save). DDP averages a parameter's ``.grad`` when some replica used it since
    DDP last synchronised, and otherwise leaves it. A DDP built for the resume knows only
    the micro-batches since the load (``c.since_load``, and this one's, ``reached``: ids
    of the parameters its backward reaches), so a parameter used only before the save kept
    each replica's own estimate (a probe: off by 1e-4 to 1e-3, the replicas drifted). Those
    are averaged here as DDP averages: times 1 / world size, then summed, a replica without
    a gradient adding zeros. With ``gradient_as_bucket_view`` (``as_view``) DDP averages
    every ``.grad`` it finds, as a view of its bucket, and leaves a replica without one
    with none: those get zeros to add. One collective of flags, then one per dtype
    averaged; every replica calls it."""
    n = len(slots)
    dev = slots[0].param.device
    flags = torch.tensor([float(k in c.since_load or id(s.param) in reached) for k, s in enumerate(slots)]
                         + [float(k in c.loaded) for k in range(n)], device=dev)
    dist.all_reduce(flags, group=group)
    flags = flags.tolist()
    chosen = [k for k in range(n) if flags[n + k] and not flags[k]]
    if as_view:
        for k in chosen:
            p = slots[k].param
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return
    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for k in chosen:
        by_dtype.setdefault(slots[k].param.dtype, []).append(k)
    for dtype in sorted(by_dtype, key=str):  # the same order on every replica
        ks = by_dtype[dtype]
        flat = torch.cat([slots[k].param.grad.detach().reshape(-1) if slots[k].param.grad is not None
                          else torch.zeros(slots[k].param.numel(), dtype=dtype, device=dev) for k in ks])
        flat.mul_(1.0 / world)
        dist.all_reduce(flat, group=group)
        offset = 0
        for k in ks:
            p = slots[k].param
            mean = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p).copy_(mean)
            else:
                p.grad.copy_(mean)
            if k in c.versions:  # the .grad holding its sum was not cleared: it was averaged
                c.versions[k] = p.grad._version
