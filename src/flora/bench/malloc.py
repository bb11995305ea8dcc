"""glibc's allocator thresholds for timing runs (``flora-bench step --malloc``).

glibc serves an allocation above its mmap threshold with fresh pages from the kernel,
faulted in at first touch and handed back at ``free``. The threshold starts at 128 KiB;
freeing such a buffer of at most 32 MiB raises it to that buffer's size (larger ones leave
it), and the trim threshold (heap memory kept after a free) follows at twice it. So whether
an eager optimizer's temporaries (HF Adafactor allocates several per tensor and step) are
fresh pages at every step depends on what the process freed before: on SmolLM2's shapes HF
Adafactor's step took 0.52-0.58 s in some processes and 0.82-0.94 s in others, 0.30 s
without fresh pages (docs/compile.md, 2026-12-07). Step times are compared under one
policy, set before anything is allocated. ``mallopt`` acts on the whole process and cannot
be undone (it also turns glibc's dynamic thresholds off), and an allocator preloaded in
glibc's place (``LD_PRELOAD``: jemalloc, tcmalloc) may take the call and ignore it: the
record keeps ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# policy -> (mmap threshold, trim threshold) in bytes; None: glibc's dynamic thresholds
POLICIES: dict[str, tuple[int, int] | None] = {
    # the highest glibc's own thresholds go, where a training process that frees buffers
    # of up to 32 MiB (activations) takes them: temporaries under 32 MiB come from the
    # heap, larger ones are fresh pages
    "warm": (32 << 20, 64 << 20),
    # no fresh pages for a temporary under 1 GiB, as with a caching allocator (jemalloc,
    # tcmalloc): the eager steps' cost without page faults
    "reuse": (1 << 30, 2**31 - 1),
    # the process's dynamic thresholds, as they happen to stand: step times depend on history
    "as-is": None,
}
DEFAULT = "warm"

HELP = ("glibc's allocator thresholds while timing: warm (default; mmap threshold 32 MiB, trim 64 MiB: the "
        "highest glibc's own go, as in a training process), reuse (1 GiB: no fresh pages for any temporary, as with "
        "jemalloc or tcmalloc), as-is (glibc's dynamic thresholds, which move with what the process freed before: HF "
        "Adafactor's step varied 1.7x between processes)")


def apply(policy: str, mallopt=None) -> dict:
    """Set ``policy``'s thresholds in this process (before the timed tensors are made).
    Returns what to record: the policy, the thresholds set, or why none were (a libc
    other than glibc; ``mallopt`` refusing a value)."""
    if policy not in POLICIES:
        raise ValueError(f"malloc policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    values = POLICIES[policy]
    record: dict = {"policy": policy, "mmap_threshold": None, "trim_threshold": None}
    if os.environ.get("LD_PRELOAD"):
        record["ld_preload"] = os.environ["LD_PRELOAD"]
    if values is None:
        return record
    if mallopt is None:
        if platform.libc_ver()[0] != "glibc":
            return {**record, "not_applied": f"not glibc ({platform.libc_ver()[0] or 'unknown libc'})"}
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for name, param, value in (("mmap_threshold", M_MMAP_THRESHOLD, values[0]),
                               ("trim_threshold", M_TRIM_THRESHOLD, values[1])):
        if mallopt(param, value) != 1:  # what was set before stays set, and recorded
            return {**record, "not_applied": f"mallopt refused {name}={value}"}
        record[name] = value
    return record


def describe(record: dict | None) -> str:
    """The report's words for :func:`apply`'s record (None: a result from before the option)."""
    if not record:
        return "glibc's allocator thresholds not recorded (a run before --malloc)"
    preload = (f" (LD_PRELOAD={record['ld_preload']}: a preloaded allocator may ignore them)"
               if record.get("ld_preload") else "")
    if record.get("not_applied"):
        part = "partly " if record["mmap_threshold"] is not None else ""
        return f"--malloc {record['policy']} {part}not applied: {record['not_applied']}{preload}"
    if record["mmap_threshold"] is None:
        return f"--malloc as-is: glibc's dynamic allocator thresholds, as the process's history left them{preload}"
    return (f"--malloc {record['policy']}: glibc's mmap threshold {record['mmap_threshold'] >> 20} MiB, trim "
            f"threshold {record['trim_threshold'] >> 20} MiB{preload}")


__all__ = ["apply", "describe", "DEFAULT", "HELP", "POLICIES"]
