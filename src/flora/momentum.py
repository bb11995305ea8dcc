"""First-moment rules: dense (Adafactor's) and compressed (``MOMENTUM_FORMS``).

The ``*_momentum_`` functions (one per form of ``MOMENTUM_FORMS``) state the forms
plainly: they are the reference, used by the tests only. The optimizer's paths call
``compressed_step_`` (or its parts, ``compressed_apply_``), which computes the same
thing (tested) in one pass.

Each takes this step's update ``u`` and returns the update to apply; state tensors are
changed in place. ``a`` is the current projection, ``dim`` the projected dimension.
"""

from __future__ import annotations

import torch

from .adafactor import scalar_dtype
from .projection import _bcast, as_matrix, compress, decompress, decompress_add_, overlap, transfer

MOMENTUM_FORMS = ("paper", "exact", "subspace", "scaled", "adaptive", "fixed", "floored")
# Forms that need a projection with orthonormal rows (their complement is u - D(C(u))).
SUBSPACE_FORMS = ("subspace", "scaled", "adaptive", "fixed", "floored")
# Forms that take Flora's complement_weight: "fixed"'s constant phi, "floored"'s floor under phi.
WEIGHTED_FORMS = ("fixed", "floored")

# The "fixed" form's complement weight phi when Flora's complement_weight is None: on the
# selection suite at rank 8 a constant 0.4 removed the default form's deficit on tabular
# MLPs and had the best worst case without the CNN; the language model wanted a small phi
# (0.1, "exact"'s 1 - beta1, was best there). docs/results.md, "a constant complement weight".
# Also the "floored" form's floor under the "scaled" weight when complement_weight is None.
FIXED_COMPLEMENT_WEIGHT = 0.4


def fixed_weight(complement_weight: float | None) -> float:
    """The ``"fixed"`` form's ``phi`` (the ``"floored"`` form's floor): ``complement_weight``,
    or ``FIXED_COMPLEMENT_WEIGHT`` when it is None."""
    return FIXED_COMPLEMENT_WEIGHT if complement_weight is None else float(complement_weight)


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
    return _weighted_complement_(c, u, a, dim, beta,
                                 lambda cu: complement_scale(c.norm().item(), cu.norm().item(), bias_correction))


def noise_ratio_sq(beta: float, bias_correction: float) -> float:
    """``rho0^2``: the squared norm ratio of the bias-corrected momentum to one update when
    the updates are independent noise of equal size: the EMA's weights squared, summed,
    over the squared sum of its weights, ``(1 - beta)(1 + beta^t) / ((1 + beta)(1 - beta^t))``
    (1 at the first step, ``(1 - beta) / (1 + beta)`` later)."""
    beta_t = 1.0 - bias_correction
    return (1 - beta) * (1 + beta_t) / ((1 + beta) * bias_correction)


# 1 - rho0^2 is 0 at the first step and at least 2 beta / (1 + beta)^2 after it; below this
# it is the rounding of 1 - beta^t (eager: 1 - beta**t; compiled: 1 - exp(t log beta)), and
# dividing by it would draw the first step's weight anywhere in [1 - beta, 1]
FIRST_STEP_GAP = 1e-6


def adaptive_scale(c_norm: float, cu_norm: float, beta: float, bias_correction: float) -> float:
    """The ``"adaptive"`` form's weight of the complement: the fraction of this step's
    update that is signal, estimated inside the subspace and assumed alike outside it (a
    random subspace sees the same mix). With ``rho = |M| / ((1 - beta^t) |C(u)|)``, a
    signal fraction ``f`` gives ``rho^2 = f + (1 - f) rho0^2`` (:func:`noise_ratio_sq`), so
    ``f = (rho^2 - rho0^2) / (1 - rho0^2)``: the Wiener weight of a one-step estimate
    against the averaged one. Kept within ``[1 - beta, 1]``: never below the ``"exact"``
    form's weight, so the complement always moves."""
    if cu_norm <= 0.0:
        return 1.0
    rho_sq = (c_norm / (bias_correction * cu_norm)) ** 2
    r0 = noise_ratio_sq(beta, bias_correction)
    f = (rho_sq - r0) / (1 - r0) if 1 - r0 > FIRST_STEP_GAP else 1.0
    return min(1.0, max(1.0 - beta, f))


