"""Flora's step as functions over tensors, as ``torch.optim`` writes its optimizers: the
``Flora`` class validates options, owns the state and sorts parameters; these functions do
the arithmetic.

- :func:`single_tensor_step` steps one parameter: the readable reference, and what
  ``Flora.step_parameter`` (optimizer-in-backward) uses. With compression off it is
  ``transformers`` Adafactor operation for operation.
- :func:`grouped_step` steps a bucket of parameters of the same shape, dtype, device,
  options and counters at once: gradients and state are stacked, so the Adafactor factors,
  compression, decompression and transfer are a few batched calls (``bmm``, reductions
  over the stack) instead of a few per parameter. It agrees with the single-tensor path to
  float rounding (tested).

Neither waits on the host: clip factors, RMS values, learning rates and the finite-update
check are device tensors (``torch.where``, ``clamp``), so a step is a stream of kernels.

Notation (the paper's): ``G`` gradient, ``u`` Adafactor's normalised update, ``A`` the
projection, ``C``/``D`` compress/decompress, ``M`` (``exp_avg_c``) the compressed first
moment.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import adafactor as af
from .momentum import compressed_step_, dense_momentum_
from .projection import _bcast, matrix_shape, transfer

# (group, indices, count, projected size, device, dtype) -> the projections of those
# parameters (r x d, or a k x r x d stack when len(indices) > 1 or stacked=True)
ProjectionSource = Callable[..., torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


def _resample(group: dict, states: list[dict], indices: list[int], c: torch.Tensor, a: torch.Tensor,
              projections: ProjectionSource, size: int, stacked: bool) -> torch.Tensor:
    """Every ``kappa`` steps: draw the next projection and carry ``M`` over to it
    (``M <- A_new A_old^T M``); returns the projection to step with."""
    s0 = states[0]
    if s0["proj_age"] >= group["kappa"]:
        for st in states:
            st["proj_count"] += 1
            st["proj_age"] = 0
        a_new = projections(group, indices, s0["proj_count"], size, c.device, c.dtype, stacked=stacked)
        c.copy_(transfer(c, a, a_new, s0["proj_dim"]))
        a = a_new
    for st in states:
        st["proj_age"] += 1
    return a


def single_tensor_step(p: torch.Tensor, state: dict, group: dict, index: int, *,
                       projections: ProjectionSource, count_skip: Callable[[torch.Tensor], None]) -> None:
    """One Flora step of parameter ``p`` (its ``.grad``) with its initialised ``state``."""
    grad = p.grad
    if grad.dtype in _HALF:
        grad = grad.float()
    p32 = p.float() if p.dtype in _HALF else p
    state["step"] += 1
    t = state["step"]
    eps1, eps2 = group["eps"]
    beta1 = group["beta1"]
    lr = af.step_size(group["lr"], t, af.rms(p32) if group["scale_parameter"] else None, eps2=eps2,
                      relative_step=group["relative_step"], warmup_init=group["warmup_init"],
                      scale_parameter=group["scale_parameter"])
    beta2t = af.second_moment_decay(t, group["decay_rate"])
    # The second moment is computed out of place and committed only if the step is
    # finite (ok, decided on the device): a bad gradient leaves no trace. The update's
    # norm, which the clip needs anyway, is NaN or inf whenever an entry is.
    if grad.dim() >= 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        update, new_row, new_col = af.factored_normalize(grad, row, col, beta2t, eps1,
                                                         fused="exp_avg_c" in state and beta1 is not None)
        norm = update.norm(2)
        ok = torch.isfinite(norm) & torch.isfinite(new_row).all() & torch.isfinite(new_col).all()
        row.copy_(torch.where(ok, new_row, row))
        col.copy_(torch.where(ok, new_col, col))
    else:
        sq_avg = state["exp_avg_sq"]
        update, new_sq = af.unfactored_normalize(grad, sq_avg, beta2t, eps1)
        norm = update.norm(2)
        ok = torch.isfinite(norm) & torch.isfinite(new_sq).all()
        sq_avg.copy_(torch.where(ok, new_sq, sq_avg))
    bad = ok.logical_not()
    update.masked_fill_(bad, 0.0)  # leaves a finite update's bits as they are
    norm = torch.where(ok, norm, 0.0)  # the norm of the masked update
    count_skip(ok)
    sign = None
    if beta1 is not None and "exp_avg_c" in state:
        c, dim = state["exp_avg_c"], state["proj_dim"]
        size = matrix_shape(p.shape)[dim]
        a = projections(group, [index], state["proj_count"], size, c.device, c.dtype, stacked=False)
        a = _resample(group, [state], [index], c, a, projections, size, stacked=False)
        c_before = c.clone()  # r x d: small
        update = compressed_step_(group["momentum_form"], c, update, a, dim, beta1, lr, group["clip_threshold"],
                                  u_norm=norm, isometric=group["projection"] != "gaussian",
                                  bias_correction=1.0 - beta1 ** t, ok=ok)  # clips, scales by lr; 0 where not ok
        c.copy_(torch.where(ok, c, c_before))
    else:
        af.clip_by_rms_(update, group["clip_threshold"], norm=norm)
        update.mul_(lr)
        if beta1 is not None:
            m = state["exp_avg"]
            # beta1 where ok, 1 (no decay) where not; the masked update then adds nothing.
            dense_momentum_(m, update, torch.where(ok, torch.full((), beta1, dtype=m.dtype, device=m.device), 1.0),
                            alpha=1 - beta1)
            # p -= m where ok, without an n x m temporary: m * (-1) is exact, so this is
            # p.sub_(m) bit for bit.
            update = None
            sign = torch.where(ok, -1.0, 0.0)

    wd = group["weight_decay"]
    if wd != 0:
        if isinstance(lr, torch.Tensor):  # HF reads this lr on the host; the product stays on the device here
            p32.addcmul_(torch.where(ok, p32, 0.0), lr, value=-wd)
        else:
            p32.add_(torch.where(ok, p32, 0.0), alpha=(-wd * lr))
    if update is None:
        p32.addcmul_(state["exp_avg"], sign)
    else:
        p32.sub_(update)  # == add_(-update) bit for bit, without the negated copy
    if p32 is not p:
        p.copy_(p32)


def _stack(states: list[dict], key: str) -> torch.Tensor:
    return torch.stack([st[key] for st in states])


def _commit(states: list[dict], key: str, new: torch.Tensor, old: torch.Tensor, ok_b: torch.Tensor) -> None:
    """Write a stacked state back to the parameters' own tensors, where the step was finite."""
    torch._foreach_copy_([st[key] for st in states], list(torch.where(ok_b, new, old).unbind(0)))


