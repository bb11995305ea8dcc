"""Where a tensor's elements sit in memory."""

from __future__ import annotations

import torch


def in_memory_order(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s elements as a flat view in the order they sit in memory, where they fill their
    span each once (contiguous in some order of its dims: row- or column-major,
    channels_last), else None: its dims sorted by stride, each stride is the product of the
    sizes before it."""
    expected = 1
    for stride, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return None
        expected *= n
    return t.as_strided((t.numel(),), (1,))


def fills_span(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements are every element of its span, each once."""
    return in_memory_order(t) is not None
