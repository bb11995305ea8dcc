"""Stochastic rounding of a float32 first moment into bfloat16 (``momentum_dtype``).

Rounding to nearest loses every update smaller than half a unit in the last place: on a
steady input a bfloat16 momentum stalls up to ``2^-8 / (1 - beta1)`` short of it (39% at
beta1 = 0.99). Rounding up with probability equal to the discarded fraction is unbiased,
so the momentum reaches its input on average at any beta1.

The random bits are a hash of the step count and of the value rounded towards zero to
bfloat16 (its upper 16 bits), not of the element's position or a generator's state:
every stepping path (single-tensor, grouped, compiled, a shard of FSDP2) rounds an
element the same way, a resume repeats the same rounding, and no generator or host value
is read. Keying by the upper bits keeps paths that differ by float rounding together:
a float32 value a few units in the last place away takes the same random bits, so its
rounding changes only where rounding to nearest's would (at a threshold), not at random.
Values in one bfloat16 interval round with the same threshold within a step; each is
still unbiased. Integer arithmetic runs in int64 on values below 2^32 (no overflow in
the multiplications: 32-bit by 27-bit).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_LOW = 0xFFFF  # the 16 bits float32 has and bfloat16 drops
_MIX = 0x45D9F3B  # a 32-bit integer hash's multiplier
_GOLDEN = 0x9E3779B9  # spreads consecutive step counts apart


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values in [0, 2^32)."""
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    return x ^ (x >> 16)


# Keys of the two roundings a step may make: after the resample's transfer, and after the step.
AFTER_STEP, AFTER_TRANSFER = 0, 1 << 31


def stochastic_bfloat16(x: torch.Tensor, step, salt: int = AFTER_STEP) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16, up (in magnitude) with probability equal to the
    fraction of a bfloat16 unit in the last place it drops, keyed by ``step`` (an int, or an
    integer-valued tensor broadcastable to ``x``: the count this step reaches) and ``salt``
    (which of a step's roundings). Values that bfloat16 holds exactly, infinities and NaNs
    round as to nearest."""
    bits = x.view(torch.int32).to(torch.int64) & _M32  # the float's bits as an unsigned 32-bit value
    if isinstance(step, torch.Tensor):
        step = step.to(torch.int64)
    key = (bits >> 16) ^ (((step * _GOLDEN) & _M32) ^ salt)
    # float32 is sign and magnitude: adding to the low bits moves the magnitude up, and
    # clearing them truncates it towards zero, so this rounds |x| up with probability
    # (low bits) / 2^16 whatever the sign
    up = (bits + (_hash32(key) & _LOW)) & (_M32 ^ _LOW)
    up = up - ((up >> 31) << 32)  # back into int32's range (the sign bit)
    out = up.to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x).to(torch.bfloat16)


def to_stored(x: torch.Tensor, dtype: torch.dtype, step, salt: int = AFTER_STEP) -> torch.Tensor:
    """``x`` (the state dtype) as a first moment stored in ``dtype``: into bfloat16
    stochastically (from float64 through float32), else converted (a copy only if the
    dtype differs)."""
    if dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.float64):
        return stochastic_bfloat16(x.float(), step, salt)
    return x.to(dtype)


def round_into_(stored, wide, step) -> None:
    """``wide`` (the state dtype) rounded into ``stored`` (``momentum_dtype``): a tensor, or
    lists of them paired (``step``: one for all, the count this step reaches). Into
    bfloat16 stochastically (from float64 through float32); any other pair is copied."""
    if isinstance(stored, torch.Tensor):
        stored, wide = [stored], [wide]
    wide = [w if w.shape == s.shape else w.view_as(s) for s, w in zip(stored, wide)]  # 0-dim: as vectors
    if stored[0].dtype != torch.bfloat16:
        torch._foreach_copy_(stored, wide) if len(stored) > 1 else stored[0].copy_(wide[0])
        return
    if len(stored) == 1:
        stored[0].copy_(stochastic_bfloat16(wide[0].float(), step))
        return
    # a list: one pass over all of them, then one copy back (a few operations a bucket)
    flat = stochastic_bfloat16(torch.cat([w.reshape(-1) for w in wide]).float(), step)
    torch._foreach_copy_(stored, [v.view_as(s) for v, s in zip(flat.split([s.numel() for s in stored]), stored)])


__all__ = ["AFTER_STEP", "AFTER_TRANSFER", "round_into_", "stochastic_bfloat16", "to_stored"]
