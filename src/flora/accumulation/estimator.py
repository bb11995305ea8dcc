"""The estimator, over one parameter's slot: pure functions, no bookkeeping.

A compressed parameter's partial sum over a cycle is ``C = sum_k compress(G_k, A)`` (``n x
r`` or ``r x m``, float32; float64 for float64 parameters); its estimate of the cycle's
summed gradient is ``decompress(C, A)``, plus the last micro-batch's gradient exactly when
``exact_last``. ``A`` is a pure function of ``(seed, slot index, cycle)``, never stored
across cycles."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..projection import (
    ACCUMULATION_STREAM,
    as_matrix,
    compress,
    compressed_shape,
    decompress,
    decompress_add_,
    grad_dtype,
    make_projection,
    matrix_shape,
    projection_seed,
    state_dtype,
)
from ..sharded import is_dtensor

__all__ = ["ACCUMULATION_PROJECTIONS", "Slot", "accumulate_compressed_", "write_estimate_", "draw_projection",
           "estimate", "add_last_", "buffer_shape", "plan_row", "local"]

# Unbiased estimators only: decompress(compress(G)) must average to G.
ACCUMULATION_PROJECTIONS = ("gaussian", "orthonormal")


@dataclass(frozen=True)
class Slot:
    """One attached parameter."""

    index: int  # position in the parameter list given: keys the projection seeds
    name: str
    param: torch.Tensor
    dim: int | None  # projected matrix dimension; None accumulates densely
    reason: str | None = None  # why it is dense (plan()), or why its dim is not the rule's


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of an FSDP2 (DTensor) tensor; any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def accumulate_compressed_(buf: torch.Tensor | None, g: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """``buf + compress(g)`` in the projection's dtype (the parameter's state dtype: float32,
    float64 for float64 parameters), in place into ``buf`` (None starts a new sum). A
    gradient of another dtype than its parameter's (``p.grad_dtype = torch.float64`` on a
    float32 parameter) is summed in the parameter's: it had failed inside compress()
    without naming the parameter (probe Z74)."""
    like = g.shape  # FSDP2: the whole tensor's shape decides its matrix view
    g = local(g)  # FSDP2: this rank's rows, after the reduce-scatter
    c = compress(as_matrix(g.to(a.dtype if a.is_floating_point() else state_dtype(g.dtype)), like), a, dim)
    return c if buf is None else buf.add_(c)


def write_estimate_(grad: torch.Tensor, buf: torch.Tensor, a: torch.Tensor, dim: int, *, add: bool) -> torch.Tensor:
    """``grad <- decompress(buf) (+ grad when add)``, in place.

    A contiguous gradient of the buffer's dtype is updated without an n x m temporary (one
    matmul accumulating into it); otherwise the estimate is computed in the buffer's dtype
    (float32 for half gradients, float64 for float64 ones) and rounded once. A
    DTensor gradient (FSDP2) gets its local rows' estimate."""
    like = grad.shape
    grad = local(grad)
    if grad.dtype == buf.dtype and grad.is_contiguous():
        gm = as_matrix(grad, like)  # a view, since grad is contiguous
        if not add:
            gm.zero_()
        out = decompress_add_(gm, buf, a, dim)
        if out is not gm:  # traced by torch.compile, decompress_add_ returns a new tensor
            gm.copy_(out)
        return grad
    full = decompress(buf, a, dim)
    if add:
        full.add_(as_matrix(grad, like).to(full.dtype))  # a float64 gradient is not rounded to float32
    return grad.copy_(full.view(grad.shape))


def draw_projection(slot: Slot, kind: str, seed: int, rank: int, cycle: int) -> torch.Tensor:
    """The projection of ``slot`` in cycle ``cycle`` (its own stream: a ``flora.Flora`` with
    the same seed draws other matrices), on the parameter's device."""
    p = slot.param
    return make_projection(kind, projection_seed(seed, slot.index, cycle, ACCUMULATION_STREAM), rank,
                           matrix_shape(p.shape)[slot.dim], device=p.device, dtype=state_dtype(p.dtype),
                           unbiased=True)


def estimate(slot: Slot, buf: torch.Tensor, a: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new gradient tensor holding ``decompress(buf)``, in ``dtype`` (the cycle's
    ``gradient_dtype``; by default the parameter's ``grad_dtype``)."""
    g = torch.empty_like(slot.param, dtype=dtype or grad_dtype(slot.param))
    write_estimate_(g, buf, a, slot.dim, add=False)
    return g


def add_last_(g: torch.Tensor, buf: torch.Tensor | None, a: torch.Tensor, dim: int, *, exact_last: bool) -> None:
    """The cycle's last micro-batch, whose gradient ``g`` is in ``.grad``: ``g`` becomes the
    estimate, ``decompress(buf) + g`` (``exact_last``; ``g`` as it is when nothing came
    before) or ``decompress(buf + compress(g))``."""
    if not exact_last:
        write_estimate_(g, accumulate_compressed_(buf, g, a, dim), a, dim, add=False)
    elif buf is not None:
        write_estimate_(g, buf, a, dim, add=True)


def buffer_shape(slot: Slot, rank: int | None) -> tuple[int, ...]:
    """The shape of the slot's partial sum: its compressed shape (of this rank's rows under
    FSDP2), or the parameter's."""
    if slot.dim is None:
        return tuple(slot.param.shape)
    return compressed_shape(local(slot.param).shape, rank, slot.dim, like=slot.param.shape)


def plan_row(slot: Slot, rank: int | None) -> dict:
    """What :meth:`CompressedAccumulator.plan` reports of one slot."""
    s = slot
    row = {"name": s.name, "index": s.index, "shape": tuple(s.param.shape), "compressed": s.dim is not None}
    if s.dim is not None:
        row.update(proj_dim=s.dim, buffer_shape=buffer_shape(s, rank))  # this process's (FSDP2: its rows)
    if s.reason is not None:
        row["reason"] = s.reason
    return row
