"""Compressed gradient accumulation (Algorithm 1 of Flora), with an optional fused mode
that runs the optimizer step inside backward.

Over a cycle of ``tau`` micro-batches, a matrix parameter's gradient is compressed to
``C = sum_k G_k A^T`` (n x r) by a post-accumulate-grad hook the moment backward produces
it, and its full ``.grad`` is freed. On the cycle's last backward the hook writes the
estimate ``C A + G_tau`` into ``.grad`` (the last micro-batch enters exactly: its full
gradient exists at that moment anyway), and the next cycle draws a fresh projection.

With ``reduce=True`` the replicas of a data-parallel job sum their compressed (and dense)
buffers in one packed all-reduce at the end of each cycle, so that both the memory and the
traffic of a step are the compressed size (``docs/distributed.md``).
"""

from __future__ import annotations

import functools
import math
import sys
import zlib
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from ._validation import check_nonneg_int, check_positive_int, check_real
from .compression import PROJ_DIMS, compressed_dim
from .optimizer import Flora
from .sharded import is_dtensor, layout
from .projection import (
    as_matrix,
    compress,
    compressed_shape,
    decompress,
    decompress_add_,
    make_projection,
    matrix_shape,
    ACCUMULATION_STREAM,
    projection_seed,
    state_dtype,
)

__all__ = ["CompressedAccumulator", "accumulate_compressed_", "write_estimate_", "ACCUMULATION_PROJECTIONS"]

# Unbiased estimators only: decompress(compress(G)) must average to G.
ACCUMULATION_PROJECTIONS = ("gaussian", "orthonormal")

# parameter -> the accumulator whose hooks it carries (at most one: two would each free
# the gradient the other expects to see).
_ATTACHED: WeakIdKeyDictionary = WeakIdKeyDictionary()


# ------------------------------------------------------------------- arithmetic


def accumulate_compressed_(buf: torch.Tensor | None, g: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """``buf + compress(g)`` in float32 (float64 for float64 gradients), in place into
    ``buf`` (None starts a new sum)."""
    g = _local(g)  # FSDP2: this rank's rows, after the reduce-scatter
    c = compress(g.to(state_dtype(g.dtype)), a, dim)
    return c if buf is None else buf.add_(c)


def write_estimate_(grad: torch.Tensor, buf: torch.Tensor, a: torch.Tensor, dim: int, *, add: bool) -> torch.Tensor:
    """``grad <- decompress(buf) (+ grad when add)``, in place.

    A float32 contiguous gradient is updated without an n x m temporary (one matmul
    accumulating into it); other dtypes are computed in float32 and rounded once. A
    DTensor gradient (FSDP2) gets its local rows' estimate."""
    grad = _local(grad)
    if grad.dtype == buf.dtype and grad.is_contiguous():
        gm = as_matrix(grad)  # a view, since grad is contiguous
        if not add:
            gm.zero_()
        decompress_add_(gm, buf, a, dim)
        return grad
    full = decompress(buf, a, dim)
    if add:
        full.add_(as_matrix(grad).float())
    return grad.copy_(full.view(grad.shape))


# ------------------------------------------------------------------ bookkeeping


@dataclass(frozen=True)
class _Slot:
    index: int  # position in the parameter list given: keys the projection seeds
    name: str
    param: torch.Tensor
    dim: int | None  # projected matrix dimension; None accumulates densely


@dataclass
class _Cycle:
    """What the current accumulation cycle has seen. A closed cycle is replaced whole
    (``next()``), so nothing of it can leak into the next one."""

    number: int  # cycles completed before this one: keys this cycle's projections
    counts: list[int]  # backward passes each slot has seen in this cycle
    follow_accelerate: bool = False  # accelerate marked a backward of the previous cycle unsynced
    done: set[int] = field(default_factory=set)  # slots whose cycle is complete (their last micro-batch came)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> partial sum
    projections: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> cached projection
    sq_norm: torch.Tensor | None = None  # fused mode: squared norms of the gradients stepped so far
    unsynced: bool = False  # accelerate marked a backward of this cycle unsynced
    backwards: int = 0  # reduce=True: backward passes finished in this cycle
    # Normal mode: slot -> (the placeholder left in .grad of a compressed parameter between
    # backward passes, its version). zero_grad() replaces or zeroes it: that is how a
    # discarded micro-batch is seen.
    marks: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)  # slot -> version of the .grad holding its sum
    inflight: dict[int, int] = field(default_factory=dict)  # slot -> graph task accumulating it now
    # Set when a backward pass ended with the cycle complete for some parameters but not for
    # these (slot, count): the next backward must wait for a step, finish_cycle or zero_grad.
    overdue: list[tuple[int, int]] | None = None

    @classmethod
    def start(cls, n_slots: int, number: int = 0, follow_accelerate: bool = False) -> "_Cycle":
        return cls(number, [0] * n_slots, follow_accelerate)

    def next(self) -> "_Cycle":
        return _Cycle.start(len(self.counts), self.number + 1, self.unsynced)

    @property
    def active(self) -> int:
        return sum(1 for c in self.counts if c)


