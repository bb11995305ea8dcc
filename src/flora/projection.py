"""Random projections, regenerated from integer seeds and never stored.

A projection for a dimension of size ``d`` at rank ``r`` is one of (``PROJECTIONS``):

- ``"gaussian"``: the ``r x d`` matrix ``A`` with i.i.d. N(0, 1/r) entries, so
  ``E[A^T A] = I`` and ``decompress(compress(G))`` is an unbiased estimate of ``G``
  (the paper's choice);
- ``"orthonormal"``: ``Q``, the ``r x d`` matrix with orthonormal rows from the QR
  factorisation of that same Gaussian draw (a uniformly random r-dim subspace):
  ``decompress(compress(G))`` is the orthogonal projection of ``G`` on it, biased but
  with far less noise; times ``sqrt(d / r)`` it is unbiased again;
- ``"coordinates"``: ``r`` of the ``d`` coordinates drawn without replacement, kept as
  an int64 index vector: compressing selects them, decompressing scatters them back, no
  matmul (FRUGAL's and BAdam's choice of random blocks). Biased like ``"orthonormal"``.

Every one is drawn by the CPU generator (and factorised on the CPU) and then moved, so
the same seed gives the same projection on every device.

Views: every tensor with two or more dims is seen as the 2-D matrix
``(shape[0], prod(shape[1:]))``. ``dim=0`` projects the rows away (stores ``r x m``),
``dim=1`` projects the columns away (stores ``n x r``).
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch

__all__ = [
    "projection_seed",
    "PROJECTIONS",
    "gaussian_projection",
    "make_projection",
    "state_dtype",
    "as_matrix",
    "choose_dim",
    "compressed_shape",
    "compress",
    "decompress",
    "decompress_add_",
    "transfer",
]

ProjDim = Union[Literal["auto"], int]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A well-mixed 64-bit bijection: nearby inputs give unrelated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# Streams keep the optimizer's and the accumulator's matrices unrelated even when both
# are given the same seed.
MOMENTUM_STREAM = 0
ACCUMULATION_STREAM = 1


def projection_seed(base_seed: int, index: int, count: int, stream: int = MOMENTUM_STREAM) -> int:
    """Seed of parameter ``index``'s projection number ``count`` in ``stream``.

    A pure function of its integers, so a resumed run regenerates exactly the matrices it
    would have used, with no history to save. Returns a 63-bit integer.
    """
    h = _splitmix64((int(base_seed) & _MASK64) ^ (int(stream) * 0xD1B54A32D192ED03 & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    h = _splitmix64(h ^ (int(count) & _MASK64))
    return h >> 1


def gaussian_projection(
    seed: int,
    rank: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``rank x dim`` matrix with i.i.d. N(0, 1/rank) entries drawn from ``seed``.

    Drawn by the CPU generator and then moved, so the same seed gives the same matrix
    on every device (CUDA's generator is a different algorithm).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    a = torch.randn(rank, dim, generator=gen, dtype=torch.float32)
    a.mul_(1.0 / math.sqrt(rank))
    a = _to_device(a, device)
    return a if dtype == torch.float32 else a.to(dtype)


PROJECTIONS = ("gaussian", "orthonormal", "coordinates")


def _to_device(a: torch.Tensor, device) -> torch.Tensor:
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return a
    return a.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else a.to(device)


def make_projection(
    kind: str,
    seed: int,
    rank: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    unbiased: bool = False,
) -> torch.Tensor:
    """The projection of ``kind`` (see ``PROJECTIONS``) for a dimension of size ``dim``.

    ``unbiased=True`` scales an orthonormal projection by ``sqrt(dim / rank)`` so that
    ``decompress(compress(G))`` is unbiased (a Gaussian one already is; coordinates are
    refused). A ``"coordinates"`` projection is an int64 vector of ``rank`` sorted
    indices; the matrix kinds are ``rank x dim`` in ``dtype``."""
    if kind == "gaussian":
        return gaussian_projection(seed, rank, dim, device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "orthonormal":
        g = torch.randn(rank, dim, generator=gen, dtype=torch.float32)  # the Gaussian draw of this seed
        q, r = torch.linalg.qr(g.T.double())  # dim x rank, in float64 so rows stay orthonormal in float32
        q = q * torch.sign(torch.diagonal(r)).masked_fill_(torch.diagonal(r) == 0, 1.0)  # unique: diag(R) > 0
        if unbiased:
            q = q * math.sqrt(dim / rank)
        return _to_device(q.T.to(dtype).contiguous(), device)
    if kind == "coordinates":
        if unbiased:
            raise ValueError("projection 'coordinates' has no unbiased form here; use 'gaussian' or 'orthonormal'")
        idx = torch.randperm(dim, generator=gen)[:rank].sort().values
        return _to_device(idx, device)
    raise ValueError(f"projection must be one of {', '.join(map(repr, PROJECTIONS))}; got {kind!r}")


def is_coordinates(a: torch.Tensor) -> bool:
    """Whether ``a`` is a coordinate projection (an index vector) rather than a matrix."""
    return a.dtype == torch.int64


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of optimizer state, buffers and projections for a tensor of ``dtype``:
    float64 stays float64 (as in HF Adafactor), everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a tensor of two or more dims as ``(shape[0], rest)``."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    n = shape[0]
    return n, math.prod(shape[1:])


def choose_dim(shape: torch.Size | tuple[int, ...], proj_dim: ProjDim = "auto") -> int:
    """The matrix dimension to project away: ``"auto"`` takes the smaller one (less
    noise, since the estimator's variance grows like d / r), ties going to the columns."""
    n, m = matrix_shape(shape)
    if proj_dim == "auto":
        return 0 if n < m else 1
    return int(proj_dim)


def compressed_shape(shape: torch.Size | tuple[int, ...], rank: int, dim: int) -> tuple[int, int]:
    n, m = matrix_shape(shape)
    return (rank, m) if dim == 0 else (n, rank)


def compress(g: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """``A G`` (dim 0, gives r x m) or ``G A^T`` (dim 1, gives n x r); for coordinates,
    the selected rows (dim 0) or columns (dim 1)."""
    g = as_matrix(g)
    if is_coordinates(a):
        return g.index_select(dim, a)
    return a @ g if dim == 0 else g @ a.T


def decompress(c: torch.Tensor, a: torch.Tensor, dim: int, *, size: int | None = None) -> torch.Tensor:
    """``A^T C`` (dim 0) or ``C A`` (dim 1): an n x m matrix (unbiased for the original
    with a Gaussian ``A``). Coordinates are scattered into zeros of the projected
    dimension's ``size``, which they need."""
    if is_coordinates(a):
        if size is None:
            raise ValueError("decompress: a coordinate projection needs size= (the projected dimension)")
        shape = (size, c.shape[1]) if dim == 0 else (c.shape[0], size)
        return decompress_add_(c.new_zeros(shape), c, a, dim)
    return a.T @ c if dim == 0 else c @ a


def decompress_add_(out: torch.Tensor, c: torch.Tensor, a: torch.Tensor, dim: int, *,
                    beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``out <- beta out + alpha decompress(c, a, dim)`` in place (``out`` an n x m
    matrix), without the n x m temporary that ``out + decompress(...)`` would allocate."""
    if is_coordinates(a):
        if beta != 1.0:
            out.mul_(beta)
        return out.index_add_(dim, a, c, alpha=alpha)
    if dim == 0:
        return out.addmm_(a.T, c, beta=beta, alpha=alpha)
    return out.addmm_(c, a, beta=beta, alpha=alpha)


def overlap(a_old: torch.Tensor, a_new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A_new A_old^T`` (r x r): how the new projection sees the old one's coordinates."""
    if is_coordinates(a_new):
        return (a_new[:, None] == a_old[None, :]).to(dtype)
    return a_new @ a_old.T


def transfer(c: torch.Tensor, a_old: torch.Tensor, a_new: torch.Tensor, dim: int) -> torch.Tensor:
    """Move a compressed tensor from one projection to another without leaving r x r:
    ``A_new A_old^T C`` (dim 0) or ``C A_old A_new^T`` (dim 1)."""
    t = overlap(a_old, a_new, c.dtype)
    return t @ c if dim == 0 else c @ t.T
