"""What happens to a gradient, and when a cycle ends: the accumulator's engine.

The hooks (``hooks.py``) call it under ``lock``; it keeps the current :class:`Cycle`, sums
each gradient with the estimator (``estimator.py``), sees ``zero_grad()`` through
``.grad`` (``grads.py``), steps in fused mode (``fused.py``), runs the cycle's collective
with ``reduce=True`` (``replicas.py``) and asks accelerate where a cycle ends
(``integrations.py``)."""

from __future__ import annotations

import sys
import threading

import torch
from torch.optim import Optimizer

from .. import _autocast
from ..compression import dense_reason
from ..sharded import is_dtensor
from .cycle import Cycle, lag_message
from .ddp import average_unrecorded, mean_over_replicas
from .estimator import Slot, accumulate_compressed_, add_last_, draw_projection, estimate
from .fused import FusedStepper, check_fused_optimizer
from .grads import GradView
from .integrations import AccelerateWatch, accelerate_ends_cycle, accelerate_syncs
from .options import Options
from .replicas import DDPSyncGuard, Replicas, check_not_under_ddp, ddp_holding
from .units import Units, fsdp_units

__all__ = ["Engine"]


def _reentrant_checkpoint_running() -> bool:
    """Whether a reentrant activation checkpoint's backward (its own backward pass, run
    inside the outer one) is on the stack. Asked only when a count runs ahead."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_qualname.startswith("CheckpointFunction.") and "checkpoint" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


def _refuse_uncompressible(slot: Slot, shape: tuple, rank: int) -> None:
    """A parameter resized between cycles is compressed on the same side at its new shape
    (the next cycle draws for it); one whose projected side no longer exceeds the rank
    cannot be (before 2026-12-05: torch's error about the projection's rows from inside
    the backward, a probe): refused, naming it."""
    reason = dense_reason(shape, rank, proj_dim=slot.dim)
    if reason is not None:
        raise RuntimeError(
            f"CompressedAccumulator: parameter {slot.name!r} was resized to {shape} since the accumulator was built, "
            f"and its compressed side (proj_dim={slot.dim}) can no longer be compressed at rank={rank} ({reason}). "
            "Build a new accumulator for the resized model (acc.remove() first)")


class Engine:
    def __init__(self, opts: Options, slots: list[Slot], optimizer: Optimizer | None, ddp=None, model=None):
        self.opts, self.slots, self.optimizer = opts, slots, optimizer
        self.names = [s.name for s in slots]
        self.ids = {id(s.param) for s in slots}
        self.cycle = Cycle.start(len(slots))
        self.accelerate = AccelerateWatch()  # whether accelerate's sync flag is live, not a leftover
        self.sharded = {k for k, s in enumerate(slots) if is_dtensor(s.param)}  # FSDP2: no tensor hooks
        self.grads = GradView(slots, opts.fused, self.sharded)
        self.stepper = FusedStepper(optimizer, opts, {id(s.param): s.name for s in slots}) if opts.fused else None
        # Fused mode under FSDP2: a unit's parameters step together (units.py).
        self.units = Units(fsdp_units(model, slots, self.sharded)) if opts.fused and self.sharded else None
        self.ddp_steps = None  # fused mode under DDP: its communication hook steps the buckets (ddp.py)
        self.replicas = Replicas(slots, opts, ddp) if opts.reduce else None
        # DDP wrapping is looked for at the first backward: fused mode refuses it (unless built on
        # the DDP model); normal mode guards the synchronised micro-batch (DDPSyncGuard).
        self.ddp_checked = opts.reduce or (not opts.fused and bool(self.sharded))
        self.ddp_guard = None
        self.last_grad_norm: torch.Tensor | None = None
        self.compressible: dict[int, torch.Size] = {}  # slot -> the last shape it was found compressible at
        # Autograd runs each CUDA device's backward on its own thread: a model spread over
        # devices may run two hooks at once.
        self.lock = threading.Lock()
        if self.sharded:  # FSDP2, HSDP's replicas too: every process compresses alike (probe Z19)
            from ..agreement import check_on_meshes

            o = opts
            check_on_meshes("CompressedAccumulator", {
                "rank": o.rank, "tau": o.tau, "seed": o.seed, "projection": o.projection, "proj_dim": o.proj_dim,
                "max_aspect_ratio": o.max_aspect_ratio, "exact_last": o.exact_last, "fused": o.fused},
                [slots[k].param for k in sorted(self.sharded)],
                why="every process must compress a sharded parameter alike (a seed set per rank, seed=rank, draws "
                    "other projections on each, and HSDP's replicas drift apart): build every rank's accumulator "
                    "with the same options")

    def projection(self, k: int) -> torch.Tensor:
        c = self.cycle
        c.follow_dtype(k, self.slots[k].param, self.slots[k].dim is not None)
        a = c.projections.get(k)
        if a is None:
            o = self.opts
            a = draw_projection(self.slots[k], o.projection, o.seed, o.rank, c.number)
            if o.cache_projections:
                c.projections[k] = a
        return a

    # ------------------------------------------------------------ per gradient

    def check_ddp(self) -> None:
        """First backward: in fused mode, refuse a model that DDP wrapped after the
        accumulator was built; in normal mode, guard a DDP model found now (wrapped after
        the accumulator) and refuse this backward if DDP synchronises it too early."""
        if self.ddp_checked:
            return
        if self.opts.fused:
            check_not_under_ddp(self.ids)
        elif self.ddp_guard is None:
            self.ddp_checked = True
            self.guard_ddp(None, used=None)  # (found at a backward: used if its forward has run)
            if self.ddp_guard is not None and self.ddp_guard.synchronising:
                self.ddp_guard.refuse_early("backward pass", "Nothing was accumulated from it; call zero_grad() "
                                            "and run the cycle again")
        self.ddp_checked = True

    def guard_ddp(self, ddp, used: bool | None = False) -> None:
        """Normal mode: guard ``ddp`` (or the live DDP model that holds these parameters, if
        any, when a process group is up) against synchronising a backward too early.
        ``used``: whether its forward is known to have run (else the guard waits for one;
        None: whether DDP says it has)."""
        import torch.distributed as dist

        if ddp is None and dist.is_available() and dist.is_initialized():
            ddp = ddp_holding(self.ids)
        if ddp is not None:
            if used is None:  # DDP's first forward sets it (a wrapper made but never called: probe Z125)
                used = bool(getattr(ddp, "_lazy_init_ran", True))
            self.ddp_guard = DDPSyncGuard(self, ddp, used)
            self.ddp_checked = True

    @torch.no_grad()
    def settle_unreached(self, reached: set[int]) -> None:
        """Normal mode under DDP(find_unused_parameters=True), before the cycle's synchronised
        backward: the slots with a partial sum that this backward will not reach (``reached``:
        the ids of the parameters it reaches) get their estimate in ``.grad`` for DDP to
        average, and are complete."""
        with self.lock:
            self.sweep()  # a zero_grad() since the last backward discards what it cleared
            c = self.cycle
            with _autocast.disabled():  # inside the user's autocast: estimate in the state dtype
                for k, _ in c.lagging():
                    if id(self.slots[k].param) not in reached:
                        self.grads.write_estimate(c, k, self.projection)  # (takes the buffer)
                        c.done.add(k)

    @torch.no_grad()
    def settle_loaded(self, reached: set[int], ddp) -> None:
        """Normal mode under DDP(find_unused_parameters=True), the synchronised forward of a
        cycle loaded by ``load_state_dict``: see :func:`average_unrecorded`."""
        with self.lock:
            c = self.cycle
            if c.loaded is not None:
                average_unrecorded(self.slots, c, reached, ddp.process_group,
                                   as_view=bool(getattr(ddp, "gradient_as_bucket_view", False)))
                c.loaded = None

    def edit_message(self, k: int) -> str:
        return (f"CompressedAccumulator: the .grad of {self.names[k]!r} was replaced (or its .data) between "
                f"micro-batches of a cycle ({self.cycle.counts[k]} of tau={self.opts.tau} summed): its sum is kept "
                "compressed in a buffer, .grad only holds a placeholder until the cycle's last backward, so an "
                "edit of .grad cannot reach it. Edit each micro-batch's gradient with a tensor hook "
                "(p.register_hook(fn)) or the estimate in .grad after the cycle's last backward; to drop the "
                "cycle, optimizer.zero_grad() or acc.discard_cycle()")

    def refuse_edits(self) -> None:
        """At a backward pass's first gradient: an edited ``.grad`` anywhere is refused before
        this pass accumulates anything (refused at the edited parameter's own hook, the
        parameters reached before it had taken the micro-batch in, and the refused pass
        counted; a probe)."""
        c = self.cycle
        for k, n in enumerate(c.counts):
            if n and self.grads.edited(c, k):
                raise RuntimeError(self.edit_message(k))

    def before_grad(self, k: int, task: int) -> None:
        """Before autograd adds this backward's gradient to ``.grad``, so that a refusal
        leaves the parameter as it was: discards a partial sum that ``zero_grad()``
        cleared, refuses a new cycle that nothing closed, and takes the placeholder out of
        ``.grad``. ``task``: the running backward pass."""
        self.settle_stale(task)
        if self.cycle.counts[k] and self.grads.edited(self.cycle, k):
            raise RuntimeError(self.edit_message(k))
        if self.cycle.counts[k] and self.grads.cleared(self.cycle, k):
            # every slot zero_grad() cleared, at once: a cycle left empty restarts its count
            # of backward passes (its tau-th is the last for every parameter, accumulate)
            self.sweep()
        self.check_cycle_open(k)
        if not self.cycle.counts[k] and self.grads.written:
            self.grads.stale_estimate(k, self.names[k])
        self.grads.take(self.cycle, k)
        self.cycle.inflight[k] = task

    def settle_stale(self, task: int) -> None:
        """Slots announced "in flight" by a backward pass other than ``task`` (the running
        one; -1 outside any): that pass raised after announcing them (a user's hook, out
        of memory) and never ended (:meth:`task_ended`), so the entries would hide a
        ``zero_grad()`` from ``cleared()`` for good. A compressed slot among them had its
        placeholder taken out, so its empty ``.grad`` cannot show a ``zero_grad()`` since;
        the other slots can: if one of them was cleared, these are dropped with it, else
        they get their placeholder back, as ``task_ended`` gives it."""
        c = self.cycle
        stale = [k for k, t in c.inflight.items() if t != task]
        if not stale:
            return
        for k in stale:
            del c.inflight[k]
        parked = [k for k in stale if c.counts[k] and self.grads.parks(k) and self.slots[k].param.grad is None]
        if not parked:
            return
        others = [k for k, n in enumerate(c.counts) if n and k not in stale]
        cleared = any(self.grads.cleared(c, k) for k in others)
        for k in parked:
            if cleared:
                self.grads.drop(c, k)
            else:
                self.grads.mark(c, k)

    def check_cycle_open(self, k: int) -> None:
        c = self.cycle
        if c.overdue is not None:
            self.sweep()  # zero_grad() may have dropped the cycle
            c = self.cycle
            if c.overdue is not None:
                raise RuntimeError(self.lag_message(k, first=True))
        if k in c.done and not self.opts.reduce:  # a backward completed it and then failed before closing it
            raise RuntimeError(self.lag_message(k, first=False))

    def lag_message(self, k: int, *, first: bool) -> str:
        return lag_message(self.cycle, self.names, tau=self.opts.tau, fused=self.opts.fused, name=self.names[k],
                           first=first)

    def accumulate(self, k: int, p: torch.Tensor) -> None:
        """Slot k's gradient of this backward pass, in ``p.grad``, into the cycle."""
        g = p.grad
        if g is None:  # frozen since its forward (torch runs the hooks, accumulates nothing)
            if self.cycle.counts[k] and k not in self.cycle.done and self.grads.parks(k):
                self.grads.mark(self.cycle, k)  # its placeholder back: a zero_grad() must still show (a probe)
            return
        c, o = self.cycle, self.opts
        count, slot = c.counts[k], self.slots[k]
        # Every check comes before any change of state.
        if g.is_sparse and (slot.dim is not None or o.fused or o.reduce or k in self.sharded):
            way = (f"; or exclude=[{slot.name!r}], which leaves its sum to autograd (fused=False)"
                   if slot.dim is not None and not (o.fused or o.reduce) else "")
            raise TypeError(f"parameter {slot.name!r} got a sparse gradient; CompressedAccumulator needs dense "
                            f"gradients here (sparse=False on its nn.Embedding or nn.EmbeddingBag){way}")
        task = torch._C._current_graph_task_id()
        if count > c.backwards and not o.reduce and (c.tasks.get(k) in c.nested or _reentrant_checkpoint_running()):
            # all of a cycle's parameters used in two segments would count 2 micro-batches a
            # pass, in step with each other: no lag to tell, the cycle closed at tau / 2 (a probe).
            # The segment's own pass may also come first (the layer used outside the segment
            # before it, in forward order): then the first came from a pass that ended inside
            # this one (probe Z27: fused mode had stepped the layer)
            raise RuntimeError(
                f"CompressedAccumulator(tau={o.tau}): parameter {slot.name!r} got a second gradient within one "
                "backward pass: reentrant activation checkpointing (torch.utils.checkpoint(use_reentrant=True)) "
                "runs a backward pass per segment, so a layer used in two segments (or inside one and outside "
                "it) would count as two micro-batches. Use use_reentrant=False (Hugging Face: "
                "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False}), "
                "older transformers: gradient_checkpointing_enable(gradient_checkpointing_kwargs=...))")
        if o.fused and not c.fused_checked:
            # once a cycle, before its first change: a parameter unfrozen since the accumulator
            # was built would keep its .grad and move at every other parameter's step
            check_fused_optimizer(self.optimizer, self.slots)
            c.fused_checked = True
            self.stepper.expect_step(g.device)
        if slot.dim is not None and self.compressible.get(k) != p.shape:  # resized since it was checked?
            _refuse_uncompressible(slot, tuple(p.shape), o.rank)
            self.compressible[k] = p.shape
        c.check_shape(k, p, slot.name)  # a parameter resized mid-cycle
        if getattr(p, "grad_dtype", False) is None:  # autograd keeps its gradients as they come
            c.arrived[k] = g.dtype
        c.follow_dtype(k, p, slot.dim is not None)  # a model cast mid-cycle
        # The cycle's tau-th backward pass is the last for every parameter, however many
        # micro-batches each was used in (a branch used in the last one only gets its
        # gradient exactly under exact_last; before 2026-12-04 only DDP's path knew, found by
        # a probe); DDP synchronises that backward only (DDPSyncGuard). reduce=True counts the
        # cycle's backward passes, not this parameter's, and ends the cycle in backward_done
        try:
            ends = accelerate_ends_cycle(c, o.tau, c.backwards if o.reduce else count, self.accelerate)
        except ValueError:
            if count == 0 and c.backwards == 0:
                # refused at the cycle's first backward: autograd had written this gradient
                # before the hook, and a rebuilt accumulator took it into its first cycle (a probe)
                p.grad = None
            raise
        if o.reduce:
            self.replicas.accumulate(c, k, g, self.projection, self.grads)
            return
        last = (ends or count + 1 == o.tau
                or c.backwards + 1 == o.tau or (self.ddp_guard is not None and self.ddp_guard.synchronising))
        buf = c.buffers.get(k)
        if slot.dim is not None:
            a = self.projection(k)
            if not last:
                c.buffers[k] = accumulate_compressed_(buf, g, a, slot.dim)
                self.grads.park(c, k)
            else:
                add_last_(g, buf, a, slot.dim, exact_last=o.exact_last)
        elif o.fused:
            # Dense, fused: .grad must be None between cycles (the optimizer steps every
            # parameter holding one), so the running sum lives here; summing in the same
            # order as autograd keeps it bit-identical.
            if buf is not None:
                g = buf.add_(g)
            elif k in self.sharded and not last:
                g = g.detach().clone()  # FSDP2's gradient is a view of its unit's whole reduce-scatter output
            if last:
                p.grad = g
            else:
                c.buffers[k] = g
                p.grad = None
        elif k in self.sharded and count == 0 and not last:
            # Dense, normal mode, FSDP2: the sum lives in .grad, which FSDP2 made a view of its
            # unit's whole reduce-scatter output; a copy lets that output go until the last one.
            p.grad = g.detach().clone()
        if last and o.fused:
            if k in self.sharded:
                self.units.add(k, self.step_slots)
            elif self.ddp_steps is None:  # under DDP the estimate waits in .grad for its bucket's mean
                self.stepper.step(p, c)
        if last:
            c.buffers.pop(k, None)
            c.done.add(k)
        c.counts[k] = count + 1
        c.tasks[k] = task
        if c.loaded is not None:
            c.since_load.add(k)
        self.grads.seen(c, k)

    def task_ended(self, task: int) -> None:
        """Backward pass ``task`` ended: a slot whose gradient it announced but sent
        elsewhere (``torch.autograd.grad``) gets its placeholder back."""
        c = self.cycle
        for k, t in list(c.inflight.items()):
            if t == task:
                del c.inflight[k]
                if c.counts[k] and self.slots[k].param.grad is None and self.grads.parks(k):
                    self.grads.mark(c, k)

    def backward_done(self) -> None:
        """End of a backward pass that accumulated. Closes a cycle whose every parameter is
        complete (a parameter that finishes first cannot know whether the others got their
        gradients); with some complete and others not, the others' estimates are written
        into ``.grad`` (so that clipping sees them) and the cycle waits for the step.
        reduce=True: counts the backward pass and runs the cycle's collective after the
        tau-th."""
        c, o = self.cycle, self.opts
        if o.reduce:
            c.backwards += 1
            # accelerate ends a short cycle (its data's end) at a synchronised backward: the
            # estimates must be in .grad before its clipping, not at the step
            if c.backwards >= o.tau or accelerate_syncs(c, o.tau):
                self.reduce_cycle()
            return
        if self.units is not None:
            self.units.flush(self.step_slots)
        if self.ddp_steps is not None:
            self.ddp_steps.settle()
        c.backwards += 1
        # The tau-th backward ends the cycle even where no parameter got all tau gradients
        # (two experts routed alternately): otherwise nothing would end it there.
        if not c.done and c.backwards < o.tau:
            return
        lagging = c.lagging()
        if not lagging:
            self.close()
            return
        c.overdue = lagging
        if not o.fused:
            for k, _ in lagging:
                self.grads.write_estimate(c, k, self.projection)

    def step_slots(self, ks: list[int]) -> None:
        """Fused mode under FSDP2: step these slots' parameters together."""
        self.stepper.step_sharded([self.slots[k].param for k in ks], self.cycle)

    # ------------------------------------------------------------ the cycle's end

    def reduce_cycle(self) -> None:
        c = self.cycle
        step = None if self.stepper is None else (lambda p: self.stepper.step(p, c))
        self.replicas.reduce_cycle(c, self.projection, step)
        self.close()

    def close(self) -> None:
        c = self.cycle
        if self.opts.fused and c.sq_norm is not None:
            self.last_grad_norm = c.sq_norm.sqrt()
        self.grads.release(c)  # never left behind (every path writes the estimates first)
        if not self.opts.reduce:
            self.grads.remember_estimates(c)
        self.cycle = c.next()

    def sweep(self) -> None:
        """Apply what ``zero_grad()`` did since the last backward pass to every slot."""
        self.settle_stale(torch._C._current_graph_task_id())
        c = self.cycle
        for k, n in enumerate(c.counts):
            if n and self.grads.cleared(c, k):
                self.grads.drop(c, k)
        if not c.active:
            c.backwards = 0
        if c.settle_overdue(self.opts.tau):  # what is left is complete
            self.close()

    def micro_step(self) -> int:
        self.sweep()
        return self.cycle.micro_step(self.opts.reduce)

    @torch.no_grad()
    def finish(self) -> int:
        """``finish_cycle()``: close the open cycle now. Outside inference mode, also when
        the step that closes it runs under ``torch.inference_mode()`` (a probe): the
        estimates it writes into ``.grad`` are then ordinary tensors, whose versions show a
        later ``zero_grad(set_to_none=False)``."""
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self.finish()
        with self.lock:
            k = self.micro_step()
            if k == 0:
                return 0
            if self.opts.reduce:
                self.reduce_cycle()
                return k
            c = self.cycle
            together = []  # FSDP2 or DDP: stepped together (every rank finishes alike)
            written = []  # normal mode: the slots whose estimates this call wrote into .grad
            for j, s in enumerate(self.slots):
                if c.counts[j] == 0 or j in c.done:  # no gradient, or its cycle is complete
                    continue
                p = s.param
                if self.opts.fused:
                    c.follow_dtype(j, p, s.dim is not None)
                    buf = c.buffers.pop(j, None)
                    if s.dim is not None and buf is not None:
                        p.grad = estimate(s, buf, self.projection(j), c.gradient_dtype(j, p))
                    elif s.dim is None:
                        p.grad = buf
                    if p.grad is None:
                        continue
                    if j in self.sharded or self.ddp_steps is not None:
                        together.append(j)
                    else:
                        self.stepper.step(p, c)
                else:
                    self.grads.write_estimate(c, j, self.projection)
                    written.append(j)
            if self.ddp_steps is not None:
                self.ddp_steps.sync_and_step(together)  # every replica takes part, with or without gradients
            elif together:
                self.step_slots(together)
            elif self.ddp_guard is not None and self.ddp_guard.used and self.ddp_guard.group is not None:
                # normal mode under DDP, a short cycle: none of its backward passes synchronised
                # (the guard lets only a cycle's last one), so its estimates are averaged here, as
                # DDP averages a full cycle's; every replica takes part, with or without gradients
                mean_over_replicas(self.slots, [j for j in written if self.slots[j].param.grad is not None],
                                   self.ddp_guard.group)
            self.close()
            return k

    def discard(self) -> int:
        """``discard_cycle()``: drop the open cycle."""
        with self.lock:
            k = self.micro_step()
            c = self.cycle
            for j, n in enumerate(c.counts):
                if n:
                    self.grads.drop(c, j)
                    if not self.opts.fused:
                        self.slots[j].param.grad = None
            c.reset_open()
            return k
