"""First-moment rules: dense (Adafactor's) and compressed (``MOMENTUM_FORMS``).

``paper_momentum_``, ``exact_momentum_`` and ``subspace_momentum_`` state the forms
plainly (the reference); the optimizer uses ``compressed_step_``, which computes the
same thing (tested) in one pass.

Each takes this step's update ``u`` and returns the update to apply; state tensors are
changed in place. ``a`` is the current projection, ``dim`` the projected dimension.
"""

from __future__ import annotations

import math

import torch

from .projection import as_matrix, compress, decompress, decompress_add_, transfer

MOMENTUM_FORMS = ("paper", "exact", "subspace", "scaled")
# Forms that need a projection with orthonormal rows (their complement is u - D(C(u))).
SUBSPACE_FORMS = ("subspace", "scaled")


def dense_momentum_(m: torch.Tensor, u: torch.Tensor, beta: float | torch.Tensor, *,
                    alpha: float | None = None) -> torch.Tensor:
    """``m <- beta m + alpha u`` (``alpha = 1 - beta`` unless given); the update is ``m``.

    ``beta`` may be a 0-dim tensor (the optimizer passes 1 to freeze ``m`` on a skipped
    step without a host sync); multiplying by it gives the same bits as by the float."""
    return m.mul_(beta).add_(u, alpha=(1 - beta) if alpha is None else alpha)


def paper_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float) -> torch.Tensor:
    """Algorithm 2 of the paper: ``M <- beta M + (1 - beta) compress(u)``; the update is
    ``decompress(M)``."""
    c.mul_(beta).add_(compress(u, a, dim), alpha=(1 - beta))
    return decompress(c, a, dim, size=as_matrix(u).shape[dim]).view_as(u)


def exact_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float) -> torch.Tensor:
    """The current step enters exactly: update ``(1 - beta) u + beta decompress(M_prev)``;
    ``M`` then follows the same recursion as the paper's form."""
    update = decompress(c, a, dim, size=as_matrix(u).shape[dim]).view_as(u).mul_(beta).add_(u, alpha=(1 - beta))
    c.mul_(beta).add_(compress(u, a, dim), alpha=(1 - beta))
    return update


def subspace_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float) -> torch.Tensor:
    """Momentum inside the projection's subspace, none outside it (FRUGAL, Zmushko et al.
    2024): ``M <- beta M + (1 - beta) compress(u)``; the update is ``decompress(M)`` plus
    the part of ``u`` the projection misses, ``u - decompress(compress(u))``. Needs
    orthonormal rows, so that ``decompress(compress(.))`` is an orthogonal projection."""
    size = as_matrix(u).shape[dim]
    cu = compress(u, a, dim)
    c.mul_(beta).add_(cu, alpha=(1 - beta))
    return (as_matrix(u) + decompress(c - cu, a, dim, size=size)).view_as(u)


def complement_scale(c_norm: float, cu_norm: float, bias_correction: float) -> float:
    """The "scaled" form's weight of the complement: the bias-corrected momentum's norm
    over this step's projected update's norm, at most 1 (Fira, Chen et al. 2024, scales
    the residual by such a ratio). About 1 while gradients agree from step to step,
    about sqrt((1 - beta) / (1 + beta)) when they are noise."""
    if cu_norm <= 0.0:
        return 1.0
    return min(1.0, c_norm / (bias_correction * cu_norm))


def scaled_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
                     bias_correction: float) -> torch.Tensor:
    """``"subspace"`` with the complement scaled: ``M <- beta M + (1 - beta) C(u)``; the
    update is ``D(M) + phi (u - D(C(u)))``, ``phi = complement_scale(|M|, |C(u)|, 1 - beta^t)``."""
    size = as_matrix(u).shape[dim]
    cu = compress(u, a, dim)
    c.mul_(beta).add_(cu, alpha=(1 - beta))
    phi = complement_scale(c.norm().item(), cu.norm().item(), bias_correction)
    return (as_matrix(u) * phi + decompress(c - phi * cu, a, dim, size=size)).view_as(u)