def _named_params(model_or_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.named_parameters())
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    out: list[torch.Tensor] = []
    for item in model_or_params:
        if isinstance(item, dict):  # parameter groups, as an optimizer takes them
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            out.append(item)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"model_or_params must be an nn.Module or an iterable of tensors (or parameter "
                            f"groups); item {i} is a {type(p).__name__}")
    seen: set[int] = set()
    named = []
    for i, p in enumerate(out):
        if id(p) not in seen:  # a tensor listed twice is one parameter
            seen.add(id(p))
            named.append((f"params.{i}", p))
    return named


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _is_ddp(module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


def _ddp_holding(ids: set[int]) -> nn.Module | None:
    """A live DistributedDataParallel whose module holds one of these parameters (DDP
    keeps no registry: looked for among the collector's objects, once)."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    for attempt in range(2):
        found = None
        for obj in gc.get_objects():
            if issubclass(type(obj), DistributedDataParallel):
                module = getattr(obj, "module", None)
                if isinstance(module, nn.Module) and any(
                        id(p) in ids and not getattr(p, "_ddp_ignored", False) for p in module.parameters()):
                    found = obj
                    break
        if found is None or attempt:
            return found
        del found, obj
        gc.collect()  # a wrapper dropped but not yet collected does not count
    return None


def _unwrap(optimizer):
    # Wrappers such as accelerate's AcceleratedOptimizer keep the real one in .optimizer;
    # hooks and per-parameter steps must reach the real one.
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, Optimizer) else optimizer


class CompressedAccumulator:
    r"""Accumulate gradients over ``tau`` micro-batches in compressed form.

    Contract: after the ``tau``-th backward of a cycle every parameter's ``.grad`` holds
    an unbiased estimate of the sum of its ``tau`` gradients (``decompress(C) + G_tau``
    for a compressed matrix, the exact sum for a dense parameter), so any optimizer,
    clipping or logging works on it unchanged; between backward passes a compressed
    matrix's partial sum is an ``n x r`` buffer and its ``.grad`` a zero placeholder of one
    element (stride 0). A step after ``k < tau`` backward passes steps on the estimate of
    those ``k`` and starts a new cycle; ``zero_grad()`` in the middle of a cycle drops it,
    as in plain PyTorch (``discard_cycle()`` explicitly). With ``rank=None`` everything equals plain accumulation bit for bit. With
    ``fused=True`` the optimizer steps inside the ``tau``-th backward instead, one
    parameter at a time. Loops, short cycles, fused mode, integrations and limits:
    ``docs/accumulation.md``.

    Usage, with the usual accumulation loop::

        acc = flora.CompressedAccumulator(model, rank=32, tau=8, optimizer=opt)
        for i, batch in enumerate(batches):
            (loss_fn(model, batch) / 8).backward()    # mean over micro-batches: divide by tau
            if (i + 1) % 8 == 0 or i + 1 == len(batches):
                acc.finish_cycle()    # only needed before clipping a short last cycle
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional
                opt.step(); opt.zero_grad()

    Args:
        model_or_params: an ``nn.Module``, an iterable of parameters, or parameter groups.
            Parameters with ``requires_grad=False`` are left alone.
        rank: rank of the compressed buffers; None accumulates every parameter densely
            (useful with ``fused=True`` for a plain optimizer-in-backward).
        tau: micro-batches per cycle (optimizer step).
        seed: base seed of the projections. They come from their own stream, so a
            ``flora.Flora`` given the same seed still draws unrelated matrices.
        proj_dim: the matrix dimension projected away: ``"auto"`` (the smaller one, less
            noisy), 0 or 1.
        max_aspect_ratio: accumulate tensors with ``max(n, m) / min(n, m)`` above this
            densely; None compresses every shape.
        exclude: parameters (tensors, or names when a module is given) to accumulate densely.
        exact_last: add the last micro-batch's gradient uncompressed (the default, None,
            means True; less noise at no memory cost). False compresses all ``tau``, as in
            the paper. With ``reduce=True`` the last micro-batch is compressed too (None
            means False there; True is refused: it would send that micro-batch's full
            gradient, more bytes than plain DDP).
        optimizer: in normal mode, optional: its step pre-hook closes a partial cycle
            (without it a global optimizer step pre-hook does, for any optimizer holding
            these parameters). Required in fused mode.
        fused: step the optimizer inside backward: ``step_parameter`` for a
            ``flora.Flora``, otherwise ``optimizer.step()`` while only that parameter has
            a gradient; the loop then calls ``backward()`` only.
        max_grad_norm: fused mode only: per-parameter gradient-norm clipping (global-norm
            clipping is impossible there; ``last_grad_norm`` reports the cycle's norm).
        cache_projections: keep each parameter's projection for the whole cycle (at most
            the size of its compressed buffer) instead of redrawing it every micro-batch.
        projection: ``"orthonormal"`` (default: QR of the seeded Gaussian draw, scaled
            by ``sqrt(d / r)`` to stay unbiased; its mean squared error is
            ``(d / r - 1) |G|^2`` against ``(d + 1) / r |G|^2``, and lower on real
            gradients, see ``docs/results.md``) or ``"gaussian"`` (the paper's). A
            state saved before this option loads only with ``"gaussian"``.
        scaler: fused mode only: a ``torch.amp.GradScaler``; each accumulated gradient is
            unscaled and checked before its step, a non-finite one is not stepped, and
            the findings are recorded so that ``scaler.step(optimizer)`` and
            ``scaler.update()`` work as usual.
        reduce: data-parallel training without DDP's own all-reduce: at the end of each
            cycle (the ``tau``-th backward, ``finish_cycle()`` or the optimizer's step)
            every replica's compressed buffers, dense sums and per-parameter gradient
            counts are all-reduced in ONE packed collective (``communication_bytes()``),
            and ``.grad`` receives the mean over replicas of the estimate, identical on
            every replica. Every micro-batch must run without DDP's synchronisation (no
            DDP, or every backward under ``ddp_model.no_sync()``; a synchronising DDP
            backward is refused). Every replica must run the same number of backward
            passes per cycle and close short cycles alike, as under DDP. The first
            cycle compares the replicas' options with one extra small all-reduce. With
            ``rank=None`` it equals DDP's accumulation (``no_sync`` then one synchronised
            backward). Needs ``torch.distributed`` initialised.
        process_group: with ``reduce=True``, the group to all-reduce over (None: the
            default group).
    """

    def __init__(
        self,
        model_or_params,
        rank: int | None,
        tau: int,
        *,
        seed: int = 0,
        proj_dim: str | int = "auto",
        max_aspect_ratio: float | None = None,
        exclude: Iterable[Any] = (),
        exact_last: bool | None = None,
        optimizer: Optimizer | None = None,
        fused: bool = False,
        max_grad_norm: float | None = None,
        cache_projections: bool = True,
        scaler: "torch.amp.GradScaler | None" = None,
        projection: str = "orthonormal",
        reduce: bool = False,
        process_group=None,
    ):
        check_positive_int("rank", rank, allow_none=True)
        check_positive_int("tau", tau)
        check_nonneg_int("seed", seed)
        if proj_dim not in PROJ_DIMS or isinstance(proj_dim, bool):
            raise ValueError(f"proj_dim must be one of {', '.join(map(repr, PROJ_DIMS))}; got {proj_dim!r}")
        check_real("max_aspect_ratio", max_aspect_ratio, low=1.0, allow_none=True)
        if projection not in ACCUMULATION_PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(map(repr, ACCUMULATION_PROJECTIONS))}; "
                             f"got {projection!r}")
        if exact_last is not None and not isinstance(exact_last, bool):
            raise TypeError(f"exact_last must be True, False or None, got {exact_last!r}")
        for name, v in (("fused", fused), ("cache_projections", cache_projections), ("reduce", reduce)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be True or False, got {v!r}")
        self._check_reduce(reduce, process_group, exact_last)
        check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True, allow_none=True)
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if fused and optimizer is None:
            raise ValueError("fused=True needs optimizer=: the optimizer steps inside backward")
        if max_grad_norm is not None and not fused:
            raise ValueError("max_grad_norm applies to fused=True only; in normal mode call "
                             "torch.nn.utils.clip_grad_norm_ after the tau-th backward, as usual")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if scaler is not None and not fused:
            raise ValueError("scaler applies to fused=True only; in normal mode use the GradScaler as usual "
                             "(scaler.step(optimizer) after the tau-th backward)")

        if fused and not reduce and _is_ddp(model_or_params):
            raise ValueError(
                "fused=True cannot run under DistributedDataParallel: the optimizer would step inside backward "
                "on this replica's gradient, before DDP averages it, and the replicas would drift apart. Use "
                "normal mode (no_sync() on the first tau-1 micro-batches), or reduce=True, which averages the "
                "compressed buffers across replicas itself (then give the unwrapped model)")
        named = _named_params(model_or_params)
        excluded = self._resolve_exclude(exclude, named)
        slots = []
        for index, (name, p) in enumerate(named):
            if not p.requires_grad:
                continue
            if p.is_complex():
                raise TypeError(f"parameter {name!r} is complex: CompressedAccumulator supports real tensors only")
            pd = proj_dim
            if is_dtensor(p):  # FSDP2: project the unsharded columns (see _check_sharded)
                self._check_sharded(name, p, rank, proj_dim, max_aspect_ratio, fused=fused, reduce=reduce)
                pd = 0 if proj_dim == 0 else 1
            dim = None if id(p) in excluded else compressed_dim(tuple(p.shape), rank, proj_dim=pd,
                                                                max_aspect_ratio=max_aspect_ratio)
            slots.append(_Slot(index, name, p, dim))
        if not slots:
            raise ValueError("model_or_params has no parameter with requires_grad=True")
        for s in slots:
            owner = _ATTACHED.get(s.param)
            if owner is not None:
                raise RuntimeError(f"parameter {s.name!r} already has a CompressedAccumulator attached; "
                                   "call .remove() on that one first (two would each free the other's gradients)")
        self._optimizer = None if optimizer is None else _unwrap(optimizer)
        if fused:
            self._check_fused_optimizer(slots)

        self.rank, self.tau, self.seed, self.proj_dim = rank, tau, seed, proj_dim
        exact_last = (not reduce) if exact_last is None else exact_last
        self.max_aspect_ratio, self.exact_last, self.fused = max_aspect_ratio, exact_last, fused
        self.reduce, self.process_group = reduce, process_group
        # reduce=True under DDP: a synchronising backward would all-reduce what the hooks freed.
        self._ddp = model_or_params if reduce and _is_ddp(model_or_params) else None
        self._agreed = False  # reduce=True: the replicas' options are compared at the first collective
        self.max_grad_norm, self.cache_projections, self.scaler = max_grad_norm, cache_projections, scaler
        self.projection = projection
        self._slots: list[_Slot] = slots
        self._ids = {id(s.param) for s in slots}
        self._c = _Cycle.start(len(slots))
        self._queued: dict[int, bool] = {}  # graph task -> a gradient was accumulated in it (its end is queued)
        self._sharded = {k for k, s in enumerate(slots) if is_dtensor(s.param)}  # FSDP2: no tensor hooks
        self._zeros: dict[int, torch.Tensor] = {}  # slot -> the one-element storage of its placeholder
        self._ddp_checked = not fused or reduce  # fused mode: DDP wrapping is looked for at the first backward
        self.last_grad_norm: torch.Tensor | None = None
        # Autograd runs each CUDA device's backward on its own thread: a model spread over
        # devices may run two hooks at once.
        self._lock = threading.Lock()
        self._handles = [s.param.register_post_accumulate_grad_hook(functools.partial(self._on_grad, k))
                         for k, s in enumerate(slots)]
        # Before each accumulation (FSDP2's sharded parameters are not in the graph: their
        # gradients arrive by the post-accumulate hook alone).
        self._handles += [s.param.register_hook(functools.partial(self._before_grad, k))
                          for k, s in enumerate(slots) if not is_dtensor(s.param)]
        for s in slots:
            _ATTACHED[s.param] = self
        self._guard = None
        self._zero_grad_patched = False
        if fused:
            self._patch_zero_grad()
        else:
            if self._optimizer is not None:
                self._guard = self._optimizer.register_step_pre_hook(self._on_step)
            else:
                # A global hook must not keep the accumulator (and the model) alive.
                ref = weakref.ref(self)

                def on_any_step(optimizer, args, kwargs):
                    acc = ref()
                    if acc is not None:
                        acc._on_any_step(optimizer)

                self._guard = register_optimizer_step_pre_hook(on_any_step)
                weakref.finalize(self, self._guard.remove)

    @staticmethod
    def _check_reduce(reduce: bool, process_group, exact_last: bool | None) -> None:
        if not reduce:
            if process_group is not None:
                raise ValueError("process_group applies to reduce=True only")
            return
        if exact_last:
            raise ValueError("exact_last=True with reduce=True would send the last micro-batch's full gradient "
                             "(more bytes than plain DDP); leave exact_last unset (reduce=True compresses every "
                             "micro-batch)")
        import torch.distributed as dist

        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("reduce=True needs torch.distributed: call torch.distributed.init_process_group() "
                               "(torchrun sets up its environment) before building the accumulator")

    @staticmethod
    def _resolve_exclude(exclude, named) -> set[int]:
        if isinstance(exclude, (str, torch.Tensor)):
            exclude = [exclude]
        by_name = {n: p for n, p in named}
        ids = {id(p) for _, p in named}
        out: set[int] = set()
        for e in exclude:
            if isinstance(e, str):
                if e not in by_name:
                    raise ValueError(f"exclude: no parameter named {e!r} (names are those of "
                                     "named_parameters(), or 'params.<i>' for a list)")
                out.add(id(by_name[e]))
            elif isinstance(e, torch.Tensor):
                if id(e) not in ids:
                    raise ValueError(f"exclude: a tensor of shape {tuple(e.shape)} is not among model_or_params")
                out.add(id(e))
            else:
                raise TypeError(f"exclude must hold parameter names or tensors, got {type(e).__name__}")
        return out

    @staticmethod
    def _check_sharded(name, p, rank, proj_dim, max_aspect_ratio, *, fused: bool, reduce: bool) -> None:
        """FSDP2 parameters: the hooks see this rank's rows after the reduce-scatter and
        compress them on their own, which needs the projected dimension to be the
        unsharded one (1, the columns; "auto" takes it)."""
        layout(p)  # Shard(0) or Replicate, else a clear error
        if fused:
            raise ValueError(f"fused=True is not supported for FSDP2 (DTensor) parameters such as {name!r}: "
                             "flora.Flora steps them together in step(), summing Adafactor's factors over the "
                             "shards; use normal mode")
        if reduce:
            raise ValueError(f"reduce=True is for replicas (DDP or none); {name!r} is an FSDP2 (DTensor) "
                             "parameter, whose gradients FSDP2 already reduce-scatters")
        if proj_dim == 0 and compressed_dim(tuple(p.shape), rank, proj_dim=0,
                                            max_aspect_ratio=max_aspect_ratio) is not None:
            raise ValueError(f"proj_dim=0 projects away the rows that FSDP2 shards ({name!r}, shape "
                             f"{tuple(p.shape)}): each rank would hold a part of every compressed sum. Use "
                             "proj_dim=1 or 'auto' (which takes the unsharded columns under FSDP2)")

    def _check_fused_optimizer(self, slots: list[_Slot]) -> None:
        # Stepping the whole optimizer for one parameter is only right if every other
        # parameter it holds has no gradient, i.e. if this accumulator frees them all.
        mine = {id(s.param) for s in slots}
        theirs = [p for g in self._optimizer.param_groups for p in g["params"] if p.requires_grad]
        extra = [tuple(p.shape) for p in theirs if id(p) not in mine]
        if extra:
            raise ValueError(f"fused=True: the optimizer holds {len(extra)} trainable parameter(s) not given to "
                             f"the accumulator (shapes {extra[:3]}...); give it the same parameters")
        ids = {id(p) for p in theirs}
        missing = [s.name for s in slots if id(s.param) not in ids]
        if missing:
            raise ValueError(f"fused=True: parameters {missing[:5]} are not in the optimizer, so nothing "
                             "would step them; give both the same parameters")

    # ------------------------------------------------------------------ the hook

    def _projection(self, k: int) -> torch.Tensor:
        a = self._c.projections.get(k)
        if a is None:
            s = self._slots[k]
            a = make_projection(self.projection, projection_seed(self.seed, s.index, self._c.number,
                                                                 ACCUMULATION_STREAM),
                                self.rank, matrix_shape(s.param.shape)[s.dim], device=s.param.device,
                                dtype=state_dtype(s.param.dtype), unbiased=True)
            if self.cache_projections:
                self._c.projections[k] = a
        return a

    def _before_grad(self, k: int, grad: torch.Tensor) -> None:  # no tensor arithmetic: no no_grad() needed
        """Tensor hook: runs before autograd adds this backward's gradient to ``.grad``, so
        that a refusal leaves the parameter as it was. Discards a partial sum that
        ``zero_grad()`` cleared, refuses a new cycle that nothing closed, and takes the
        placeholder out of ``.grad``."""
        with self._lock:
            if not self._ddp_checked:
                self._check_not_under_ddp()
            self._queue_end()
            if self._c.counts[k] and self._cleared(k):
                self._discard(k)
            self._check_cycle_open(k)
            c, p = self._c, self._slots[k].param
            m = c.marks.pop(k, None)
            if m is not None and p.grad is m[0]:
                p.grad = None  # autograd writes this gradient into a fresh .grad
            c.inflight[k] = torch._C._current_graph_task_id()

    @torch.no_grad()
    def _on_grad(self, k: int, p: torch.Tensor) -> None:
        with self._lock:
            self._c.inflight.pop(k, None)
            self._queue_end(accumulated=True)
            if k in self._sharded:  # no tensor hook ran before this one
                self._check_cycle_open(k)
            self._accumulate(k, p)

    def _check_cycle_open(self, k: int) -> None:
        c = self._c
        if c.overdue is not None:
            self._sweep()  # zero_grad() may have dropped the cycle
            c = self._c
            if c.overdue is not None:
                raise RuntimeError(self._lag_message(self._slots[k].name, first=True))
        if k in c.done and not self.reduce:  # a backward completed it and then failed before closing it
            raise RuntimeError(self._lag_message(self._slots[k].name, first=False))

    def _accumulate(self, k: int, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        c = self._c
        count, slot = c.counts[k], self._slots[k]
        # Every check comes before any change of state.
        if g.is_sparse:
            raise TypeError(f"parameter {slot.name!r} got a sparse gradient; CompressedAccumulator needs dense "
                            "gradients (e.g. nn.Embedding(sparse=False))")
        if self.reduce:
            self._accumulate_for_reduce(k, p, g)
            return
        last = self._accelerate_ends_cycle(count) or count + 1 == self.tau
        buf = c.buffers.get(k)
        if slot.dim is not None:
            a = self._projection(k)
            if not last:
                c.buffers[k] = accumulate_compressed_(buf, g, a, slot.dim)
                self._park(k)
            elif not self.exact_last:
                write_estimate_(g, accumulate_compressed_(buf, g, a, slot.dim), a, slot.dim, add=False)
            elif buf is not None:
                write_estimate_(g, buf, a, slot.dim, add=True)
        elif self.fused:
            # Dense, fused: .grad must be None between cycles (the optimizer steps every
            # parameter holding one), so the running sum lives here; summing in the same
            # order as autograd keeps it bit-identical.
            if buf is not None:
                g = buf.add_(g)
            if last:
                p.grad = g
            else:
                c.buffers[k] = g
                p.grad = None
        if last and self.fused:
            self._fused_step(p)
        if last:
            c.buffers.pop(k, None)
            c.done.add(k)
        c.counts[k] = count + 1
        if not self.fused and p.grad is not None and k not in c.marks:
            c.versions[k] = p.grad._version  # its sum lives in .grad: zero_grad() shows there

    def _queue_end(self, accumulated: bool = False) -> None:
        """Have ``_after_backward`` run once at the end of the running backward pass."""
        task = torch._C._current_graph_task_id()
        if task not in self._queued:
            self._queued[task] = accumulated
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._after_backward, task))
        elif accumulated:
            self._queued[task] = True

    def _after_backward(self, task: int) -> None:
        """End of a backward pass. Closes a cycle whose every parameter is complete (a
        parameter that finishes first cannot know whether the others got their gradients);
        with some complete and others not, the others' estimates are written into ``.grad``
        (so that clipping sees them) and the cycle waits for the step. reduce=True: counts
        the backward pass and runs the cycle's collective after the tau-th."""
        node = torch._C._current_autograd_node()
        with self._lock:
            accumulated = self._queued.pop(task, False)
            c = self._c
            for k, t in list(c.inflight.items()):
                if t == task:  # its gradient went elsewhere (torch.autograd.grad): put the placeholder back
                    del c.inflight[k]
                    if c.counts[k] and self._slots[k].param.grad is None and self._parks(k):
                        self._mark(k)
            if node is not None and self._defer(node, accumulated):
                return
            if not accumulated:
                return
            if self.reduce:
                c.backwards += 1
                if c.backwards >= self.tau:
                    self._reduce_cycle()
                return
            if not c.done:
                return
            lagging = [(k, n) for k, n in enumerate(c.counts) if n and k not in c.done]
            if not lagging:
                self._close_cycle()
                return
            c.overdue = lagging
            if not self.fused:
                for k, _ in lagging:
                    self._write_estimate(k)

    def _defer(self, node, accumulated: bool) -> bool:
        """A backward pass run inside another one (reentrant activation checkpointing) ends
        inside one of the outer pass's nodes: look at the cycle when the outer pass ends."""
        fired = []

        def outer_node_done(grad_inputs, grad_outputs):
            if not fired:
                fired.append(True)
                with self._lock:
                    self._queue_end(accumulated)

        try:
            node.register_hook(outer_node_done)
        except (RuntimeError, TypeError, AttributeError):
            return False
        return True

    # --------------------------------------------------- the open cycle, seen from .grad

    def _parks(self, k: int) -> bool:
        """Whether slot k leaves a placeholder in ``.grad`` while its partial sum is in a
        buffer: compressed, normal mode (fused mode keeps every .grad None), not FSDP2."""
        return not self.fused and self._slots[k].dim is not None and k not in self._sharded

    def _park(self, k: int) -> None:
        if self._parks(k):
            self._mark(k)
        else:
            self._slots[k].param.grad = None

    def _mark(self, k: int) -> None:
        """Leave in ``.grad`` a zero placeholder that holds one element (stride 0): plain
        ``zero_grad()`` replaces it by None or zeroes it, which is how this slot's partial
        sum is known to have been discarded."""
        p = self._slots[k].param
        z = self._zeros.get(k)
        if z is None or z.device != p.device or z.dtype != p.dtype:
            z = self._zeros[k] = torch.zeros((), dtype=p.dtype, device=p.device)
        m = z.expand(p.shape)
        p.grad = m
        self._c.marks[k] = (m, m._version)
        self._c.versions.pop(k, None)

    def _cleared(self, k: int) -> bool:
        """Whether slot k's partial sum was discarded by the user since the hook left it:
        its placeholder replaced or zeroed, or the ``.grad`` holding its sum set to None or
        zeroed (``zero_grad(set_to_none=False)``)."""
        c = self._c
        if k in c.inflight:
            return False
        m = c.marks.get(k)
        p = self._slots[k].param
        if m is not None:
            return p.grad is not m[0] or m[0]._version != m[1]
        v = c.versions.get(k)
        if v is None:  # fused mode or FSDP2: the sum is not in .grad
            return False
        g = p.grad
        return g is None or (g._version != v and not bool(g.any()))

    def _discard(self, k: int) -> None:
        c = self._c
        c.counts[k] = 0
        c.done.discard(k)
        c.buffers.pop(k, None)
        c.versions.pop(k, None)
        m = c.marks.pop(k, None)
        if m is not None:
            p = self._slots[k].param
            if p.grad is m[0]:
                p.grad = None  # zeroed in place: autograd must not add into a placeholder
            if m[0]._version != m[1]:
                self._zeros.pop(k, None)

    def _sweep(self) -> None:
        """Apply what ``zero_grad()`` did since the last backward pass to every slot."""
        c = self._c
        for k, n in enumerate(c.counts):
            if n and self._cleared(k):
                self._discard(k)
        if not c.active:
            c.backwards = 0
        if c.overdue is not None:
            lagging = [(k, n) for k, n in c.overdue if c.counts[k]]
            if lagging and c.done:
                c.overdue = lagging
            else:
                c.overdue = None
                if c.done and not lagging:  # what is left is complete
                    self._close_cycle()

    def _write_estimate(self, k: int) -> None:
        """Normal mode: write slot k's estimate of the gradients it got into ``.grad``."""
        c, s = self._c, self._slots[k]
        buf = c.buffers.pop(k, None)
        m = c.marks.pop(k, None)
        if m is not None and s.param.grad is m[0]:
            s.param.grad = None
        if s.dim is not None and buf is not None:
            g = torch.empty_like(s.param)
            write_estimate_(g, buf, self._projection(k), s.dim, add=False)
            s.param.grad = g
        if s.param.grad is not None:
            c.versions[k] = s.param.grad._version

    def _check_not_under_ddp(self) -> None:
        """Fused mode, first backward: refuse a model that DDP wrapped after the accumulator
        was built (each replica would step on its own gradient before DDP averages it)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            ddp = _ddp_holding(self._ids)
            if ddp is not None:
                raise RuntimeError(
                    f"CompressedAccumulator(fused=True) on parameters of a model wrapped in {type(ddp).__name__} "
                    f"(world size {dist.get_world_size()}): the optimizer would step inside backward on this "
                    "replica's own gradient, before DDP averages it, and the replicas would drift apart. Use "
                    "normal mode (fused=False, no_sync() on the first tau-1 micro-batches), or build the "
                    "accumulator on the DDP model with reduce=True (fused=True works there: it averages the "
                    "compressed buffers itself; run every backward under ddp_model.no_sync()). Nothing was "
                    "accumulated or stepped")
        self._ddp_checked = True

    def _patch_zero_grad(self) -> None:
        """Fused mode keeps no .grad between backward passes, so the optimizer's zero_grad()
        cannot see the open cycle: wrap it (on this optimizer object only) to discard it."""
        opt = self._optimizer
        original = opt.zero_grad
        had_own = "zero_grad" in vars(opt)
        ref = weakref.ref(self)

        @functools.wraps(original)
        def zero_grad(*args, **kwargs):
            acc = ref()
            if acc is not None and any(acc._c.counts):
                acc.discard_cycle()
            return original(*args, **kwargs)

        opt.zero_grad = zero_grad
        self._zero_grad_patched = (zero_grad, original if had_own else None)

    # ------------------------------------------------------------ across replicas

    def _accumulate_for_reduce(self, k: int, p: torch.Tensor, g: torch.Tensor) -> None:
        """reduce=True: every micro-batch is summed (compressed, or dense in ``.grad`` or,
        fused, in a buffer); the cycle is closed by the collective after the ``tau``-th
        backward (``_after_backward``) or by ``finish_cycle``."""
        c, slot = self._c, self._slots[k]
        if self._ddp is not None and getattr(self._ddp, "require_backward_grad_sync", False):
            raise RuntimeError("CompressedAccumulator(reduce=True) on a DDP model: run every micro-batch under "
                               "ddp_model.no_sync() (the accumulator all-reduces the compressed buffers itself; "
                               "DDP's synchronisation would all-reduce the freed gradients)")
        buf = c.buffers.get(k)
        if slot.dim is not None:
            c.buffers[k] = accumulate_compressed_(buf, g, self._projection(k), slot.dim)
            self._park(k)
        elif self.fused:  # dense parameters' sums live here in fused mode (.grad is None between cycles)
            c.buffers[k] = g if buf is None else buf.add_(g)
            p.grad = None
        c.counts[k] += 1
        if not self.fused and p.grad is not None and k not in c.marks:
            c.versions[k] = p.grad._version

    def _layout(self) -> list[tuple[int, torch.Size | tuple[int, int]]]:
        """(slot, shape on the wire) of every attached parameter, in order: the packed
        buffer of a cycle holds these, then one gradient count per parameter."""
        return [(k, tuple(s.param.shape) if s.dim is None else compressed_shape(s.param.shape, self.rank, s.dim))
                for k, s in enumerate(self._slots)]

    def _wire_dtype(self) -> torch.dtype:
        dtypes = [s.param.dtype if s.dim is None else state_dtype(s.param.dtype) for s in self._slots]
        return functools.reduce(torch.promote_types, dtypes, torch.float32)

    def communication_bytes(self) -> int:
        """Bytes of the one all-reduce per cycle with ``reduce=True`` (0 otherwise):
        ``element size x (sum of compressed buffer sizes + sum of dense sizes + one count
        per parameter)``."""
        if not self.reduce:
            return 0
        numel = sum(math.prod(shape) for _, shape in self._layout()) + len(self._slots)
        return numel * torch.empty((), dtype=self._wire_dtype()).element_size()

    def _reduce_cycle(self) -> None:
        """The collective of a cycle: pack, all-reduce (mean over replicas), write every
        estimate into ``.grad`` (fused: step it), close the cycle. Runs with the lock held."""
        import torch.distributed as dist

        c = self._c
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        device = self._slots[0].param.device
        wire = self._wire_dtype()
        layout = self._layout()
        pieces = []
        for k, shape in layout:
            s = self._slots[k]
            t = c.buffers.get(k) if (s.dim is not None or self.fused) else (s.param.grad if c.counts[k] else None)
            pieces.append(torch.zeros(math.prod(shape), dtype=wire, device=device) if t is None
                          else t.detach().reshape(-1).to(device=device, dtype=wire))
        n_data = sum(t.numel() for t in pieces)
        flat = torch.cat(pieces + [torch.tensor(c.counts, dtype=wire, device=device)])
        del pieces
        if not self._agreed:
            from .distributed import check_agreement

            signature = repr([(s.index, s.dim, tuple(s.param.shape)) for s in self._slots]).encode()
            check_agreement("CompressedAccumulator(reduce=True)", {
                "rank": self.rank, "tau": self.tau, "seed": self.seed, "projection": self.projection,
                "cycle": c.number, "parameters (indices, shapes, compressed dims)": zlib.crc32(signature),
                "wire dtype": str(wire).removeprefix("torch.")}, device=device, group=group)
            self._agreed = True
        flat[:n_data].div_(dist.get_world_size(group))  # the mean, divided first as DDP does
        dist.all_reduce(flat, group=group)
        totals = flat[n_data:].tolist()
        c.buffers.clear()
        offset = 0
        for k, shape in layout:
            s, n = self._slots[k], math.prod(shape)
            view, offset = flat[offset:offset + n].view(shape), offset + n
            p = s.param
            if not totals[k]:  # no replica had a gradient for it: left alone, as DDP does
                continue
            if s.dim is not None:
                g = torch.empty_like(p)
                write_estimate_(g, view.to(state_dtype(p.dtype)), self._projection(k), s.dim, add=False)
                p.grad = g
            elif p.grad is not None and not self.fused:
                p.grad.copy_(view.view(p.shape))
            else:
                p.grad = view.view(p.shape).to(p.dtype, copy=True)
            if self.fused:
                self._fused_step(p)
        del flat
        self._close_cycle()

    def _accelerate_ends_cycle(self, count: int) -> bool:
        """True when accelerate (the HF Trainer, ``accelerator.accumulate()``) drives the
        accumulation and marks this backward as the last of its cycle. Its gradient state
        is read only if accelerate is imported, and followed only once it has marked some
        backward of this or the previous cycle as unsynced (a plain loop never does).
        ``count``: backward passes this parameter had in the cycle before this one. A tau
        that disagrees with accelerate's accumulation is refused."""
        mod = sys.modules.get("accelerate.state")
        shared = getattr(getattr(mod, "GradientState", None), "_shared_state", None)
        if not shared:
            return False
        sync = bool(shared.get("sync_gradients", True))
        if not sync:
            self._c.unsynced = True
        if not (self._c.unsynced or self._c.follow_accelerate):
            return False
        steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
        if isinstance(steps, int) and steps > 1 and steps != self.tau:  # accelerator.accumulate()
            raise ValueError(f"CompressedAccumulator(tau={self.tau}) under accelerate with "
                             f"gradient_accumulation_steps={steps}: the two must agree; build the accumulator "
                             f"with tau={steps}")
        if not sync and count + 1 >= self.tau:  # the Trainer (which leaves accelerate's num_steps at 1)
            raise ValueError(
                f"CompressedAccumulator(tau={self.tau}) under the Hugging Face Trainer or accelerate, whose "
                f"gradient accumulation is longer: backward pass {count + 1} of this cycle is not the last of its "
                f"optimizer step, so gradient_accumulation_steps > tau={self.tau}. The accumulator would close "
                "several cycles per step and compress the first estimate again. Build it with tau equal to "
                "gradient_accumulation_steps (flora.AccumulatorCallback checks both when training starts)")
        return sync

    def _unscale(self, p: torch.Tensor) -> torch.Tensor | None:
        """Unscale ``p.grad`` by the GradScaler's scale in place and record whether it is
        finite where ``scaler.step``/``update`` look for it. Returns the found-inf flag."""
        from torch.amp.grad_scaler import OptState

        scaler = self.scaler
        if not scaler.is_enabled():
            return None
        if scaler._scale is None:
            raise RuntimeError("CompressedAccumulator(scaler=...): the scaler has no scale yet; call "
                               "scaler.scale(loss).backward()")
        record = scaler._per_optimizer_states[id(self._optimizer)]
        record["stage"] = OptState.UNSCALED  # so that scaler.step() does not unscale (nothing) again
        g = p.grad
        found = torch.zeros(1, dtype=torch.float32, device=g.device)
        inv_scale = scaler._scale.double().reciprocal().float().to(g.device)
        torch._amp_foreach_non_finite_check_and_unscale_([g], found, inv_scale)
        seen = record["found_inf_per_device"].get(g.device)
        record["found_inf_per_device"][g.device] = found if seen is None else seen.add_(found)
        return found

    def _fused_step(self, p: torch.Tensor) -> None:
        if self.scaler is not None:
            found = self._unscale(p)
            # flora.Flora skips a non-finite gradient on the device; any other optimizer
            # must be told on the host (GradScaler syncs here too).
            if found is not None and not isinstance(self._optimizer, Flora) and found.item():
                p.grad = None
                return
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.promote_types(p.grad.dtype, torch.float32))
        sq = norm.float().square()
        self._c.sq_norm = sq if self._c.sq_norm is None else self._c.sq_norm + sq
        opt = self._optimizer
        step_parameter = getattr(opt, "step_parameter", None)
        if step_parameter is not None:
            step_parameter(p)
            # What an LR scheduler's wrapper around step() would have recorded; without it
            # the scheduler warns that it stepped before the optimizer.
            opt._opt_called = True
        else:
            opt.step()  # every other parameter's .grad is None, so only p moves
        p.grad = None

    def _close_cycle(self) -> None:
        c = self._c
        if self.fused and c.sq_norm is not None:
            self.last_grad_norm = c.sq_norm.sqrt()
        for k, (m, _) in c.marks.items():  # never left behind (every path writes the estimates first)
            if self._slots[k].param.grad is m:
                self._slots[k].param.grad = None
        self._c = c.next()

    def _lag_message(self, name: str, *, first: bool) -> str:
        c = self._c
        done = [self._slots[k].name for k in sorted(c.done)]
        lagging = [(self._slots[k].name, n) for k, n in enumerate(c.counts) if n and k not in c.done]

        def listed(names):
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        if first:
            what = (f"a backward pass began while the previous cycle (cycle {c.number}) waits to be stepped: it "
                    f"ended for {len(done)} parameter(s) ({listed([repr(n) for n in done])}) and "
                    f"{len(lagging)} got gradients in fewer micro-batches "
                    f"({listed([f'{n!r} ({k})' for n, k in lagging])}"
                    f"{'' if self.fused else '; their estimates are in .grad'}). Nothing of this backward was "
                    "accumulated")
        else:
            what = (f"parameter {name!r} got a gradient after its cycle (cycle {c.number}) was complete, and "
                    "the cycle was never closed (did the backward pass that completed it fail?). Complete: "
                    f"{len(done)} parameter(s) ({listed([repr(n) for n in done])}); fewer micro-batches: "
                    f"{len(lagging)} ({listed([f'{n!r} ({k})' for n, k in lagging]) or 'none'}). This backward's "
                    f"gradient of {name!r} was not accumulated; gradients it produced before reaching {name!r} "
                    "were")
        return (f"CompressedAccumulator(tau={self.tau}): {what}. Close the cycle with optimizer.step() or "
                "acc.finish_cycle() (each parameter steps on what it got), or drop it with optimizer.zero_grad() "
                "or acc.discard_cycle(), before the next backward")

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.micro_step:
            self.finish_cycle()

    def _on_any_step(self, optimizer) -> None:
        if self.micro_step:
            opt = _unwrap(optimizer)
            if any(id(p) in self._ids for g in opt.param_groups for p in g["params"]):
                self.finish_cycle()

    # ------------------------------------------------------------------ public

    @property
    def cycle(self) -> int:
        """Completed cycles: the current cycle's projections use this number."""
        return self._c.number

    @property
    def micro_step(self) -> int:
        """Backward passes seen in the current cycle (0 on a boundary, and after
        ``zero_grad()`` or ``discard_cycle()`` dropped the open cycle)."""
        self._sweep()
        return self._c.backwards if self.reduce else max(self._c.counts)

    @torch.no_grad()
    def finish_cycle(self) -> int:
        """Close the current cycle now, after ``k < tau`` backward passes (the last, short
        cycle of an epoch). Normal mode: every parameter's ``.grad`` receives the estimate
        of its ``k`` gradients (decompressed; dense ones hold their sum already), exactly
        what plain accumulation would hold; call it before clipping or unscaling such a
        cycle (``optimizer.step()`` calls it otherwise). Fused mode: those parameters are
        stepped, as on a tau-th backward. The next cycle draws fresh projections. With
        ``reduce=True`` this is the cycle's collective: every replica must call it (or
        step) after the same number of backward passes.

        Returns ``k`` (0 on a cycle boundary, where it does nothing)."""
        with self._lock:
            k = self.micro_step
            if k == 0:
                return 0
            if self.reduce:
                self._reduce_cycle()
                return k
            c = self._c
            for j, s in enumerate(self._slots):
                if c.counts[j] == 0 or j in c.done:  # no gradient, or its cycle is complete
                    continue
                p = s.param
                if self.fused:
                    buf = c.buffers.pop(j, None)
                    if s.dim is not None and buf is not None:
                        g = torch.empty_like(p)
                        write_estimate_(g, buf, self._projection(j), s.dim, add=False)
                        p.grad = g
                    elif s.dim is None:
                        p.grad = buf
                    if p.grad is not None:
                        self._fused_step(p)
                else:
                    self._write_estimate(j)
            self._close_cycle()
            return k

    def discard_cycle(self) -> int:
        """Drop the open cycle, as ``zero_grad()`` drops accumulated gradients in plain
        PyTorch: every partial sum (compressed buffers, dense sums, and in normal mode the
        ``.grad`` of this accumulator's parameters) is discarded; the next backward starts
        the cycle afresh (same cycle number, so the same projections). In normal mode
        ``optimizer.zero_grad()`` and ``model.zero_grad()`` do this by themselves; in fused
        mode the optimizer's ``zero_grad()`` does. Needed where ``zero_grad()`` cannot be
        seen: ``model.zero_grad()`` in fused mode, and FSDP2's compressed parameters.
        With ``reduce=True`` every replica must discard alike.

        Returns the number of backward passes dropped (0 on a boundary)."""
        with self._lock:
            k = self.micro_step
            c = self._c
            for j, n in enumerate(c.counts):
                if n:
                    self._discard(j)
                    if not self.fused:
                        self._slots[j].param.grad = None
            c.backwards, c.overdue, c.sq_norm = 0, None, None
            return k

    def remove(self) -> None:
        """Detach every hook. Partial sums of an unfinished cycle are dropped (with a
        warning), dense parameters' partial ``.grad`` included."""
        self._sweep()
        if any(self._c.counts):
            warnings.warn(f"CompressedAccumulator.remove() in the middle of a cycle ({self.micro_step} of "
                          f"tau={self.tau} micro-batches): the partial sums are dropped", stacklevel=2)
            for j, s in enumerate(self._slots):
                if self._c.counts[j] and j not in self._c.done:
                    s.param.grad = None
        for h in self._handles:
            h.remove()
        if self._guard is not None:
            self._guard.remove()
        if self._zero_grad_patched:
            wrapper, own = self._zero_grad_patched
            if vars(self._optimizer).get("zero_grad") is wrapper:
                if own is None:
                    del self._optimizer.zero_grad
                else:
                    self._optimizer.zero_grad = own
            self._zero_grad_patched = False
        for s in self._slots:
            if _ATTACHED.get(s.param) is self:
                del _ATTACHED[s.param]
        self._handles, self._guard = [], None
        self._c = _Cycle.start(len(self._slots), self._c.number)

    def plan(self) -> list[dict[str, Any]]:
        """One row per attached parameter: ``name``, ``index`` (keys the projection
        seeds), ``shape``, ``compressed`` and, when compressed, ``proj_dim`` and
        ``buffer_shape`` (its ``n x r`` or ``r x m`` partial sum)."""
        rows = []
        for s in self._slots:
            row = {"name": s.name, "index": s.index, "shape": tuple(s.param.shape), "compressed": s.dim is not None}
            if s.dim is not None:
                row.update(proj_dim=s.dim, buffer_shape=compressed_shape(s.param.shape, self.rank, s.dim))
            rows.append(row)
        return rows

    def memory_bytes(self) -> int:
        """Bytes held now by the partial sums and cached projections."""
        ts = list(self._c.buffers.values()) + list(self._c.projections.values())
        return sum(t.numel() * t.element_size() for t in ts)

    def state_dict(self) -> dict[str, Any]:
        """Everything a mid-cycle resume needs, as tensors and plain numbers (loadable with
        ``torch.load(weights_only=True)``). In normal mode the dense parameters' partial sums
        live in their ``.grad``, so they are copied from there. Take it between backward
        passes (not between the last backward and ``step()``)."""
        self._sweep()
        compressed, dense = {}, {}
        for k, s in enumerate(self._slots):
            if not self._c.counts[k]:
                continue
            if s.dim is not None:
                compressed[s.index] = self._c.buffers[k].clone() if k in self._c.buffers else None
            elif self.fused:
                dense[s.index] = self._c.buffers[k].clone()
            elif s.param.grad is not None:
                dense[s.index] = s.param.grad.detach().clone()
        compressed = {i: t for i, t in compressed.items() if t is not None}
        return {
            "rank": self.rank, "tau": self.tau, "seed": self.seed, "proj_dim": self.proj_dim,
            "projection": self.projection,
            "exact_last": self.exact_last, "cycle": self._c.number, "backwards": self._c.backwards,
            "indices": torch.tensor([s.index for s in self._slots], dtype=torch.int64),
            "counts": torch.tensor(self._c.counts, dtype=torch.int64),
            "compressed": compressed, "dense": dense,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; everything is checked before anything changes. A state
        saved in normal mode loads in fused mode and back."""
        sd = {"projection": "gaussian", **state_dict}  # saved before projection kinds: Gaussian
        for key in ("rank", "tau", "seed", "proj_dim", "projection"):
            if sd.get(key) != getattr(self, key):
                raise ValueError(f"state_dict has {key}={sd.get(key)!r} but this accumulator has "
                                 f"{key}={getattr(self, key)!r}; build it with the same {key}")
        indices = [int(i) for i in sd["indices"].tolist()]
        if indices != [s.index for s in self._slots]:
            raise ValueError(f"state_dict covers {len(indices)} parameters, this accumulator {len(self._slots)} "
                             "(or different ones): it was saved from a different model or parameter list")
        counts = [int(c) for c in sd["counts"].tolist()]
        if any(c < 0 or c >= self.tau for c in counts):
            raise ValueError(f"state_dict counts must lie in [0, tau={self.tau}); got {counts[:8]}...")
        by_index = {s.index: (k, s) for k, s in enumerate(self._slots)}
        for kind in ("compressed", "dense"):
            for i, t in sd[kind].items():
                if i not in by_index:
                    raise ValueError(f"state_dict holds a {kind} buffer for parameter index {i}, unknown here")
                k, s = by_index[i]
                if (s.dim is not None) != (kind == "compressed"):
                    raise ValueError(f"state_dict holds a {kind} buffer for {s.name!r}, which this accumulator "
                                     f"accumulates {'densely' if s.dim is None else 'compressed'}")
                want = tuple(s.param.shape) if s.dim is None else compressed_shape(s.param.shape, self.rank, s.dim)
                if tuple(t.shape) != want:
                    raise ValueError(f"state_dict buffer for {s.name!r} has shape {tuple(t.shape)}, expected {want}")
        # All checked: apply.
        self._agreed = False  # reduce=True: the replicas are compared again at the next collective
        for k, m in self._c.marks.items():  # the placeholders of the state replaced
            if self._slots[k].param.grad is m[0]:
                self._slots[k].param.grad = None
        cycle = _Cycle.start(len(self._slots), int(sd["cycle"]))
        cycle.counts = counts
        if self.reduce:  # a state saved without reduce=True counted no backward passes
            cycle.backwards = int(sd.get("backwards", 0)) or max(counts)
        self._c = cycle
        for k, s in enumerate(self._slots):
            if counts[k] and not (s.dim is None and not self.fused):
                s.param.grad = None  # the partial sum lives in the buffers here
        for i, t in sd["compressed"].items():
            k, s = by_index[i]
            cycle.buffers[k] = t.detach().to(device=s.param.device, dtype=state_dtype(s.param.dtype), copy=True)
        for i, t in sd["dense"].items():
            k, s = by_index[i]
            t = t.detach().to(device=s.param.device, dtype=s.param.dtype, copy=True)
            if self.fused:
                cycle.buffers[k] = t
            else:
                s.param.grad = t
                cycle.versions[k] = t._version
        for k, n in enumerate(counts):
            if n and k in cycle.buffers and self._parks(k):
                self._mark(k)

    def __repr__(self) -> str:
        n_c = sum(s.dim is not None for s in self._slots)
        return (f"CompressedAccumulator(rank={self.rank}, tau={self.tau}, seed={self.seed}, "
                f"compressed={n_c}, dense={len(self._slots) - n_c}, fused={self.fused}, reduce={self.reduce}, "
                f"cycle={self._c.number}, micro_step={self.micro_step})")
