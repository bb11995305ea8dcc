"""Flora's step as functions over tensors, as ``torch.optim`` writes its optimizers: the
``Flora`` class validates options, owns the state and sorts parameters; these functions do
the arithmetic.

A step has two halves:

- an eager *prelude* (:func:`prepare`), which does the host-side bookkeeping: the step
  counters' host copies, when to resample, drawing projections (by the CPU generator, so
  that a seed gives the same matrix on every device) and carrying the compressed momentum
  over to a new projection. It returns a :class:`Work` item: tensors and constants;
- a pure tensor function (:func:`single_core`, :func:`grouped_core`) that does the rest on
  those tensors, in place. It reads no Python value that changes from step to step, so
  ``torch.compile`` traces it once per shape signature (``Flora(compile=True)`` compiles it
  with ``fullgraph=True, dynamic=False``: :mod:`flora.compiled`; ``torch.compile(opt.step)``
  traces it into one graph after the prelude, which is the one graph break).

The two cores:

- :func:`single_core` steps one parameter: the readable reference, and what
  ``Flora.step_parameter`` (optimizer-in-backward) uses on the single-tensor path. With
  compression off it is ``transformers`` Adafactor operation for operation.
- :func:`grouped_core` steps a bucket of parameters of the same shape, dtype, device,
  options and counters at once: gradients and state are stacked, so the Adafactor factors,
  compression, decompression and transfer are a few batched calls (``bmm``, reductions
  over the stack) instead of a few per parameter. It agrees with the single-tensor path to
  float rounding (tested).

Step counters are kept twice: ``state["step"]``, a plain integer (what checkpoints hold
and the host's bookkeeping reads), and a 1-element tensor per parameter on its device
(:class:`DeviceSteps`, as torch's capturable optimizers keep theirs). Eagerly, the
step-dependent scalars (the relative step size, ``beta2_t = 1 - t^decay``, the bias
correction ``1 - beta1^t``) are computed on the host from the integer, exactly as HF
Adafactor computes them; under ``torch.compile`` they are computed from the device
counter (as torch's optimizers do when ``capturable``), so that a new step count is a new
input, not a recompilation. Neither path waits on the host: clip factors, RMS values, learning rates
and the finite-update check are device tensors (``torch.where``, ``clamp``), so a step is
a stream of kernels.

Notation (the paper's): ``G`` gradient, ``u`` Adafactor's normalised update, ``A`` the
projection, ``C``/``D`` compress/decompress, ``M`` (``exp_avg_c``) the compressed first
moment.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from . import adafactor as af
from .kernels import adafactor as fk
from .momentum import compressed_apply_, compressed_step_, compressed_terms, dense_momentum_
from .compression import momentum_storage
from .rounding import AFTER_STEP, AFTER_TRANSFER, noise_table, stochastic_bfloat16, to_stored
from .projection import HALF, matrix_shape, state_dtype, transfer
from .state import store_momentum_as
from .stacks import StateStacks, first as _first, stack as _stack, write_back as _write_back

# (group, indices, count, projected size, device, dtype) -> the projections of those
# parameters (r x d, or a k x r x d stack when len(indices) > 1 or stacked=True)
ProjectionSource = Callable[..., torch.Tensor]



class Spec(NamedTuple):
    """What a core function needs to know besides tensors: constants only, none of which
    changes from step to step (``torch.compile`` guards on them)."""

    shape: tuple
    half: bool  # the parameters are float16 / bfloat16 (stepped in float32, copied back)
    momentum: str | None  # "c": compressed (exp_avg_c), "m": dense (exp_avg), None: no first moment
    form: str
    dim: int  # the projected dimension (-1 unless momentum == "c")
    isometric: bool  # the projection's rows are orthonormal
    beta1: float | None
    eps1: float
    eps2: float
    clip_threshold: float
    decay_rate: float
    weight_decay: float
    scale_parameter: bool
    relative_step: bool
    warmup_init: bool
    kernel: str | None = None  # "triton": the factored normalisation by flora.kernels (2-D)
    # the factored dims when they are not the last two (adafactor.factor_move): the
    # second moment's arithmetic then runs on a view with them moved last
    factor: tuple[int, int] | None = None
    # the "fixed" form's complement weight, the "floored" form's floor (the group's
    # complement_weight; None: the default, flora.momentum.FIXED_COMPLEMENT_WEIGHT)
    complement_weight: float | None = None


class Work(NamedTuple):
    """One call of a core function, as the prelude prepared it. Lists hold one tensor per
    parameter (one element on the single-tensor path)."""

    grouped: bool
    spec: Spec
    params: list
    grads: list
    steps: list  # the device step counters (DeviceSteps), holding the count before this step
    sq: tuple  # (rows, cols) of a factored second moment, or (full second moments,)
    moms: list | None  # exp_avg_c or exp_avg, or None
    a: torch.Tensor | None  # the projection (a k x r x d stack on the grouped path)
    lr: Any  # float, tensor or None (relative step)
    skips: torch.Tensor  # int64 count of skipped updates on this device
    t: int  # the step count this step reaches (state["step"], for the eager scalars)
    compiled: bool = False  # run the compiled core
    # the bucket's first parameter, by which the optimizer knows it (``params`` may hold
    # aliases of the parameters: see prepare)
    owner: torch.Tensor | None = None


# ------------------------------------------------------------------ step counters


class DeviceSteps:
    """The step counters on the device: one 1-element tensor per parameter, in the dtype of
    the step's scalars (float64, exact to 2**53 steps; float32 on MPS, to 2**24), beside
    ``state["step"]``, the plain integer that checkpoints hold and the host's bookkeeping
    reads (buckets, when to resample, eager scalars). A compiled core reads the tensor,
    so that a new count is a new value, not a recompilation; the same tensor object
    serves every step (CUDA graphs need that). Never read back: a counter that no longer
    holds its parameter's ``state["step"]`` (a loaded or edited state) is rewritten from
    the integer (a fill, no sync). Not state: rebuilt after a deep copy, a pickle and
    ``load_state_dict``, like the projection cache.

    1-element, not 0-dim (issue 18): dynamo gives a 0-dim float64 CPU input a symbolic
    ``.item()`` value; AOTAutograd's scalar pass then specialises it and restarts the
    trace, and the restarted trace drops every in-place op on that input whose result is
    unused (torch 2.13: ``OutputGraph.remove_tensorify_specialized_graphargs`` removes a
    node whose value carries the input's ``item_memo`` and that has no users; ``all()`` of
    no users is true). The counter's ``add_(1)`` vanished from the compiled graph of every
    float64 CPU bucket of one (larger buckets use ``_foreach_add_``): its count stayed 0,
    ``beta2_t = 1 - 0^-0.8`` was -inf and every step was skipped as non-finite. A 1-element tensor is an ordinary input; a
    compiled core reads the count as a 0-dim view of it (:func:`_count_step`).

    Not the parameter's state dtype: a float32 counter (that of float32 and bfloat16
    parameters until 2026-12-05) stops at 2**24, as 2**24 + 1 rounds back to it; from there
    the compiled step's relative step and ``beta2_t`` froze, and so did the key of its
    stochastic rounding, which then rounds each value the same way every step: a bfloat16
    momentum lost a third of its value (a probe)."""

    def __init__(self) -> None:
        # id(param) -> (its counter tensor, the count it holds once the pending step ran). No
        # reference to the parameter, not even a weak one: torch.utils.swap_tensors (module
        # conversion under torch.__future__.set_swap_module_params_on_conversion) refuses a
        # tensor with a weak reference (a probe: model.to(float64) failed once Flora had
        # stepped). A counter found at a reused id is still right: its device and dtype are
        # checked, and its value is rewritten whenever its count is not the state's. The
        # optimizer drops the entries of parameters no longer in its groups (:meth:`keep`),
        # so a pruned layer's counter goes with it.
        self._d: dict[int, tuple[torch.Tensor, int]] = {}
        # id(a compiled bucket's first param) -> (its k x 1 counters, their rows)
        self._stacks: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        self._d.clear()
        self._stacks.clear()

    def keep(self, ids: set[int]) -> None:
        """Only the counters of the parameters whose ids are given (those in the groups)."""
        self._d = {k: v for k, v in self._d.items() if k in ids}
        self._stacks = {k: v for k, v in self._stacks.items() if k in ids}

    def take(self, params: list[torch.Tensor], n: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The counters of ``params`` (whose ``state["step"]`` is ``n`` before this step),
        each holding ``n``; the core adds one."""
        out = []
        for p in params:
            hit = self._d.get(id(p))
            if hit is not None and hit[0].device == p.device and hit[0].dtype == dtype:
                c = hit[0]
                if hit[1] != n:
                    c.fill_(float(n))
            else:
                c = torch.full((1,), float(n), dtype=dtype, device=p.device)
            self._d[id(p)] = (c, n + 1)
            out.append(c)
        return out

    def take_stacked(self, params: list[torch.Tensor], n: int, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`take` for a compiled bucket: the counters as the rows of one ``k x 1``
        tensor (flora.stacks), kept while the bucket's members and their counters stay."""
        key = id(params[0])
        hit = self._stacks.get(key)
        entries = [self._d.get(id(p)) for p in params]
        if hit is not None and len(hit[1]) == len(params) and all(
                e is not None and e[0] is v for e, v in zip(entries, hit[1])) and hit[0].dtype == dtype and \
                hit[0].device == params[0].device:
            base, views = hit
            if any(e[1] != n for e in entries):
                base.fill_(float(n))
        else:
            base = torch.full((len(params), 1), float(n), dtype=dtype, device=params[0].device)
            views = list(base.unbind(0))
            self._stacks[key] = (base, views)
        for p, v in zip(params, views):
            self._d[id(p)] = (v, n + 1)
        return base

    def get(self, p: torch.Tensor) -> torch.Tensor | None:
        """``p``'s counter tensor, or None before its first step."""
        hit = self._d.get(id(p))
        return hit[0] if hit is not None else None


# ------------------------------------------------------------------ the prelude


def make_spec(group: dict, state: dict, shape, dtype: torch.dtype, kernel: str | None = None) -> Spec:
    beta1 = group["beta1"]
    momentum = None
    if beta1 is not None:
        momentum = "c" if "exp_avg_c" in state else "m" if "exp_avg" in state else None
    eps1, eps2 = group["eps"]
    factor = af.factor_move(shape, group["factor_dims"])
    return Spec(
        shape=tuple(shape), half=dtype in HALF, momentum=momentum, form=group["momentum_form"],
        dim=int(state["proj_dim"]) if momentum == "c" else -1, isometric=group["projection"] != "gaussian",
        beta1=None if beta1 is None else float(beta1), eps1=float(eps1), eps2=float(eps2),
        clip_threshold=float(group["clip_threshold"]), decay_rate=float(group["decay_rate"]),
        weight_decay=float(group["weight_decay"]), scale_parameter=bool(group["scale_parameter"]),
        relative_step=bool(group["relative_step"]), warmup_init=bool(group["warmup_init"]),
        kernel=kernel if len(shape) == 2 and factor is None else None, factor=factor,
        complement_weight=None if group["complement_weight"] is None else float(group["complement_weight"]),
    )


def prepare(params: list[torch.Tensor], states: list[dict], group: dict, indices: list[int], *, grouped: bool,
            projections: ProjectionSource, device_steps: DeviceSteps, skips: torch.Tensor, lr=None,
            compiled: bool = False, kernel: str | None = None, stacks: StateStacks | None = None) -> Work:
    """The eager prelude of one step of ``params`` (a bucket on the grouped path, one
    parameter otherwise): their counters advance on the host, the projection this
    step uses is fetched (or drawn), and every ``kappa`` steps the next one is drawn and
    the compressed momentum carried over to it (``M <- A_new A_old^T M``); nothing else
    changes. Returns the :class:`Work` for the core.

    ``stacks``: a compiled bucket's state and counters are handed over as stacks (see
    flora.stacks) rather than lists, for a bucket of several parameters of at least one
    dim."""
    s0 = states[0]
    n = s0["step"]
    stacks = stacks if grouped and len(params) > 1 and params[0].dim() > 0 else None
    if stacks is None:
        steps = device_steps.take(params, n, af.scalar_dtype(params[0].device))
    else:
        steps = device_steps.take_stacked(params, n, af.scalar_dtype(params[0].device))
    rows = (lambda key: [st[key] for st in states]) if stacks is None else (lambda key: stacks.stacked(states, key))
    t = n + 1
    for st in states:
        st["step"] = t
    spec = make_spec(group, s0, params[0].shape, params[0].dtype, kernel)
    a = None
    moms = None
    sdt = state_dtype(params[0].dtype)
    if spec.momentum is not None:
        key = "exp_avg_c" if spec.momentum == "c" else "exp_avg"
        want = momentum_storage(group, params[0].dtype)
        if any(st[key].dtype != want for st in states):  # a checkpoint's, or the option edited
            store_momentum_as(states, want)
        if want == torch.bfloat16:
            noise_table(params[0].device)  # its stochastic rounding's table, made here, outside any graph
        moms = rows(key)  # as stored: a narrower momentum_dtype is widened by the core
    if spec.momentum == "c":
        dim = spec.dim
        size = matrix_shape(spec.shape)[dim]
        cs = moms
        c0 = _first(cs)
        a = projections(group, indices, s0["proj_count"], size, c0.device, sdt, stacked=grouped)
        if s0["proj_age"] >= group["kappa"]:
            for st in states:
                st["proj_count"] += 1
                st["proj_age"] = 0
            a_new = projections(group, indices, s0["proj_count"], size, c0.device, sdt, stacked=grouped)
            # in the state dtype; a narrower momentum is rounded after the transfer too
            if grouped:
                c_st = _stack(cs)
                _write_back(cs, _stored(transfer(_wide(c_st, sdt), a, a_new, dim), c_st, t, AFTER_TRANSFER))
            else:
                c0.copy_(_stored(transfer(_wide(c0, sdt), a, a_new, dim), c0, t, AFTER_TRANSFER))
            a = a_new
        for st in states:
            st["proj_age"] += 1
    if len(spec.shape) >= 2:
        sq = (rows("exp_avg_sq_row"), rows("exp_avg_sq_col"))
    else:
        sq = (rows("exp_avg_sq"),)
    params, grads = list(params), [p.grad for p in params]
    owner = params[0]
    if any(g.dtype != p.dtype for p, g in zip(params, grads)):
        # p.grad_dtype: dynamo refuses a graph input whose .grad has another dtype; an alias
        # without .grad is written in place all the same
        params = [p.detach() for p in params]
    if spec.shape == ():
        # 0-dim parameters step as 1-element views (the same arithmetic): a 0-dim float64
        # CPU tensor is no safe input of a compiled graph (see DeviceSteps), and neither
        # Flora(compile=...) nor torch.compile(opt.step) must be handed one.
        params, grads, sq = _as_vectors(params), _as_vectors(grads), (_as_vectors(sq[0]),)
        moms = None if moms is None else _as_vectors(moms)
        spec = spec._replace(shape=(1,))
    return Work(grouped, spec, params, grads, steps, sq, moms,
                a, group["lr"] if lr is None else lr, skips, t, compiled, owner)


def _wide(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A first moment as the arithmetic takes it: in the state dtype ``dtype`` (a copy
    when ``momentum_dtype`` stores it narrower, else the tensor itself)."""
    return stored if stored.dtype == dtype else stored.to(dtype)


def _stored(x: torch.Tensor, like: torch.Tensor, t, salt: int = AFTER_STEP) -> torch.Tensor:
    """``x`` (a first moment in the state dtype) as ``like`` stores it: bfloat16 rounded
    stochastically (``flora.rounding``, keyed by the step count ``t``), else ``x``."""
    return x if x.dtype == like.dtype else to_stored(x, like.dtype, t, salt)


def _store_into(stored: torch.Tensor, x: torch.Tensor, t, salt: int = AFTER_STEP) -> None:
    """``stored.copy_(_stored(x, stored, t))``, a bfloat16 one written into directly."""
    if stored.dtype == torch.bfloat16 and x.dtype == torch.float32:
        stochastic_bfloat16(x, t, salt, out=stored)
    else:
        stored.copy_(_stored(x, stored, t, salt))


def _as_vectors(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.view(1) for x in ts]


def run(work: Work, t: int | None) -> None:
    """The core of ``work``; ``t``: the host's step count (eager), or None to derive the
    step-dependent scalars from the counter tensors (what a compiled core does)."""
    fn = grouped_core if work.grouped else single_core
    fn(work.spec, work.params, work.grads, work.steps, work.sq, work.moms, work.a, work.lr, work.skips, t)


# ------------------------------------------------------------------ scalars of a step


def _scalars(spec: Spec, t, device) -> tuple[Any, Any]:
    """``(beta2_t, 1 - beta1^t)``: Python floats from the host's count, or tensors from
    the counter ``t`` in its dtype (``scalar_dtype``: float64, as the host's; float32 where
    the device has none). ``device`` is unused."""
    bias = None
    if spec.beta1 is not None:
        bias = af.bias_correction(spec.beta1, t)
    return af.second_moment_decay(t, spec.decay_rate), bias


def _advance(steps) -> None:
    """Add one to the device counters (a list, or a compiled bucket's k x 1 stack)."""
    if isinstance(steps, torch.Tensor) or len(steps) == 1:
        (steps if isinstance(steps, torch.Tensor) else steps[0]).add_(1)
    else:
        torch._foreach_add_(steps, 1)


def _count_step(t, steps, *, advance: bool = True):
    """Advance the device counters (unless ``advance`` is False: the caller's next stage
    does); returns the count the scalars are computed from: the host's ``t`` when given,
    else the count this step reaches, from the counter (0-dim, in the scalar dtype)."""
    if advance:
        _advance(steps)
    if t is not None:
        return t
    count = steps[0].reshape(()).to(af.scalar_dtype(steps[0].device))
    return count if advance else count + 1


# ------------------------------------------------------------------ the cores


def _norm(update: torch.Tensor) -> torch.Tensor:
    """The update's 2-norm, summed in row-major order as HF Adafactor's contiguous update
    is: an update in a gradient's other layout (transposed, channels_last) is copied first,
    or the clipping RMS differs in the last bits (found by a differential fuzz)."""
    return (update if update.is_contiguous() else update.contiguous()).norm(2)


def _normalize(spec: Spec, grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor, beta2t, *, stacked: bool):
    """Adafactor's factored normalisation and the update's 2-norm (one per parameter of a
    ``stacked`` bucket): ``flora.kernels`` under ``spec.kernel`` where they run on ``grad``
    (2-D float32 CUDA, contiguous), else the eager operations, on the view of ``grad`` with
    the factored dims last (``spec.factor``); the update comes back in ``grad``'s dim order (and, eagerly, its
    memory layout: the buffer it is written into follows the view's strides)."""
    fused = spec.momentum == "c"
    if spec.kernel is not None and fk.supported(grad):
        # where the kernels do not run (no Triton or CUDA, another dtype, a gradient in another
        # layout), the eager operations below, not the kernels' reference: its norm sums in
        # the gradient's memory order, not row-major, and differed in the last bits (probe Z16)
        return fk.factored_normalize(grad, row, col, beta2t, spec.eps1, fused=fused)
    lead = 1 if stacked else 0
    view = af.to_factored(grad, spec.factor, lead)
    update, new_row, new_col = af.factored_normalize(view, row, col, beta2t, spec.eps1, fused=fused)
    update = af.from_factored(update, spec.factor, lead)
    if not stacked:
        return update, new_row, new_col, _norm(update)
    return update, new_row, new_col, torch.linalg.vector_norm(update.reshape(grad.shape[0], -1), dim=1)



_lr_in = af.lr_in


def single_core(spec: Spec, params, grads, steps, sq, moms, a, lr, skips, t: int | None = None) -> None:
    """One Flora step of parameter ``params[0]`` (gradient ``grads[0]``), its state given
    as tensors; see :class:`Work`."""
    lr = _lr_in(lr)
    p = params[0]
    grad = grads[0]
    if grad.dtype in HALF:
        grad = grad.float()
    p32 = p.float() if spec.half else p
    t = _count_step(t, steps)
    if p.numel() == 0:  # nothing to update (its statistics would be means of nothing: NaN, a false skip)
        return
    eps1, eps2 = spec.eps1, spec.eps2
    beta1 = spec.beta1
    lr = af.step_size(lr, t, af.rms(p32) if spec.scale_parameter else None, eps2=eps2,
                      relative_step=spec.relative_step, warmup_init=spec.warmup_init,
                      scale_parameter=spec.scale_parameter)
    beta2t, bias = _scalars(spec, t, grad.device)
    # The second moment is computed out of place and committed only if the step is
    # finite (ok, decided on the device): a bad gradient leaves no trace. The update's
    # norm, which the clip needs anyway, is NaN or inf whenever an entry is.
    if len(spec.shape) >= 2:
        row, col = sq[0][0], sq[1][0]
        update, new_row, new_col, norm = _normalize(spec, grad, row, col, beta2t, stacked=False)
        ok = torch.isfinite(norm) & torch.isfinite(new_row).all() & torch.isfinite(new_col).all()
        row.copy_(torch.where(ok, new_row, row))
        col.copy_(torch.where(ok, new_col, col))
    else:
        sq_avg = sq[0][0]
        update, new_sq = af.unfactored_normalize(grad, sq_avg, beta2t, eps1)
        norm = _norm(update)
        ok = torch.isfinite(norm) & torch.isfinite(new_sq).all()
        sq_avg.copy_(torch.where(ok, new_sq, sq_avg))
    bad = ok.logical_not()
    update.masked_fill_(bad, 0.0)  # leaves a finite update's bits as they are
    norm = torch.where(ok, norm, 0.0)  # the norm of the masked update
    skips.add_(bad.sum())
    sign = None
    if spec.momentum == "c":
        c = _wide(moms[0], update.dtype)
        c_before = c.clone()  # r x d: small
        update = compressed_step_(spec.form, c, update, a, spec.dim, beta1, lr, spec.clip_threshold,
                                  u_norm=norm, isometric=spec.isometric, bias_correction=bias, ok=ok,
                                  complement_weight=spec.complement_weight)  # clips, scales by lr; 0 where not ok
        moms[0].copy_(_stored(torch.where(ok, c, c_before), moms[0], t))
    else:
        af.clip_by_rms_(update, spec.clip_threshold, norm=norm)
        update.mul_(lr)
        if spec.momentum == "m":
            m = _wide(moms[0], update.dtype)
            # beta1 where ok, 1 (no decay) where not; the masked update then adds nothing.
            dense_momentum_(m, update, torch.where(ok, torch.full((), beta1, dtype=m.dtype, device=m.device), 1.0),
                            alpha=1 - beta1)
            if m is not moms[0]:  # a large one rounded in pieces straight into it (flora.rounding.CHUNK)
                _store_into(moms[0], m, t)
            # p -= m where ok, without an n x m temporary: m * (-1) is exact, so this is
            # p.sub_(m) bit for bit.
            update = None
            sign = torch.where(ok, -1.0, 0.0)

    if spec.weight_decay != 0:
        af.weight_decay_(p32, ok, lr, spec.weight_decay)
    if update is None:
        p32.addcmul_(m, sign)
    else:
        p32.sub_(update)  # == add_(-update) bit for bit, without the negated copy
    if p32 is not p:
        p.copy_(p32)


def _param_rms(spec: Spec, p32: list, pnorms: list | None) -> torch.Tensor | None:
    """The parameters' RMS, a k-vector, when ``spec.scale_parameter`` (else None), from
    ``pnorms`` (their 2-norms) when given."""
    if not spec.scale_parameter:
        return None
    if pnorms is not None:
        norms = pnorms
    elif isinstance(p32, torch.Tensor):  # a stack (stacked_io)
        return torch.linalg.vector_norm(p32.reshape(p32.shape[0], -1), dim=1).div_(math.sqrt(math.prod(spec.shape)))
    elif torch.compiler.is_compiling():  # reductions of the graph, not a _foreach_norm call of their own
        norms = [torch.linalg.vector_norm(p) for p in p32]
    else:
        norms = torch._foreach_norm(p32)
    return torch.stack(norms).div_(math.sqrt(math.prod(spec.shape)))


def param_norms(plan: list) -> list:
    """For each item of a step's ``plan``: the 2-norms of its parameters (0-dim tensors in
    the state dtype) where it is a compiled bucket that scales its step by them
    (``scale_parameter``), else None. One ``_foreach_norm`` per device and state dtype
    serves the whole step: inside a graph each norm is a reduction loop of its own, 30 a
    bucket, and inductor generates and compiles each (16 s of SmolLM2's 73 s cold
    compile, docs/compile.md); eager, they cost one operation a step. The parameters do
    not change before their own bucket steps, so the norms are those the step would
    compute."""
    out: list = [None] * len(plan)
    by_kind: dict = {}
    for i, w in enumerate(plan):
        if w.compiled and w.grouped and w.spec.scale_parameter:
            p = w.params[0]
            by_kind.setdefault((p.device, state_dtype(p.dtype)), []).append(i)
    for (_, dtype), items in by_kind.items():
        norms = torch._foreach_norm([p for i in items for p in plan[i].params], 2, dtype=dtype)
        at = 0
        for i in items:
            k = len(plan[i].params)
            out[i], at = norms[at:at + k], at + k
    return out


def _all_finite(norm: torch.Tensor, *stats: torch.Tensor) -> torch.Tensor:
    """Per matrix of a bucket (``norm``: a k-vector), whether its update's norm and its new
    statistics (``k x ...``) are all finite, in few operations (each a kernel launch on a
    GPU): a statistic's entries are never negative, so their sum is finite exactly when
    each is, and a float64 sum of float32 values does not overflow. Float64 statistics
    (float64 parameters) are checked entry by entry, as the single-tensor step does: their
    finite entries can sum past float64's range (a probe: gradients of 2.5e153 skipped)."""
    if norm.device.type == "mps" or norm.dtype == torch.float64 or any(st.dtype == torch.float64 for st in stats):
        # mps: no float64 there
        ok = torch.isfinite(norm)
        for st in stats:
            ok = ok & torch.isfinite(st).reshape(len(norm), -1).all(1)
        return ok
    total = stats[0].reshape(len(norm), -1).sum(1, dtype=torch.float64)
    for st in stats[1:]:
        total.add_(st.reshape(len(norm), -1).sum(1, dtype=torch.float64))
    return torch.isfinite(total.add_(norm))


def _commit(targets, new: torch.Tensor, old: torch.Tensor, ok_b: torch.Tensor) -> None:
    """Write a stacked state back to the bucket's own tensors (a list, or a stack), where
    the step was finite."""
    _write_back(targets, torch.where(ok_b, new, old))


def grouped_core(spec: Spec, params, grads, steps, sq, moms, a, lr, skips, t: int | None = None,
                 pnorms: list | None = None) -> None:
    """One Flora step of ``params`` (gradients ``grads``), which share shape, dtypes,
    device, options, state layout and counters: the single-tensor step on stacks.
    ``pnorms``: the parameters' 2-norms, when the caller has them (:func:`param_norms`).
    ``params`` and ``grads`` are lists (the parameters updated in place), or
    (:func:`stacked_io`) k x shape stacks in the state dtype: then the new parameters'
    stack is returned, first of three tensors (see the end)."""
    lr = _lr_in(lr)
    k = len(params)
    shape = spec.shape
    numel = math.prod(shape)
    stack_io = isinstance(params, torch.Tensor)
    g = grads if stack_io else torch.stack(grads)
    if g.dtype in HALF:
        g = g.float()
    p32 = [p.float() for p in params] if spec.half and not stack_io else params
    t = _count_step(t, steps)
    if numel == 0:  # nothing to update (its statistics would be means of nothing: NaN, a false skip)
        return
    eps1, eps2 = spec.eps1, spec.eps2
    beta1 = spec.beta1
    prms = _param_rms(spec, p32, pnorms)
    lr = af.step_size(lr, t, prms, eps2=eps2, relative_step=spec.relative_step, warmup_init=spec.warmup_init,
                      scale_parameter=spec.scale_parameter)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(g.device)
        # one per parameter, or one for all (a 0-dim lr scales as the float would)
        lr_b = lr if lr.dim() == 0 else lr.reshape(-1, *([1] * len(shape)))
    else:
        lr_b = lr
    beta2t, bias = _scalars(spec, t, g.device)

    def per_param(x: torch.Tensor) -> torch.Tensor:  # a k-vector shaped to scale the k x shape stack
        return x.reshape(k, *([1] * len(shape)))

    if len(shape) >= 2:
        row, col = _stack(sq[0]), _stack(sq[1])
        update, new_row, new_col, norm = _normalize(spec, g, row, col, beta2t, stacked=True)
        ok = _all_finite(norm, new_row, new_col)
        _commit(sq[0], new_row, row, ok.reshape(k, *([1] * (row.dim() - 1))))
        _commit(sq[1], new_col, col, ok.reshape(k, *([1] * (col.dim() - 1))))
    else:
        sq_avg = _stack(sq[0])
        update, new_sq = af.unfactored_normalize(g, sq_avg, beta2t, eps1)
        norm = torch.linalg.vector_norm(update.reshape(k, -1), dim=1)
        ok = _all_finite(norm, new_sq)
        _commit(sq[0], new_sq, sq_avg, per_param(ok))
    del g
    ok_b = per_param(ok)
    bad = ok.logical_not()
    update.masked_fill_(per_param(bad), 0.0)
    norm = torch.where(ok, norm, 0.0)
    skips.add_(bad.sum())
    if spec.momentum == "c":
        c_st = _stack(moms)
        c = _wide(c_st, update.dtype)
        c_before = c.clone()  # k x r x d: small
        # The k x n x m view of the update is a copy when the update's dims cannot be
        # merged (channels_last and other permuted layouts of 3 or more dims): the step
        # is what compressed_step_ returns, never the tensor it was given.
        update = compressed_step_(spec.form, c, update.reshape(k, *matrix_shape(shape)), a, spec.dim,
                                  beta1, lr, spec.clip_threshold, u_norm=norm,
                                  isometric=spec.isometric, bias_correction=bias, ok=ok,
                                  complement_weight=spec.complement_weight).view(k, *shape)
        _write_back(moms, _stored(torch.where(ok.reshape(k, 1, 1), c, c_before), c_st, t))
    else:
        clip = (norm / math.sqrt(numel) / spec.clip_threshold).clamp_(min=1.0)
        update.div_(per_param(clip)).mul_(lr_b)
        if spec.momentum == "m":
            m_st = _stack(moms)
            m = _wide(m_st, update.dtype)
            dense_momentum_(m, update, per_param(torch.where(ok, torch.full_like(ok, beta1, dtype=m.dtype), 1.0)),
                            alpha=1 - beta1)
            _write_back(moms, _stored(m, m_st, t))
            update = torch.where(ok_b, m, 0.0)
    wd = spec.weight_decay
    if wd != 0:
        decay = torch.where(ok_b, p32 if stack_io else torch.stack(p32), 0.0)
        if isinstance(lr, torch.Tensor):  # p <- p - wd lr p - update, folded into the update
            # out of place: inductor's C++ code generation failed (KeyError 'buf10') on this add
            # into the torch.where output above, for a bucket of 1-D parameters with momentum
            update = update + decay.mul_(lr_b).mul_(wd)
        elif stack_io:
            p32.add_(decay, alpha=-wd * lr)
        else:  # as the single-tensor step (and HF) does it
            torch._foreach_add_(p32, list(decay.unbind(0)), alpha=-wd * lr)
    if stack_io:  # the caller copies the new stack into the parameters
        # Also returned, unused: the new statistics and the widened momentum. As graph
        # outputs they are no candidates for the local buffers of inductor's outer-loop
        # fusion, whose check fails (KeyError 'buf7', torch 2.13) on a buffer computed
        # from a state that the same fused loop then overwrites.
        stats = new_row if len(shape) >= 2 else new_sq
        return p32 - update, stats, (_wide(_stack(moms), update.dtype) if spec.momentum == "m" else None)
    torch._foreach_sub_(p32, list(update.unbind(0)))
    if spec.half:
        torch._foreach_copy_(params, p32)


# ------------------------------------------------------------------ the staged CPU core
#
# Flora(compile=...) on a CPU steps a large bucket of compressed 2-D parameters in three
# compiled stages around an eager copy of the gradients and the decompression matmul, into
# buffers the optimizer keeps (flora.compiled.staged_step), so that:
# - no bucket-sized buffer is allocated per call: inside one graph, inductor writes the
#   stacked gradient, the normalised update and the decompressed momentum to buffers it
#   allocates on every call, and a CPU allocator maps any buffer above 32 MiB afresh each
#   time, its pages faulted in and zeroed at every step (20 ms for 53 MB here, against
#   1.5 ms to write a buffer already mapped);
# - the factors are buffers: where one graph made the statistics and the update, inductor
#   recomputed the factors and the step's scalars for every element of the update (a
#   float64 pow among them), 4x slower than the pass's memory traffic.
# The stages compute what grouped_core does.


def _vec(x):
    """A 0-dim tensor as a 1-element vector (a stage's output that the next stage takes:
    see ``flora.compiled.lr_arg`` for why not 0-dim); anything else as it is."""
    return x.reshape(1) if isinstance(x, torch.Tensor) and x.dim() == 0 else x


def _stacked(spec: Spec, g: torch.Tensor) -> torch.Tensor:
    """The stacked gradients of a staged bucket; a bucket of one is handed its gradient
    itself (no copy), made a stack of one inside the graph."""
    return g.unsqueeze(0) if g.dim() == len(spec.shape) else g


def staged_stats(spec: Spec, steps, sq, ws_g, a) -> tuple:
    """Stage 1: Adafactor's factored statistics of the stacked gradients ``ws_g``
    (float32, copied there eagerly: a stack inside a graph is a new buffer) and ``C(u)``
    but its outer factor. Returns ``(r_factor, c_factor, new_row, new_col, cu)``. The
    factors are outputs so that the next stage reads them as buffers: where one graph
    made them and the update, inductor recomputed them, and the step's scalars
    (``t^-0.8`` in float64), for every element. The counters, the step size and the bias
    correction are stage 2's: here, every value this graph returns besides its closing
    matmul's was written after it, by a kernel of its own (an operation per bucket)."""
    ws_g = _stacked(spec, ws_g)
    t = _count_step(None, steps, advance=False)
    beta2t = af.second_moment_decay(t, spec.decay_rate)
    row, col = _stack(sq[0]), _stack(sq[1])
    # adafactor.factored_normalize(fused=True)'s statistics (staged() takes 2-D parameters
    # factored over both dims only); the column mean as a plain reduction, not the
    # vector-matrix product that needs the squares in memory
    sq_ = torch.addcmul(ws_g.new_full((), spec.eps1), ws_g, ws_g)
    new_row = af.ema(row, sq_.mean(dim=-1), beta2t)
    new_col = af.ema(col, sq_.mean(dim=-2), beta2t)
    r_factor = (new_row / new_row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
    c_factor = new_col.unsqueeze(-2).rsqrt()
    # C(u) from the gradient: u = diag(r) g diag(c), so u a^T = r * (g (c * a)^T) and
    # a u = ((a * r^T) g) * c, a matmul with an r-sized result. The outer factor is applied
    # in stage 2, so that the matmul ends this graph (inductor writes what follows an
    # extern call as a kernel of its own: one more operation per bucket).
    if spec.dim == 0:
        cu = torch.bmm(a * r_factor.mT, ws_g)
    else:
        cu = torch.bmm(ws_g, (a * c_factor).mT)
    return r_factor, c_factor, new_row, new_col, cu


def _normalized(spec: Spec, ws_g, r_factor, c_factor) -> torch.Tensor:
    """The normalised update ``r_factor * c_factor * g`` of a staged bucket (not masked: a
    skipped parameter's may not be finite). Computed where it is read, in stage 2 for its
    norms and in stage 3 for the update: a pass over the gradients each time, which costs
    less than writing it into a buffer in stage 2 and reading that in stage 3."""
    return r_factor * c_factor * _stacked(spec, ws_g)


def staged_normalize(spec: Spec, sq, skips, ws_g, r_factor, c_factor, new_row, new_col) -> tuple:
    """Stage 2, first half: the norms of the normalised update (:func:`_normalized`), in
    one read of ``ws_g``; the finite check and the statistics' commit. Returns ``(norm,
    ok)``, the update's norms (0 where skipped) and the finite check."""
    update = _normalized(spec, ws_g, r_factor, c_factor)
    k = update.shape[0]
    norm = update.reshape(k, -1).square().sum(1).sqrt()
    ok = torch.isfinite(norm) & torch.isfinite(new_row).reshape(k, -1).all(1) & \
        torch.isfinite(new_col).reshape(k, -1).all(1)
    row, col = _stack(sq[0]), _stack(sq[1])
    _commit(sq[0], new_row, row, ok.reshape(k, *([1] * (row.dim() - 1))))
    _commit(sq[1], new_col, col, ok.reshape(k, *([1] * (col.dim() - 1))))
    skips.add_(ok.logical_not().sum())
    return torch.where(ok, norm, 0.0), ok


def staged_update(spec: Spec, params, steps, lr, sq, skips, ws_g, r_factor, c_factor, new_row, new_col,
                  moms, cu, a, pnorms=None) -> tuple:
    """Stage 2: the counters, the step size (from the parameters' RMS; ``pnorms``: their
    norms, computed before) and :func:`staged_normalize` and :func:`staged_momentum` in
    one graph, ``cu`` being ``C(u)`` but its outer factor (see :func:`staged_stats`).
    Returns ``(x, coef, ok, lr)``."""
    lr = _lr_in(lr)
    p32 = [p.float() for p in params] if spec.half else params
    t = _count_step(None, steps)
    prms = _param_rms(spec, p32, pnorms)
    lr = af.step_size(lr, t, prms, eps2=spec.eps2, relative_step=spec.relative_step,
                      warmup_init=spec.warmup_init, scale_parameter=spec.scale_parameter)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(ws_g.device)
    bias = _scalars(spec, t, ws_g.device)[1]
    norm, ok = staged_normalize(spec, sq, skips, ws_g, r_factor, c_factor, new_row, new_col)
    cu = cu * c_factor if spec.dim == 0 else r_factor * cu  # C(u)'s outer factor (staged_stats)
    x, coef = staged_momentum(spec, moms, cu, a, norm, lr, ok, bias, t)
    return x, coef, ok, _vec(lr)


def staged_momentum(spec: Spec, moms, cu, a, norm, lr, ok, bias, t) -> tuple:
    """Stage 2, second half (r-sized): the compressed momentum's coefficients from ``cu =
    C(u)`` and the first half's outputs; updates and commits the momentum (``t``: the step
    count, the key of a bfloat16 momentum's rounding). Returns ``(x, coef)``: the
    update is ``coef * u + D(x)`` (see ``compressed_apply_(split=True)``)."""
    lr, bias = _lr_in(lr), _lr_in(bias)
    k = len(moms)
    c_st = _stack(moms)
    c = _wide(c_st, cu.dtype)
    c_before = c.clone()
    sdt = af.scalar_dtype(cu.device)
    terms = compressed_terms(c, cu, a, spec.dim, isometric=spec.isometric, dtype=sdt)
    n, m = matrix_shape(spec.shape)
    xa, coef = compressed_apply_(spec.form, c, None, cu, a, spec.dim, spec.beta1, lr, spec.clip_threshold,
                                 u_sq=norm.to(sdt).square(), terms=terms, numel=n * m, isometric=spec.isometric,
                                 bias_correction=bias, ok=ok, split=True,
                                 complement_weight=spec.complement_weight)
    _write_back(moms, _stored(torch.where(ok.reshape(k, 1, 1), c, c_before), c_st, t))
    # a skipped parameter's u (unmasked, recomputed in stage 3) may not be finite: its x and coef are 0
    ok3 = ok.reshape(k, 1, 1)
    return torch.where(ok3, xa, 0.0), (None if coef is None else torch.where(ok, coef, 0.0))


def staged_apply(spec: Spec, params, ws_g, r_factor, c_factor, ws_d, coef, ok, lr) -> None:
    """Stage 3: the parameters' update, ``coef * u + D(x)`` (``u`` from ``ws_g`` and the
    factors, :func:`_normalized`; ``D(x)`` in ``ws_d``), with weight decay as grouped_core
    applies it."""
    lr = _lr_in(lr)
    k = len(params)
    shape = spec.shape
    p32 = [p.float() for p in params] if spec.half else params
    update = ws_d if coef is None else _normalized(spec, ws_g, r_factor, c_factor) * coef.reshape(k, 1, 1) + ws_d
    ok_b = ok.reshape(k, *([1] * len(shape)))
    update = torch.where(ok_b, update.view(k, *shape), 0.0)  # u of a skipped parameter may not be finite
    wd = spec.weight_decay
    if wd != 0:
        decay = torch.where(ok_b, torch.stack(p32), 0.0)
        if isinstance(lr, torch.Tensor):
            lr_b = lr if lr.dim() == 0 else lr.reshape(-1, *([1] * len(shape)))
            update = update + decay * lr_b * wd
        else:
            torch._foreach_add_(p32, list(decay.unbind(0)), alpha=-wd * lr)
    torch._foreach_sub_(p32, list(update.unbind(0)))
    if spec.half:
        torch._foreach_copy_(params, p32)


# A compiled CPU bucket of compressed parameters steps in stages when its stacked gradient
# holds at least this many bytes: glibc's allocator maps buffers above 32 MiB afresh on
# every allocation (smaller ones come back from its heap, cheaply). Below it the one-graph
# core is faster: the stages cost three compiled calls and two eager ones per bucket (on
# the bench's 1.6 M-parameter model, staged everywhere: 1.95x HF Adafactor against 1.43x).
STAGED_MIN_BYTES = 32 << 20


def staged(work: Work) -> bool:
    """Whether a compiled ``work`` steps in stages (flora.compiled.staged_step): a CPU
    bucket of compressed 2-D parameters (factored over both dims) with a matrix
    projection, of at least ``STAGED_MIN_BYTES``."""
    g = work.grads[0]
    return (work.grouped and work.spec.momentum == "c" and work.spec.kernel is None and work.a is not None
            and work.a.is_floating_point() and g.device.type == "cpu"
            and len(work.spec.shape) == 2 and work.spec.factor is None
            and len(work.grads) * g.numel() * torch.finfo(state_dtype(g.dtype)).bits // 8 >= STAGED_MIN_BYTES)


# ------------------------------------------------------------------ buckets

# Flora(compile=...): buckets of at most this many parameters (None: no limit but
# BUCKET_NUMEL's), split in parts of two sizes at most (split_for_graphs), so that a
# shape's buckets share one or two compiled graphs and each graph stays small:
# inductor's compile time grows with the parameters in a graph
# (on this CPU about 10 s for 4 of 576 x 576, 14 s for 16, 36 s for 60), and a graph
# takes every parameter, gradient and state tensor of its bucket as an input. 30 rather
# than 16: 8 compressed buckets on SmolLM2's shapes instead of 15, 43 operations per step
# instead of 79 (issue 18's goal: at most 50), a step 1.92x HF Adafactor's instead of
# 2.23x (with the staged CPU step), compile 74 s instead of 47 s here (docs/compile.md).
COMPILED_BUCKET_MAX: int | None = 30

# A compiled CPU bucket of small vectors (norm weights, biases) steps on stacks: its
# gradients and parameters copied into one buffer by one eager ``_foreach_copy_``, the
# graph reading and updating the stacks, the parameters copied back by one more. A graph
# that reads k tensors and writes k more has a loop for each, which inductor generates and
# compiles: SmolLM2's 61 RMSNorm weights took graphs of 30 and 1 (8-10 s to compile), as
# one stack one graph (4-5 s; docs/compile.md). Two copies of a small vector cost little.
# A stacked bucket holds at most STACKED_IO_BUCKET_NUMEL elements (16 MiB in float32): its
# graph allocates three stacks a step (the new parameters, and see grouped_core's end).
STACKED_IO_MAX_NUMEL = 1 << 16
STACKED_IO_BUCKET_NUMEL = 1 << 22


def stacked_io(p: torch.Tensor) -> bool:
    """Whether a compiled bucket of parameters like ``p`` steps on stacks (see above): a
    CPU vector of 1 to ``STACKED_IO_MAX_NUMEL`` elements whose gradient has its dtype."""
    g = p.grad
    return (p.dim() == 1 and p.device.type == "cpu" and 0 < p.numel() <= STACKED_IO_MAX_NUMEL
            and g is not None and g.dtype == p.dtype)


def split_for_graphs(bucket: list, most: int | None) -> list[list]:
    """``bucket`` in ``ceil(len / most)`` parts of at most two sizes (a compiled graph each),
    holding as few parameters between them as can be: parts of ``most`` and one of the
    rest, or parts whose sizes differ by one, whichever is fewer (61 in parts of 30: 30,
    30 and 1, graphs of 31 parameters, rather than 20, 20 and 21, graphs of 41; inductor's
    compile time grows with the parameters in a graph); a tie goes to the even parts."""
    if most is None or len(bucket) <= most:
        return [bucket]
    parts = -(-len(bucket) // most)
    size, extra = divmod(len(bucket), parts)
    rest = len(bucket) - most * (parts - 1)
    if most + (rest if rest != most else 0) < size + (size + 1 if extra else 0):
        return [bucket[i:i + most] for i in range(0, len(bucket), most)]
    out, i = [], 0
    for j in range(parts):
        n = size + (j < extra)
        out.append(bucket[i:i + n])
        i += n
    return out


def bucket_key(p: torch.Tensor, state: dict) -> tuple:
    """Parameters of one group with equal keys step together in :func:`grouped_core`."""
    momentum = "c" if "exp_avg_c" in state else "m" if "exp_avg" in state else None
    proj = (state["proj_dim"], state["proj_count"], state["proj_age"]) if momentum == "c" else None
    return (tuple(p.shape), p.dtype, p.grad.dtype, p.device, state["step"], momentum, proj)


# Gradient elements stacked at once: bounds the grouped step's temporaries (a stacked
# copy of the gradients and the update, each this many elements) whatever the model.
BUCKET_NUMEL = 1 << 25


def buckets(entries: list[tuple[torch.Tensor, dict, int, dict]], max_numel: int | None = None,
            max_count: int | None = None):
    """Split ``(param, state, index, group)`` entries into lists that
    :func:`grouped_core` can take, none above ``max_numel`` gradient elements (default
    ``BUCKET_NUMEL``; unless a single parameter is) nor ``max_count`` parameters. With
    ``max_count``, the parameters of one key are split in parts of two sizes at most
    (:func:`split_for_graphs`), so that they share as few compiled graphs as can be."""
    max_numel = BUCKET_NUMEL if max_numel is None else max_numel
    by_key: dict[tuple, list] = {}
    for e in entries:
        by_key.setdefault(bucket_key(e[0], e[1]), []).append(e)
    for members in by_key.values():
        stacks = max_count is not None and stacked_io(members[0][0])  # no loop per parameter: no count cap
        per = max(1, min(max_numel, STACKED_IO_BUCKET_NUMEL if stacks else max_numel) // max(1, members[0][0].numel()))
        if max_count is None or stacks:
            for i in range(0, len(members), per):
                yield members[i:i + per]
        else:
            yield from split_for_graphs(members, min(per, max_count))


__all__ = ["single_core", "grouped_core", "param_norms", "staged_stats", "staged_normalize", "staged_update",
           "staged_momentum", "staged_apply", "staged", "STAGED_MIN_BYTES", "prepare", "run", "Spec", "Work",
           "DeviceSteps", "buckets", "bucket_key",
           "BUCKET_NUMEL", "COMPILED_BUCKET_MAX", "split_for_graphs",
           "stacked_io", "STACKED_IO_MAX_NUMEL", "STACKED_IO_BUCKET_NUMEL"]
