"""``CompressedAccumulator``: compressed gradient accumulation (Algorithm 1 of Flora), with an
optional fused mode that runs the optimizer step inside backward. A facade: it checks its
arguments, wires the package's parts and keeps the public API; how it is built:
``docs/accumulation.md`` ("How it is built")."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from .. import _autocast
from . import checkpoint
from .cycle import Cycle
from .engine import Engine
from .estimator import plan_row
from .fused import check_fused_optimizer
from .hooks import Hooks, attach, check_unattached, detach
from .integrations import AccelerateWatch, unwrap, wrapper_scaler
from .._validation import plain
from .options import (Option, Options, check_holds_some, check_options, make_slots, named_params, padded_tables,
                      refuse_sparse_tables_fused, resolve_exclude)
from .ddp import DDPSteps, check_ddp_fused
from .replicas import is_ddp
from .units import guard_gradient_sync
from .._warn import warn

__all__ = ["CompressedAccumulator"]


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
        model_or_params: an ``nn.Module``, an iterable of parameters or of ``(name,
            parameter)`` pairs (``model.named_parameters()``, whose names ``exclude`` and
            messages then use), or parameter groups of either. Parameters with
            ``requires_grad=False`` are left alone.
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
            these parameters; so does it beside this one's when a compressed parameter is
            not in this optimizer, which another must then step). Required in fused mode.
            One holding none of these parameters is refused in fused mode and said with a
            warning in normal mode (its steps would close this model's cycles).
        fused: step the optimizer inside backward: ``step_parameter`` for a
            ``flora.Flora``, otherwise ``optimizer.step()`` while only that parameter has
            a gradient; the loop then calls ``backward()`` only.
        max_grad_norm: fused mode only: per-parameter gradient-norm clipping (global-norm
            clipping is impossible there; ``last_grad_norm`` reports the cycle's norm).
        cache_projections: keep each parameter's projection for the whole cycle (at most
            the size of its compressed buffer under ``"auto"``, but for a stack of experts
            or a padded embedding projected on their larger side; ``memory_bytes()``
            counts it) instead of redrawing it every micro-batch.
        projection: ``"orthonormal"`` (default: QR of the seeded Gaussian draw, scaled
            by ``sqrt(d / r)`` to stay unbiased; its mean squared error is
            ``(d / r - 1) |G|^2`` against ``(d + 1) / r |G|^2``, and lower on real
            gradients, see ``docs/results.md``) or ``"gaussian"`` (the paper's). A
            state saved before this option loads only with ``"gaussian"``.
        scaler: fused mode only: a ``torch.amp.GradScaler``; each accumulated gradient is
            unscaled and checked before its step, a non-finite one is not stepped, and
            the findings are recorded so that ``scaler.step(optimizer)`` and
            ``scaler.update()`` work as usual. None with an optimizer that accelerate
            prepared under fp16 (a GPU) takes that optimizer's scaler.
        reduce: data-parallel training without DDP's own all-reduce: at the end of each
            cycle (the ``tau``-th backward, the one accelerate marks synced,
            ``finish_cycle()`` or the optimizer's step)
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
            group of the DDP model holding these parameters, if any, else the default
            group).
        comm_hook: fused mode on a ``DistributedDataParallel`` model: the communication
            hook whose mean over replicas each bucket steps on, as a ``(state, hook)``
            pair for ``register_comm_hook`` (e.g. ``(flora.distributed.ProjectionState(
            rank=32), flora.distributed.projection_hook)``); None: DDP's all-reduce.

    Across replicas, fused mode works on a ``DistributedDataParallel`` model (give the DDP
    model: a communication hook steps each bucket on its mean, and the accumulator decides
    which micro-batch DDP synchronises, so no ``no_sync()`` is needed) and on FSDP2
    (``fully_shard``; each unit's parameters step together after its reduce-scatter);
    clipping, ``last_grad_norm`` and a GradScaler's findings are then global.
    """

    rank, tau, seed, proj_dim, projection = Option(), Option(), Option(), Option(), Option()
    max_aspect_ratio, exact_last, fused, reduce = Option(), Option(), Option(), Option()
    process_group, max_grad_norm, cache_projections, scaler = Option(), Option(), Option(), Option()

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
        comm_hook: tuple | None = None,
    ):
        check_options(rank, tau, seed=seed, proj_dim=proj_dim, max_aspect_ratio=max_aspect_ratio,
                      projection=projection, exact_last=exact_last, fused=fused,
                      cache_projections=cache_projections, reduce=reduce, process_group=process_group,
                      max_grad_norm=max_grad_norm, optimizer=optimizer, scaler=scaler)
        # numpy numbers as Python's: state_dict() must stay plain (weights_only, the Trainer's JSON)
        rank, tau, seed, proj_dim, max_aspect_ratio, max_grad_norm = map(
            plain, (rank, tau, seed, proj_dim, max_aspect_ratio, max_grad_norm))
        ddp_fused = fused and not reduce and is_ddp(model_or_params)
        if comm_hook is not None and not ddp_fused:
            raise ValueError("comm_hook applies to fused=True on a DistributedDataParallel model only (with "
                             "reduce=False); for normal mode register it on the model with register_comm_hook")
        named = named_params(model_or_params)
        if not named and not isinstance(model_or_params, torch.nn.Module):  # a generator already read (a probe)
            raise ValueError("model_or_params is an empty parameter list (if it was a generator such as "
                             "model.parameters() given to the optimizer first: a generator can be read once; pass "
                             "the model, or list(model.parameters()))")
        slots = make_slots(named, resolve_exclude(exclude, named, model_or_params), rank=rank, proj_dim=proj_dim,
                           max_aspect_ratio=max_aspect_ratio, reduce=reduce, keep_rows=padded_tables(model_or_params))
        check_unattached(slots)
        if fused and scaler is None and optimizer is not None:
            # accelerate's fp16 (a GPU): its prepared optimizer steps through its loss scaler; without
            # it the hooks would step on scaled gradients (a probe: 1024x the step) before any error
            scaler = wrapper_scaler(optimizer)
        optimizer = None if optimizer is None else unwrap(optimizer)
        if optimizer is not None:
            check_holds_some(optimizer, slots, fused)
        if fused:
            refuse_sparse_tables_fused(model_or_params, slots)
            check_fused_optimizer(optimizer, slots)
        if ddp_fused:
            check_ddp_fused(model_or_params, slots, comm_hook)
        opts = Options(rank, tau, seed, proj_dim, projection, max_aspect_ratio,
                       (not reduce) if exact_last is None else exact_last, fused, reduce, process_group,
                       max_grad_norm, cache_projections, scaler)
        # reduce=True under DDP: a synchronising backward would all-reduce what the hooks freed.
        self._engine = Engine(opts, slots, optimizer, model_or_params if reduce and is_ddp(model_or_params) else None,
                              model=model_or_params)
        if ddp_fused:
            self._engine.ddp_checked = True
            self._engine.ddp_steps = DDPSteps(self._engine, model_or_params, comm_hook)
        self._hooks = Hooks(self._engine)
        self._hooks.owner = self  # the hooks on the parameters keep the accumulator (ATTACHED holds it weakly)
        self._sync_guard = guard_gradient_sync(model_or_params) if self._engine.sharded else None
        if not (fused or reduce or self._engine.sharded):  # normal mode under DDP: only the last backward syncs
            self._engine.guard_ddp(model_or_params if is_ddp(model_or_params) else None)
        attach(slots, self)
        self._hooks.guard_steps()
        self._hooks.guard_unfrozen(model_or_params)  # fused mode refuses a parameter unfrozen since; normal warns

    @property
    def cycle(self) -> int:
        """Completed cycles: the current cycle's projections use this number."""
        return self._engine.cycle.number

    @property
    def micro_step(self) -> int:
        """Backward passes seen in the current cycle (0 on a boundary, and after
        ``zero_grad()`` or ``discard_cycle()`` dropped the open cycle)."""
        return self._engine.micro_step()

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """Fused mode: the global gradient norm (before clipping) of the cycle just finished."""
        return self._engine.last_grad_norm

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
        with _autocast.disabled():
            return self._engine.finish()

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
        return self._engine.discard()

    def remove(self) -> None:
        """Detach every hook. Partial sums of an unfinished cycle are dropped (with a
        warning), dense parameters' partial ``.grad`` included."""
        eng = self._engine
        eng.sweep()
        if any(eng.cycle.counts):
            warn(f"CompressedAccumulator.remove() in the middle of a cycle ({self.micro_step} of "
                 f"tau={self.tau} micro-batches): the partial sums are dropped")
            for j, s in enumerate(eng.slots):
                if eng.cycle.counts[j] and j not in eng.cycle.done:
                    s.param.grad = None
        self._hooks.remove()
        if eng.ddp_steps is not None:
            eng.ddp_steps.remove()
        if self._sync_guard is not None:
            self._sync_guard.remove()
        if eng.ddp_guard is not None:
            eng.ddp_guard.remove()
            eng.ddp_guard = None
        detach(eng.slots, self)
        eng.cycle = Cycle.start(len(eng.slots), eng.cycle.number)
        # let the optimizer go (a probe: a replaced optimizer and its state, 2x the model
        # for AdamW, lived as long as the accumulator object)
        eng.optimizer = None
        eng.removed = True  # its options can no longer be set (they would be checked against no optimizer)
        if eng.stepper is not None:
            eng.stepper.optimizer = None

    def __reduce_ex__(self, protocol):  # deepcopy and pickle: a clear refusal, not "cannot pickle '_thread.lock'"
        raise TypeError("a CompressedAccumulator cannot be copied or pickled: it is hooked into its model's "
                        "parameters. Save acc.state_dict() (tensors and numbers) and load it into an accumulator "
                        "built on the copied model")

    @staticmethod
    def remove_from(model) -> int:
        """Remove every CompressedAccumulator attached to ``model``'s parameters (a module,
        or an iterable of parameters), including one no longer referenced: a notebook
        cell run again builds a new accumulator on a model whose parameters still carry
        the old one's hooks. Returns how many were removed."""
        from .hooks import attached

        params = model.parameters() if isinstance(model, torch.nn.Module) else model
        owners = {id(o): o for p in params if (o := attached(p)) is not None}
        for o in owners.values():
            o.remove()
        return len(owners)

    def plan(self) -> list[dict[str, Any]]:
        """One row per attached parameter: ``name``, ``index`` (keys the projection
        seeds), ``shape``, ``compressed`` and, when compressed, ``proj_dim`` and
        ``buffer_shape`` (its ``n x r`` or ``r x m`` partial sum; under FSDP2 this process's
        rows); ``reason`` where it is
        dense (``"rank=None"``, ``"1-D"``, ``"excluded"``, ``"projected dim 1 <= rank 4"``,
        ...) or projects other than the rule would (an embedding with ``padding_idx``)."""
        return [plan_row(s, self.rank) for s in self._engine.slots]

    def memory_bytes(self) -> int:
        """Bytes held now by the partial sums and cached projections."""
        c = self._engine.cycle
        return sum(t.numel() * t.element_size() for t in list(c.buffers.values()) + list(c.projections.values()))

    def communication_bytes(self) -> int:
        """Bytes of the one all-reduce per cycle with ``reduce=True`` (0 otherwise):
        ``element size x (sum of compressed buffer sizes + sum of dense sizes + one count
        per parameter)``."""
        replicas = self._engine.replicas
        return 0 if replicas is None else replicas.communication_bytes()

    def state_dict(self) -> dict[str, Any]:
        """Everything a mid-cycle resume needs, as tensors and plain numbers (loadable with
        ``torch.load(weights_only=True)``). In normal mode the dense parameters' partial sums
        live in their ``.grad``, so they are copied from there. Take it between backward
        passes (not between the last backward and ``step()``)."""
        return checkpoint.state_dict(self._engine)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; everything is checked before anything changes. A state
        saved in normal mode loads in fused mode and back."""
        checkpoint.load_state_dict(self._engine, state_dict)

    def _driven_by_accelerate(self) -> None:
        """accelerate's sync flag ends every cycle from now on, a first short one included
        (AccumulatorCallback: the Trainer always drives accumulation through it)."""
        self._engine.cycle.driven = True  # not saved into follow_accelerate: a plain loop loading
        # a Trainer checkpoint would follow accelerate's flag, True outside the Trainer (review Z101)

    def _released_by_accelerate(self) -> None:
        """The Trainer has stopped: accelerate's sync flag, which it leaves as it was, ends no
        cycle of a plain loop that goes on with this accumulator; tau counts again. A window
        the Trainer left open (stopped mid-window, the flag left unsynced) goes on counting,
        the flag read as a leftover, as by an accumulator built then."""
        c = self._engine.cycle
        c.driven = c.follow_accelerate = False
        self._engine.accelerate = AccelerateWatch()

    def __repr__(self) -> str:
        n_c = sum(s.dim is not None for s in self._engine.slots)
        return (f"CompressedAccumulator(rank={self.rank}, tau={self.tau}, seed={self.seed}, "
                f"compressed={n_c}, dense={len(self._engine.slots) - n_c}, fused={self.fused}, "
                f"reduce={self.reduce}, cycle={self.cycle}, micro_step={self.micro_step})")