def adaptive_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
                       bias_correction: float) -> torch.Tensor:
    """``"subspace"`` with the complement weighted by its estimated signal fraction:
    ``M <- beta M + (1 - beta) C(u)``; the update is ``D(M) + phi (u - D(C(u)))``,
    ``phi = adaptive_scale(|M|, |C(u)|, beta, 1 - beta^t)``. ``"exact"`` is the same with
    ``phi = 1 - beta``, ``"subspace"`` with ``phi = 1``."""
    return _weighted_complement_(c, u, a, dim, beta,
                                 lambda cu: adaptive_scale(c.norm().item(), cu.norm().item(), beta, bias_correction))


def fixed_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
                    phi: float) -> torch.Tensor:
    """``"subspace"`` with the complement weighted by a constant: ``M <- beta M + (1 - beta) C(u)``;
    the update is ``D(M) + phi (u - D(C(u)))`` (``phi = 1 - beta``: ``"exact"``; ``phi = 1``:
    ``"subspace"``)."""
    return _weighted_complement_(c, u, a, dim, beta, lambda cu: phi)


def floored_momentum_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
                      bias_correction: float, phi_min: float) -> torch.Tensor:
    """``"scaled"`` with its weight never below ``phi_min``: ``M <- beta M + (1 - beta) C(u)``;
    the update is ``D(M) + phi (u - D(C(u)))``,
    ``phi = max(phi_min, complement_scale(|M|, |C(u)|, 1 - beta^t))``. On noisy gradients
    the scaled weight falls below the floor and this is ``"fixed"`` (``phi = phi_min``); on
    a noiseless problem the scaled weight goes to 1 and this is ``"scaled"``."""
    return _weighted_complement_(
        c, u, a, dim, beta,
        lambda cu: max(phi_min, complement_scale(c.norm().item(), cu.norm().item(), bias_correction)))


def _weighted_complement_(c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
                          weight) -> torch.Tensor:
    """``M <- beta M + (1 - beta) C(u)``; the update is ``D(M) + phi (u - D(C(u)))``, with
    ``phi = weight(C(u))`` read after ``M`` changed (the weighted forms' reference)."""
    size = as_matrix(u).shape[dim]
    cu = compress(u, a, dim)
    c.mul_(beta).add_(cu, alpha=(1 - beta))
    phi = weight(cu)
    return (as_matrix(u) * phi + decompress(c - phi * cu, a, dim, size=size)).view_as(u)


