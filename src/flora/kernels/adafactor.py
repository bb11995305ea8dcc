"""Adafactor's factored second moment as fused Triton kernels (CUDA), with plain PyTorch
references beside them (issue 18, item 3).

For a float32 gradient ``G`` of ``n x m`` (or a ``k x n x m`` stack of such), Adafactor's
normalised update is ``U = G / sqrt(V)``, ``V`` the rank-one reconstruction of the updated
row and column statistics; eagerly it takes about eight passes over ``G``-sized memory
(square, row mean, column mean, factor product, product with ``G``, norm, ...). Here:

- :func:`factored_normalize` returns ``(U, new_row, new_col, norm)`` as
  ``adafactor.factored_normalize`` and ``torch.linalg.vector_norm(U)`` do, in two passes
  over ``G``: one kernel squares it and sums rows and columns at once (the column sums by
  atomic adds of each row block's partial sums), the other writes ``U`` and sums its
  squares; between them only n- and m-sized vectors are touched. Flora's cores use it
  under ``Flora(compile="triton")``; the finite check and the commit of the statistics
  stay in the cores (on n- and m-sized tensors).
- :func:`factored_step_` is Adafactor's whole step without a first moment, in place:
  statistics, update, clip to RMS ``clip_threshold``, lr, finite check and the parameter
  update, in three passes over ``G`` (``U`` is never stored) and one over the parameter.
  A parameter whose update or statistics are not finite is left as it was, with its
  statistics.

Each has a ``*_reference`` in plain PyTorch (the eager arithmetic of ``flora.adafactor``),
which the kernels are tested against on a GPU (``tests/test_kernels.py``) and which is
tested here against HF Adafactor and Flora's eager step on the CPU. Without CUDA or the
``triton`` package the references run instead, and this module imports without triton.
"""

from __future__ import annotations

import math

import torch

from .. import adafactor as af

try:  # optional: only CUDA builds of torch ship it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

HAVE_TRITON = triton is not None
BLOCK_N = 16  # rows per program
BLOCK_M = 128  # columns per inner iteration


def available() -> bool:
    """The Triton kernels can run here: ``triton`` imports and CUDA is available."""
    return HAVE_TRITON and torch.cuda.is_available()


def supported(grad: torch.Tensor) -> bool:
    """The kernels take this gradient: float32, contiguous, 2 or 3 dims, on CUDA."""
    return (HAVE_TRITON and grad.is_cuda and grad.dtype == torch.float32 and grad.dim() in (2, 3)
            and grad.is_contiguous())


# ------------------------------------------------------------------ references


def factored_normalize_reference(grad, row, col, beta2t: float, eps1: float, *, fused: bool = True):
    """``(U, new_row, new_col, norm)``: ``adafactor.factored_normalize`` and the 2-norm of
    ``U`` (one per matrix of a stack). Nothing is written to ``row`` or ``col``."""
    update, new_row, new_col = af.factored_normalize(grad, row, col, beta2t, eps1, fused=fused)
    return update, new_row, new_col, torch.linalg.vector_norm(update, dim=(-2, -1))


def _finite(norm, new_row, new_col) -> torch.Tensor:
    return torch.isfinite(norm) & torch.isfinite(new_row).all(-1) & torch.isfinite(new_col).all(-1)


def factored_step_reference_(param, grad, row, col, beta2t: float, eps1: float, lr: float,
                             clip_threshold: float = 1.0) -> torch.Tensor:
    """Adafactor's step without first moment, in place: ``param -= lr U / max(1, RMS(U) /
    clip_threshold)`` and the statistics updated, for each matrix whose update and
    statistics are finite (the others, and their statistics, stay as they were). Returns
    ``ok`` (bool, one per matrix)."""
    update, new_row, new_col, norm = factored_normalize_reference(grad, row, col, beta2t, eps1, fused=False)
    ok = _finite(norm, new_row, new_col)
    row.copy_(torch.where(ok.unsqueeze(-1), new_row, row))
    col.copy_(torch.where(ok.unsqueeze(-1), new_col, col))
    numel = grad.shape[-2] * grad.shape[-1]
    clip = (norm / math.sqrt(numel) / clip_threshold).clamp(min=1.0)
    scale = torch.where(ok, lr / clip, 0.0)[..., None, None]
    update = torch.where(ok[..., None, None], update, 0.0)
    param.sub_(update * scale)
    return ok


# ------------------------------------------------------------------ kernels