def _gram(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The r x r Gram matrix of a compressed tensor along its rank dimension."""
    return x @ x.T if dim == 0 else x.T @ x


def compressed_step_(
    form: str, c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
    lr: float | torch.Tensor, clip: float, *, u_norm: torch.Tensor | None = None, isometric: bool = False,
    bias_correction: float = 1.0,
) -> torch.Tensor:
    """Adafactor's update clip and learning rate, then Flora's compressed momentum and
    its clip after decompression, with one pass over ``u`` (which it overwrites).

    ``u`` is this step's normalised update before clipping (``u_norm``: its 2-norm, if
    already computed); ``isometric``: the projection's rows are orthonormal
    (``"orthonormal"``, ``"coordinates"``); ``bias_correction``: ``1 - beta^t``, used by
    ``"scaled"``. Equal, up to rounding, to::

        u = lr * u / max(1, rms(u) / clip)
        out = paper_momentum_(c, u, a, dim, beta)  # or exact_, subspace_, scaled_momentum_
        return out / max(1, rms(out) / (clip * lr))

    but the three scalings are folded into the coefficients of the one ``addmm`` that
    writes ``out``, and ``rms(out)`` comes from r-sized quantities, with ``C``/``D`` for
    compress/decompress: ``<u, D(x)> = <C(u), x>`` and ``|D(x)|^2 = <gram(x), A A^T>``
    (``= |x|^2`` when isometric).
    """
    if form in SUBSPACE_FORMS and not isometric:
        raise ValueError(f"momentum_form {form!r} needs a projection with orthonormal rows "
                         "('orthonormal' or 'coordinates'), not 'gaussian'")
    um = as_matrix(u)
    cu = compress(um, a, dim)  # C(u), unscaled
    numel = um.numel()
    # Scalars for the coefficients, fetched together (one device sync).
    u_sq = (um.norm() if u_norm is None else u_norm).square()
    scalars = [torch.as_tensor(lr, dtype=u_sq.dtype, device=u.device), u_sq]
    if isometric:
        scalars += [(cu * c).sum(), c.square().sum(), cu.square().sum()]
    elif form != "paper":
        gram_a = a @ a.T
        scalars += [(cu * c).sum(), (_gram(c, dim) * gram_a).sum()]
    lr, u_sq, *rest = torch.stack(scalars).tolist()
    k = lr / max(1.0, math.sqrt(u_sq / numel) / clip)  # k u: Adafactor's clipped, lr-scaled update
    b = (1 - beta) * k  # weight of C(k u) in the new momentum
    x = c
    if form == "paper":  # out = D(c_new)
        c.mul_(beta).add_(cu, alpha=b)
        coef_u, coef_dc = 0.0, 1.0
        if isometric:
            cross, c_sq, cu_sq = rest
            out_sq = beta**2 * c_sq + 2 * beta * b * cross + b**2 * cu_sq
        else:
            out_sq = (_gram(c, dim) * (a @ a.T)).sum().item()
    elif form == "exact":  # out = (1 - beta) k u + beta D(c_old)
        cross, dc_sq = (rest[0], rest[1])
        coef_u, coef_dc = b, beta
        out_sq = coef_u**2 * u_sq + 2 * coef_u * coef_dc * cross + coef_dc**2 * dc_sq
    elif form == "scaled":  # out = D(c_new) + phi (k u - D(C(k u))) = phi k u + D(c_new - phi k C(u))
        cross, c_sq, cu_sq = rest
        new_sq = beta**2 * c_sq + 2 * beta * b * cross + b**2 * cu_sq  # |c_new|^2
        phi = complement_scale(math.sqrt(max(new_sq, 0.0)), k * math.sqrt(cu_sq), bias_correction)
        c.mul_(beta).add_(cu, alpha=b)
        x = torch.add(c, cu, alpha=-phi * k)
        coef_u, coef_dc = phi * k, 1.0
        x_cross = beta * cross + b * cu_sq - phi * k * cu_sq  # <C(u), x>
        x_sq = new_sq - 2 * phi * k * (beta * cross + b * cu_sq) + (phi * k) ** 2 * cu_sq
        out_sq = coef_u**2 * u_sq + 2 * coef_u * x_cross + x_sq
    else:  # subspace: out = D(c_new) + (k u - D(C(k u))) = k u + beta D(c_old - k C(u))
        cross, c_sq, cu_sq = rest
        x = torch.add(c, cu, alpha=-k)
        coef_u, coef_dc = k, beta
        x_cross = cross - k * cu_sq  # <C(u), x>
        x_sq = c_sq - 2 * k * cross + k**2 * cu_sq  # |x|^2 = |D(x)|^2
        out_sq = k**2 * u_sq + 2 * k * beta * x_cross + beta**2 * x_sq
    bound = clip * lr
    s = 1.0 / max(1.0, math.sqrt(max(out_sq, 0.0) / numel) / bound) if bound > 0 else 0.0
    decompress_add_(um, x, a, dim, beta=s * coef_u, alpha=s * coef_dc)  # u <- s (coef_u u + coef_dc D(x))
    if form in ("exact", "subspace"):
        c.mul_(beta).add_(cu, alpha=b)
    return um.reshape(u.shape)


def resample_(c: torch.Tensor, a_old: torch.Tensor, a_new: torch.Tensor, dim: int) -> torch.Tensor:
    """Carry compressed momentum over to a new projection, in place."""
    return c.copy_(transfer(c, a_old, a_new, dim))


__all__ = [
    "MOMENTUM_FORMS",
    "dense_momentum_",
    "paper_momentum_",
    "exact_momentum_",
    "subspace_momentum_",
    "scaled_momentum_",
    "complement_scale",
    "compressed_step_",
    "resample_",
    "as_matrix",
]