def _gram(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The r x r Gram matrix of a compressed tensor (or a stack) along its rank dimension."""
    return x @ x.mT if dim == 0 else x.mT @ x


def _msum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last two dims: one value per matrix of a stack (0-dim for one matrix).
    The longer dim first, then the shorter (at most the rank here): torch's CPU sum of more
    than 32,768 values into one splits them among the threads, so its last bit depended on
    torch.set_num_threads (a probe: 15 of 20 sums of 2048 x 32); a sum into one value per
    row or column is computed whole by one thread."""
    return x.sum(dim=-2).sum(dim=-1) if x.shape[-2] >= x.shape[-1] else x.sum(dim=-1).sum(dim=-1)




def compressed_step_(
    form: str, c: torch.Tensor, u: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
    lr: float | torch.Tensor, clip: float, *, u_norm: torch.Tensor | None = None, isometric: bool = False,
    bias_correction: float | torch.Tensor = 1.0, ok: torch.Tensor | None = None,
    complement_weight: float | None = None,
) -> torch.Tensor:
    """Adafactor's update clip and learning rate, then Flora's compressed momentum and
    its clip after decompression, with one pass over ``u`` (which it overwrites).

    ``u`` is this step's normalised update before clipping (``u_norm``: its 2-norm, if
    already computed); ``isometric``: the projection's rows are orthonormal
    (``"orthonormal"``, ``"coordinates"``); ``bias_correction``: ``1 - beta^t``, used by
    ``"scaled"``, ``"adaptive"`` and ``"floored"`` (a float, or a 0-dim device tensor in a
    compiled step); ``complement_weight``: the ``"fixed"`` form's ``phi``, the ``"floored"``
    form's floor under it (None: ``FIXED_COMPLEMENT_WEIGHT``; ignored by the other forms).
    Equal, up to rounding, to::

        u = lr * u / max(1, rms(u) / clip)
        out = paper_momentum_(c, u, a, dim, beta)  # or exact_, subspace_, scaled_, adaptive_, fixed_,
                                                   # floored_momentum_
        return out / max(1, rms(out) / (clip * lr))

    but the three scalings are folded into the coefficients of the one ``addmm`` that
    writes ``out``, and ``rms(out)`` comes from r-sized quantities, with ``C``/``D`` for
    compress/decompress: ``<u, D(x)> = <C(u), x>`` and ``|D(x)|^2 = <gram(x), A A^T>``
    (``= |x|^2`` when isometric).

    Nothing here waits on the host: the coefficients are device tensors (``torch.where``
    and ``clamp`` stand for the ``max`` and ``min`` above). Stacks work too: ``u`` of
    ``k x n x m``, ``c`` of ``k x r x m`` (or ``k x n x r``), ``a`` of ``k x r x d`` (or
    ``k x r`` coordinates), ``lr`` and ``u_norm`` a float or one value per matrix; then
    every coefficient is a ``k``-vector and the matmuls are batched.

    ``ok`` (bool, 0-dim or one per matrix): where False, the returned update is exactly 0
    (its coefficients are), provided ``u`` is finite there; ``c`` still changes. Where the
    update's RMS is not finite (``c`` overflowed float32), the update is 0 and ``c``
    restarts from 0.
    """
    if form in SUBSPACE_FORMS and not isometric:
        raise ValueError(f"momentum_form {form!r} needs a projection with orthonormal rows "
                         "('orthonormal' or 'coordinates'), not 'gaussian'")
    batched = u.dim() == 3 and c.dim() == 3
    um = u if batched else as_matrix(u)
    cu = compress(um, a, dim)  # C(u), unscaled
    norm = torch.linalg.vector_norm(um, dim=(-2, -1)) if u_norm is None else u_norm
    sdt = scalar_dtype(u.device)  # the r-sized coefficients: float64 (cancellation in |out|^2)
    terms = compressed_terms(c, cu, a, dim, isometric=isometric, dtype=sdt)
    um = compressed_apply_(form, c, um, cu, a, dim, beta, lr, clip, u_sq=norm.to(sdt).square(), terms=terms,
                      numel=um.shape[-2] * um.shape[-1], isometric=isometric, bias_correction=bias_correction, ok=ok,
                      complement_weight=complement_weight)
    return um if batched else um.reshape(u.shape)


def compressed_terms(c: torch.Tensor, cu: torch.Tensor, a: torch.Tensor, dim: int, *, isometric: bool,
                     dtype: torch.dtype) -> torch.Tensor:
    """The r-sized sums the compressed step needs besides ``|u|^2``, stacked on the last
    dim (one row per matrix of a stack): ``<C(u), M>, |M|^2, |C(u)|^2`` when isometric;
    else ``<C(u), M>`` and the Gram matrices of ``M`` and ``C(u)`` against ``A A^T``:
    ``<G(M), AA^T>, 2 <G(M, C(u)), AA^T>, <G(C(u)), AA^T>`` (so ``|D(x)|^2`` of any
    ``x = s M + t C(u)`` follows). Every one is a sum over the entries of ``M`` and
    ``C(u)``: where those are sharded by rows, the sums of the shards' terms are the
    terms (``flora.sharded`` all-reduces them)."""
    cross = _msum(cu * c)
    if isometric:
        out = [cross, _msum(c.square()), _msum(cu.square())]
    else:
        aat = overlap(a, a, c.dtype)  # A A^T
        out = [cross, _msum(_gram(c, dim) * aat), 2 * _msum(_cross_gram(c, cu, dim) * aat),
               _msum(_gram(cu, dim) * aat)]
    return torch.stack(out, dim=-1).to(dtype)


def _cross_gram(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    return x @ y.mT if dim == 0 else x.mT @ y


def compressed_apply_(
    form: str, c: torch.Tensor, um: torch.Tensor, cu: torch.Tensor, a: torch.Tensor, dim: int, beta: float,
    lr: float | torch.Tensor, clip: float, *, u_sq: torch.Tensor, terms: torch.Tensor, numel: int,
    isometric: bool, bias_correction: float | torch.Tensor = 1.0, ok: torch.Tensor | None = None,
    split: bool = False, complement_weight: float | None = None,
) -> torch.Tensor:
    """The rest of :func:`compressed_step_` once ``|u|^2`` (``u_sq``) and
    :func:`compressed_terms` are known (summed over shards, for a sharded tensor whose
    ``um``, ``c`` and ``cu`` are the local rows): updates ``c`` and overwrites ``um`` with
    the update (and returns it: under torch.compile, a new tensor); ``numel``: the whole
    tensor's; ``complement_weight``: the ``"fixed"`` form's ``phi`` and the ``"floored"``
    form's floor (:func:`fixed_weight`: None is ``FIXED_COMPLEMENT_WEIGHT``), a Python
    constant (no sync; under torch.compile a guarded constant, as ``beta``).

    ``split=True`` (``um`` may then be None): ``um`` is left alone, and the update is
    returned as its two parts, ``(x, coef)``, such that the update is
    ``coef * u + D(x)`` (``coef`` None: ``D(x)`` alone, the paper's form): what
    ``flora.compiled``'s staged CPU step decompresses into a buffer of its own."""
    sdt = u_sq.dtype
    like = cu if um is None else um
    lr_t = lr.to(device=like.device, dtype=sdt) if isinstance(lr, torch.Tensor) else lr
    k = lr_t / (u_sq / numel).sqrt().div_(clip).clamp_(min=1.0)  # k u: Adafactor's clipped, lr-scaled update
    b = (1 - beta) * k  # weight of C(k u) in the new momentum
    t = terms.unbind(-1)
    cross = t[0]
    if isometric:
        c_sq, cu_sq = t[1], t[2]
    else:
        g_cc, g_x, g_uu = t[1], t[2], t[3]
    x, coef_u = c, None
    if form == "paper":  # out = D(c_new)
        c.mul_(beta).add_(cu * _bcast(b.to(c.dtype)))
        coef_dc = 1.0
        if isometric:
            out_sq = beta**2 * c_sq + 2 * beta * b * cross + b**2 * cu_sq
        else:  # |D(beta M + b C(u))|^2 from the Gram terms
            out_sq = beta**2 * g_cc + beta * b * g_x + b**2 * g_uu
    elif form == "exact":  # out = (1 - beta) k u + beta D(c_old)
        dc_sq = c_sq if isometric else g_cc
        coef_u, coef_dc = b, beta
        out_sq = b**2 * u_sq + 2 * b * beta * cross + beta**2 * dc_sq
    elif form in ("scaled", "adaptive", "fixed", "floored"):
        # out = D(c_new) + phi (k u - D(C(k u))) = phi k u + D(c_new - phi k C(u))
        new_sq = beta**2 * c_sq + 2 * beta * b * cross + b**2 * cu_sq  # |c_new|^2
        if form == "fixed":
            phi = fixed_weight(complement_weight)
        elif form in ("scaled", "floored"):
            phi = complement_scale_t(new_sq.clamp(min=0.0).sqrt(), k * cu_sq.sqrt(), bias_correction)
            if form == "floored":  # the floor a Python constant, as beta: no sync, no recompile
                phi = phi.clamp(min=fixed_weight(complement_weight))
        else:
            phi = adaptive_scale_t(new_sq.clamp(min=0.0), k.square() * cu_sq, beta, bias_correction)
        c.mul_(beta).add_(cu * _bcast(b.to(c.dtype)))
        pk = phi * k
        x = c - cu * _bcast(pk.to(c.dtype))
        coef_u, coef_dc = pk, 1.0
        # out = D(c_new) + pk (u - D(C(u))): with orthonormal rows D(C(u)) is u's projection
        # onto the rows, so the two parts are orthogonal and |u - D(C(u))|^2 = |u|^2 - |C(u)|^2
        out_sq = new_sq + pk.square() * (u_sq - cu_sq).clamp_(min=0.0)
    else:  # subspace: out = D(c_new) + (k u - D(C(k u))) = k u + beta D(c_old - k C(u))
        x = c - cu * _bcast(k.to(c.dtype))
        coef_u, coef_dc = k, beta
        # = D(c_new) + k (u - D(C(u))), two orthogonal parts (as the scaled family's)
        new_sq = beta**2 * c_sq + 2 * beta * b * cross + b**2 * cu_sq  # |c_new|^2
        out_sq = new_sq + k.square() * (u_sq - cu_sq).clamp_(min=0.0)
    bound = clip * lr_t
    rms = (out_sq.clamp(min=0.0) / numel).sqrt()
    # 1 / max(1, rms(out) / bound): 1 for bound inf (clip_threshold inf, no clipping, as in
    # HF Adafactor); bound 0 (lr 0): no step
    s = torch.where(rms > bound, bound / rms, 1.0)
    if isinstance(bound, torch.Tensor):
        s = torch.where(bound > 0, s, 0.0)
    elif not bound > 0:
        s = torch.zeros_like(s)
    # A momentum grown past float32 (a Gaussian projection's transfers amplifying it, which
    # Flora warns of) makes rms NaN (inf - inf), which fails `rms > bound`: it had stepped
    # unclipped, by 1e25, then turned the weights NaN (probe Z118, review Z122). Where rms
    # is not finite: no step (x masked too: 0 * inf is NaN), and the momentum restarts from 0.
    finite = rms.isfinite()
    s = torch.where(finite if ok is None else ok & finite, s, 0.0)
    x = torch.where(_bcast(finite), x, 0.0)  # a new tensor: x is c itself for "exact"
    alpha = (s if coef_dc == 1.0 else s * coef_dc).to(like.dtype)
    if split:
        xa = x * _bcast(alpha)
        if form in ("exact", "subspace"):
            c.mul_(beta).add_(cu * _bcast(b.to(c.dtype)))
        c.masked_fill_(_bcast(finite.logical_not()), 0.0)
        return xa, (None if coef_u is None else (s * coef_u).to(like.dtype))
    if coef_u is None:  # the paper's form: out = s D(c_new), nothing of u
        um.zero_()
        um = decompress_add_(um, x, a, dim, alpha=alpha)
    else:
        # u <- s (coef_u u + coef_dc D(x))
        um = decompress_add_(um, x, a, dim, beta=(s * coef_u).to(um.dtype), alpha=alpha)
    if form in ("exact", "subspace"):
        c.mul_(beta).add_(cu * _bcast(b.to(c.dtype)))
    c.masked_fill_(_bcast(finite.logical_not()), 0.0)
    return um


def complement_scale_t(c_norm: torch.Tensor, cu_norm: torch.Tensor, bias_correction: float | torch.Tensor) -> torch.Tensor:
    """:func:`complement_scale` on device tensors (no host sync)."""
    ratio = c_norm / (bias_correction * cu_norm)
    return torch.where(cu_norm > 0, ratio.clamp(max=1.0), 1.0)


def adaptive_scale_t(c_sq: torch.Tensor, cu_sq: torch.Tensor, beta: float, bias_correction: float | torch.Tensor) -> torch.Tensor:
    """:func:`adaptive_scale` on device tensors (no host sync), from squared norms."""
    r0 = noise_ratio_sq(beta, bias_correction)
    if not isinstance(r0, torch.Tensor):
        if 1 - r0 <= FIRST_STEP_GAP:  # the first step: nothing to tell signal from noise yet
            return torch.ones_like(c_sq)
        f = (c_sq / (bias_correction**2 * cu_sq) - r0) / (1 - r0)
        return torch.where(cu_sq > 0, f.clamp(min=1.0 - beta, max=1.0), 1.0)
    # a device step count (compiled steps): the same choice, made on the device
    f = (c_sq / (bias_correction**2 * cu_sq) - r0) / (1 - r0)
    return torch.where((cu_sq > 0) & (1 - r0 > FIRST_STEP_GAP), f.clamp(min=1.0 - beta, max=1.0), 1.0)


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
    "adaptive_momentum_",
    "adaptive_scale",
    "fixed_momentum_",
    "fixed_weight",
    "floored_momentum_",
    "FIXED_COMPLEMENT_WEIGHT",
    "SUBSPACE_FORMS",
    "WEIGHTED_FORMS",
    "compressed_step_",
    "compressed_terms",
    "compressed_apply_",
    "resample_",
    "as_matrix",
]