if HAVE_TRITON:

    @triton.jit
    def _sums_kernel(g_ptr, rowsum_ptr, colsum_ptr, n, m, eps1, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        # program (row block, matrix): row sums of G^2 + eps1 stored, column sums added
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        base = g_ptr + b * n * m
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in range(0, m, BLOCK_M):
            cols = j + tl.arange(0, BLOCK_M)
            cmask = cols < m
            mask = rmask[:, None] & cmask[None, :]
            g = tl.load(base + rows[:, None].to(tl.int64) * m + cols[None, :], mask=mask, other=0.0)
            sq = tl.where(mask, g * g + eps1, 0.0)
            acc += tl.sum(sq, axis=1)
            tl.atomic_add(colsum_ptr + b * m + cols, tl.sum(sq, axis=0), mask=cmask)
        tl.store(rowsum_ptr + b * n + rows, acc, mask=rmask)

    @triton.jit
    def _u_tile(g_ptr, cf_ptr, rf, b, rows, rmask, j, n, m, BLOCK_M: tl.constexpr):
        # one tile of U = (r_factor c_factor) G: (offsets, mask, U) of its columns j..j+BLOCK_M
        cols = j + tl.arange(0, BLOCK_M)
        cmask = cols < m
        mask = rmask[:, None] & cmask[None, :]
        offs = b * n * m + rows[:, None].to(tl.int64) * m + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        cf = tl.load(cf_ptr + b * m + cols, mask=cmask, other=0.0)
        return offs, mask, (rf[:, None] * cf[None, :]) * g

    @triton.jit
    def _normalize_kernel(g_ptr, rf_ptr, cf_ptr, u_ptr, sumsq_ptr, n, m,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, STORE: tl.constexpr):
        # U = (r_factor c_factor) G, stored when STORE; sum of U^2 added per matrix
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        rf = tl.load(rf_ptr + b * n + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in range(0, m, BLOCK_M):
            offs, mask, u = _u_tile(g_ptr, cf_ptr, rf, b, rows, rmask, j, n, m, BLOCK_M)
            if STORE:
                tl.store(u_ptr + offs, u, mask=mask)
            acc += tl.sum(tl.where(mask, u * u, 0.0), axis=1)
        tl.atomic_add(sumsq_ptr + b, tl.sum(acc, axis=0))

    @triton.jit
    def _apply_kernel(p_ptr, g_ptr, rf_ptr, cf_ptr, scale_ptr, ok_ptr, n, m,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        # p -= scale U where the matrix's step is finite (U recomputed from G, never stored)
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        ok = tl.load(ok_ptr + b) != 0
        scale = tl.load(scale_ptr + b)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = (rows < n) & ok
        rf = tl.load(rf_ptr + b * n + rows, mask=rmask, other=0.0)
        for j in range(0, m, BLOCK_M):
            offs, mask, u = _u_tile(g_ptr, cf_ptr, rf, b, rows, rmask, j, n, m, BLOCK_M)
            p = tl.load(p_ptr + offs, mask=mask, other=0.0)
            tl.store(p_ptr + offs, p - u * scale, mask=mask)


def _stacked(grad, row, col):
    """Views of a 2-D problem as a stack of one matrix."""
    if grad.dim() == 2:
        return grad.unsqueeze(0), row.unsqueeze(0), col.unsqueeze(0)
    return grad, row, col


def _factors(grad, row, col, beta2t, eps1):
    """The sums kernel, then the new statistics and the factors (n- and m-sized torch ops)."""
    g, r, c = _stacked(grad, row, col)
    k, n, m = g.shape
    rowsum = torch.empty((k, n), dtype=torch.float32, device=g.device)
    colsum = torch.zeros((k, m), dtype=torch.float32, device=g.device)
    grid = (triton.cdiv(n, BLOCK_N), k)
    _sums_kernel[grid](g, rowsum, colsum, n, m, eps1, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)
    new_row = af.ema(r, rowsum.div_(m), beta2t)
    new_col = af.ema(c, colsum.div_(n), beta2t)
    rf = (new_row / new_row.mean(dim=-1, keepdim=True)).rsqrt_().contiguous()
    cf = new_col.rsqrt().contiguous()
    return g, new_row, new_col, rf, cf, grid


def factored_normalize(grad, row, col, beta2t: float, eps1: float, *, fused: bool = True):
    """:func:`factored_normalize_reference` by the Triton kernels where :func:`supported`,
    else the reference itself. Equal to the reference to float rounding (summation order;
    the kernel's ``G^2 + eps1`` is rounded as Triton contracts it, ``fused`` or not)."""
    if not supported(grad):
        return factored_normalize_reference(grad, row, col, beta2t, eps1, fused=fused)
    g, new_row, new_col, rf, cf, grid = _factors(grad, row, col, beta2t, eps1)
    k, n, m = g.shape
    update = torch.empty_like(g)
    sumsq = torch.zeros(k, dtype=torch.float32, device=g.device)
    _normalize_kernel[grid](g, rf, cf, update, sumsq, n, m, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, STORE=True)
    norm = sumsq.sqrt_()
    if grad.dim() == 2:
        return update[0], new_row[0], new_col[0], norm[0]
    return update, new_row, new_col, norm


def factored_step_(param, grad, row, col, beta2t: float, eps1: float, lr: float,
                   clip_threshold: float = 1.0) -> torch.Tensor:
    """:func:`factored_step_reference_` by the Triton kernels where :func:`supported` (and
    ``param`` is float32 and contiguous like ``grad``), else the reference itself."""
    if not (supported(grad) and param.dtype == torch.float32 and param.is_contiguous()):
        return factored_step_reference_(param, grad, row, col, beta2t, eps1, lr, clip_threshold)
    g, new_row, new_col, rf, cf, grid = _factors(grad, row, col, beta2t, eps1)
    k, n, m = g.shape
    sumsq = torch.zeros(k, dtype=torch.float32, device=g.device)
    _normalize_kernel[grid](g, rf, cf, sumsq, sumsq, n, m, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, STORE=False)
    norm = sumsq.sqrt_()
    ok = _finite(norm, new_row, new_col)
    _, r, c = _stacked(grad, row, col)
    r.copy_(torch.where(ok.unsqueeze(-1), new_row, r))
    c.copy_(torch.where(ok.unsqueeze(-1), new_col, c))
    clip = (norm / math.sqrt(n * m) / clip_threshold).clamp_(min=1.0)
    scale = torch.where(ok, lr / clip, 0.0).to(torch.float32).contiguous()
    p = param.unsqueeze(0) if param.dim() == 2 else param
    _apply_kernel[grid](p, g, rf, cf, scale, ok.to(torch.int8), n, m, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M)
    return ok[0] if grad.dim() == 2 else ok


__all__ = ["HAVE_TRITON", "available", "supported", "factored_normalize", "factored_normalize_reference",
           "factored_step_", "factored_step_reference_"]
