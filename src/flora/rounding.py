"""Stochastic rounding of a float32 first moment into bfloat16 (``momentum_dtype``).

Rounding to nearest loses every update smaller than half a unit in the last place: on a
steady input a bfloat16 momentum stalls short of it by up to ``2^-8 / (1 - beta1)`` of the
power of two below it (39% at beta1 = 0.99). Rounding up with probability equal to the
discarded fraction is unbiased, so the momentum reaches its input on average at any beta1.

The random bits are a hash of the step count and of the value rounded towards zero to
bfloat16 (its upper 16 bits), not of the element's position or a generator's state:
every stepping path (single-tensor, grouped, compiled, a shard of FSDP2) rounds an
element the same way, a resume repeats the same rounding, and no generator or host value
is read. Keying by the upper bits keeps paths that differ by float rounding together:
a float32 value a few units in the last place away takes the same random bits, so its
rounding changes only where rounding to nearest's would (at a threshold), not at random.
Values in one bfloat16 interval round with the same threshold within a step; each is
still unbiased. Per element it is a few int32 passes and one gather from a fixed random
permutation of the 16-bit numbers (no 64-bit arithmetic, no overflow: the sum of a finite
float's bits and 16 bits stays inside int32); over the 65,536 keys a step can take, each
noise value comes once, so the mean rounding is the value exactly.
"""

from __future__ import annotations

import torch

from .layout import in_memory_order

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit integer hash's multiplier
_GOLDEN = 0x9E3779B9  # spreads consecutive step counts apart
_NAN_BITS = 0x7FC0  # bfloat16's canonical quiet NaN
_MASK_LOW = -0x10000  # int32 with the low 16 bits clear: the bits bfloat16 keeps

# Keys of the two roundings a step may make: after the resample's transfer, and after the step.
AFTER_STEP, AFTER_TRANSFER = 0, 1 << 31

# The 65,536 16-bit numbers in an order drawn once from a fixed seed on the CPU (the same
# on every device and process): an element's noise is NOISE[upper 16 bits ^ the step's
# 16-bit key], one gather, so the rounding is a few int32 passes (no 64-bit arithmetic per
# element). A permutation, so that over the keys each noise value comes once and rounding
# up has exactly the dropped fraction's probability (until 2026-12-08 the table was 65,536
# independent draws: rounding up was 1e-3 of a unit in the last place too likely on
# average, 3.5e-3 at most, probe Z140).
_NOISE_SEED = 0x5EED_B16
_CPU = torch.device("cpu")
_tables: dict = {_CPU: torch.randperm(1 << 16, dtype=torch.int32,
                                      generator=torch.Generator().manual_seed(_NOISE_SEED))}
_pinned: dict = {}


def noise_table(device) -> torch.Tensor:
    """The table on ``device``, copied there once. The step's prelude calls this eagerly
    for every device a bfloat16 momentum lives on, so that a compiled graph only reads it
    (a graph cannot make it: no generator inside torch.compile)."""
    device = torch.device(device)
    table = _tables.get(device)
    if table is None:
        source = _tables[_CPU]
        if device.type == "cuda":  # from pinned memory, asynchronously: a pageable copy waits on the host
            source = _pinned[device] = source.pin_memory()  # kept: the copy may still be reading it
        table = _tables[device] = source.to(device, non_blocking=True)
    return table


