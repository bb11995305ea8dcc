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


def bucket_gradients(bucket, out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each gradient of a DDP ``GradBucket`` as DDP lays it out in the bucket's buffer (or at
    the same offsets in ``out``, a tensor like it): with its parameter's strides where the
    parameter fills its span (channels_last, transposed), row-major otherwise.
    ``bucket.gradients()`` shows row-major views of that memory whatever the layout, so a
    channels_last gradient read through it is a permuted matrix. A complex parameter's
    gradient comes back complex, from the real view DDP buckets it as."""
    buf = bucket.buffer()
    target = buf if out is None else out
    views = []
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        at = g.storage_offset() - buf.storage_offset()  # in the parameter's elements
        strides = p.stride() if fills_span(p) else g.stride()
        if p.is_complex() and not target.is_complex():
            # a complex bucket holds its real view (twice as long), where gradients() shows
            # real tensors of the complex shapes at the complex offsets (a review)
            real = target.as_strided(tuple(g.size()) + (2,), tuple(2 * st for st in strides) + (1,),
                                     target.storage_offset() + 2 * at)
            views.append(torch.view_as_complex(real))
        else:
            views.append(target.as_strided(g.size(), strides, target.storage_offset() + at))
    return views
