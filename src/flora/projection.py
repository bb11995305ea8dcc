"""Random Gaussian projections, regenerated from integer seeds and never stored.

A projection for a dimension of size ``d`` at rank ``r`` is the ``r x d`` matrix ``A``
with i.i.d. N(0, 1/r) entries, so ``E[A^T A] = I`` and ``decompress(compress(G))`` is an
unbiased estimate of ``G``.

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
    "gaussian_projection",
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
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cpu":
        a = a.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else a.to(device)
    return a if dtype == torch.float32 else a.to(dtype)


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
    """``A G`` (dim 0, gives r x m) or ``G A^T`` (dim 1, gives n x r)."""
    g = as_matrix(g)
    return a @ g if dim == 0 else g @ a.T


def decompress(c: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """``A^T C`` (dim 0) or ``C A`` (dim 1): an n x m matrix, unbiased for the original."""
    return a.T @ c if dim == 0 else c @ a


def decompress_add_(out: torch.Tensor, c: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """``out += decompress(c, a, dim)`` in place (``out`` an n x m matrix), without the
    n x m temporary that ``out + decompress(...)`` would allocate."""
    return out.addmm_(a.T, c) if dim == 0 else out.addmm_(c, a)


def transfer(c: torch.Tensor, a_old: torch.Tensor, a_new: torch.Tensor, dim: int) -> torch.Tensor:
    """Move a compressed tensor from one projection to another without leaving r x r:
    ``A_new A_old^T C`` (dim 0) or ``C A_old A_new^T`` (dim 1)."""
    if dim == 0:
        return (a_new @ a_old.T) @ c
    return c @ (a_old @ a_new.T)
