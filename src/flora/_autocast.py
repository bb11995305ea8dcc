"""Autocast turned off inside Flora's own arithmetic (a step, an accumulator's hooks):
called inside an autocast region, the projection matmuls (compression, decompression,
transfers, orthonormal draws) would run in its lower dtype instead of the state dtype."""

from __future__ import annotations

import contextlib

import torch

# the device types torch.amp knows of here
DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


# those this build has (a context for another raises), fixed at import: a traced step cannot ask
_AVAILABLE = tuple(t for t in DEVICE_TYPES if torch.amp.is_autocast_available(t))


def enabled() -> tuple:
    """The device types whose autocast is enabled here (usually none)."""
    return tuple(t for t in _AVAILABLE if torch.is_autocast_enabled(t))


def disabled(types: tuple | None = None) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``types`` (default: those enabled now)."""
    types = enabled() if types is None else types
    if not types:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for t in types:
        stack.enter_context(torch.autocast(t, enabled=False))
    return stack


def off_traced(fn, *args):
    """``fn(*args)`` with autocast off for every device type, by nested ``torch.autocast(t,
    enabled=False)`` contexts, which torch.compile follows (it cannot trace ``disabled``'s
    ExitStack nor ask which types are on): the user's ``torch.compile(opt.step)`` inside
    an autocast region had traced the step's matmuls in its dtype (a probe: 1e-2 of a step
    off). Off where it was off already is no change. ``fn`` must not break the graph: a
    break inside the contexts splits it in many."""
    return _nested(fn, args, _AVAILABLE)


def _nested(fn, args: tuple, types: tuple):
    if not types:
        return fn(*args)
    with torch.autocast(types[0], enabled=False):
        return _nested(fn, args, types[1:])
