"""The accumulation cycle as a small typed state: what the current cycle has seen, and its
transitions. A closed cycle is replaced whole (:meth:`Cycle.next`), so nothing of it can
leak into the next one.

States of one slot within a cycle: untouched (count 0) -> accumulating (count k, its
partial sum in a buffer or in ``.grad``) -> done (its last micro-batch came; its estimate
is in ``.grad`` or it has stepped). The cycle closes when every slot that got a gradient
is done (the end of a backward pass), or when it is finished early (``finish_cycle()``, the
optimizer's step) or, with ``reduce=True``, after its collective. A slot that got fewer
gradients than the others when they are done is *lagging*; the cycle is then *overdue*: it
waits for a step, ``finish_cycle()`` or ``zero_grad()``, and the next backward is refused.
Discarding (``zero_grad()``, ``discard_cycle()``) returns slots to untouched, same cycle
number."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..projection import grad_dtype, state_dtype

__all__ = ["Cycle", "lag_message"]


@dataclass
class Cycle:
    number: int  # cycles completed before this one: keys this cycle's projections
    counts: list[int]  # backward passes each slot has seen in this cycle
    follow_accelerate: bool = False  # accelerate marked a backward of the previous cycle unsynced
    # accelerate drives every cycle (AccumulatorCallback says so under the Trainer): its
    # synced backward ends even a first, short cycle; kept by every next cycle
    driven: bool = False
    done: set[int] = field(default_factory=set)  # slots whose cycle is complete (their last micro-batch came)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> partial sum
    projections: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> cached projection
    sq_norm: torch.Tensor | None = None  # fused mode: squared norms of the gradients stepped so far
    unsynced: bool = False  # accelerate marked a backward of this cycle unsynced
    # accelerate's flag read False in this cycle while not yet trusted (a stale flag left by
    # an earlier run, or this run's first window): live after all if it turns True
    doubted: bool = False
    backwards: int = 0  # backward passes finished in this cycle (that accumulated)
    fused_checked: bool = False  # fused mode: the optimizer's trainable parameters checked this cycle
    options_checked: bool = False  # fused mode: flora.Flora's options checked before the cycle's first step
    # Normal mode: slot -> (the placeholder left in .grad of a compressed parameter between
    # backward passes, its version). zero_grad() replaces or zeroes it: that is how a
    # discarded micro-batch is seen.
    marks: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)  # slot -> version of the .grad holding its sum
    shapes: dict[int, tuple] = field(default_factory=dict)  # slot -> its parameter's shape when its sum began
    inflight: dict[int, int] = field(default_factory=dict)  # slot -> graph task accumulating it now
    tasks: dict[int, int] = field(default_factory=dict)  # slot -> graph task of its latest gradient
    nested: set[int] = field(default_factory=set)  # graph tasks that ended inside another (reentrant checkpoints)
    # Set when a backward pass ended with the cycle complete for some parameters but not for
    # these (slot, count): the next backward must wait for a step, finish_cycle or zero_grad.
    overdue: list[tuple[int, int]] | None = None
    # load_state_dict: the slots with a partial sum in the state loaded into this cycle, and
    # those with a gradient since; a DDP built for the resume knows only the latter
    loaded: set[int] | None = None
    since_load: set[int] = field(default_factory=set)
    # slot -> the dtype its gradients arrive in, for a parameter with p.grad_dtype = None
    # (autograd then keeps a gradient in whatever dtype it comes: see gradient_dtype)
    arrived: dict[int, torch.dtype] = field(default_factory=dict)

    @classmethod
    def start(cls, n_slots: int, number: int = 0, follow_accelerate: bool = False, driven: bool = False) -> "Cycle":
        return cls(number, [0] * n_slots, follow_accelerate, driven)  # (follows_accelerate() reads both)

    def next(self) -> "Cycle":
        return Cycle.start(len(self.counts), self.number + 1, self.unsynced, self.driven)

    def follows_accelerate(self) -> bool:
        """Whether accelerate's sync flag ends this cycle: it marked a backward of this or
        the previous cycle unsynced, or it drives every cycle."""
        return self.unsynced or self.follow_accelerate or self.driven

    @property
    def active(self) -> int:
        return sum(1 for c in self.counts if c)

    def micro_step(self, reduce: bool) -> int:
        """Backward passes seen: counted per pass with ``reduce=True``; else the passes
        counted, or the most any slot has seen if more (a slot's count survives a discard
        of others). Two experts routed alternately each see half the passes: the most a
        slot saw alone had undercounted, and DDP's tau-th forward was refused as early (a
        probe)."""
        return self.backwards if reduce else max(self.backwards, max(self.counts, default=0))

    def lagging(self) -> list[tuple[int, int]]:
        """(slot, count) of the slots that got gradients but are not done."""
        return [(k, n) for k, n in enumerate(self.counts) if n and k not in self.done]

    def gradient_dtype(self, k: int, param: torch.Tensor) -> torch.dtype:
        """The dtype slot k's gradient is kept in, as autograd would keep it: ``param.grad_dtype``
        (a bfloat16 parameter may keep float32 gradients), its own dtype by default, and where
        ``grad_dtype`` is None the dtype its gradients arrived in this cycle (probe Z74: a
        float32 gradient of such a bfloat16 parameter was summed, estimated and loaded in
        bfloat16, where plain accumulation keeps float32)."""
        if getattr(param, "grad_dtype", False) is None:
            return self.arrived.get(k, param.dtype)
        return grad_dtype(param)

    def follow_dtype(self, k: int, param: torch.Tensor, compressed: bool) -> None:
        """Slot k's partial sum and projection in the dtypes, and on the device, of ``param``
        as it is now: a model cast or moved mid-cycle (``model.double()``, ``.bfloat16()``,
        ``.to("cuda")``) converts ``.grad`` with the parameters, and so the sums kept here
        (before 2026-12-04: torch's dtype errors at every backward after such a cast in
        fused mode, a probe; the device followed since 2026-12-05)."""
        want = state_dtype(param.dtype) if compressed else self.gradient_dtype(k, param)
        buf = self.buffers.get(k)
        if buf is not None and (buf.dtype != want or buf.device != param.device):
            self.buffers[k] = buf.to(device=param.device, dtype=want)  # a model moved mid-cycle too
        a = self.projections.get(k)
        if a is not None and a.device != param.device:
            self.projections[k] = a = a.to(param.device)
        if a is not None and a.is_floating_point() and a.dtype != state_dtype(param.dtype):
            self.projections[k] = a.to(state_dtype(param.dtype))

    def check_shape(self, k: int, param: torch.Tensor, name: str) -> None:
        """A parameter resized mid-cycle (``p.data = `` a larger tensor: an embedding grown
        in place) cannot add to a partial sum of its old shape (before 2026-12-04: torch's
        size mismatch from inside the backward, a probe): refused, naming it. Between
        cycles a resize is taken (the next cycle draws for the new shape), unless its
        compressed side no longer exceeds the rank (``engine._refuse_uncompressible``)."""
        shape = tuple(param.shape)
        was = self.shapes.setdefault(k, shape)
        if was != shape:
            raise RuntimeError(
                f"CompressedAccumulator: parameter {name!r} changed shape from {was} to {shape} in the middle of "
                f"an accumulation cycle ({self.counts[k]} micro-batch(es) summed at the old shape): resize "
                "parameters between cycles (after the optimizer's step), or drop this cycle "
                "(acc.discard_cycle()) and run it again")

    def forget(self, k: int) -> tuple[torch.Tensor, int] | None:
        """Slot ``k`` back to untouched; returns its placeholder mark, if it had one."""
        self.counts[k] = 0
        self.done.discard(k)
        self.buffers.pop(k, None)
        self.versions.pop(k, None)
        self.shapes.pop(k, None)
        return self.marks.pop(k, None)

    def settle_overdue(self, tau: int) -> bool:
        """After slots were discarded: drop the overdue state when no lagging slot is left
        (or none is done, and fewer than ``tau`` backward passes ran). Returns True when
        what is left is complete: the cycle closes."""
        if self.overdue is None:
            return False
        lagging = [(k, n) for k, n in self.overdue if self.counts[k]]
        if lagging and (self.done or self.backwards >= tau):
            self.overdue = lagging
            return False
        self.overdue = None
        return bool(self.done) and not lagging

    def reset_open(self) -> None:
        """What ``discard_cycle()`` resets besides the slots."""
        self.backwards, self.overdue, self.sq_norm = 0, None, None

    def add_sq_norm(self, sq: torch.Tensor) -> None:
        self.sq_norm = sq if self.sq_norm is None else self.sq_norm + sq


def lag_message(c: Cycle, names: list[str], *, tau: int, fused: bool, name: str, first: bool) -> str:
    """The refusal of a backward pass into a cycle that some slots completed: ``first``, a
    new pass began while the cycle is overdue; otherwise ``name`` got a gradient after its
    cycle was complete and the cycle was never closed."""
    done = [names[k] for k in sorted(c.done)]
    lagging = [(names[k], n) for k, n in c.lagging()]

    def listed(items):
        return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    # the tau-th backward ends the cycle for every parameter it reaches: done, yet maybe with
    # fewer than tau gradients; "complete" is a parameter that got all tau
    complete = any(c.counts[k] >= tau for k in c.done)
    if first:
        if done and complete:
            ended = f"ended for {len(done)} parameter(s) ({listed([repr(n) for n in done])})"
        else:
            reached = f" (the last of them reached {listed([repr(n) for n in done])})" if done else ""
            ended = f"ended after {tau} backward passes, though no parameter got a gradient in all {tau}{reached},"
        what = (f"a backward pass began while the previous cycle (cycle {c.number}) waits to be stepped: it "
                f"{ended} and "
                f"{len(lagging)} got gradients in fewer micro-batches "
                f"({listed([f'{n!r} ({k})' for n, k in lagging])}"
                f"{'' if fused else '; their estimates are in .grad'}). Nothing of this backward was "
                "accumulated")
    else:
        what = (f"parameter {name!r} got a gradient after its cycle (cycle {c.number}) was complete, and "
                "the cycle was never closed (did the backward pass that completed it fail?). Complete: "
                f"{len(done)} parameter(s) ({listed([repr(n) for n in done])}); fewer micro-batches: "
                f"{len(lagging)} ({listed([f'{n!r} ({k})' for n, k in lagging]) or 'none'}). This backward's "
                f"gradient of {name!r} was not accumulated; gradients it produced before reaching {name!r} "
                "were")
    # tau counts backward passes: several per micro-batch (a GAN's two models) end a cycle early
    several = ("; if each micro-batch runs more than one backward pass (a GAN's two models), tau counts those "
               "passes: use one accumulator per model, or one backward per micro-batch"
               if first and not complete else "")
    # a segment's own backward under reentrant checkpointing counts a layer used twice twice (probe)
    reentrant = ("; a layer used in two segments of reentrant activation checkpointing "
                 "(torch.utils.checkpoint(use_reentrant=True)) counts twice per backward pass: use "
                 "use_reentrant=False")
    return (f"CompressedAccumulator(tau={tau}): {what}. Close the cycle with optimizer.step() or "
            "acc.finish_cycle() (each parameter steps on what it got), or drop it with optimizer.zero_grad() "
            f"or acc.discard_cycle(), before the next backward{several}{reentrant}")
