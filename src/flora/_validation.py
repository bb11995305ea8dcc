"""Argument checks shared by the optimizer and the accumulator: each error names the
argument and what is allowed."""

from __future__ import annotations

import numbers


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def plain(value):
    """A number of another library (numpy's int64, float32) as Python's own, so that a
    checkpoint holding it stays plain (``torch.load(weights_only=True)``, JSON); a bool,
    a tensor or anything else as it is."""
    if type(value) in (int, float) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value  # (numpy's float64 is a float subclass: converted below)
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def plain_option(name: str, value):
    """:func:`plain` on an option's value, and on the items of ``eps``'s pair (a list becomes
    the tuple Flora keeps); a user's own keys keep their types (a list stays a list)."""
    if name == "eps" and isinstance(value, (tuple, list)):
        return tuple(plain(v) for v in value)
    return plain(value)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value):
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if value <= 0:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value}")


def check_nonneg_int(name: str, value) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")


# Seeds of projections: 0 <= seed < 2**63. projection_seed mixes 64 bits, so a larger
# integer would be silently folded onto a smaller one (2**64 + s gives s's matrices); the
# bound also keeps every seed an int64, as tensors and checkpoints hold it.
SEED_LIMIT = 1 << 63
# Step and projection counters stay below 2**63 too: a step is mirrored by an int64 tensor
# and the projections' seeds take counts below 2**64 (a larger one loaded, then failed the
# step after it had moved other parameters' counters, a probe).
COUNTER_LIMIT = 1 << 63
# A parameter's step: its device counter is float64 (functional.DeviceSteps), exact to
# 2**53; from there the count stops, the bfloat16 momentum's rounding key with it, and the
# compiled step's rounding drifts from the eager one's (a probe, Z143: a third of the
# momentum lost over 400 steps). No run reaches it (2**53 steps); a checkpoint past it is
# refused on load (only there: a state loaded just below it steps on past it).
STEP_LIMIT = 1 << 53


def check_seed(name: str, value) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer in [0, 2**63), got {value!r} ({type(value).__name__})")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63) (a larger one would be folded onto another "
                         f"seed's projections), got {value}")


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False, allow_none=False,
               finite: bool = False):
    """``value`` is a real number in the range given (NaN never is); ``finite=True``
    also refuses infinities."""
    if value is None and allow_none:
        return
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    rng = f"in {lo or ('(-inf' if finite else '[-inf')}, {hi or ('inf)' if finite else 'inf]')}"  # inf: no limit
    allowed = f"a {'finite ' if finite else ''}real number {rng}" + (" or None" if allow_none else "")
    if not _is_real(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    try:  # an int too large for a float (10**400) is no finite number for the step either
        as_float = float(value)
    except OverflowError:
        as_float = float("inf") if value > 0 else float("-inf")
    bad = (
        value != value
        or (finite and as_float in (float("inf"), float("-inf")))
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        shown = str(value)
        shown = shown if len(shown) <= 40 else f"{shown[:12]}...e{len(shown) - 1}"  # an int of hundreds of digits
        raise ValueError(f"{name} must be {allowed}, got {shown}")


def check_bool(name: str, value, *, allow_none: bool = False, when: str = "") -> None:
    """``value`` is True or False (or None where allowed): a string such as "no", or a
    number, would be taken for its truth value without a word."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}{when}, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    """``value`` is one of ``choices``, of its type too (1.0 or a tensor holding 1 is not 1:
    it would be kept as given, in checkpoints and in comparisons)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
                         + (f" ({type(value).__name__})" if any(value is not c and _same(value, c) for c in choices)
                            else ""))


def _same(value, choice) -> bool:
    try:
        return bool(value == choice)
    except Exception:  # a tensor of several values, say
        return False


def check_process_group(process_group) -> None:
    """None or a ``torch.distributed.ProcessGroup`` this process belongs to (``new_group``
    hands processes outside the group an int marker, which had been called "an int")."""
    if process_group is None:
        return
    import torch.distributed as dist

    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("process_group: this process is not a member of it (dist.new_group returns a marker to "
                         "processes outside the group); give each process a group it belongs to, or None for "
                         "the default group")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
