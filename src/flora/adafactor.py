"""Adafactor's arithmetic (Shazeer and Stern, 2018) as plain functions.

Written to follow ``transformers.optimization.Adafactor`` operation for operation, so
that Flora with compression off equals it number for number on the single-tensor path
(``foreach=False``); the grouped path stacks parameters and equals it to float rounding.
"""

from __future__ import annotations

import math

import torch


# ------------------------------------------------------------------ which dims are factored

# Flora's factor_dims option: "largest" (the default) factors the second moment of a tensor
# of 2+ dims over its two largest dims (optax's rule); "last" over its last two, one
# (row, col) pair per index of the leading dims (HF's and torch's Adafactor).
FACTOR_DIMS = ("largest", "last")


def factored_dims(shape, rule: str = "largest") -> tuple[int, int] | None:
    """The two dims of a tensor of ``shape`` over which Adafactor's second moment is
    factored, in their original order, or None for fewer than 2 dims (a full second
    moment). ``rule``: ``"last"``, the last two (HF's and torch's Adafactor: a (64, 32, 3, 3)
    kernel keeps 2 x 64 x 32 x 3 numbers); ``"largest"``, the two largest, ties going to the
    later dims (optax's rule: 9 x (64 + 32) numbers for that kernel). The two rules agree
    on every 2-D tensor and whenever the last two dims are the largest.

    Every path views the gradient with these dims moved last (:func:`to_factored`), runs
    the last-two-dims arithmetic on that view and moves the result back: the row statistic
    has the view's shape but its last dim, the column statistic all but its second last."""
    n = len(shape)
    if n < 2:
        return None
    if rule == "last":
        return n - 2, n - 1
    if rule != "largest":
        raise ValueError(f"factor_dims must be one of {', '.join(map(repr, FACTOR_DIMS))}; got {rule!r}")
    by_size = sorted(range(n), key=lambda i: shape[i])  # stable: of equal sizes the later dim ranks higher
    i, j = sorted(by_size[-2:])
    return i, j


def factor_move(shape, rule: str) -> tuple[int, int] | None:
    """The factored dims of ``shape`` when they are not already its last two (the view is
    then a permutation), else None (every path then runs exactly as without the option)."""
    dims = factored_dims(shape, rule)
    return None if dims is None or dims == (len(shape) - 2, len(shape) - 1) else dims


def to_factored(t: torch.Tensor, move: tuple[int, int] | None, lead: int = 0) -> torch.Tensor:
    """``t`` (a tensor of the parameter's shape, after ``lead`` stacking dims) viewed with
    the factored dims ``move`` (:func:`factor_move`) last; ``t`` itself when None."""
    if move is None:
        return t
    return t.movedim((move[0] + lead, move[1] + lead), (-2, -1))


def from_factored(t: torch.Tensor, move: tuple[int, int] | None, lead: int = 0) -> torch.Tensor:
    """The inverse of :func:`to_factored`: a view in the parameter's dim order."""
    if move is None:
        return t
    return t.movedim((-2, -1), (move[0] + lead, move[1] + lead))


