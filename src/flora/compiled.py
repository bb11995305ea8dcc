"""``Flora(compile=...)``: the step's cores compiled with ``torch.compile``.

The cores are :func:`flora.functional.grouped_core` (a bucket of parameters of one shape)
and :func:`flora.functional.single_core`, compiled with ``fullgraph=True, dynamic=False``:
dynamo caches one graph per shape signature of a bucket (``tests/test_compile.py``:
equal to the eager step to 1e-5, nothing compiled after the first step).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from . import functional as F
from .functional import grouped_core, single_core
from .projection import matrix_shape, state_dtype
from ._warn import warn

# torch.compile options of Flora(compile=...): one graph per shape signature, no graph
# break allowed inside (torchao's low-bit optimizers compile their per-parameter step the
# same way).
COMPILE_OPTIONS = dict(fullgraph=True, dynamic=False)
_compiled: dict[tuple, Callable] = {}

# Inductor's CUDA code (Triton) is not yet verified equal to the eager step: on an H200
# (torch 2.11.0+cu130, Triton 3.6, 2026-12-04) a compiled bucket of one dense vector
# differed from its second step, and one compressed matrix with scale_parameter from its
# first, by 10-20% of a step; one single-tensor graph failed Triton's compiler (the same
# cores compiled for a CPU equal eager to 1e-7). So Flora(compile=True) steps its CUDA
# parameters eagerly, with a warning, unless FLORA_COMPILE_CUDA=1 (to check a newer torch:
# tests/test_cuda.py). Other backends (aot_eager, ...) run as asked.
CUDA_INDUCTOR = os.environ.get("FLORA_COMPILE_CUDA", "") == "1"

CUDA_EAGER_MESSAGE = (
    "{what} on CUDA: inductor's compiled step is not verified equal to the eager one on a GPU (measured "
    "differing by 10-20% of a step on small buckets, torch 2.11 on an H200; docs/compile.md)")


def compiles_on(backend, device) -> bool:
    """Whether Flora(compile=backend) runs its compiled core for parameters on ``device``
    (see ``CUDA_INDUCTOR``)."""
    if backend is None:
        return False
    return CUDA_INDUCTOR or torch.device(device).type != "cuda" or backend != "inductor"


_PARTS = {True: grouped_core, False: single_core, "stats": F.staged_stats, "update": F.staged_update,
          "apply": F.staged_apply}


def compiled_core(grouped, backend="inductor", options: dict | None = None) -> Callable:
    """The core function compiled with ``backend`` (one compiled function per backend and
    options; dynamo caches its graphs per shape signature). ``grouped``: True
    (grouped_core), False (single_core), or a stage of the staged CPU step ("stats",
    "update", "apply"). Should compiling fail (no C++ compiler, a backend's error), the
    call runs the eager function instead, from then on, with a warning (_eager_on_failure)."""
    key = (grouped, backend if isinstance(backend, str) else id(backend), tuple(sorted((options or {}).items())))
    fn = _compiled.get(key)
    if fn is None:
        compiled = torch.compile(_PARTS[grouped], backend=backend, options=options, **COMPILE_OPTIONS)
        fn = _compiled[key] = _eager_on_failure(compiled, _PARTS[grouped], key, backend)
    return fn


# Backend objects (callables) this process compiled Flora's cores with, before a warning.
BACKENDS_WARN = 8
_backends_seen: set = set()
_backends_kept: list = []


def say_if_many_backends(backend) -> None:
    """Every backend object compiles Flora's cores anew (seconds) and keeps its graphs for
    the process's life: dynamo keeps them on the cores' code objects, beside every other
    backend's, and Flora's steps lift the recompile limit that would otherwise stop them.
    A new callable per optimizer (``compile=lambda gm, ex: ...`` in a loop) grew memory by
    about 3 MB an optimizer (a probe): said once, at the ``BACKENDS_WARN``-th, by the
    constructor (so that the warning points at the caller's line)."""
    if backend is None or isinstance(backend, str) or id(backend) in _backends_seen:
        return
    _backends_seen.add(id(backend))
    _backends_kept.append(backend)  # alive, so that its id is not reused by another
    if len(_backends_seen) == BACKENDS_WARN:
        warn(f"Flora(compile=<a callable>): the {BACKENDS_WARN}th backend object this process compiles "
             "Flora's step with; each compiles anew (seconds) and keeps its graphs for the process's life "
             "(torch._dynamo.reset() frees the Python side, not most of it: README), so memory grows with "
             "every new one. Build every Flora with one backend object, or a backend's name", UserWarning)


def _eager_on_failure(compiled: Callable, eager: Callable, key: tuple, backend) -> Callable:
    """``compiled``, which runs ``eager`` instead when compiling fails. By then the step's
    prelude has moved the step counters and other buckets may have stepped, so raising
    would leave a half-made step; a failure to compile comes before the graph runs (no
    tensor is written), so the eager function, which computes the same (tests), finishes
    the step. The failed core stays eager for the process; other cores still compile.
    (The closure keeps ``compiled``, hence the backend, alive: ``key`` holds its id.)"""
    from torch._dynamo.exc import TorchDynamoException

    failed = []

    def call(*args):
        if failed:
            return eager(*args)
        try:
            return compiled(*args)
        except TorchDynamoException as e:
            failed.append(type(e).__name__)
            cause = getattr(e, "inner_exception", None) or e  # a backend's own error, inside dynamo's
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            inner = f"{type(cause).__name__}: " if cause is not e else ""
            warn(f"Flora(compile={backend!r}): compiling {eager.__name__} failed ({type(e).__name__}: "
                 f"{inner}{first}); it steps eagerly from now on: the same arithmetic, without the "
                 "compiled speed (fix the cause, e.g. a C++ compiler for inductor on a CPU, or use "
                 "compile=False)", UserWarning)
            return eager(*args)

    call.failed = failed  # the error's type name once it failed (tests: a compiled path that ran eagerly)
    return call


class Workspace:
    """The two bucket-sized buffers of the staged CPU step (the stacked gradients and the
    decompressed momentum), one pair per device and dtype, as large as the largest
    bucket stepped so far; views of them are kept per bucket shape, so that a step makes
    none. Not state: rebuilt empty after a deep copy, a pickle and ``load_state_dict``."""

    def __init__(self) -> None:
        self._flat: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: dict[tuple, tuple[torch.Tensor, list]] = {}

    def slots(self, buf: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``buf`` viewed as a stack of tensors of ``shape``, and its slices (kept)."""
        key = (buf.data_ptr(), buf.shape, tuple(shape))
        hit = self._slots.get(key)
        if hit is None:
            view = buf.view(buf.shape[0], *shape)
            hit = self._slots[key] = (view, list(view.unbind(0)))
        return hit

    def nbytes(self) -> int:
        return sum(u.numel() * u.element_size() * 2 for u, _ in self._flat.values())

    def get(self, shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (shape, dtype, device)
        hit = self._views.get(key)
        if hit is not None:
            return hit
        n = math.prod(shape)
        fkey = (dtype, device)
        flat = self._flat.get(fkey)
        if flat is None or flat[0].numel() < n:
            flat = self._flat[fkey] = (torch.empty(n, dtype=dtype, device=device),
                                       torch.empty(n, dtype=dtype, device=device))
            self._views = {k: v for k, v in self._views.items() if (k[1], k[2]) != fkey}
            self._slots.clear()
        hit = self._views[key] = (flat[0][:n].view(shape), flat[1][:n].view(shape))
        return hit


def staged_step(work, backend, options, workspace: Workspace, transposed: dict, lr_views: dict,
                pnorms: list | None = None) -> None:
    """A compiled step of a CPU bucket of compressed parameters (``functional.staged``):
    the gradients copied eagerly into ``workspace``'s first buffer; three compiled
    stages, ``functional.staged_stats`` (which also compresses the update, from the
    gradient), ``staged_update`` and ``staged_apply`` (which read the gradients again
    for the normalised update rather than a copy of it); between the last two the
    decompression, an eager matmul into the second buffer (``out=``). Equal to the compiled
    ``grouped_core`` to float rounding; six operations a bucket (the one graph: three
    kernels and two matmuls), without bucket-sized allocations and with every
    bucket-sized pass near memory speed (docs/compile.md)."""
    spec = work.spec
    k = len(work.params)
    n, m = matrix_shape(spec.shape)
    dtype = state_dtype(work.grads[0].dtype)  # the momentum may be stored narrower
    ws_s, ws_d = workspace.get((k, n, m), dtype, work.grads[0].device)
    g0 = work.grads[0]
    if k == 1 and g0.dtype == dtype and g0.is_contiguous():
        ws_g = g0  # a bucket of one reads its gradient where it is (functional._stacked)
    else:
        ws_g, slots = workspace.slots(ws_s, spec.shape)
        torch._foreach_copy_(slots, work.grads)
    a = work.a
    rf, cf, new_row, new_col, cu = compiled_core("stats", backend, options)(spec, work.steps, work.sq, ws_g, a)
    x, coef, ok, lr = compiled_core("update", backend, options)(
        spec, work.params, work.steps, lr_arg(work.lr, lr_views), work.sq, work.skips, ws_g, rf, cf, new_row,
        new_col, work.moms, cu, a, pnorms)
    key = id(work.owner)  # one entry per bucket, replaced when its projection is
    hit = transposed.get(key)
    if hit is None or hit[0] is not a:
        hit = transposed[key] = (a, a.mT)
    a_t = hit[1]
    if spec.dim == 0:
        torch.bmm(a_t, x, out=ws_d)
    else:
        torch.bmm(x, a, out=ws_d)
    compiled_core("apply", backend, options)(spec, work.params, ws_g, rf, cf, ws_d, coef, ok, lr)


def stacked_step(work, backend, options, workspace: Workspace, lr_views: dict, pnorms: list | None = None) -> None:
    """A compiled step of a CPU bucket of small vectors on stacks (``functional.stacked_io``):
    the gradients and parameters copied into ``workspace``'s two buffers (one eager
    ``_foreach_copy_``, widened to the state dtype), the compiled ``grouped_core`` on the
    stacks, the parameters copied back (rounded to their dtype, as ``grouped_core`` does)."""
    k, n = len(work.params), work.params[0].numel()
    ws_g, ws_p = workspace.get((k, n), state_dtype(work.params[0].dtype), work.params[0].device)
    g_slots, p_slots = workspace.slots(ws_g, (n,))[1], workspace.slots(ws_p, (n,))[1]
    torch._foreach_copy_(g_slots + p_slots, list(work.grads) + list(work.params))
    new, *_ = compiled_core(True, backend, options)(work.spec, ws_p, ws_g, work.steps, work.sq, work.moms, work.a,
                                                   lr_arg(work.lr, lr_views), work.skips, None, pnorms)
    torch._foreach_copy_(work.params, new.unbind(0))


def lr_arg(lr, views: dict):
    """What a compiled core is handed for ``lr``: a 0-dim tensor as a 1-element view of
    it (kept in ``views``, so that no step makes a new one), anything else as it is.

    Dynamo takes a 0-dim float64 CPU tensor input for a Python float: its graph then
    reads it with a guard, ``not math.isnan(lr.item())``, an ``aten::item`` on every call
    (a sync, were it on a GPU). A 1-element vector is an ordinary tensor input; the core
    turns it back into a 0-dim tensor inside the graph (``functional._lr_in``)."""
    if not isinstance(lr, torch.Tensor) or lr.dim() != 0:
        return lr
    hit = views.get(id(lr))
    if hit is None or hit[0] is not lr or hit[1].data_ptr() != lr.data_ptr():
        if len(views) >= 64:  # a new lr tensor every step: keep the memo small
            views.clear()
        hit = views[id(lr)] = (lr, lr.view(1))
    return hit[1]


__all__ = ["compiled_core", "COMPILE_OPTIONS", "lr_arg", "staged_step", "stacked_step", "Workspace"]
