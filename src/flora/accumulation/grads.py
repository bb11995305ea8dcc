"""The open cycle, seen from ``.grad`` (normal mode).

Between backward passes a compressed matrix's partial sum is in a buffer and its ``.grad``
holds a zero placeholder of one element (a stride-0 view); a dense parameter's partial sum
is its ``.grad``. Plain ``zero_grad()`` replaces or zeroes either: that is how a discarded
micro-batch is seen, with no hook on any optimizer or module. Fused mode keeps every
``.grad`` None between cycles, and FSDP2's compressed parameters keep theirs None between
backward passes: neither leaves a placeholder (FSDP2's dense ones keep their sum in
``.grad``, as any dense parameter does)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .._warn import warn
from .cycle import Cycle
from .estimator import Slot, estimate

__all__ = ["GradView"]


class GradView:
    def __init__(self, slots: list[Slot], fused: bool, sharded: set[int]):
        self.slots, self.fused, self.sharded = slots, fused, sharded
        self.zeros: dict[int, torch.Tensor] = {}  # slot -> the one-element storage of its placeholder
        # slot -> its parameter's data when the placeholder was put there (kept alive, so that a
        # parameter moved since, by Module.to, cannot come back at the same address)
        self.homes: dict[int, torch.Tensor] = {}
        # normal mode, the first cycles: slot -> a weak reference to the estimate the last
        # cycle left in .grad (see stale_estimate)
        self.written: dict[int, weakref.ref] = {}
        self.warned_stale = False

    WATCHED_CYCLES = 2  # cycles after which an estimate left in .grad is looked for (a sync each)

    def remember_estimates(self, c: Cycle) -> None:
        """A closing cycle's estimates in ``.grad`` (normal mode, compressed slots, its first
        cycles): the next cycle looks for them (:meth:`stale_estimate`)."""
        self.written = {}
        if self.fused or c.number >= self.WATCHED_CYCLES or self.warned_stale:
            return
        for k, n in enumerate(c.counts):
            g = self.slots[k].param.grad
            if n and self.parks(k) and g is not None:
                self.written[k] = weakref.ref(g)

    def stale_estimate(self, k: int, name: str) -> None:
        """Before slot k's first gradient of a cycle: warn (once) where ``.grad`` still holds
        the estimate the last cycle left, not zeroed (a parameter the stepping optimizer does
        not hold, or one a second optimizer steps every few cycles; or a cycle closed before
        the loop's step: ``finish_cycle()`` between micro-batches, or a ``tau`` below the
        loop's passes per step, probe Z79). Autograd adds this
        backward's gradient to it and the sum is compressed again, so the estimate's error
        compounds from cycle to cycle (a probe: relative error 1.4 after one cycle, 17 after
        four, 750 after eight), where plain accumulation would keep adding exactly."""
        ref = self.written.pop(k, None)
        g = self.slots[k].param.grad
        if ref is None or ref() is not g or g is None or self.warned_stale or not bool(g.any()):
            return
        self.warned_stale = True
        warn(f"CompressedAccumulator: the .grad of {name!r} still holds the last cycle's estimate as a new cycle "
             "begins (nothing zeroed it). This backward adds to it and the sum is compressed again, so its error "
             "compounds from cycle to cycle. Either a cycle closed before the loop's step: finish_cycle() called "
             "between micro-batches (call it once, right before the step: acc.micro_step says where the cycle is), "
             "or a tau below the loop's backward passes per step (make them equal); or a parameter that the "
             "optimizer which steps does not hold, or one that another optimizer steps every few cycles: zero its "
             "gradient after each step (model.zero_grad()), freeze it, or leave it out of the accumulator "
             "(exclude=...)", UserWarning)

    def parks(self, k: int) -> bool:
        """Whether slot k leaves a placeholder in ``.grad`` while its partial sum is in a
        buffer: compressed, normal mode (fused mode keeps every .grad None), not FSDP2."""
        return not self.fused and self.slots[k].dim is not None and k not in self.sharded

    def park(self, c: Cycle, k: int) -> None:
        if self.parks(k):
            self.mark(c, k)
        else:
            self.slots[k].param.grad = None

    def mark(self, c: Cycle, k: int) -> None:
        """Leave in ``.grad`` a zero placeholder that holds one element (stride 0): plain
        ``zero_grad()`` replaces it by None or zeroes it, which is how this slot's partial
        sum is known to have been discarded."""
        p = self.slots[k].param
        z = self.zeros.get(k)
        dtype = c.gradient_dtype(k, p)
        if z is None or z.device != p.device or z.dtype != dtype:
            z = self.zeros[k] = torch.zeros((), dtype=dtype, device=p.device)
        m = z.expand(p.shape)
        p.grad = m
        self.homes[k] = p.detach()
        c.marks[k] = (m, m._version)
        c.versions.pop(k, None)

    def take(self, c: Cycle, k: int) -> None:
        """Take slot k's placeholder out of ``.grad`` (autograd or the estimate writes a
        fresh one)."""
        m = c.marks.pop(k, None)
        self.homes.pop(k, None)  # not to hold a parameter's old storage once moved
        p = self.slots[k].param
        if m is not None and p.grad is m[0]:
            p.grad = None

    def release(self, c: Cycle) -> None:
        """Take every placeholder still in ``.grad`` out (a cycle closes or is replaced)."""
        for k, (m, _) in c.marks.items():
            self.homes.pop(k, None)
            if self.slots[k].param.grad is m:
                self.slots[k].param.grad = None

    def seen(self, c: Cycle, k: int) -> None:
        """Slot k's sum lives in ``.grad`` (normal mode, no placeholder): remember its
        version, so that ``zero_grad(set_to_none=False)`` shows."""
        p = self.slots[k].param
        if not self.fused and p.grad is not None and k not in c.marks:
            c.versions[k] = p.grad._version

    def cleared(self, c: Cycle, k: int) -> bool:
        """Whether slot k's partial sum was discarded by the user since the hook left it:
        its placeholder replaced or zeroed, or the ``.grad`` holding its sum set to None or
        zeroed (``zero_grad(set_to_none=False)``)."""
        if k in c.inflight:
            return False
        m = c.marks.get(k)
        p = self.slots[k].param
        if m is not None:
            if self.edited(c, k):
                return False  # not a discard: refused at the next backward (Engine.before_grad)
            return p.grad is None or m[0]._version != m[1]
        v = c.versions.get(k)
        if v is None:  # fused mode, or an FSDP2 compressed slot: the sum is not in .grad
            return False
        g = p.grad
        return g is None or (g._version != v and not bool(g.any()))

    def edited(self, c: Cycle, k: int) -> bool:
        """Whether slot k's placeholder was replaced by another tensor (``p.grad = p.grad /
        2``, ``+ noise``, ``.clone()``) or its data swapped (``p.grad.data = ...``) since
        the hook left it: an edit meant for the cycle's sum, which is compressed in a buffer
        out of its reach (before 2026-12-04 taken for a ``zero_grad()``: the sum dropped,
        silently; a probe)."""
        m = c.marks.get(k)
        if m is None or k in c.inflight:
            return False
        g = self.slots[k].param.grad
        if g is None or (g is m[0] and not any(g.stride())):  # the placeholder's strides are all 0
            return False
        if g is not m[0]:
            return True
        # its data swapped: Module.to(dtype or device) does so to cast .grad (the sum follows,
        # Cycle.follow_dtype); in the same dtype and device, an edit (p.grad.data = ... / 2),
        # but for Module.to's re-layouts, which move the parameter too and write the
        # placeholder anew as zeros: memory_format=channels_last (a probe saw it refused), or
        # a cast and a cast back between two micro-batches (model.bfloat16().float(): probe
        # Z90). The values are read in this rare case only (a sync on a GPU)
        z = self.zeros.get(k)
        if z is None or g.dtype != z.dtype or g.device != z.device:
            return False
        home = self.homes.get(k)
        moved = home is not None and home.data_ptr() != self.slots[k].param.data_ptr()
        return not moved or bool(g.any())

    def drop(self, c: Cycle, k: int) -> None:
        """Discard slot k's partial sum and its placeholder."""
        m = c.forget(k)
        self.homes.pop(k, None)
        if m is not None:
            p = self.slots[k].param
            if p.grad is m[0]:
                p.grad = None  # zeroed in place: autograd must not add into a placeholder
            if m[0]._version != m[1]:
                self.zeros.pop(k, None)

    def write_estimate(self, c: Cycle, k: int, projection: Callable[[int], torch.Tensor]) -> None:
        """Normal mode: write slot k's estimate of the gradients it got into ``.grad``."""
        s = self.slots[k]
        c.follow_dtype(k, s.param, s.dim is not None)
        buf = c.buffers.pop(k, None)
        self.take(c, k)
        if s.dim is not None and buf is not None:
            s.param.grad = estimate(s, buf, projection(k), c.gradient_dtype(k, s.param))
        if s.param.grad is not None:
            c.versions[k] = s.param.grad._version