def factored_shapes(shape, rule: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of the row and column statistics of a tensor of ``shape`` (2+ dims)."""
    view = tuple(shape)
    move = factor_move(shape, rule)
    if move is not None:
        view = tuple(s for d, s in enumerate(shape) if d not in move) + (shape[move[0]], shape[move[1]])
    return view[:-1], view[:-2] + view[-1:]


def weight_decay_(p32: torch.Tensor, ok: torch.Tensor, lr, wd: float) -> None:
    """HF's ``p.add_(p, alpha=-wd * lr)``, where ``ok``. A tensor lr (scale_parameter's,
    the compiled step's) stays on the device; ``-wd * lr`` is rounded first, as HF's alpha
    is (``p * -wd * lr`` rounds twice: 1 ulp off in about one value of 700)."""
    if isinstance(lr, torch.Tensor):  # in the wider of the two dtypes (a float32 lr of float64 parameters)
        p32.addcmul_(torch.where(ok, p32, 0.0), lr.to(torch.promote_types(lr.dtype, p32.dtype)) * -wd)
    else:
        p32.add_(torch.where(ok, p32, 0.0), alpha=(-wd * lr))


def rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


# A step count is a Python int (the host's copy: the eager step, where these scalars are
# Python floats exactly as HF computes them) or a 0-dim tensor (the device counter, under
# torch.compile: the scalars are then device tensors, computed in scalar_dtype).


def scalar_dtype(device) -> torch.dtype:
    """The dtype of step-dependent scalars on ``device``: float64, as Python's floats,
    except where the device has none (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def bias_correction(beta: float, step) -> float | torch.Tensor:
    """``1 - beta^t``; from a device counter as ``1 - exp(t log beta)`` (see
    :func:`second_moment_decay`)."""
    if isinstance(step, torch.Tensor):
        return 1.0 - step.mul(math.log(beta)).exp() if beta > 0 else 1.0 - torch.pow(beta, step)
    return 1.0 - beta ** step


def lr_in(lr):
    """The lr a step was handed: a 1-element tensor of any shape (a user's ``[[1e-3]]``,
    or the vector ``flora.compiled.lr_arg`` passes a compiled core for a 0-dim lr) as
    0-dim (inside a graph: no operation of its own), so that it scales as the float
    would; anything else as it is."""
    if isinstance(lr, torch.Tensor) and lr.dim() >= 1 and lr.numel() == 1:
        return lr.reshape(())
    return lr


def step_size(
    lr: float | torch.Tensor | None,
    step: int | torch.Tensor,
    param_rms: torch.Tensor | None,
    *,
    eps2: float,
    relative_step: bool,
    warmup_init: bool,
    scale_parameter: bool,
):
    """The learning rate of this step: relative (``min(1e-2, 1/sqrt(t))``) or ``lr``,
    times ``max(eps2, RMS(p))`` when ``scale_parameter`` (``param_rms``: RMS(p), a
    tensor, or one per parameter of a stack; unused otherwise).

    HF's ``max(eps2, RMS)`` reads the RMS on the host; ``torch.where`` gives the same
    values (RMS when it is larger, else eps2) and stays on the device."""
    if relative_step:  # an lr given with relative_step can only be 0 (a step of size 0)
        rel = relative_step_size(step, warmup_init) if lr is None else 0.0
    else:
        rel = lr
    if not scale_parameter:
        return rel
    return torch.where(param_rms > eps2, param_rms * rel, eps2 * rel)


def relative_step_size(step, warmup_init: bool) -> float | torch.Tensor:
    """Adafactor's relative step before parameter scaling: ``min(1e-2, 1/sqrt(t))``, or
    ``min(1e-6 t, 1/sqrt(t))`` with warm-up."""
    if isinstance(step, torch.Tensor):
        inv = 1.0 / step.sqrt()
        return torch.minimum(1e-6 * step, inv) if warmup_init else inv.clamp(max=1e-2)
    min_step = 1e-6 * step if warmup_init else 1e-2
    return min(min_step, 1.0 / math.sqrt(step))


def second_moment_decay(step, decay_rate: float) -> float | torch.Tensor:
    """``beta2_t = 1 - t^decay_rate``. From a device counter (a compiled step) as
    ``exp(decay_rate log t)``: inductor's CPU code keeps a reused value holding an ``exp``
    or ``log`` in a buffer, where a ``pow`` chain is inlined into every consumer, and so
    recomputed (in float64) once per 16 elements of every row and column loop."""
    if isinstance(step, torch.Tensor):
        return 1.0 - step.log().mul(decay_rate).exp()
    return 1.0 - math.pow(step, decay_rate)


def ema(old: torch.Tensor, new: torch.Tensor, beta) -> torch.Tensor:
    """``beta old + (1 - beta) new``, out of place: HF's ``mul`` and ``add(alpha=)`` for a
    float ``beta``; for a tensor one (compiled steps), the same with the weight multiplied."""
    if isinstance(beta, torch.Tensor):
        return old.mul(beta).add_(new * (1.0 - beta))
    return old.mul(beta).add_(new, alpha=(1.0 - beta))


def squared(grad: torch.Tensor, eps1: float, *, fused: bool = False) -> torch.Tensor:
    """``grad^2 + eps1`` in a new buffer: HF's two operations, or (``fused``) one
    ``addcmul`` pass, which a CPU may round once where HF rounds twice (1 ulp on a few
    elements); Flora fuses it where its result has no reference to equal (compressed
    momentum)."""
    if fused:
        return torch.addcmul(grad.new_full((), eps1), grad, grad)
    return grad.square().add_(eps1)


def _col_mean(sq: torch.Tensor) -> torch.Tensor:
    """``sq.mean(dim=-2)``. Compiled for a CPU, as a vector-matrix product: inductor's C++
    code reduces over the rows one column block at a time, a strided walk through the
    whole matrix for each block (latency-bound, several times slower than the eager
    reduction on SmolLM2's shapes), where BLAS streams the rows once."""
    if torch.compiler.is_compiling() and sq.device.type == "cpu" and sq.shape[-2] > 1:
        n = sq.shape[-2]
        return (sq.new_full((1, n), 1.0 / n) @ sq).squeeze(-2)
    return sq.mean(dim=-2)


def factored_normalize(
    grad: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    beta2t: float,
    eps1: float,
    *,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(grad / sqrt(V_hat), new_row, new_col)``: the updated row and column
    statistics (out of place; they are small) and the normalised gradient under their
    rank-one reconstruction ``V_hat``.

    Same operations as transformers' Adafactor, bit for bit; the state is left for the
    caller to commit, so that a non-finite result can be discarded. The gradient-sized
    work happens in one buffer (``fused``: see :func:`squared`)."""
    sq = squared(grad, eps1, fused=fused)
    row = ema(row, sq.mean(dim=-1), beta2t)
    col = ema(col, _col_mean(sq), beta2t)
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    if torch.compiler.is_compiling():  # dynamo refuses an out= tensor that is not contiguous (channels_last)
        return (r_factor * c_factor).mul_(grad), row, col
    return torch.mul(r_factor, c_factor, out=sq).mul_(grad), row, col


def unfactored_normalize(
    grad: torch.Tensor, sq_avg: torch.Tensor, beta2t: float, eps1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(grad / sqrt(V), new_V)`` with the full second moment updated out of place."""
    sq = grad.square().add_(eps1)
    sq_avg = ema(sq_avg, sq, beta2t)
    if torch.compiler.is_compiling():  # dynamo refuses an out= tensor that is not contiguous
        return sq_avg.rsqrt().mul_(grad), sq_avg
    return torch.rsqrt(sq_avg, out=sq).mul_(grad), sq_avg


def clip_by_rms_(update: torch.Tensor, threshold: float, *, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Scale ``update`` down so that its RMS is at most ``threshold``; ``norm``, its 2-norm
    if already computed."""
    r = rms(update) if norm is None else norm / (update.numel() ** 0.5)
    return update.div_((r / threshold).clamp_(min=1.0))
