"""The Flora optimizer: Adafactor whose first moment is kept in a randomly projected,
low-rank form and moved to a fresh projection every ``kappa`` steps."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from ._validation import check_choice, check_positive_int, check_real, check_seed
from . import adafactor as af
from . import functional as F
from . import sharded
from .sharded import is_dtensor
from .momentum import MOMENTUM_FORMS, SUBSPACE_FORMS
from .compression import PROJ_DIMS, compressed_dim, dense_reason
from .projection import PROJECTIONS, compressed_shape, make_projections, projection_seed, state_dtype

# Options every Flora state_dict has held since the first release: a state without them
# comes from another optimizer.
_CORE_KEYS = ("rank", "kappa", "clip_threshold", "decay_rate", "proj_dim")

# Options that change Flora's algorithm (not only its step size): when a loaded state's
# groups set them otherwise than this optimizer was built with, load_state_dict warns.
# (A different rank is refused: the momentum's shape depends on it.)
ALGORITHM_KEYS = ("momentum_form", "projection", "beta1", "kappa", "seed", "rank", "proj_dim")


# Attributes rebuilt empty after deepcopy, pickle and load_state_dict: never state.
_RUNTIME = ("_proj_cache", "_skips", "_where", "_device_steps", "_lr_tensors")


def _install_prelude() -> None:
    """Mark ``Flora._prelude`` as not traceable by torch.compile (``torch.compiler.disable``),
    once, when the first Flora is built: the eager prelude is then the one graph break of a
    compiled ``opt.step``. (Done here rather than at import: it imports torch._dynamo, about
    a second, which torch's own optimizers also import at their first step.)"""
    if not getattr(Flora._prelude, "_torchdynamo_disable", False):
        Flora._prelude = torch.compiler.disable(Flora._prelude_eager)


def _upgrade_group(group: dict, *, saved: bool = True) -> dict:
    """Map a group of an earlier release to today's options, in place: ``momentum`` (a
    form name) became ``momentum_form``; a ``saved`` state without ``projection`` dates
    from when every projection was Gaussian, and keeps those matrices."""
    old = group.get("momentum")
    if isinstance(old, str) and "momentum_form" not in group:
        group["momentum_form"] = group.pop("momentum")
    if saved:
        group.setdefault("projection", "gaussian")
    return group


def _momentum_dim(shape, group: dict) -> int | None:
    """The projected dimension of a parameter's first moment in ``group``, or None (dense)."""
    return compressed_dim(shape, group["rank"], proj_dim=group["proj_dim"], max_aspect_ratio=group["max_aspect_ratio"])


def _momentum_reason(shape, group: dict) -> str | None:
    if group["beta1"] is None:
        return "beta1=None (no momentum to compress)"
    return dense_reason(shape, group["rank"], proj_dim=group["proj_dim"], max_aspect_ratio=group["max_aspect_ratio"])


# On a CPU, tensors up to this many elements step grouped (Python and dispatch overhead
# dominates them); larger ones step one at a time, which keeps each one's temporaries in
# cache where a stack of them goes to memory on every pass (docs/results.md, issue 10).
CPU_GROUP_NUMEL = 1 << 16


def _grouped(group: dict, p: torch.Tensor, compiled: bool = False) -> bool:
    """Whether ``p`` (and its bucket) steps on the grouped path: ``foreach=True``; or
    None (the default) off the CPU, on the CPU for small tensors, and everywhere when
    the step is compiled."""
    if group["foreach"] is None:
        return compiled or p.device.type != "cpu" or p.numel() <= CPU_GROUP_NUMEL
    return group["foreach"]


def _refuse_deepspeed(p) -> None:
    """DeepSpeed ZeRO hands optimizers flat 1-D partitions of parameters (it marks them
    with ``ds_shape`` / ``ds_id``): no factored second moment or projected momentum can be
    formed on those, and stepping them as vectors would silently be another optimizer."""
    if hasattr(p, "ds_shape") or hasattr(p, "ds_id"):
        shape = getattr(p, "ds_shape", None)
        raise ValueError(
            f"Flora cannot step DeepSpeed ZeRO partitions (a parameter{f' of shape {tuple(shape)}' if shape else ''} "
            f"carries DeepSpeed's ds_shape/ds_id): ZeRO flattens parameters into 1-D pieces, where Adafactor's "
            "row/column factors and Flora's projected momentum do not exist. Shard with PyTorch FSDP2 "
            "(torch.distributed.fsdp.fully_shard, or accelerate's FSDP2 plugin) instead; see docs/distributed.md")


def _validate_group(group: dict) -> None:
    lr, rel = group["lr"], group["relative_step"]
    if isinstance(lr, torch.Tensor):  # a device lr (as torch.optim allows): its value is not read here
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr given as a tensor must hold one floating-point value, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}")
    else:
        check_real("lr", lr, low=0.0, allow_none=True, finite=True)
    if not isinstance(rel, bool):
        raise TypeError(f"relative_step must be True or False, got {rel!r}")
    # lr=0 with relative_step is a step of size 0: torch.distributed.checkpoint's state_dict
    # helpers set every group's lr to 0 to create an optimizer's state with one empty step.
    if lr is not None and rel and not (isinstance(lr, (int, float)) and lr == 0):
        raise ValueError("lr must be None when relative_step=True (the step size is then relative); "
                         "pass relative_step=False to use a fixed lr")
    if lr is None and not rel:
        raise ValueError("lr must be a non-negative number when relative_step=False")
    if group["warmup_init"] and not rel:
        raise ValueError("warmup_init=True requires relative_step=True")
    check_positive_int("rank", group["rank"], allow_none=True)
    check_positive_int("kappa", group["kappa"])
    check_real("beta1", group["beta1"], low=0.0, high=1.0, high_open=True, allow_none=True)
    eps = group["eps"]
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise TypeError(f"eps must be a pair (eps1, eps2) of non-negative numbers, got {eps!r}")
    check_real("eps[0]", eps[0], low=0.0, finite=True)
    check_real("eps[1]", eps[1], low=0.0, finite=True)
    check_real("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
    check_real("decay_rate", group["decay_rate"], high=0.0, high_open=True)
    check_real("weight_decay", group["weight_decay"], low=0.0, finite=True)
    check_seed("seed", group["seed"])
    check_choice("proj_dim", group["proj_dim"], PROJ_DIMS)
    check_choice("momentum_form", group["momentum_form"], MOMENTUM_FORMS)
    check_choice("projection", group["projection"], PROJECTIONS)
    if group["momentum_form"] in SUBSPACE_FORMS and group["projection"] == "gaussian":
        raise ValueError(f"momentum_form={group['momentum_form']!r} needs projection='orthonormal' or "
                         "'coordinates' (its complement u - decompress(compress(u)) is an orthogonal projection "
                         "only for orthonormal rows); got projection='gaussian'")
    check_real("max_aspect_ratio", group["max_aspect_ratio"], low=1.0, allow_none=True)
    for name in ("scale_parameter", "warmup_init", "cache_projections"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{name} must be True or False, got {group[name]!r}")
    if group["foreach"] not in (None, True, False):
        raise TypeError(f"foreach must be None, True or False, got {group['foreach']!r}")


class Flora(Optimizer):
    r"""Adafactor with Flora's compressed, resampled first moment.

    With ``rank=None`` (or ``beta1=None``) this is ``transformers.optimization.Adafactor``
    with the same arguments. With a rank, each parameter of two or more dims whose
    projected dimension exceeds ``rank`` keeps its momentum as an ``r x m`` or ``n x r``
    matrix ``M`` under a random ``r x d`` projection ``A``, regenerated from a seed and
    never stored: by default one with orthonormal rows (``projection="orthonormal"``);
    ``"gaussian"`` gives the paper's N(0, 1/r) entries. Every ``kappa`` steps a new
    projection is drawn and ``M`` is carried over (``M <- M A_old A_new^T``).

    Args:
        params: parameters or parameter groups; every option below can be set per group.
        lr: fixed learning rate; leave None to use Adafactor's relative step.
        rank: rank of the compressed momentum; None keeps it dense (plain Adafactor).
        kappa: steps between resamplings of the projection.
        beta1: momentum coefficient in [0, 1), or None for no first moment (then nothing
            is compressed, whatever ``rank`` says).
        eps, clip_threshold, decay_rate, weight_decay, scale_parameter, relative_step,
        warmup_init: as in ``transformers.optimization.Adafactor``. ``relative_step``
            defaults to ``lr is None``.
        seed: base seed of all projections; a parameter's projection number ``k`` is
            drawn from ``projection_seed(seed, index, k)``, ``index`` being its position
            across the parameter groups.
        proj_dim: dimension projected away: ``"auto"`` (the smaller, less noisy), 0 or 1.
        momentum_form: ``"exact"`` (this step enters uncompressed:
            ``(1 - beta1) u + beta1 D(M_prev)``), ``"paper"`` (the update is ``D(M)``) or
            ``"subspace"`` (momentum inside the projection's subspace, this step's update
            unchanged outside it: ``D(M) + u - D(C(u))``; FRUGAL's form) or ``"scaled"``
            (the same with the outside scaled by ``|M| / ((1 - beta1^t) |C(u)|)``, at most
            1: Fira's idea); those two need orthonormal rows. Named
            so that it never collides with the ``momentum`` key torch's cyclic schedulers
            write; ``momentum=`` of earlier releases is still accepted, with a warning.
        projection: ``"gaussian"`` (N(0, 1/r) entries, unbiased: the paper's),
            ``"orthonormal"`` (QR of the same Gaussian draw, on the CPU) or
            ``"coordinates"`` (r random coordinates of the projected dimension, no
            matmul). See ``flora.projection``.
        max_aspect_ratio: leave tensors with ``max(n, m) / min(n, m)`` above this dense;
            None compresses every shape (embeddings included).
        cache_projections: keep each parameter's current projection on its device until
            the next resample instead of redrawing it every step (the default): drawing
            and, for orthonormal rows, a QR every step cost 9% of a rank-32 step on
            SmolLM2's shapes on a CPU, up to a third on a GPU. It costs
            ``r * min(n, m)`` floats per compressed tensor (at most its momentum's size;
            ``flora.cache_bytes``); False redraws instead. The cache is not part of the
            state and changes no result.
        foreach: True: step parameters of equal shape, dtype, device and counters
            together, stacked, a few batched kernels per bucket
            (``flora.functional.grouped_step``); False: one parameter at a time
            (``single_tensor_step``, the reference: with compression off it follows HF
            Adafactor operation for operation); None (the default): grouped on GPUs and
            other accelerators; on the CPU grouped for tensors of at most
            ``CPU_GROUP_NUMEL`` elements and single-tensor for larger ones, whichever
            was faster there. The two agree to float rounding. Neither path waits on
            the host during ``step()``.
        compile: ``True`` compiles the step's arithmetic with ``torch.compile``
            (inductor; ``fullgraph=True, dynamic=False``), once per shape signature of
            a bucket, as torchao's low-bit optimizers compile their per-parameter step;
            a backend name or callable instead of True picks that backend. Every
            bucket then steps on the grouped path unless ``foreach=False``. The first
            step of each new signature compiles (seconds each); later steps reuse the
            graphs, whatever the step count, the lr (give it as a 0-dim tensor, or a
            float: it is then written into a device tensor), resamples or non-finite
            skips. Results equal the eager step to float rounding. Not saved in
            ``state_dict``. ``torch.compile(opt.step)`` works too, without this: one
            graph break (the eager prelude that draws projections) and one graph.

    Step counters: ``state["step"]`` is a plain integer (checkpoints hold numbers; a
    checkpoint whose counters are tensors, torch's convention, loads too), and a 0-dim
    tensor per parameter on its device mirrors it for compiled steps, as torch's
    capturable optimizers keep theirs (not state: rebuilt from the integer on demand).

    State is float32 whatever the parameter dtype (float64 parameters keep float64
    state). A compressed update is clipped to RMS ``lr * clip_threshold`` after
    decompression, the bound that dense momentum obeys by construction; the
    decompression would otherwise amplify it by about sqrt(d / r).

    A parameter whose gradient holds a NaN or an infinity, or a value whose square
    overflows (so that the second moment or the normalised update is not finite), is not
    updated: its weights and state tensors stay as they were (its step
    counter still advances); the decision is taken on the device, and
    :attr:`nonfinite_skips` counts such skipped parameter updates.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        *,
        rank: int | None = None,
        kappa: int = 1000,
        beta1: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool | None = None,
        warmup_init: bool = False,
        seed: int = 0,
        proj_dim: str | int = "auto",
        momentum_form: str = "scaled",
        projection: str = "orthonormal",
        max_aspect_ratio: float | None = None,
        cache_projections: bool = True,
        foreach: bool | None = None,
        compile: bool | str | Any = False,
        momentum: str | None = None,
    ):
        if momentum is not None:
            warnings.warn("Flora(momentum=...) is renamed momentum_form=...: torch's cyclic schedulers write "
                          "a 'momentum' option of their own", FutureWarning, stacklevel=2)
            momentum_form = momentum
        if relative_step is None:
            relative_step = lr is None
        defaults = dict(
            lr=lr, rank=rank, kappa=kappa, beta1=beta1, eps=tuple(eps) if isinstance(eps, list) else eps,
            clip_threshold=clip_threshold, decay_rate=decay_rate, weight_decay=weight_decay,
            scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
            seed=seed, proj_dim=proj_dim, momentum_form=momentum_form, projection=projection,
            max_aspect_ratio=max_aspect_ratio,
            cache_projections=cache_projections, foreach=foreach,
        )
        _validate_group(defaults)
        if not (compile is True or compile is False or compile is None or isinstance(compile, str)
                or callable(compile)):
            raise TypeError(f"compile must be True, False, a torch.compile backend name or a backend callable, "
                            f"got {compile!r}")
        # the torch.compile backend of the compiled core, or None (eager)
        self._compile = None if compile is False or compile is None else ("inductor" if compile is True else compile)
        _install_prelude()
        super().__init__(params, defaults)
        self._init_runtime()
        self._warn_if_nothing_compressed()

    def _init_runtime(self) -> None:
        # Neither is state: rebuilt empty after deepcopy, pickle and load_state_dict.
        # The projection cache (see cache_projections and _projections): at most one entry
        # per parameter index, so it never holds more than one projection per tensor.
        self._proj_cache = ProjectionCache()
        # device -> int64 count of parameter updates skipped for a non-finite gradient
        self._skips: dict[torch.device, torch.Tensor] = {}
        # (group sizes, id(param) -> (param, group, index)): step_parameter's lookup
        self._where: tuple | None = None
        # the step counters on the device, beside state["step"] (plain integers)
        self._device_steps = F.DeviceSteps()
        # (id(group), device) -> [device lr tensor, its float]: compile=True's float lr
        self._lr_tensors: dict[tuple, list] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_compile", None)
        super().__setstate__(state)
        for group in self.param_groups:  # options added or renamed since it was pickled
            _upgrade_group(group)
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        self._init_runtime()

    def __getstate__(self) -> dict[str, Any]:
        # The projection cache is rebuilt on demand and the skip counter is monitoring.
        return {k: v for k, v in super().__getstate__().items() if k not in _RUNTIME}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets itself, with its own message
            params = list(params)  # a generator can be read once: read it here, for torch and for us
        param_group["params"] = params
        if isinstance(param_group.get("momentum"), str):
            warnings.warn("the parameter-group option 'momentum' is renamed 'momentum_form'", FutureWarning,
                          stacklevel=2)
            _upgrade_group(param_group, saved=False)
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if "lr" in param_group and "relative_step" not in param_group and param_group["lr"] is not None:
            merged["relative_step"] = False
        _validate_group(merged)
        for p in params:
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError("params must be real tensors: Flora does not support complex parameters")
            _refuse_deepspeed(p)
        super().add_param_group({**param_group, "relative_step": merged["relative_step"]})
        self._where = None  # step_parameter's map is rebuilt

    # ------------------------------------------------------------------ reporting

    def plan(self) -> list[dict[str, Any]]:
        """One row per parameter: ``index`` (across groups, keys the projection seeds),
        ``group``, ``shape``, ``compressed`` (bool), ``proj_dim`` and ``momentum_shape`` when
        compressed, else ``reason`` (why its momentum is dense or absent)."""
        rows, index = [], 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                shape = tuple(p.shape)
                reason = _momentum_reason(shape, group)
                row = {"index": index, "group": gi, "shape": shape, "compressed": reason is None}
                if reason is None:
                    dim = sharded.momentum_dim(shape, group) if is_dtensor(p) else _momentum_dim(shape, group)
                    row.update(proj_dim=dim, momentum_shape=compressed_shape(shape, group["rank"], dim))
                else:
                    row["reason"] = reason
                rows.append(row)
                index += 1
        return rows

    def summary(self) -> str:
        """Which tensors keep compressed momentum and why the others do not, as text."""
        rows = self.plan()
        n_c = sum(r["compressed"] for r in rows)
        lines = [f"Flora: {n_c} of {len(rows)} parameter tensors keep compressed momentum"]
        for r in rows:
            what = (f"compressed to {r['momentum_shape'][0]} x {r['momentum_shape'][1]} (proj_dim={r['proj_dim']})"
                    if r["compressed"] else f"dense: {r['reason']}")
            lines.append(f"  [{r['index']}] group {r['group']} {r['shape']}: {what}")
        return "\n".join(lines)

    def _warn_if_nothing_compressed(self) -> None:
        if all(g["rank"] is None for g in self.param_groups):
            return
        rows = [r for r in self.plan() if self.param_groups[r["group"]]["rank"] is not None]
        if not rows or any(r["compressed"] for r in rows):
            return
        reasons: dict[str, int] = {}
        for r in rows:
            reason = r["reason"]
            key = "projected dim <= " + reason.split(" <= ")[1] if reason.startswith("projected dim") else reason
            reasons[key] = reasons.get(key, 0) + 1
        said = "; ".join(f"{k} ({v} tensor{'s' * (v > 1)})" for k, v in reasons.items())
        warnings.warn(f"Flora: a rank is set but no tensor keeps compressed momentum: {said}. "
                      "See Flora.summary(); compression needs beta1 set and a projected dimension above the rank.",
                      UserWarning, stacklevel=3)

    def cache_bytes(self) -> int:
        """Bytes of the projections kept by ``cache_projections=True``: memory on the
        parameters' devices that is not optimizer state (``flora.state_bytes`` does not
        count it, and ``state_dict`` does not hold it). Counts the storage the cache keeps
        alive; at most one projection per parameter."""
        return self._proj_cache.nbytes()

    @property
    def nonfinite_skips(self) -> torch.Tensor:
        """Parameter updates skipped so far because the gradient was not finite (an int64
        tensor; reading its value syncs with the device). Not saved in ``state_dict``."""
        counts = list(self._skips.values())
        if not counts:
            return torch.zeros((), dtype=torch.int64)
        total = counts[0]
        for c in counts[1:]:
            total = total + c.to(total.device)
        return total

    # ------------------------------------------------------------------ stepping

    def _check_grads(self) -> None:
        for group in self.param_groups:
            _validate_group(group)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError("Flora does not support sparse gradients (got one of shape "
                                    f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)")
                if g.is_complex():
                    raise TypeError("Flora does not support complex gradients")
                _refuse_deepspeed(p)
                if is_dtensor(p):
                    sharded.layout(p)  # a placement Flora cannot step is refused here, before any change

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            # The eager prelude: checks, state, buckets, host counters, projections and
            # resamples (and FSDP2's sharded parameters, whole); under torch.compile(opt.step)
            # it is the one graph break. Then the arithmetic, on tensors only.
            plan = self._prelude()
            self._apply(plan)
        return loss

    def _prelude_eager(self) -> list:
        """Everything of a step that reads or writes host values; returns the
        :class:`flora.functional.Work` items whose cores do the arithmetic."""
        # Every check happens before any state changes.
        self._check_grads()
        index = 0
        plan = []
        sharded_entries = []  # DTensor parameters (FSDP2): stepped together, their sums packed
        compiled = self._compile is not None
        for group in self.param_groups:
            entries = []
            for p in group["params"]:
                if p.grad is not None:
                    self._prepare_state(p, group)
                    if is_dtensor(p):
                        sharded_entries.append((p, self.state[p], group, index))
                    else:
                        entries.append((p, self.state[p], index))
                index += 1
            if not entries:
                continue
            for bucket in F.buckets(entries):
                p0 = bucket[0][0]
                if _grouped(group, p0, compiled):
                    plan.append(self._work([e[0] for e in bucket], [e[1] for e in bucket], group,
                                           [e[2] for e in bucket], grouped=True))
                    continue
                for p, state, i in bucket:
                    plan.append(self._work([p], [state], group, [i], grouped=False))
        if sharded_entries:
            sharded.sharded_step(sharded_entries, projections=self._projections, count_skip=self._count_skip)
        return plan

    # Replaced by torch.compiler.disable(_prelude_eager) when the first Flora is built.
    _prelude = _prelude_eager

    def _work(self, params, states, group, indices, *, grouped: bool):
        device = params[0].device
        compiled = self._compile is not None
        return F.prepare(params, states, group, indices, grouped=grouped, projections=self._projections,
                         device_steps=self._device_steps, skips=self._skip_counter(device),
                         lr=self._lr_for(group, device) if compiled else None, compiled=compiled)

    def _lr_for(self, group: dict, device):
        """compile=True: a float lr as a device tensor (one per group and device, written
        when the value changes), so that a scheduler writing floats does not recompile."""
        lr = group["lr"]
        if lr is None or isinstance(lr, torch.Tensor):
            return lr
        key = (id(group), device)
        hit = self._lr_tensors.get(key)
        if hit is None:
            t = torch.full((), float(lr), dtype=af.scalar_dtype(device), device=device)
            hit = self._lr_tensors[key] = [t, float(lr)]
        elif hit[1] != float(lr):
            hit[0].fill_(float(lr))
            hit[1] = float(lr)
        return hit[0]

    def _apply(self, plan: list) -> None:
        """The arithmetic of a step: every item's core, compiled or not."""
        if torch.compiler.is_compiling():  # traced into the caller's graph: counters as tensors
            for work in plan:
                F.run(work, None)
            return
        if any(w.compiled for w in plan):
            from torch._dynamo.utils import disable_cache_limit

            # One graph per shape signature, a fixed number for a model (as torchao's optimizers).
            with disable_cache_limit():
                for work in plan:
                    if work.compiled:
                        F.compiled_core(work.grouped, self._compile)(
                            work.spec, work.params, work.grads, work.steps, work.sq, work.moms, work.a, work.lr,
                            work.skips, None)
                    else:
                        F.run(work, work.t)
            return
        for work in plan:
            F.run(work, work.t)

    def _locate(self, p: torch.Tensor) -> tuple[dict, int] | None:
        """``p``'s group and index, from a map rebuilt only when the groups change."""
        sizes = tuple(len(g["params"]) for g in self.param_groups)
        if self._where is None or self._where[0] != sizes:
            where, index = {}, 0
            for group in self.param_groups:
                for q in group["params"]:
                    where[id(q)] = (q, group, index)
                    index += 1
            self._where = (sizes, where)
        hit = self._where[1].get(id(p))
        if hit is None or hit[0] is not p:
            return None
        return hit[1], hit[2]

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Step one parameter with its current ``.grad``, as ``step()`` would (on the
        grouped path, as a bucket of one).

        For optimizer-in-backward use (fused accumulation): parameters can be stepped one
        by one as their gradients arrive, and the result equals one ``step()``. Finds the
        parameter in constant time."""
        found = self._locate(p)
        if found is None:
            self._where = None  # the groups may have been edited in place: look again
            found = self._locate(p)
        if found is None:
            raise ValueError("step_parameter: the tensor is not a parameter of this optimizer")
        group, index = found
        if p.grad is None:
            return
        if p.grad.is_sparse or p.grad.is_complex():
            self._check_grads()
        if is_dtensor(p):
            raise ValueError("step_parameter: DTensor (FSDP2) parameters step together in step(), which sums "
                             "Adafactor's factors over their shards; fused per-parameter steps are not supported")
        self._prepare_state(p, group)
        # on the grouped path, a bucket of one: the same arithmetic as step()'s buckets
        work = self._work([p], [self.state[p]], group, [index],
                          grouped=_grouped(group, p, self._compile is not None))
        self._apply([work])

    def _prepare_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if is_dtensor(p):
            sharded.init_state(state, p, group)
            return
        grad = p.grad
        if not state:
            self._init_state(state, grad, group)
        if group["beta1"] is not None and "exp_avg" not in state and "exp_avg_c" not in state:
            self._init_momentum(state, grad, group)

    def _init_state(self, state: dict, grad: torch.Tensor, group: dict) -> None:
        shape, dtype = grad.shape, state_dtype(grad.dtype)
        state["step"] = 0
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=dtype, device=grad.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=dtype, device=grad.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=grad.device)

    def _init_momentum(self, state: dict, grad: torch.Tensor, group: dict) -> None:
        dim = _momentum_dim(grad.shape, group)
        dtype = state_dtype(grad.dtype)
        if dim is None:
            state["exp_avg"] = torch.zeros(grad.shape, dtype=dtype, device=grad.device)
        else:
            state["exp_avg_c"] = torch.zeros(
                compressed_shape(grad.shape, group["rank"], dim), dtype=dtype, device=grad.device
            )
            state["proj_dim"] = dim
            state["proj_count"] = 0  # projections drawn so far, minus one
            state["proj_age"] = 0  # steps taken with the current projection

    def _projections(self, group: dict, indices: list[int], count: int, size: int, device, dtype, *,
                     stacked: bool) -> torch.Tensor:
        """Projection number ``count`` of the parameters at ``indices`` (a ``k x r x d``
        stack, or one ``r x d`` matrix), drawn together, or taken from the cache."""
        key = (group["projection"], group["seed"], group["rank"], count, size, dtype, torch.device(device))
        cache = self._proj_cache
        indices = list(indices)
        if not group["cache_projections"]:
            cache.discard(indices)
            seeds = [projection_seed(group["seed"], i, count) for i in indices]
            a = make_projections(group["projection"], seeds, group["rank"], size, device=device, dtype=dtype)
            return a if stacked else a[0]
        if stacked:
            a = cache.stack(indices, key)  # the stack this bucket was drawn as: no copy
            if a is not None:
                return a
        found = [cache.get(i, key) for i in indices]
        missing = [i for i, a in zip(indices, found) if a is None]
        if missing:
            seeds = [projection_seed(group["seed"], i, count) for i in missing]
            drawn = make_projections(group["projection"], seeds, group["rank"], size, device=device, dtype=dtype)
            if len(missing) == len(indices):
                cache.put_stack(indices, key, drawn)
            else:  # a bucket that mixes cached and new projections: the new ones alone
                for i, a in zip(missing, drawn.unbind(0)):
                    cache.put(i, key, a.clone())
            new = iter(drawn.unbind(0))
            found = [next(new) if a is None else a for a in found]
            if len(missing) == len(indices):
                return drawn if stacked else drawn[0]
        if not stacked:
            return found[0]
        # A bucket made of projections cached apart (parameters that step in changing
        # subsets, as experts of a mixture do): stacked for this step only.
        return found[0].unsqueeze(0) if len(found) == 1 else torch.stack(found)

    def _skip_counter(self, device) -> torch.Tensor:
        device = torch.device(device)
        c = self._skips.get(device)
        if c is None:
            c = self._skips[device] = torch.zeros((), dtype=torch.int64, device=device)
        return c

    def _count_skip(self, ok: torch.Tensor) -> None:
        self._skip_counter(ok.device).add_(ok.logical_not().sum())

    # ------------------------------------------------------------ checkpointing

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking that the state comes from a Flora of the same rank and that
        every saved state tensor fits this optimizer's parameters; keeps the saved dtype
        (float32), which torch would otherwise cast to the parameter's. State saved by
        earlier releases (option ``momentum``) loads.

        As in torch, the loaded parameter groups replace this optimizer's options (lr,
        beta1, kappa, ... all come from the checkpoint). A ``UserWarning`` names each
        option of ``ALGORITHM_KEYS`` (momentum_form, projection, beta1, kappa, seed,
        proj_dim) whose loaded value differs from this optimizer's, old and new."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for gi, saved in enumerate(groups):
            missing = [k for k in _CORE_KEYS if k not in saved]
            if missing:
                has = sorted(k for k in saved if k != "params")
                raise ValueError(
                    f"state_dict is not a Flora state: its parameter group {gi} has options {has} and lacks "
                    f"{missing}; it was saved by a different optimizer (such as AdamW). Load it into that "
                    "optimizer, or start Flora from a fresh state"
                )
        groups = [_upgrade_group(dict(g)) for g in groups]
        id_to_param: dict[Any, tuple[torch.Tensor, dict]] = {}
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"state_dict has a parameter group of {len(saved['params'])} parameters where this "
                    f"optimizer has {len(mine['params'])}: it was saved from a different model"
                )
            if saved["rank"] != mine["rank"]:
                raise ValueError(
                    f"state_dict was saved with rank={saved['rank']!r} in parameter group {gi}, but this optimizer "
                    f"has rank={mine['rank']!r}: build Flora with rank={saved['rank']!r} to resume this state"
                )
            _validate_group({**self.defaults, **{k: v for k, v in saved.items() if k != "params"}})
            for pid, p in zip(saved["params"], mine["params"]):
                id_to_param[pid] = (p, saved)
        for pid, s in state_dict["state"].items():
            p, g = id_to_param[pid]
            _check_state_shapes(p, s, g)
        changed = [(gi, k, mine[k], saved[k]) for gi, (saved, mine) in enumerate(zip(groups, self.param_groups))
                   for k in ALGORITHM_KEYS if k in saved and k in mine and saved[k] != mine[k]]
        super().load_state_dict({**state_dict, "param_groups": groups})
        if changed:
            said = "; ".join(f"{k}: {old!r} -> {new!r}" + (f" (group {gi})" if len(groups) > 1 else "")
                             for gi, k, old, new in changed)
            warnings.warn(f"Flora.load_state_dict: the loaded parameter groups change the algorithm this optimizer "
                          f"was built with: {said}. As in torch, the loaded options win; build Flora with the "
                          "checkpoint's options (or set them in param_groups after loading) to silence this",
                          UserWarning, stacklevel=2)
        self._proj_cache.clear()
        self._where = None
        self._device_steps.clear()
        self._lr_tensors.clear()
        for group in self.param_groups:  # options added since the state was saved
            _upgrade_group(group)
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        for pid, s in state_dict["state"].items():
            p, _ = id_to_param[pid]
            for k, v in s.items():
                if k == "step":  # a plain number (ours) or a tensor (torch's convention): the number
                    self.state[p]["step"] = int(v.item()) if isinstance(v, torch.Tensor) else int(v)
                elif isinstance(v, torch.Tensor):
                    self.state[p][k] = v.detach().to(device=p.device, copy=True)


class ProjectionCache:
    """Projections kept between steps: one entry per parameter index, ``index -> (key,
    r x d matrix or r indices)``, the key naming the draw (projection, seed, rank, count,
    size, dtype, device). A new key for an index replaces its entry, so the cache holds at
    most one projection per parameter whatever subset of parameters steps.

    A bucket drawn together is kept as one ``k x r x d`` stack whose slices are its
    members' entries, so that the grouped path gets the same stack back with no copy on
    every step until its next resample. When a member's entry is replaced or dropped, the
    stack is dissolved: the other members keep copies of their own slices, and the
    stack's memory is freed."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._stacks: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}
        self._member: dict[int, tuple[int, ...]] = {}  # index -> the stack it is a slice of

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._stacks.clear()
        self._member.clear()

    def get(self, index: int, key: tuple) -> torch.Tensor | None:
        hit = self._entries.get(index)
        return hit[1] if hit is not None and hit[0] == key else None

    def stack(self, indices, key: tuple) -> torch.Tensor | None:
        hit = self._stacks.get(tuple(indices))
        return hit[1] if hit is not None and hit[0] == key else None

    def _release(self, index: int) -> None:
        """Detach ``index`` from the stack it is a slice of, dissolving that stack."""
        members = self._member.pop(index, None)
        if members is None:
            return
        del self._stacks[members]
        for j in members:
            if j != index:
                del self._member[j]
                k, a = self._entries[j]
                self._entries[j] = (k, a.clone())

    def discard(self, indices) -> None:
        for i in indices:
            self._release(i)
            self._entries.pop(i, None)

    def put(self, index: int, key: tuple, a: torch.Tensor) -> None:
        self._release(index)
        self._entries[index] = (key, a)

    def put_stack(self, indices, key: tuple, stack: torch.Tensor) -> None:
        indices = tuple(indices)
        if self._stacks.pop(indices, None) is not None:  # the same bucket's previous draw: nothing to copy
            for i in indices:
                del self._member[i]
        for i in indices:
            self._release(i)
        for i, a in zip(indices, stack.unbind(0)):
            self._entries[i] = (key, a)
            self._member[i] = indices
        self._stacks[indices] = (key, stack)

    def nbytes(self) -> int:
        """Bytes of the distinct storages the entries keep alive."""
        seen: dict[tuple, int] = {}
        for _, a in self._entries.values():
            s = a.untyped_storage()
            seen[(a.device, s.data_ptr())] = s.nbytes()
        return sum(seen.values())


def _check_state_shapes(p: torch.Tensor, s: dict, group: dict) -> None:
    shape = tuple(p.shape)
    expected = {"exp_avg": shape, "exp_avg_sq": shape}
    if len(shape) >= 2:
        expected["exp_avg_sq_row"] = shape[:-1]
        expected["exp_avg_sq_col"] = shape[:-2] + shape[-1:]
    if "exp_avg_c" in s:
        dim = s.get("proj_dim")
        if dim not in (0, 1) or len(shape) < 2:
            raise ValueError(f"state_dict holds compressed momentum for a parameter of shape {shape} "
                             f"with proj_dim={dim!r}: it was saved from a different model")
        expected["exp_avg_c"] = compressed_shape(shape, group["rank"], dim)
    for k, want in expected.items():
        if k in s and tuple(s[k].shape) != tuple(want):
            raise ValueError(
                f"state_dict entry {k!r} has shape {tuple(s[k].shape)} but this optimizer's parameter of shape "
                f"{shape} needs {tuple(want)}: it was saved from a different model or rank"
            )
