"""Which tensors are compressed, and along which dimension: one pure rule, used by the
optimizer's momentum, the gradient accumulator and the state-size formula."""

from __future__ import annotations

from .projection import choose_dim, matrix_shape

__all__ = ["PROJ_DIMS", "compressed_dim", "dense_reason"]

PROJ_DIMS = ("auto", 0, 1)


def compressed_dim(shape, rank: int | None, *, proj_dim="auto", max_aspect_ratio: float | None = None) -> int | None:
    """The matrix dimension projected away for a tensor of ``shape``, or None to keep it
    dense.

    Tensors of two or more dims are viewed as ``(shape[0], rest)``; they are compressed
    when ``rank`` is set, they hold elements (0-size tensors stay dense), the projected
    dimension (``proj_dim``: ``"auto"`` takes the smaller) exceeds it, and
    ``max(n, m) / min(n, m)`` does not exceed ``max_aspect_ratio`` (None: any shape)."""
    return None if dense_reason(shape, rank, proj_dim=proj_dim, max_aspect_ratio=max_aspect_ratio) else \
        choose_dim(shape, proj_dim)


def dense_reason(shape, rank: int | None, *, proj_dim="auto", max_aspect_ratio: float | None = None) -> str | None:
    """Why :func:`compressed_dim` keeps a tensor of ``shape`` dense, or None when it
    compresses it."""
    if rank is None:
        return "rank=None"
    if len(shape) < 2:
        return "1-D"
    n, m = matrix_shape(shape)
    if n == 0 or m == 0:  # no aspect ratio and nothing to compress; its state is empty
        return f"0-size tensor ({n} x {m} as a matrix)"
    if max_aspect_ratio is not None and max(n, m) > max_aspect_ratio * min(n, m):
        return f"aspect ratio {max(n, m) / min(n, m):.3g} > max_aspect_ratio={max_aspect_ratio}"
    d = (n, m)[choose_dim(shape, proj_dim)]
    if d <= rank:
        return f"projected dim {d} <= rank {rank}"
    return None