def grouped_step(params: list[torch.Tensor], states: list[dict], group: dict, indices: list[int], *,
                 projections: ProjectionSource, count_skip: Callable[[torch.Tensor], None]) -> None:
    """One Flora step of ``params`` (their ``.grad``), which share shape, dtypes, device,
    ``group`` and state layout and counters: the single-tensor step on stacks."""
    k = len(params)
    shape = params[0].shape
    numel = params[0].numel()
    grads = [p.grad for p in params]
    half = params[0].dtype in _HALF
    g = torch.stack(grads)
    if g.dtype in _HALF:
        g = g.float()
    p32 = [p.float() for p in params] if half else params
    for st in states:
        st["step"] += 1
    s0 = states[0]
    t = s0["step"]
    eps1, eps2 = group["eps"]
    beta1 = group["beta1"]
    prms = None
    if group["scale_parameter"]:
        prms = torch.stack(torch._foreach_norm(p32)).div_(math.sqrt(numel))
    lr = af.step_size(group["lr"], t, prms, eps2=eps2, relative_step=group["relative_step"],
                      warmup_init=group["warmup_init"], scale_parameter=group["scale_parameter"])
    if isinstance(lr, torch.Tensor):
        lr = lr.to(g.device)
        lr_b = lr.reshape(-1, *([1] * len(shape)))  # one per parameter, or one for all
    else:
        lr_b = lr
    beta2t = af.second_moment_decay(t, group["decay_rate"])

    def per_param(x: torch.Tensor) -> torch.Tensor:  # a k-vector shaped to scale the k x shape stack
        return x.reshape(k, *([1] * len(shape)))

    if len(shape) >= 2:
        row, col = _stack(states, "exp_avg_sq_row"), _stack(states, "exp_avg_sq_col")
        update, new_row, new_col = af.factored_normalize(g, row, col, beta2t, eps1,
                                                         fused="exp_avg_c" in s0 and beta1 is not None)
        norm = torch.linalg.vector_norm(update.reshape(k, -1), dim=1)
        ok = torch.isfinite(norm) & torch.isfinite(new_row).reshape(k, -1).all(1) & \
            torch.isfinite(new_col).reshape(k, -1).all(1)
        _commit(states, "exp_avg_sq_row", new_row, row, ok.reshape(k, *([1] * (row.dim() - 1))))
        _commit(states, "exp_avg_sq_col", new_col, col, ok.reshape(k, *([1] * (col.dim() - 1))))
    else:
        sq_avg = _stack(states, "exp_avg_sq")
        update, new_sq = af.unfactored_normalize(g, sq_avg, beta2t, eps1)
        norm = torch.linalg.vector_norm(update.reshape(k, -1), dim=1)
        ok = torch.isfinite(norm) & torch.isfinite(new_sq).reshape(k, -1).all(1)
        _commit(states, "exp_avg_sq", new_sq, sq_avg, per_param(ok))
    del g
    ok_b = per_param(ok)
    update.masked_fill_(ok_b.logical_not(), 0.0)
    norm = torch.where(ok, norm, 0.0)
    count_skip(ok)
    if beta1 is not None and "exp_avg_c" in s0:
        dim = s0["proj_dim"]
        size = matrix_shape(shape)[dim]
        c = _stack(states, "exp_avg_c")
        a = projections(group, indices, s0["proj_count"], size, c.device, c.dtype, stacked=True)
        a = _resample(group, states, indices, c, a, projections, size, stacked=True)
        c_before = c.clone()  # k x r x d: small
        # The k x n x m view of the update is a copy when the update's dims cannot be
        # merged (channels_last and other permuted layouts of 3 or more dims): the step
        # is what compressed_step_ returns, never the tensor it was given.
        update = compressed_step_(group["momentum_form"], c, update.reshape(k, *matrix_shape(shape)), a, dim,
                                  beta1, lr, group["clip_threshold"], u_norm=norm,
                                  isometric=group["projection"] != "gaussian", bias_correction=1.0 - beta1 ** t,
                                  ok=ok).view(k, *shape)
        _commit(states, "exp_avg_c", c, c_before, ok.reshape(k, 1, 1))
    else:
        clip = (norm / math.sqrt(numel) / group["clip_threshold"]).clamp_(min=1.0)
        update.div_(per_param(clip)).mul_(lr_b)
        if beta1 is not None:
            m = _stack(states, "exp_avg")
            dense_momentum_(m, update, per_param(torch.where(ok, torch.full_like(ok, beta1, dtype=m.dtype), 1.0)),
                            alpha=1 - beta1)
            torch._foreach_copy_([st["exp_avg"] for st in states], list(m.unbind(0)))
            update = torch.where(ok_b, m, 0.0)
    wd = group["weight_decay"]
    if wd != 0:
        decay = torch.where(ok_b, torch.stack(p32), 0.0)
        if isinstance(lr, torch.Tensor):  # p <- p - wd lr p - update, folded into the update
            update.add_(decay.mul_(lr_b).mul_(wd))
        else:  # as the single-tensor step (and HF) does it
            torch._foreach_add_(p32, list(decay.unbind(0)), alpha=-wd * lr)
    torch._foreach_sub_(p32, list(update.unbind(0)))
    if half:
        torch._foreach_copy_(params, p32)


