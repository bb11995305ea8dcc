"""Which tensors are compressed, and along which dimension: one pure rule, used by the
optimizer's momentum, the gradient accumulator and the state-size formula; and the dtype
the momentum is stored in."""

from __future__ import annotations

import torch

from .projection import choose_dim, is_stack, matrix_shape, one_matrix, state_dtype

__all__ = ["FLORA_PROJ_DIMS", "MOMENTUM_DTYPES", "PROJ_DIMS", "check_momentum_dtype", "compressed_dim",
           "dense_reason", "momentum_dtype_name", "momentum_storage"]

PROJ_DIMS = ("auto", 0, 1)
# Flora's momentum also takes "sharded": the side FSDP2's "auto" projects, on any tensor.
# One process resuming a sharded run through torch.distributed.checkpoint needs it: DCP
# loads into tensors the loading optimizer shapes, and no single 0 or 1 matches a sharded
# run that holds a (1, N, d) tensor (rows) beside matrices (columns) (probe Z91).
FLORA_PROJ_DIMS = PROJ_DIMS + ("sharded",)


def _resolved(shape, rank, proj_dim, max_aspect_ratio):
    """``proj_dim`` as "auto", 0 or 1 for ``shape``: "sharded" is FSDP2's rule (columns
    where they compress; one matrix behind leading dims of 1, which FSDP2 puts whole on
    one rank, its rows; otherwise "auto"'s choice)."""
    if proj_dim != "sharded":
        return proj_dim
    if one_matrix(shape):
        return 0
    return 1 if dense_reason(shape, rank, proj_dim=1, max_aspect_ratio=max_aspect_ratio) is None else "auto"


def compressed_dim(shape, rank: int | None, *, proj_dim="auto", max_aspect_ratio: float | None = None) -> int | None:
    """The matrix dimension projected away for a tensor of ``shape``, or None to keep it
    dense.

    Tensors of two or more dims are viewed as a matrix (``(shape[0], rest)``, or
    ``(rest, shape[-1])`` for a stack of matrices: ``flora.projection.matrix_shape``); they
    are compressed when ``rank`` is set, they hold elements (0-size tensors stay dense),
    the projected dimension (``proj_dim``: ``"auto"`` takes the smaller, a stack's
    columns) exceeds it, and ``max(n, m) / min(n, m)`` (of one matrix of a stack) does not
    exceed ``max_aspect_ratio`` (None: any shape). ``"sharded"``: FSDP2's choice
    (:data:`FLORA_PROJ_DIMS`)."""
    proj_dim = _resolved(shape, rank, proj_dim, max_aspect_ratio)
    return None if dense_reason(shape, rank, proj_dim=proj_dim, max_aspect_ratio=max_aspect_ratio) else \
        choose_dim(shape, proj_dim)


def dense_reason(shape, rank: int | None, *, proj_dim="auto", max_aspect_ratio: float | None = None) -> str | None:
    """Why :func:`compressed_dim` keeps a tensor of ``shape`` dense, or None when it
    compresses it."""
    proj_dim = _resolved(shape, rank, proj_dim, max_aspect_ratio)
    if rank is None:
        return "rank=None"
    if len(shape) < 2:
        return f"{len(shape)}-D"  # 0-D: a scalar
    n, m = matrix_shape(shape)
    if n == 0 or m == 0:  # no aspect ratio and nothing to compress; its state is empty
        return f"0-size tensor ({n} x {m} as a matrix)"
    a, b = shape[-2:] if is_stack(shape) else (n, m)  # a stack: the shape of its matrices
    if max_aspect_ratio is not None and max(a, b) > max_aspect_ratio * min(a, b):
        return f"aspect ratio {max(a, b) / min(a, b):.3g} > max_aspect_ratio={max_aspect_ratio}"
    d = (n, m)[choose_dim(shape, proj_dim)]
    if d <= rank:
        return f"projected dim {d} <= rank {rank}"
    return None


# What the first moment may be stored in (``momentum_dtype``); None: the state dtype
# (float32, float64 for float64 parameters); "auto" (the default since 2026-12-02):
# bfloat16 in a group with a rank when the state is float32, the state dtype otherwise
# (rank None: HF Adafactor's arithmetic; float64 parameters). Its arithmetic always runs
# in the state dtype.
# Not float16: the momentum holds lr-scaled updates (as HF Adafactor's), about lr in size,
# so at fine-tuning lrs (1e-5) it would sit in float16's subnormals (below 6.1e-5) or
# flush to zero; bfloat16 has float32's range.
MOMENTUM_DTYPES = (None, "auto", "float32", "bfloat16")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def momentum_dtype_name(value):
    """``momentum_dtype`` as the group holds it: a name of ``MOMENTUM_DTYPES`` (a
    ``torch.dtype`` given is named, so that checkpoints hold a plain string)."""
    return _DTYPE_NAMES.get(value, value) if isinstance(value, torch.dtype) else value


def check_momentum_dtype(value) -> None:
    """``momentum_dtype`` is one of ``MOMENTUM_DTYPES`` (or such a ``torch.dtype``):
    ``ValueError`` naming the option and the allowed values otherwise (float16 with why)."""
    name = momentum_dtype_name(value)
    if name in MOMENTUM_DTYPES and not isinstance(value, bool):
        return
    why = (" (not float16: the momentum holds lr-scaled updates, about lr in size, which at small lrs "
           "fall below float16's normal range; bfloat16 has float32's)") if name == "float16" else ""
    raise ValueError("momentum_dtype must be 'auto' (bfloat16 in a group with a rank and a float32 state, "
                     "else the state dtype), None (the state dtype: float32, float64 for float64 parameters), "
                     f"'float32' or 'bfloat16' (or that torch.dtype); got {value!r}{why}")


def momentum_storage(group: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter of ``dtype`` keeps its first moment in under ``group``. A group
    without the option (a checkpoint from before it) keeps the state dtype."""
    name = momentum_dtype_name(group.get("momentum_dtype"))
    wide = state_dtype(dtype)
    if name == "auto":
        return torch.bfloat16 if group.get("rank") is not None and wide == torch.float32 else wide
    return wide if name is None else getattr(torch, name)
