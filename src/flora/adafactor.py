"""Adafactor's arithmetic (Shazeer and Stern, 2018) as plain functions.

Written to follow ``transformers.optimization.Adafactor`` operation for operation, so
that Flora with compression off equals it number for number.
"""

from __future__ import annotations

import math

import torch


def rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


def step_size(
    lr: float | None,
    step: int,
    param_rms: torch.Tensor | float,
    *,
    eps2: float,
    relative_step: bool,
    warmup_init: bool,
    scale_parameter: bool,
):
    """The learning rate of this step: relative (``min(1e-2, 1/sqrt(t))``) or ``lr``,
    times ``max(eps2, RMS(p))`` when ``scale_parameter``."""
    rel = lr
    if relative_step:
        min_step = 1e-6 * step if warmup_init else 1e-2
        rel = min(min_step, 1.0 / math.sqrt(step))
    scale = 1.0
    if scale_parameter:
        scale = max(eps2, param_rms)
    return scale * rel


def second_moment_decay(step: int, decay_rate: float) -> float:
    """``beta2_t = 1 - t^decay_rate``."""
    return 1.0 - math.pow(step, decay_rate)


def factored_normalize_(
    grad: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    beta2t: float,
    eps1: float,
) -> torch.Tensor:
    """Update the row and column statistics in place; return ``grad / sqrt(V_hat)``
    with ``V_hat`` their rank-one reconstruction.

    Same operations as transformers' Adafactor, but in place into one buffer (no
    temporaries of the gradient's size beyond the returned tensor)."""
    sq = grad.square().add_(eps1)
    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=(1.0 - beta2t))
    col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=(1.0 - beta2t))
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor, out=sq).mul_(grad)


def unfactored_normalize_(grad: torch.Tensor, sq_avg: torch.Tensor, beta2t: float, eps1: float) -> torch.Tensor:
    """Update the full second moment in place; return ``grad / sqrt(V)``."""
    sq = grad.square().add_(eps1)
    sq_avg.mul_(beta2t).add_(sq, alpha=(1.0 - beta2t))
    return torch.rsqrt(sq_avg, out=sq).mul_(grad)


def clip_by_rms_(update: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale ``update`` down so that its RMS is at most ``threshold``."""
    return update.div_((rms(update) / threshold).clamp_(min=1.0))