def bucket_key(p: torch.Tensor, state: dict) -> tuple:
    """Parameters of one group with equal keys step together in :func:`grouped_step`."""
    momentum = "c" if "exp_avg_c" in state else "m" if "exp_avg" in state else None
    proj = (state["proj_dim"], state["proj_count"], state["proj_age"]) if momentum == "c" else None
    return (tuple(p.shape), p.dtype, p.grad.dtype, p.device, state["step"], momentum, proj)


# Gradient elements stacked at once: bounds the grouped step's temporaries (a stacked
# copy of the gradients and the update, each this many elements) whatever the model.
BUCKET_NUMEL = 1 << 25


def buckets(entries: list[tuple[torch.Tensor, dict, int]], max_numel: int = BUCKET_NUMEL):
    """Split ``(param, state, index)`` entries of one group into lists that
    :func:`grouped_step` can take, none above ``max_numel`` gradient elements (unless a
    single parameter is)."""
    by_key: dict[tuple, list] = {}
    for e in entries:
        by_key.setdefault(bucket_key(e[0], e[1]), []).append(e)
    for members in by_key.values():
        per = max(1, max_numel // max(1, members[0][0].numel()))
        for i in range(0, len(members), per):
            yield members[i:i + per]


__all__ = ["single_tensor_step", "grouped_step", "buckets", "bucket_key", "BUCKET_NUMEL"]