def _hash32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of values in [0, 2^32): Python
    ints or int64 tensors alike (no overflow: 32-bit by 27-bit products)."""
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    x = ((x ^ (x >> 16)) * _MIX) & _M32
    return x ^ (x >> 16)


def step_key(step, salt: int = AFTER_STEP):
    """The 16-bit key of a step count (and ``salt``): a Python int, or a 0-dim int32
    tensor for a tensor count (a device counter: no host read)."""
    if isinstance(step, torch.Tensor):
        step = step.reshape(()).to(torch.int64)
    key = _hash32(((step * _GOLDEN) & _M32) ^ salt) & 0xFFFF
    return key.to(torch.int32) if isinstance(key, torch.Tensor) else key


# Eagerly, a tensor above this many elements is rounded in pieces of it, in memory order:
# whole, the int32 temporaries took up to 4x its float32 bytes at once (a 32,000 x 1,024
# momentum left dense: 750 MiB at its step's peak; a probe; the flat form's in-place passes
# take less, still a whole int32 copy and more). Inside a compiled graph inductor fuses
# them away, so it rounds whole there.
CHUNK = 1 << 22


def stochastic_bfloat16(x: torch.Tensor, step, salt: int = AFTER_STEP, out: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16, up (in magnitude) with probability equal to the
    fraction of a bfloat16 unit in the last place it drops, keyed by ``step`` (an int, or an
    integer-valued tensor of one element: the count this step reaches) and ``salt`` (which
    of a step's roundings). Values that bfloat16 holds exactly, infinities and NaNs round
    as to nearest. ``out``: a bfloat16 tensor of ``x``'s shape to write the result into
    (returned), else a new one."""
    if out is not None and (out.shape != x.shape or out.dtype != torch.bfloat16):
        raise ValueError(f"out must be a bfloat16 tensor of x's shape {tuple(x.shape)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    key = step_key(step, salt)
    if torch.compiler.is_compiling() or x.numel() <= CHUNK:  # compiling first: no guard on the size
        return _round(x, key) if out is None else out.copy_(_round(x, key))
    target = torch.empty_like(x, dtype=torch.bfloat16) if out is None else out
    flat_x, flat_out = in_memory_order(x), in_memory_order(target)
    if flat_x is None or flat_out is None or target.stride() != x.stride():  # overlapping, with gaps, or laid out otherwise
        return _round(x, key) if out is None else out.copy_(_round(x, key))
    for i in range(0, flat_x.numel(), CHUNK):
        flat_out[i:i + CHUNK] = _round(flat_x[i:i + CHUNK], key)
    return target


def _round(x: torch.Tensor, key) -> torch.Tensor:
    """:func:`stochastic_bfloat16` of ``x`` with the step's 16-bit ``key``, in one piece.
    Eagerly, a tensor that fills its span gets its noised bits from its flat memory
    (:func:`_noised_flat`: the same bits, half the time); traced, or one that does not
    fill its span, from elementwise operations (inductor fuses them)."""
    if not torch.compiler.is_compiling():
        flat = in_memory_order(x)
        if flat is not None:
            return _finish(x, _noised_flat(flat, key).as_strided(x.shape, x.stride()))
    bits = x.view(torch.int32)
    # float32 is sign and magnitude: adding to the low bits moves the magnitude up (a carry
    # goes into the exponent, as rounding up does; no finite value overflows int32), and
    # dropping them truncates it towards zero, so this rounds |x| up with probability
    # (low bits) / 2^16 whatever the sign
    return _finish(x, bits + noise_table(x.device)[((bits >> 16) & 0xFFFF) ^ key])


def _noised_flat(x: torch.Tensor, key) -> torch.Tensor:
    """The noised bits (int32) of a flat contiguous ``x``, eagerly: the table read by
    ``index_select`` and the int32 passes in place (advanced indexing and a new tensor per
    pass took twice as long: 17.9 against 8.9 ms for 3.2 M elements on one CPU core)."""
    bits = x.view(torch.int32)
    index = (bits >> 16).bitwise_and_(0xFFFF).bitwise_xor_(key)
    return torch.index_select(noise_table(x.device), 0, index).add_(bits)


def _finish(x: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of ``noised`` (int32, a new tensor laid out as ``x``) as bfloat16,
    NaN where ``x`` is NaN (a NaN's payload in the low bits is carried out of NaN by the
    noise, into -0, 0 or inf). Traced, the bits are taken as they are (shifted, int16,
    viewed): converting the truncated float32 instead gives the same values but took
    inductor's CPU code 4x as long as the whole rounding does now (880 against 200 us for
    90,112 elements on one core, torch 2.13). Eagerly, ATen's vectorised conversion is the
    fast one. Which NaN comes out may differ between the two (bfloat16's canonical one
    traced, the conversion's eagerly)."""
    # ``x != x`` is isnan: inductor's CPU code vectorises the comparison, not ``isnan``
    if torch.compiler.is_compiling():
        return torch.where(x != x, _NAN_BITS, noised >> 16).to(torch.int16).view(torch.bfloat16)
    return torch.where(x != x, x, noised.bitwise_and_(_MASK_LOW).view(torch.float32)).to(torch.bfloat16)


def to_stored(x: torch.Tensor, dtype: torch.dtype, step, salt: int = AFTER_STEP) -> torch.Tensor:
    """``x`` (the state dtype) as a first moment stored in ``dtype``: into bfloat16
    stochastically (from float64 through float32), else converted (a copy only if the
    dtype differs)."""
    if dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.float64):
        return stochastic_bfloat16(x.float(), step, salt)
    return x.to(dtype)


__all__ = ["AFTER_STEP", "AFTER_TRANSFER", "CHUNK", "noise_table", "stochastic_bfloat16", "to_stored"]
