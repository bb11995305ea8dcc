"""First-moment rules: dense (Adafactor's) and compressed (Flora's two forms).

Each takes this step's update ``u`` and returns the update to apply; state tensors are
changed in place. ``a`` is the current projection, ``dim`` the projected dimension.
"""

from __future__ import annotations

import torch

from .projection import as_matrix, compress, decompress, transfer

MOMENTUM_FORMS = ("paper", "exact")


def dense_momentum_(m: torch.Tensor, u: torch.Tensor, beta: float) -> torch.Tensor:
    """``m <- beta m + (1 - beta) u``; the update is ``m``."""
    return m.mul_(beta).add_(u, alpha=(1 - beta))


def paper_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float) -> torch.Tensor:
    """Algorithm 2 of the paper: ``M <- beta M + (1 - beta) compress(u)``; the update is
    ``decompress(M)``."""
    c.mul_(beta).add_(compress(u, a, dim), alpha=(1 - beta))
    return decompress(c, a, dim).view_as(u)


def exact_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float) -> torch.Tensor:
    """The current step enters exactly: update ``(1 - beta) u + beta decompress(M_prev)``;
    ``M`` then follows the same recursion as the paper's form."""
    update = decompress(c, a, dim).view_as(u).mul_(beta).add_(u, alpha=(1 - beta))
    c.mul_(beta).add_(compress(u, a, dim), alpha=(1 - beta))
    return update


def compressed_momentum_(
    form: str, c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float
) -> torch.Tensor:
    if form == "paper":
        return paper_momentum_(c, u, a, dim, beta)
    return exact_momentum_(c, u, a, dim, beta)


def resample_(c: torch.Tensor, a_old: torch.Tensor, a_new: torch.Tensor, dim: int) -> torch.Tensor:
    """Carry compressed momentum over to a new projection, in place."""
    return c.copy_(transfer(c, a_old, a_new, dim))


__all__ = [
    "MOMENTUM_FORMS",
    "dense_momentum_",
    "paper_momentum_",
    "exact_momentum_",
    "compressed_momentum_",
    "resample_",
    "as_matrix",
]
