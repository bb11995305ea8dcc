"""The Flora optimizer: Adafactor whose first moment is kept in a randomly projected,
low-rank form and moved to a fresh projection every ``kappa`` steps."""

from __future__ import annotations

import operator
from collections import OrderedDict
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch.optim import Optimizer

from . import _autocast
from . import adafactor as af
from . import compiled as C
from . import kernels
from . import functional as F
from . import sharded
from .sharded import is_dtensor
from . import checkpoint
from .cache import ProjectionCache, cache_projections
from .group_keys import BETAS_HELP, FOREIGN_KEYS, check_foreign_keys, foreign_found
from . import reports
from ._validation import plain_option
from .options import (ALGORITHM_KEYS, CPU_GROUP_NUMEL, STEPPED_DTYPES, check_grads, group_names,  # noqa: F401
                      WARMUP_NEEDS_RELATIVE_STEP,
                      grouped as _grouped, grad_dtype_ok, label, name_in, option_values, validate_named,
                      momentum_dtype_name as _momentum_dtype_name, plain_group,
                      refuse_flat_pieces as _refuse_flat_pieces, refuse_fsdp1_shards as _refuse_fsdp1_shards,
                      refuse_shared_memory as _refuse_shared_memory,
                      upgrade_group as _upgrade_group,
                      validate_group as _validate_group)
from .momentum import WEIGHTED_FORMS
from .projection import state_dtype
from .state import check_factoring, check_momentum_layout, check_not_resized, follow_dtype, free_index, prepare_state
from .stacks import StateStacks
from ._warn import warn

_PARAMS = operator.itemgetter("params")

# The group options a compiled core takes as constants (functional.Spec): each new value
# compiles new graphs (lr is handed to the graph as a tensor instead).
_GRAPH_CONSTANTS = ("beta1", "eps", "clip_threshold", "decay_rate", "weight_decay", "scale_parameter",
                    "warmup_init", "relative_step", "complement_weight", "momentum_form", "projection",
                    "momentum_dtype")
_RECOMPILE_WARN_AFTER = 3  # changes of a group's constants before saying what they cost


_option_values = option_values
# steps (or fused cycles) in a row with every lr 0 before Flora says so (Flora._watch_zero_lrs)
ZERO_LR_STEPS = 10


def _merge_alike(found: list[tuple[dict, list]], defaults: dict) -> list[tuple[dict, list]]:
    """The groups' entries, those of groups whose options are all equal but a fixed lr put
    together, under the first such group: they step as one group would, in shared
    buckets, each entry keeping its own group (its lr; see ``Flora._bucket_lr``). A group
    per parameter (mmengine's, a per-layer lr decay) had stepped in buckets of one, and
    lrs equal for one step (a warmup's 0) merged for that step only (figures:
    docs/results.md, "Parameter groups of equal options" and "... that differ in lr
    alone")."""
    merged: dict = {}
    for group, entries in found:
        if not entries:
            continue
        # a relative step's lr (None, or 0 for a step of size 0) is not a per-parameter factor
        values = [group.get(k) for k in defaults if k != "lr" or group.get("relative_step")]
        key = tuple(id(v) if isinstance(v, torch.Tensor) else v for v in values)
        try:
            hit = merged.get(key)
        except TypeError:  # an unhashable option value: the group steps alone
            key, hit = id(group), None
        if hit is None:
            merged[key] = (group, list(entries))
        else:
            hit[1].extend(entries)
    return list(merged.values())


def _backend_name(backend) -> str:
    """A compile backend as a user wrote it: a name quoted, a callable by its name (not the
    repr of the object, with its address)."""
    if isinstance(backend, str):
        return repr(backend)
    return getattr(backend, "__name__", None) or type(backend).__name__


def _install_prelude() -> None:
    """Mark ``Flora._prelude`` as not traceable by torch.compile (``torch.compiler.disable``),
    once, when the first Flora is built: the eager prelude is then the one graph break of a
    compiled ``opt.step``. (Done here rather than at import: it imports torch._dynamo, about
    a second, which torch's own optimizers also import at their first step.)"""
    if not getattr(Flora._prelude, "_torchdynamo_disable", False):
        Flora._prelude = torch.compiler.disable(Flora._prelude_eager, reason=PRELUDE_BREAK)


# Said by torch.compile(opt.step, fullgraph=True), whose hint had been to remove the disable
PRELUDE_BREAK = ("Flora's eager prelude (checks, step counts, projections drawn by the CPU generator) is the one "
                 "intended graph break of a compiled opt.step: compile it without fullgraph=True, or use "
                 "Flora(..., compile=True), which compiles the per-bucket arithmetic itself")


# The options a live state's layout depends on (factoring, the momentum's shape, its
# projections): an edit of one mid-run is checked against the state at the next step.
_LAYOUT_KEYS = ("factor_dims", "rank", "seed", "projection", "proj_dim", "max_aspect_ratio")


# momentum_form's default, an object of its own: ``momentum=`` (its old name) may override the
# default but not a "floored" the caller wrote (a probe: momentum="exact" silently won over it)
_DEFAULT_FORM = "".join(("floo", "red"))


def check_compile(compile, *, backends: bool = True) -> None:
    """``Flora(compile=...)``: True, False, None, ``"triton"``, a torch.compile backend's
    name or a backend callable; refused here, not at the first step's compile (shared with
    ``flora_state_bytes``, which had taken any value). ``backends=False``: a name is not
    looked up (listing them imports dynamo: seconds, where flora_state_bytes takes a ms)."""
    if not (compile is True or compile is False or compile is None or isinstance(compile, str)
            or callable(compile)):
        raise TypeError(f"compile must be True, False (or None: eager), a torch.compile backend name or "
                        f"a backend callable, got {compile!r}")
    if isinstance(compile, str) and compile != "triton" and backends:
        names = torch.compiler.list_backends(exclude_tags=())
        if compile not in names:
            raise ValueError(f"compile={compile!r} is not a torch.compile backend; allowed: True, False, "
                             f"'triton' or one of {names}")


def _layout_key(group: dict) -> tuple:
    return tuple(group[k] for k in _LAYOUT_KEYS)


def _refuse_group(e: Exception, written: list, group: dict, index: int, lr_ended_warmup: bool) -> None:
    """An option refused in a group the caller wrote options into (``written``, their keys)
    names that group (a probe: "warmup_init=True requires relative_step=True" for a group
    whose own lr had turned its relative step off, the constructor's warmup_init=True being
    the user's only word on it); a group of the constructor's options alone is its
    defaults, said as such."""
    if not written:
        raise e
    why = ""
    if lr_ended_warmup and str(e) == WARMUP_NEEDS_RELATIVE_STEP:
        why = (f"; its own lr={group['lr']!r} turns its relative step off, and warmup_init needs it: leave lr "
               "out of this group, or give it warmup_init=False")
    raise type(e)(f"{e} (in param_groups[{index}], which sets {', '.join(written)}{why})") from None


class Flora(Optimizer):
    """Adafactor with Flora's compressed, resampled first moment (full text below the class)."""

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        *,
        rank: int | None = None,
        kappa: int = 100,
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
        momentum_form: str = _DEFAULT_FORM,
        projection: str = "orthonormal",
        max_aspect_ratio: float | None = None,
        factor_dims: str = "largest",
        complement_weight: float | None = None,
        momentum_dtype: str | torch.dtype | None = "auto",
        cache_projections: bool = True,
        foreach: bool | None = None,
        compile: bool | str | Any = False,
        momentum: str | None = None,
        betas: Any = None,
    ):
        if betas is not None:  # AdamW's habit (a drop-in swap, Trainer's optimizer kwargs)
            raise TypeError(f"Flora has no betas={betas!r}: {BETAS_HELP}")
        if momentum is not None and not isinstance(momentum, str):  # torch SGD's habit: a coefficient
            raise ValueError(f"Flora has no momentum={momentum!r}: the momentum coefficient is beta1 (beta1=0.9; "
                             "None: no first moment); momentum_form names how it is compressed")
        if momentum is not None:
            if momentum_form is not _DEFAULT_FORM and momentum_form != momentum:  # the default: not given
                raise ValueError(f"Flora got momentum={momentum!r} and momentum_form={momentum_form!r}: "
                                 "momentum= is the old name of momentum_form=; give momentum_form= alone")
            warn("Flora(momentum=...) is renamed momentum_form=...: torch's cyclic schedulers write "
                 "a 'momentum' option of their own", FutureWarning)
            momentum_form = momentum
        # given explicitly, it holds for every group; left None, each group's follows its lr
        self._relative_step_given = relative_step is not None
        if relative_step is None:
            relative_step = lr is None
        defaults = dict(
            lr=lr, rank=rank, kappa=kappa, beta1=beta1, eps=tuple(eps) if isinstance(eps, list) else eps,
            clip_threshold=clip_threshold, decay_rate=decay_rate, weight_decay=weight_decay,
            scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
            seed=seed, proj_dim=proj_dim, momentum_form=momentum_form, projection=projection,
            max_aspect_ratio=max_aspect_ratio, factor_dims=factor_dims, complement_weight=complement_weight,
            momentum_dtype=_momentum_dtype_name(momentum_dtype), cache_projections=cache_projections,
            foreach=foreach,
        )
        defaults = {k: plain_option(k, v) for k, v in defaults.items()}  # numpy numbers as Python's (checkpoints)
        # no lr with relative_step=False: each group must give its own (LoRA+'s A and B groups;
        # HF Adafactor takes them, and so does every group's own check below: a probe)
        _validate_group(defaults if lr is not None or relative_step else {**defaults, "lr": 0.0},
                        read_tensors=True)
        check_compile(compile)
        # "triton": eager cores with the Triton kernels of flora.kernels (an explicit opt-in)
        self._kernel = "triton" if compile == "triton" else None
        if self._kernel is not None:
            compile = False
            if not kernels.available():
                warn("Flora(compile='triton'): triton or CUDA is not available here; every parameter "
                     "steps on the eager path", UserWarning)
        # the torch.compile backend of the compiled core, or None (eager)
        self._compile = None if compile is False or compile is None else ("inductor" if compile is True else compile)
        C.say_if_many_backends(self._compile)
        _install_prelude()
        # the groups' memory is checked once for all of them, after torch adds them: group by
        # group, each against every earlier one, was quadratic (thousands of groups: minutes)
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        _refuse_shared_memory([p for g in self.param_groups for p in g["params"]],
                              names={id(p): n for g in self.param_groups for p, n in zip(g["params"], group_names(g))})
        # all groups at once: FSDP1's sharded shares are told apart from vectors by the whole model
        _refuse_fsdp1_shards([p for g in self.param_groups for p in g["params"]])
        self._init_runtime()
        reports.warn_if_nothing_compressed(self)
        reports.warn_if_momentum_grows(self)
        reports.warn_if_many_signatures(self)

    def _init_runtime(self) -> None:
        # Neither is state: rebuilt empty after deepcopy, pickle and load_state_dict.
        # The projection cache (see cache_projections and _projections): at most one entry
        # per parameter index, so it never holds more than one projection per tensor.
        self._proj_cache = ProjectionCache()
        self._warned_sharded_eager = False  # compile set, FSDP2's DTensors stepped eagerly: said once
        self._warned_cuda_eager = False  # compile set, CUDA parameters stepped eagerly (compiled.CUDA_INDUCTOR): said once
        # compile set: id(group) -> [its _GRAPH_CONSTANTS values last step, how often they changed,
        # the names of those that changed]
        self._constants_seen: dict[int, list] = {}
        # (id(group), key): another optimizer's option, said once (at construction, or at the step)
        self._foreign_warned = {(id(g), k) for g in self.param_groups for k in foreign_found(g)}
        # id(group) -> its keys when last checked: a key replaced by another (a count would not
        # change), or a new group that reuses a dropped one's id with other keys, is checked again
        self._group_keys: dict[int, tuple] = {}
        self._warned_recompiles = False
        self._warned_no_grads = False  # a first step with no gradient at all: said once
        self._warned_scheduler_over_none = False  # a torch scheduler over lr=None: said once
        self._zero_lr_steps = 0  # steps (or fused cycles) in a row with every group's lr a number 0 (-1: said)
        self._lists_checked = None  # the ids of the groups and their parameters last found free of repeats
        # device -> int64 count of parameter updates skipped for a non-finite gradient
        self._skips: dict[torch.device, torch.Tensor] = {}
        # (group sizes, id(param) -> (param, group, index)): step_parameter's lookup
        self._where: tuple | None = None
        # the step counters on the device, beside state["step"] (plain integers)
        self._device_steps = F.DeviceSteps()
        # (id(group), device) -> [device lr tensor, its float]: compile=True's float lr
        self._lr_tensors: dict[tuple, list] = {}
        # id(0-dim lr tensor) -> (it, a 1-element view of it): what a compiled core is handed
        self._lr_views: dict[int, tuple] = {}
        # compile=True on a CPU: the staged step's buffers, and id(a bucket's first parameter) ->
        # (its projection, the transpose)
        self._workspace = C.Workspace()
        self._transposed: dict[int, tuple] = {}
        # compile=True: buckets' state kept as views of one stacked tensor (flora.stacks)
        self._stacks = StateStacks()
        self._shapes_checked: dict[int, tuple] = {}  # id(p) -> the (shape, dtype) its state was checked to fit
        self._groups_checked: dict[int, tuple] = {}  # id(group) -> its option values step_parameter last checked
        self._groups_validated: dict[int, tuple] = {}  # id(group) -> its option values step() last validated
        # id(group) -> (id of its params list, _layout_key's tuple) its states were last checked
        # against (_check_options_fit_state); a parameter's own is _stepped_under's
        self._factor_dims_seen: dict[int, tuple] = {}
        # (group index, ids of a device mesh's process groups) whose options were checked equal on every
        # process (sharded.check_options_agree)
        self._options_checked: dict = {}  # (group index, mesh) -> the option values compared across processes
        # id(p) -> the group layout (_layout_key) p last stepped under: a parameter moved into
        # another group (add_param_group, a group replaced) is checked against it
        self._stepped_under: dict[int, tuple] = {}
        self._layout_warned: set[int] = set()  # id(p): a frozen parameter's misfit state, said once (_check_layouts)
        # (the indices of the states, len(self.state) then): a new state's index must be free
        self._taken: tuple[set, int] | None = None
        self._states_seen = 0  # len(self.state) after the last step's prelude

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this with the state and the groups alone: the
        # optimizer keeps how it steps (compile=...). An unpickled one (no attributes yet)
        # pickled before these options existed steps eagerly, as it did.
        for k in ("_compile", "_kernel", "_relative_step_given"):
            state.setdefault(k, getattr(self, k, None if k != "_relative_step_given" else False))
        _install_prelude()  # unpickled in a process that built no Flora: torch.compile(opt.step) needs it
        had = "differentiable" in state.get("defaults", getattr(self, "defaults", {}))
        super().__setstate__(state)
        if not had:  # torch's adds differentiable=False, which every group then took: the state_dict
            self.defaults.pop("differentiable", None)  # after a load or copy had a key the saved one lacks
        _upgrade_group(self.defaults)  # new groups step as this optimizer's did when it was pickled
        for group in self.param_groups:  # options added or renamed since it was pickled
            _upgrade_group(group)
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        lrs: set[int] = set()
        for group in self.param_groups:  # one lr tensor per group, as add_param_group gives (a
            lr = group.get("lr")  # checkpoint of groups sharing one keeps the sharing through pickle)
            if isinstance(lr, torch.Tensor):
                if id(lr) in lrs:
                    group["lr"] = lr.clone()
                lrs.add(id(group["lr"]))
        self._init_runtime()
        self._remember_layouts()  # a copy's edit of seed, projection, ... is checked as the original's

    def __getstate__(self) -> dict[str, Any]:
        # The projection cache is rebuilt on demand and the skip counter is monitoring.
        # How it steps (compile=...) is kept: torch's own state holds groups and state only.
        if hasattr(self, "_stepped_under"):
            self._check_layouts("a copy or pickle of Flora", saving=True)
        out = super().__getstate__()  # torch's: defaults, state and param_groups alone
        # an explicit relative_step holds for groups added later (add_param_group), in a copy too
        out.update(_compile=self._compile, _kernel=self._kernel,
                   _relative_step_given=getattr(self, "_relative_step_given", False))
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        written = [k for k in param_group if k not in ("params", "param_names")]  # for a refusal's message
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses sets itself, with its own message
            params = list(params)  # a generator can be read once: read it here, for torch and for us
        param_group["params"] = params
        if isinstance(param_group.get("momentum"), str):
            if param_group.get("momentum_form", param_group["momentum"]) != param_group["momentum"]:
                raise ValueError(f"a parameter group gives momentum={param_group['momentum']!r} and "
                                 f"momentum_form={param_group['momentum_form']!r}: 'momentum' is "
                                 "the old name of 'momentum_form'; give 'momentum_form' alone")
            warn("the parameter-group option 'momentum' is renamed 'momentum_form'", FutureWarning)
            param_group.setdefault("momentum_form", param_group.pop("momentum"))
        check_foreign_keys(param_group)
        options = sorted(k for k in param_group if k not in ("params", "weight_decay"))
        if not isinstance(params, set) and len(params) == 0 and options:
            # a filter that matched nothing; the Trainer's empty no-decay group (weight_decay only) is routine
            warn(f"a parameter group with no parameters: its options ({', '.join(options)}) apply to none "
                 "(a name filter that matched nothing? named_parameters() lists a tied weight, such as an "
                 "LM head tied to the embedding, once, under the embedding's name)", UserWarning)
        if ("momentum_form" in param_group and "complement_weight" not in param_group
                and param_group["momentum_form"] not in WEIGHTED_FORMS):
            # a weight given to the constructor belongs to its (weighted) form: a group that
            # picks a form without one does not inherit it (one it sets itself is refused)
            param_group["complement_weight"] = None
        if "momentum_dtype" in param_group:  # a torch.dtype is held by name (checkpoints hold plain values)
            param_group["momentum_dtype"] = _momentum_dtype_name(param_group["momentum_dtype"])
        plain_group(param_group)  # numpy numbers as Python's (checkpoints hold plain values)
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        derived = ("lr" in param_group and "relative_step" not in param_group
                   and not getattr(self, "_relative_step_given", False))
        if derived:  # the default is per group: lr is None
            merged["relative_step"] = param_group["lr"] is None
        try:
            _validate_group(merged, read_tensors=True)
        except (ValueError, TypeError) as e:
            _refuse_group(e, written, param_group, len(self.param_groups),
                          derived and merged.get("warmup_init") is True and not merged["relative_step"])
        # torch also takes (name, parameter) pairs (named_parameters()): checked as the tensors
        items = list(params)
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in items]
        given = param_group.get("param_names")
        given = list(given) if isinstance(given, (list, tuple)) and len(given) == len(items) else [None] * len(items)
        item_names = [it[0] if isinstance(it, tuple) and len(it) == 2 else n for it, n in zip(items, given)]
        for p, named in zip(tensors, item_names):
            if isinstance(p, torch.nn.parameter.UninitializedParameter):
                raise ValueError(f"params: {'parameter ' + repr(named) if named else 'a parameter'} is not "
                                 "initialised yet (a lazy module before its first forward pass): run one forward "
                                 "pass (a dry run), then build the optimizer")
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError(f"params must be real tensors: Flora does not support complex parameters (got "
                                f"{'parameter ' + repr(named) if named else 'a parameter'} of dtype {p.dtype}, "
                                f"shape {tuple(p.shape)})")
            _refuse_flat_pieces(p)
        if not isinstance(params, set) and len({id(p) for p in tensors}) != len(tensors):
            # torch only warns ("in future, this will cause an error"); here the step would depend
            # on the path (counted twice per step on the single-tensor path, once when grouped)
            raise ValueError("params: a parameter group lists the same parameter more than once; list each once "
                             "(a tied weight: its tensor once, e.g. from model.parameters(), which deduplicates)")
        if not getattr(self, "_constructing", False):  # at construction: all groups at once, above
            names = {id(q): n for g in self.param_groups for q, n in zip(g["params"], group_names(g))}
            names.update((id(q), n) for q, n in zip(tensors, item_names))
            _refuse_shared_memory(tensors, [q for g in self.param_groups for q in g["params"]], names=names)
        default_lr = self.defaults.get("lr")
        if ("lr" not in param_group and isinstance(default_lr, torch.Tensor)
                and any(g["lr"] is default_lr for g in self.param_groups)):
            # torch gives every group that takes the default its one tensor, which a
            # scheduler then fills in place group by group (the last group's lr wins for
            # all): a later group gets a copy of its own; the first keeps the tensor given
            param_group["lr"] = default_lr.clone()
        elif isinstance(param_group.get("lr"), torch.Tensor):
            holder = next((i for i, g in enumerate(self.param_groups) if g["lr"] is param_group["lr"]), None)
            if holder is not None:
                # one tensor given to two groups: a scheduler writes each group's lr in place,
                # so each write reached both (ReduceLROnPlateau halved it twice a reduction),
                # and a resume (which gives each group its own, __setstate__) then stepped
                # otherwise than the run that never stopped (a probe)
                warn(f"parameter group {len(self.param_groups)}'s lr is the tensor of group {holder}: it "
                     "gets a copy of its own, as every group's lr is written in place by schedulers "
                     "(one shared tensor would take each group's write); give each group its own tensor "
                     "to silence this", UserWarning)
                param_group["lr"] = param_group["lr"].clone()
        super().add_param_group({**param_group, "relative_step": merged["relative_step"]})
        if hasattr(self, "_foreign_warned"):  # said above: not again at the step
            self._foreign_warned.update((id(self.param_groups[-1]), k) for k in foreign_found(param_group))
        self._where = None  # step_parameter's map is rebuilt

    # ------------------------------------------------------------------ reporting

    def plan(self) -> list[dict[str, Any]]:
        return reports.plan(self)

    def summary(self) -> str:
        return reports.summary(self)

    plan.__doc__, summary.__doc__ = reports.plan.__doc__, reports.summary.__doc__

    def cache_bytes(self) -> int:
        """Bytes of the projections kept by ``cache_projections=True``: memory on the
        parameters' devices that is not optimizer state (``flora.state_bytes`` does not
        count it, and ``state_dict`` does not hold it). Counts the storage the cache keeps
        alive; at most one projection per parameter."""
        return self._proj_cache.nbytes()

    def workspace_bytes(self) -> int:
        """Bytes of the buffers ``compile=...`` keeps between steps, beside the state and
        the projection cache: on a CPU, two buffers the size of the largest bucket that
        steps in stages (a compressed bucket over ``functional.STAGED_MIN_BYTES``), and
        those of the small vectors' stacks. 0 when eager. Not saved; rebuilt after a load,
        a deep copy or a pickle."""
        return self._workspace.nbytes()

    @property
    def projection_cache(self) -> ProjectionCache:
        """The projections kept by ``cache_projections=True`` (read it; never state)."""
        return self._proj_cache

    @property
    def nonfinite_skips(self) -> torch.Tensor:
        """Parameter updates skipped so far because the gradient, or the update normalised
        from it, was not finite (the class docstring says when; an int64
        tensor; reading its value syncs with the device). Not saved in ``state_dict``. A
        copy: a value read earlier stays what it was (on one device it had been the live
        counter itself, so ``opt.nonfinite_skips - before`` read 0, and an in-place edit of
        it reset the count: probe Z75)."""
        counts = list(self._skips.values())
        if not counts:
            return torch.zeros((), dtype=torch.int64)
        total = counts[0].clone()
        for c in counts[1:]:
            total = total + c.to(total.device)
        return total

    def _get_lr(self, group: dict, state: dict):
        """What transformers' ``AdafactorSchedule.get_lr`` calls on HF's Adafactor: refused,
        saying what to use. That schedule wrote ``lr=0`` into the groups when it was built;
        with ``relative_step`` the first step refuses it (``refuse_scheduled_zero_lr``), and
        with a numeric lr the step ran at lr 0 and the schedule's first ``step()`` ends
        here (it had ended in an ``AttributeError``: probe Z142)."""
        raise ValueError(
            "transformers' AdafactorSchedule drives HF Adafactor's relative step: it wrote lr=0 into Flora's "
            f"parameter groups when it was built (this group's lr is {group['lr']!r}), so the steps since moved no "
            "weight. With a numeric lr, use any other scheduler (transformers.get_scheduler, or the Trainer's own: "
            "optimizers=(opt, None)); with lr=None, flora.RelativeStepSchedule(opt). Build the optimizer again: "
            "its statistics counted those steps")

    # ------------------------------------------------------------------ stepping

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if torch.compiler.is_compiling():  # the user's torch.compile(opt.step): autocast off in _step
                self._step()
                return loss
            on = _autocast.enabled()
            if on:  # step() called inside autocast: the matmuls would run in its dtype
                with _autocast.disabled(on):
                    self._step()
            else:
                self._step()
        return loss

    def _step(self) -> None:
        # The eager prelude: checks, state, buckets, host counters, projections and
        # resamples (and FSDP2's sharded parameters, whole); under torch.compile(opt.step)
        # it is the one graph break. Then the arithmetic, on tensors only.
        # traced: inside torch.compile(opt.step), whose graph then takes stacked state
        traced = torch.compiler.is_compiling()
        plan = self._prelude(traced)
        if traced:  # autocast off around the graph's arithmetic (the prelude turns it off itself, eagerly):
            _autocast.off_traced(self._apply, plan)  # a break inside the contexts had split it in 11 graphs
        else:
            self._apply(plan)

    def _check_options_fit_state(self) -> None:
        """A group whose layout options (``_LAYOUT_KEYS``: factor_dims, rank, seed,
        projection, proj_dim, max_aspect_ratio) changed since its last step (edited in
        place) must not step a state of another shape or projection: refused, naming the option, before
        any change. Checked only when one changed, so a step costs a dict lookup."""
        for group in self.param_groups:
            key = _layout_key(group)
            seen = self._layout_seen(group)
            if seen != key:
                for p in group["params"]:  # against what it last stepped under (step_parameter's too)
                    self._check_state_fits(p, group, self._stepped_under.get(id(p)) or seen)
                self._factor_dims_seen[id(group)] = (id(group["params"]), key)

    def _layout_seen(self, group: dict) -> tuple | None:
        """The group's layout options at its last step (None: not known). Kept by id(group)
        with its params list's id: a new group dict at a removed one's id (a dict replaced
        after a group was deleted) is not taken for it (a probe: its options were read as
        edits of the dead group's and refused)."""
        hit = self._factor_dims_seen.get(id(group))
        return hit[1] if hit is not None and hit[0] == id(group["params"]) else None

    def _check_group_options(self, group: dict, p: torch.Tensor) -> None:
        """step_parameter's form of step()'s option check: the group's options, validated
        again only when one of them changed since (a tuple built and compared a call), so
        that an option edited into ``param_groups`` between cycles of fused accumulation
        (an lr of NaN, a beta1 of 1.5) is refused before it steps, as ``step()`` refuses it."""
        if self._groups_checked.get(id(group)) != _option_values(group):
            plain_group(group)
            # maximize=True or a numeric momentum edited in: refused as step() refuses them (fused
            # accumulation had stepped on, descending: a probe)
            check_foreign_keys(group, self._foreign_warned)
            try:
                check_grads([{**group, "params": [p]}], self.state, numbered=False)
            except (ValueError, TypeError):  # an option's refusal said again naming the group (on a refusal only)
                validate_named(group, self._group_index(group))
                raise
            # relative_step with lr 0 is refused by what each parameter holds (its state, its
            # gradient): checked at every call then, not once for the group (a probe: the
            # first parameter passing let the others step by 0)
            if not (group["relative_step"] and group["lr"] is not None):
                self._groups_checked[id(group)] = _option_values(group)

    def _check_parameter_options_fit(self, p: torch.Tensor, group: dict) -> tuple:
        """step_parameter's form of :meth:`_check_options_fit_state`: this parameter only, so
        that it never walks the group, against the layout it last stepped under, whichever
        call stepped it (step_parameter had kept a memo of its own, which step() never updated:
        a state made anew after a seed edit was refused, or one made under the edit was
        stepped under the old seed when it was set back, a probe). Returns the layout now."""
        key = _layout_key(group)
        seen = self._stepped_under.get(id(p)) or self._layout_seen(group)
        if seen != key:
            self._check_state_fits(p, group, seen)
        return key

    def _check_layouts(self, caller: str, *, saving: bool) -> None:
        """Every trainable parameter's state against the layout options of its group now
        (seed, projection, rank, ...): an edit since the last step (or a move into another
        group) that a state does not fit is refused here, as the next step would refuse it.
        state_dict(), a copy and a pickle call this (``saving``): the copy checks its next
        step against its (edited) groups, so it had stepped the states under the edit, a
        scrambled momentum (a probe). A frozen parameter moved into a group of other options
        is checked by a step only once it has a gradient again, so it is not refused here
        either (a review: it refused every fused cycle and every checkpoint); a save says,
        once, that a copy would lose what its state was made under. An edit of its group is
        refused, as step() refuses it whatever has a gradient."""
        for group in self.param_groups:
            if any(k not in group for k in _LAYOUT_KEYS):  # pickled before an option existed: filled on load
                continue
            key, seen = _layout_key(group), self._layout_seen(group)
            edited = seen is not None and seen != key  # step() then checks every state of the group
            for p in group["params"]:
                was = self._stepped_under.get(id(p)) or seen
                if was is None or was == key or not self.state.get(p):
                    continue
                try:
                    self._check_state_fits(p, group, was)
                except ValueError as e:
                    if p.requires_grad or edited:
                        raise ValueError(f"{caller}: {e}") from None
                    if saving and id(p) not in self._layout_warned:
                        self._layout_warned.add(id(p))
                        warn(f"{caller}: a frozen parameter's state does not fit its group's options, and a "
                             f"copy or a resumed run would not know it ({e})", UserWarning)

    def check_options(self, names: Mapping[int, str] | None = None) -> None:
        """Every group's options, and every state against them, as ``step()`` checks them
        before any change. Fused accumulation calls this once a cycle, before the cycle's
        first step: stepping parameter by parameter, a refused edit of a group whose
        gradients come late had been found after other groups had stepped (a probe).
        ``names`` (``id(parameter) -> name``, the accumulator's) names a resized parameter
        where the groups hold no ``param_names`` (a probe: by its shape alone before)."""
        for group in self.param_groups:
            plain_group(group)
            check_foreign_keys(group, self._foreign_warned)
        check_grads(self.param_groups, self.state)
        self._watch_zero_lrs()  # once a fused cycle, as step() once a step
        self._refuse_repeats()
        self._check_layouts("step", saving=False)
        for group in self.param_groups:  # resized since its last step: refused here, not mid-backward
            for p in group["params"]:  # (a frozen one is not stepped: emptied to save memory, say)
                state = self.state.get(p)
                if state and p.requires_grad and self._shapes_checked.get(id(p)) != (p.shape, p.dtype):
                    check_not_resized(p, state, group, name=(names or {}).get(id(p)))

    def _refuse_repeats(self) -> None:
        """A parameter in two groups' lists (or twice in one), put there by editing a list in
        place (``add_param_group`` refuses it), is refused by name: the paths had stepped it
        twice, or once with a counter for two (a probe). Checked when a list changes, an item
        swapped in place included (the ids compared, one pass a step)."""
        groups = self.param_groups
        key = tuple((id(g), tuple(map(id, g["params"]))) for g in groups)
        if key == self._lists_checked:
            return
        seen: dict[int, int] = {}
        for gi, group in enumerate(groups):
            for p, name in zip(group["params"], group_names(group)):
                if id(p) in seen:
                    where = (f"in parameter group {seen[id(p)]} and in group {gi}" if seen[id(p)] != gi
                             else f"twice in parameter group {gi}")
                    raise ValueError(f"{label(p, name)} is {where} of this optimizer: it would be stepped twice a "
                                     "step. Keep each parameter in one group, once (add_param_group refuses a "
                                     "repeat; this one was added to a group's list in place)")
                seen[id(p)] = gi
        self._lists_checked = key

    def _check_state_fits(self, p: torch.Tensor, group: dict, seen: tuple | None) -> None:
        """``seen``: the group's layout options at its last step (None: not known)."""
        state = self.state.get(p)
        if state:
            check_factoring(p, state, group["factor_dims"])
            edited = {} if seen is None else {k: (was, group[k]) for k, was in zip(_LAYOUT_KEYS, seen)
                                              if k in ("seed", "projection") and was != group[k]}
            check_momentum_layout(p, state, group, edited)

    def _remember_layouts(self) -> None:
        """The groups' layout options as the state now stands (after a load: the saved ones),
        so that an edit before the next step is checked against them."""
        self._factor_dims_seen = {id(g): (id(g["params"]), _layout_key(g)) for g in self.param_groups}
        # each state's group layout as now (a parameter moved into a group of another seed
        # after a load or a copy is checked as before it: a probe)
        self._stepped_under = {id(p): self._factor_dims_seen[id(g)][1] for g in self.param_groups
                               for p in g["params"] if self.state.get(p)}
        self._taken = None

    def _prelude_eager(self, traced: bool = False) -> list:
        """Everything of a step that reads or writes host values; returns the
        :class:`flora.functional.Work` items whose cores do the arithmetic (``traced``:
        for the caller's compiled graph)."""
        if traced:  # called from inside the user's torch.compile(opt.step), eagerly, in its autocast (the
            with _autocast.disabled():  # projection draws and transfers must not run in a lower dtype)
                return self._prelude_steps(traced)
        return self._prelude_steps(traced)

    def _prelude_steps(self, traced: bool) -> list:
        # Every check happens before any state changes.
        for group in self.param_groups:  # an edit of another library's numbers (numpy's): as Python's
            plain_group(group)
            # another optimizer's option edited in since (a user's betas schedule): said, as at construction
            names = tuple(group)
            keys = self._group_keys.get(id(group)) != names  # a key added or replaced: misspelt?
            if keys or group.get("momentum") is not None or any(k in group for k in FOREIGN_KEYS):
                self._group_keys[id(group)] = names
                check_foreign_keys(group, self._foreign_warned, spelling=keys)
        self._warn_scheduler_over_none()
        check_grads(self.param_groups, self.state, self._groups_validated)
        self._refuse_repeats()
        self._check_options_fit_state()
        sharded.check_options_agree(self.param_groups, self._options_checked, keys=ALGORITHM_KEYS)
        # the rows that left a stack last step get their copies; a state dropped since (fewer
        # states than the last step left, plus those made since by step_parameter: a pop and
        # a new state had cancelled out, a probe), or replaced (a stack made since: the
        # states' members changed), takes its stack with it
        stale = len(self.state) < self._states_seen or self._stacks.made
        self._stacks.settle(self.state if stale else None)
        index = 0
        plan = []
        sharded_entries = []  # DTensor parameters (FSDP2): stepped together, their sums packed
        compiled = self._compile is not None
        found = []  # every group's entries first: a check in _prepare_state precedes any bucket's prepare
        for group in self.param_groups:
            entries = []
            key = self._factor_dims_seen[id(group)][1]  # its layout options, as _check_options_fit_state saw them
            for p in group["params"]:
                if p.grad is not None:
                    pinned = self._prepare_state(p, group, index, key)
                    if is_dtensor(p):
                        sharded_entries.append((p, self.state[p], group, pinned))
                    else:
                        entries.append((p, self.state[p], pinned, group))
                index += 1
            found.append((group, entries))
        if any(entries for _, entries in found) or sharded_entries:  # (fused mode's cycles: check_options)
            self._watch_zero_lrs()
        for group, entries in _merge_alike(found, self.defaults):
            on = C.compiles_on(self._compile, entries[0][0].device)  # eager on CUDA: no cap on buckets
            for bucket in F.buckets(entries, max_count=F.COMPILED_BUCKET_MAX if on else None):
                p0 = bucket[0][0]
                if _grouped(group, p0, compiled):
                    own = [e[3] for e in bucket]
                    plan.append(self._work([e[0] for e in bucket], [e[1] for e in bucket], own[0],
                                           [e[2] for e in bucket], grouped=True, traced=traced,
                                           lr=self._bucket_lr(own, p0)))
                    continue
                for p, state, i, own in bucket:
                    plan.append(self._work([p], [state], own, [i], grouped=False, traced=traced))
        if not plan and not sharded_entries and index and not self.state:
            self._warn_no_grads(index)
        if sharded_entries:
            if compiled:
                self._warn_sharded_eager(3)
            sharded.sharded_step(sharded_entries, projections=self._projections, count_skip=self._count_skip)
        if compiled:
            self._watch_graph_constants()
        if len(self._device_steps) > index:  # a parameter left the groups: its records go too
            self._forget_gone({id(p) for g in self.param_groups for p in g["params"]})
        self._states_seen = len(self.state)
        return plan

    def _warn_no_grads(self, count: int) -> None:
        """A step before any parameter of this optimizer got a gradient updates nothing, as
        torch's optimizers do, but silently it hides a model whose parameters were replaced
        after the optimizer was built (FSDP2's ``fully_shard``: a probe's loss never moved)."""
        if self._warned_no_grads:
            return
        self._warned_no_grads = True
        params = [p for g in self.param_groups for p in g["params"]]
        if params and not any(p.requires_grad for p in params):
            # (a new-user probe: Flora built before peft's get_peft_model, which freezes the
            # base weights and trains new adapter tensors that Flora does not hold)
            warn(f"Flora.step(): all {count} of its parameters are frozen (requires_grad=False), so nothing was "
                 "updated. If the model was wrapped after Flora was built (peft's get_peft_model freezes the base "
                 "weights and trains new adapter tensors), build Flora after wrapping, from the trainable "
                 "parameters: Flora([p for p in model.parameters() if p.requires_grad], ...)")
            return
        warn(f"Flora.step(): none of its {count} parameters has a gradient (.grad is None), and none has "
             "stepped before, so nothing was updated. If the model's parameters were replaced after Flora "
             "was built (fully_shard, FSDP, a module swapped or re-created), build Flora from the new ones; "
             "otherwise call step() after backward()")

    def _forget_gone(self, live: set[int]) -> None:
        """Drop what is kept for parameters that left the groups (``live``: the ids of those in
        them) and kept no state, for groups that are gone, and the cached projections of
        indices no state holds: a notebook or sweep that gives one optimizer new parameters
        again and again grew these without bound (a probe: 932 entries each for 4 live
        parameters after 800 rebuilds; a removed head's projection kept in the cache)."""
        self._device_steps.keep(live)
        kept = live | {id(q) for q in self.state}  # a state kept out of the groups keeps its record
        self._stepped_under = {k: v for k, v in self._stepped_under.items() if k in kept}
        self._shapes_checked = {k: v for k, v in self._shapes_checked.items() if k in kept}
        groups = {id(g) for g in self.param_groups}
        self._factor_dims_seen = {k: v for k, v in self._factor_dims_seen.items() if k in groups}
        self._groups_validated = {k: v for k, v in self._groups_validated.items() if k in groups}
        self._groups_checked = {k: v for k, v in self._groups_checked.items() if k in groups}  # (snapshots hold objects)
        self._constants_seen = {k: v for k, v in self._constants_seen.items() if k in groups}
        indices = {st["index"] for st in self.state.values() if "index" in st}
        self._proj_cache.discard([i for i, _, _ in self._proj_cache.items() if i not in indices])

    def _watch_graph_constants(self) -> None:
        """compile set: a group option the graphs take as a constant (beta1, weight_decay,
        ...) changing step after step (a schedule of it) compiles new graphs every step,
        seconds each and without limit; say so once."""
        for i, group in enumerate(self.param_groups):
            values = tuple(group.get(k) for k in _GRAPH_CONSTANTS)
            seen = self._constants_seen.get(id(group))
            if seen is None:
                self._constants_seen[id(group)] = [values, 0, []]
                continue
            if seen[0] == values:
                continue
            # every option that changed at the counted steps, in order, each once (a probe: the
            # message named only the last step's, one edited once among three one-off edits)
            seen[2] += [k for k, a, b in zip(_GRAPH_CONSTANTS, seen[0], values) if a != b and k not in seen[2]]
            seen[0], seen[1] = values, seen[1] + 1
            if seen[1] >= _RECOMPILE_WARN_AFTER and not self._warned_recompiles:
                self._warned_recompiles = True
                names = ", ".join(seen[2])
                warn(
           f"Flora(compile={_backend_name(self._compile)}): group {i}'s {names} changed at {seen[1]} steps; "
           "the compiled graphs take these options as constants, so each new value compiles new ones "
           "(seconds each, without limit), and a schedule of one (of anything but lr) recompiles at every "
           "step. Change them rarely, or step with compile=False", UserWarning)

    # Replaced by torch.compiler.disable(_prelude_eager) when the first Flora is built.
    _prelude = _prelude_eager

    def _work(self, params, states, group, indices, *, grouped: bool, traced: bool = False, lr=None):
        device = params[0].device
        compiled = C.compiles_on(self._compile, device)
        if self._compile is not None and not compiled and not self._warned_cuda_eager:
            self._warned_cuda_eager = True
            warn(C.CUDA_EAGER_MESSAGE.format(what=f"Flora(compile={self._compile!r})")
                 + "; its CUDA parameters step eagerly (FLORA_COMPILE_CUDA=1 compiles them anyway)",
                 UserWarning)
        if traced and device.type == "cuda" and not C.CUDA_INDUCTOR and not self._warned_cuda_eager:
            self._warned_cuda_eager = True
            warn(C.CUDA_EAGER_MESSAGE.format(what="torch.compile(opt.step)")
                 + "; the eager step (or Flora(compile=True), which steps CUDA eagerly) is the checked one",
                 UserWarning)
        return F.prepare(params, states, group, indices, grouped=grouped, projections=self._projections,
                         device_steps=self._device_steps, skips=self._skip_counter(device),
                         lr=lr if lr is not None else self._lr_for(group, device) if compiled or traced else None,
                         compiled=compiled,
                         kernel=self._kernel, stacks=self._stacks if compiled or (traced and grouped) else None)

    def _bucket_lr(self, groups: list, p0: torch.Tensor):
        """The lr of a bucket whose parameters' groups (``groups``, one per parameter) differ
        in lr alone: None where they are one group or share one lr tensor (the group's own lr
        is used, as before), else one per parameter, also where the values are equal (lrs
        equal for a step, as at a warmup's start, would change the graphs' inputs from one
        step to the next), a vector in the state dtype (a float64 vector would widen the
        float32 update it scales): on a CPU made from the values (reading a CPU tensor lr is
        no sync), on another device stacked from each group's device lr."""
        first = groups[0]
        # relative-step groups merge only at one lr (_merge_alike keys them on it), a None
        if (first.get("relative_step") or all(g is first for g in groups)
                or (isinstance(first["lr"], torch.Tensor) and all(g["lr"] is first["lr"] for g in groups))):
            return None
        device, dtype = p0.device, state_dtype(p0.dtype)
        if device.type == "cpu":
            return torch.tensor([float(g["lr"]) for g in groups], dtype=dtype)
        return torch.stack([lr.to(device=device, dtype=dtype).reshape(())
                            for lr in (self._lr_for(g, device) for g in groups)])

    def _lr_for(self, group: dict, device):
        """compile=True, or a step traced by torch.compile(opt.step): a float lr as a device
        tensor (one per group and device, written when the value changes), so that a
        scheduler writing floats does not recompile, and no graph reads a changing float
        (inductor, torch 2.13, keeps a stale value of a float used twice in a kernel once
        it is dynamic: ``lr / x.clamp(min=lr)`` used the second call's lr from the third on)."""
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
                staged = set()  # the staged buckets' keys in self._transposed
                for work, pnorms in zip(plan, F.param_norms(plan)):
                    if work.compiled and F.staged(work):
                        # the transposed view is kept for the next step while the projection
                        # is (cache_projections): kept otherwise, it would hold one alive
                        kept = self._find(work.owner, "step")[0]["cache_projections"]  # a moved one: looked up
                        if kept:
                            staged.add(id(work.owner))
                        C.staged_step(work, self._compile, None, self._workspace, self._transposed if kept else {},
                                      self._lr_views, pnorms)
                    elif work.compiled and work.grouped and F.stacked_io(work.params[0]):
                        C.stacked_step(work, self._compile, None, self._workspace, self._lr_views, pnorms)
                    elif work.compiled:
                        args = (work.spec, work.params, work.grads, work.steps, work.sq, work.moms, work.a,
                                C.lr_arg(work.lr, self._lr_views), work.skips, None)
                        C.compiled_core(work.grouped, self._compile)(*args, *([pnorms] if work.grouped else []))
                    else:
                        F.run(work, work.t)
            if len(self._transposed) > len(staged):  # buckets whose members changed: drop their projections
                self._transposed = {k: v for k, v in self._transposed.items() if k in staged}
            # every core prepared so far has written its update: the rows that left a stack
            # can be copied now, and the old stacks freed before the next step
            self._stacks.settle()
            return
        for work in plan:
            F.run(work, work.t)

    def _locate(self, p: torch.Tensor) -> tuple[dict, int] | None:
        """``p``'s group and index, from a map rebuilt when the groups change: a group dict
        or its list replaced, a list resized; a hit is checked where it points, so that a
        parameter moved within or between the lists in place is looked up again (before
        2026-12-04 step_parameter, hence fused accumulation, kept stepping such a parameter
        with its old group's options: found by a probe)."""
        groups = self.param_groups
        if self._where is not None:
            # A parameter with a state, in a group whose list is the one the map was made
            # from, is found where the map points without checking the map against every
            # group: its position only seeds a new state's index (this one's is kept in its
            # state), and that check is O(groups) at every call, once per parameter of a
            # fused cycle (a probe: 5.4 s a pass over 3,000 one-parameter groups). A group
            # added or removed, or its own group's list replaced or resized, rebuilds the map
            # (which drops the records of parameters that left: _forget_gone); a parameter
            # taken out of another group's list keeps its records until the next step() or
            # rebuild (they hold it weakly: a review).
            (group_ids, list_ids, lens), where = self._where
            hit = where.get(id(p))
            if hit is not None and len(groups) == len(group_ids):
                gi, j, index = hit
                group = groups[gi]
                params = group["params"]
                if (id(group) == group_ids[gi] and id(params) == list_ids[gi] and len(params) == lens[gi]
                        and params[j] is p and "index" in self.state.get(p, ())):
                    return group, index
        lists = list(map(_PARAMS, groups))
        key = (tuple(map(id, groups)), tuple(map(id, lists)), tuple(map(len, lists)))
        if self._where is None or self._where[0] != key:
            where, index = {}, 0
            for gi, group in enumerate(groups):
                for j, q in enumerate(group["params"]):
                    # no reference to q, not even a weak one (torch.utils.swap_tensors refuses a
                    # tensor that has one): a hit is checked where it points, below
                    where[id(q)] = (gi, j, index)
                    index += 1
            self._where = (key, where)
            if len(self._device_steps) > index:  # a parameter left the groups: its records go too
                self._forget_gone(set(where))
        hit = self._where[1].get(id(p))
        if hit is None:
            return None
        gi, j, index = hit
        group = groups[gi] if gi < len(groups) else None
        if group is None or j >= len(group["params"]) or group["params"][j] is not p:
            return None  # moved since the map was made: _find looks again
        return group, index

    def _find(self, p: torch.Tensor, caller: str) -> tuple[dict, int]:
        found = self._locate(p)
        if found is None:
            self._where = None  # the groups may have been edited in place: look again
            found = self._locate(p)
        if found is None:
            raise ValueError(f"{caller}: the tensor is not a parameter of this optimizer")
        return found

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Step one parameter with its current ``.grad``, as ``step()`` would (on the
        grouped path, as a bucket of one).

        For optimizer-in-backward use (fused accumulation): parameters can be stepped one
        by one as their gradients arrive, and the result equals one ``step()``. Finds the
        parameter in constant time."""
        group, index = self._find(p, "step_parameter")
        if p.grad is None:
            return
        on = _autocast.enabled()
        if on:  # called inside autocast (a backward hook under it): the matmuls would run in its dtype
            with _autocast.disabled(on):
                return self.step_parameter(p)
        if p.grad.is_sparse or p.grad.is_complex():
            check_grads(self.param_groups)
        if not grad_dtype_ok(p, p.grad) or p.dtype not in STEPPED_DTYPES or 0 in p.stride():
            # refused as step() refuses them (or an expanded size 1); the group's check is cached, so not there
            try:
                check_grads([{**group, "params": [p], "param_names": [name_in(group, p)]}], numbered=False)
            except (ValueError, TypeError):  # an option's refusal said naming the group, as step()'s (review Z101)
                validate_named(group, self._group_index(group))
                raise
        _refuse_flat_pieces(p)  # flattened after Flora was built (DeepSpeed, FSDP1): as step() refuses
        if getattr(p, "_fsdp_flattened", False) and p.dim() <= 1:  # one share cannot tell; all of them can
            _refuse_fsdp1_shards([q for g in self.param_groups for q in g["params"]])
        if is_dtensor(p):
            self.step_parameters([p])  # its sums over the shards: two all-reduces
            return
        self._check_group_options(group, p)
        key = self._check_parameter_options_fit(p, group)
        index = self._prepare_state(p, group, index, key)
        # on the grouped path, a bucket of one: the same arithmetic as step()'s buckets
        work = self._work([p], [self.state[p]], group, [index],
                          grouped=_grouped(group, p, self._compile is not None))
        self._apply([work])

    @torch.no_grad()
    def step_parameters(self, params, *, sums: dict | None = None) -> None:
        """Step several parameters with their current ``.grad``, as ``step()`` would: FSDP2
        (DTensor) ones together, with their sums over the shards packed into two
        all-reduces per process group (fused accumulation steps an FSDP2 unit's parameters
        in the hook FSDP2 calls after its reduce-scatter), any other one by
        :meth:`step_parameter`. Every rank of a shard group must step the same parameters.
        ``sums`` (process group -> float64 vector) rides along in the first all-reduce
        and is summed over the shards in place."""
        on = _autocast.enabled()
        if on:  # as in step_parameter
            with _autocast.disabled(on):
                return self.step_parameters(params, sums=sums)
        found = []
        for p in params:
            if not is_dtensor(p):
                self.step_parameter(p)
                continue
            hit = self._find(p, "step_parameters")
            if p.grad is not None:
                found.append((p, *hit))
        if not found:
            return
        try:
            check_grads([{**group, "params": [p]} for p, group, _ in found], numbered=False)  # before any change
        except (ValueError, TypeError):  # an option's refusal said again naming its group
            for group in {id(g): g for _, g, _ in found}.values():
                validate_named(group, self._group_index(group))
            raise
        for _, group, _ in found:  # (options of another library's numbers: as Python's, as step() makes them)
            plain_group(group)
        self._warn_scheduler_over_none()
        keys = [self._check_parameter_options_fit(p, group) for p, group, _ in found]
        sharded.check_options_agree(self.param_groups, self._options_checked, only={id(p) for p, _, _ in found},
                            keys=ALGORITHM_KEYS)
        entries = []
        for (p, group, index), key in zip(found, keys):
            entries.append((p, self.state[p], group, self._prepare_state(p, group, index, key)))
        if self._compile is not None:  # fused accumulation's steps say so too (a probe)
            self._warn_sharded_eager(2)
        sharded.sharded_step(entries, projections=self._projections, count_skip=self._count_skip, sums=sums)

    def _group_index(self, group: dict) -> int | None:
        """``group``'s position in ``param_groups``, for messages."""
        return next((i for i, g in enumerate(self.param_groups) if g is group), None)

    def _warn_scheduler_over_none(self) -> None:
        """Said once: a torch scheduler built over lr=None (it copies lr to initial_lr)
        fails at its next step with a bare TypeError of None and a float (a probe). A
        warning, not a refusal: the key stays after such a scheduler failed or was dropped,
        and flora.RelativeStepSchedule, the way out, drops it (a review)."""
        if self._warned_scheduler_over_none:
            return
        for i, group in enumerate(self.param_groups):
            if "initial_lr" in group and group["initial_lr"] is None and group["lr"] is None:
                self._warned_scheduler_over_none = True
                warn(f"parameter group {i} has lr=None (Adafactor's relative step) and initial_lr=None, which a "
                     "torch lr scheduler built over it leaves: torch's schedulers need a numeric lr and fail at "
                     "their next step. Give Flora one (lr=1e-3, say), or keep lr=None with "
                     "flora.RelativeStepSchedule(opt), which reports the relative step", UserWarning)
                return

    def _watch_zero_lrs(self) -> None:
        """Said once: every group's lr a number 0 at ``ZERO_LR_STEPS`` steps in a row (a
        ``step()`` that steps something, or a fused accumulation cycle: ``check_options``).
        transformers' AdafactorSchedule writes 0 for good (it drives HF Adafactor's relative
        step, which ignores lr); over a numeric lr its ``step()`` is refused (``_get_lr``)
        only while the gradients are there, so a loop that zeroes them first, or fused
        accumulation, trained at lr 0 without a word (a review). A warm-up from 0 has one such
        step; tensor lrs are not read (a sync)."""
        if self._zero_lr_steps < 0:
            return
        if all(type(g["lr"]) in (int, float) and g["lr"] == 0 for g in self.param_groups):
            self._zero_lr_steps += 1
            if self._zero_lr_steps == ZERO_LR_STEPS:
                self._zero_lr_steps = -1
                warn(f"Flora.step(): every parameter group's lr has been 0 for {ZERO_LR_STEPS} steps, so no weight "
                     "moved. transformers' AdafactorSchedule writes lr=0 for good (it drives HF Adafactor's "
                     "relative step, which ignores lr): with a numeric lr use another scheduler "
                     "(transformers.get_scheduler, or the Trainer's own: optimizers=(opt, None)); with lr=None, "
                     "flora.RelativeStepSchedule(opt). If lr 0 is meant, ignore this", UserWarning)
        else:
            self._zero_lr_steps = 0

    def _warn_sharded_eager(self, stacklevel: int) -> None:
        if not self._warned_sharded_eager:
            self._warned_sharded_eager = True
            warnings.warn(f"Flora(compile={self._compile!r}): FSDP2's sharded parameters (DTensors) step on the "
                          "eager sharded path; compile applies to the others", UserWarning, stacklevel=stacklevel + 1)

    def _prepare_state(self, p: torch.Tensor, group: dict, position: int, key: tuple | None = None) -> int:
        """Fill in ``p``'s state; returns the index its projections are seeded with: its
        position among the groups' parameters when its state began, kept as
        ``state["index"]`` (a checkpoint saved before it existed takes the position now),
        so that an edit which moves ``p`` (a parameter put into an earlier group's list)
        does not read its momentum under projections it was not made under."""
        state = self.state[p]
        if key is None:
            key = self._layout_seen(group) or _layout_key(group)
        was = self._stepped_under.get(id(p))
        if state:
            # moved into a group of other options: said first, so that a rank that no longer
            # fits is not taken for a reshape (check_not_resized reads the new group's rank)
            if was is not key and was is not None and was != key:
                self._check_state_fits(p, group, was)
            if self._shapes_checked.get(id(p)) != (p.shape, p.dtype):  # a dict lookup a step, once checked
                check_not_resized(p, state, group)  # before its state or any bucket changes (a new state is no change)
                follow_dtype(state, p)  # a parameter cast since (model.to(torch.float64)): its second moment too
                self._shapes_checked[id(p)] = (p.shape, p.dtype)
        else:  # a new state (after opt.state.pop(p), or another tensor at a freed id): checked at its next step
            self._shapes_checked.pop(id(p), None)
            self._states_seen += 1  # counted, so that a state dropped meanwhile still shows (see _prelude_eager)
        if not state and p.grad.shape != p.shape:  # resized between backward() and its first step
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has a gradient of shape {tuple(p.grad.shape)}: "
                             "it was resized after its gradient was computed (p.data = ..., say). Compute the "
                             "gradient again, or set p.grad = None")
        if was is not key:
            self._stepped_under[id(p)] = key
        prepare_state(state, p, group)
        if "index" not in state:
            state["index"] = self._free_index(position)
        return state["index"]

    def _free_index(self, position: int) -> int:
        """A new state's projection index (:func:`flora.state.free_index`, which plan() reads
        too), taken: a live state holds the position when a parameter was taken out of a
        group's list, or moved, since its state began. The order in which a step makes new
        states does not change them: step() (group order), step_parameter() and fused
        accumulation (backward order) agree (before 2026-12-04, one past the largest: two new
        states swapped their projections between the two, a probe)."""
        taken = self._taken
        if taken is None or taken[1] != len(self.state) - 1:  # a state added or dropped elsewhere: look again
            taken = ({s["index"] for s in self.state.values() if "index" in s}, len(self.state) - 1)
        index = free_index(position, taken[0], self.param_groups)
        taken[0].add(index)
        self._taken = (taken[0], len(self.state))
        return index

    def _projections(self, group: dict, indices: list[int], count: int, size: int, device, dtype, *,
                     stacked: bool) -> torch.Tensor:
        return cache_projections(self._proj_cache, group, indices, count, size, device, dtype, stacked=stacked)

    def _skip_counter(self, device) -> torch.Tensor:
        device = torch.device(device)
        c = self._skips.get(device)
        if c is None:
            c = self._skips[device] = torch.zeros((), dtype=torch.int64, device=device)
        return c

    def _count_skip(self, ok: torch.Tensor) -> None:
        self._skip_counter(ok.device).add_(ok.logical_not().sum())

    # ------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with option values a scheduler wrote since the last step
        in another library's number types (numpy's, from a ``LambdaLR``'s lambda) made
        Python's first: it holds tensors and plain values only (``weights_only=True``).
        Pre-hooks (``register_state_dict_pre_hook``) run first, as torch's contract says, so
        that what they write is made plain and checked too."""
        pre_hooks = self._optimizer_state_dict_pre_hooks
        for hook in list(pre_hooks.values()):
            hook(self)
        for group in self.param_groups:
            plain_group(group)
        held = {id(q) for g in self.param_groups for q in g["params"]}
        stray = [p for p in self.state if id(p) not in held]
        for p in [p for p in stray if not self.state[p]]:  # an empty entry (a lookup made it): nothing lost
            del self.state[p]
        stray = [p for p in stray if p in self.state]
        if stray:  # torch's own state_dict fails on them with a bare KeyError (an id)
            shapes = ", ".join(str(tuple(p.shape)) for p in stray[:3]) + (", ..." if len(stray) > 3 else "")
            raise ValueError(f"state_dict(): {len(stray)} parameter(s) of shape {shapes} have a state but are in no "
                             "param group (taken out of a group's list after they stepped). Drop their state first "
                             "(opt.state.pop(p) for each), or put them back into a group")
        self._check_layouts("state_dict()", saving=True)
        self._optimizer_state_dict_pre_hooks = OrderedDict()  # run above: not twice
        try:
            return super().state_dict()
        finally:
            self._optimizer_state_dict_pre_hooks = pre_hooks

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        checkpoint.load_state_dict(self, state_dict, super().load_state_dict)

    load_state_dict.__doc__ = checkpoint.load_state_dict.__doc__


Flora.__doc__ = r"""Adafactor with Flora's compressed, resampled first moment.

    With ``rank=None`` (or ``beta1=None``) this is ``transformers.optimization.Adafactor``
    with the same arguments (on tensors of 3+ dims, such as conv kernels, with
    ``factor_dims="last"``, HF's factoring): number for number with ``foreach=False``, to
    float rounding on the grouped path, which stacks parameters. With a rank, each parameter of two or more dims whose
    projected dimension exceeds ``rank`` keeps its momentum as an ``r x m`` or ``n x r``
    matrix ``M`` under a random ``r x d`` projection ``A``, regenerated from a seed and
    never stored: by default one with orthonormal rows (``projection="orthonormal"``);
    ``"gaussian"`` gives the paper's N(0, 1/r) entries. Every ``kappa`` steps a new
    projection is drawn and ``M`` is carried over (``M <- M A_old A_new^T``).

    Args:
        params: parameters or parameter groups; every option below can be set per group.
        lr: fixed learning rate; leave None to use Adafactor's relative step.
        rank: rank of the compressed momentum; None keeps it dense (plain Adafactor).
        kappa: steps between resamplings of the projection (100 by default; the paper
            used 1000, which never resamples in a run of fewer steps: on the selection
            suite 100 had the lower worst case for the default form at ranks 8 and 32,
            docs/results.md).
        beta1: momentum coefficient in [0, 1), or None for no first moment (then nothing
            is compressed, whatever ``rank`` says).
        eps, clip_threshold, decay_rate, weight_decay, scale_parameter, relative_step,
        warmup_init: as in ``transformers.optimization.Adafactor``. ``relative_step``
            defaults to ``lr is None``; ``clip_threshold=math.inf`` clips nothing.
        seed: base seed of all projections; a parameter's projection number ``k`` is
            drawn from ``projection_seed(seed, index, k)``, ``index`` being its position
            across the parameter groups when its state began (kept in the state, so that
            a parameter put into an earlier group later does not move it). The same on every
            rank of a distributed run (checked under FSDP2, not under DDP).
        proj_dim: dimension projected away: ``"auto"`` (the smaller, less noisy), 0 or 1;
            ``"sharded"``: the one FSDP2's ``"auto"`` takes (columns, but rows for a
            ``(1, N, d)`` matrix), so that one process loads a sharded run's DCP checkpoint.
        momentum_form: ``"exact"`` (this step enters uncompressed:
            ``(1 - beta1) u + beta1 D(M_prev)``), ``"paper"`` (the update is ``D(M)``) or
            ``"subspace"`` (momentum inside the projection's subspace, this step's update
            unchanged outside it: ``D(M) + u - D(C(u))``; FRUGAL's form) or ``"scaled"``
            (the same with the outside scaled by ``|M| / ((1 - beta1^t) |C(u)|)``, at most
            1: Fira's idea) or ``"adaptive"`` (the outside weighted by its estimated
            signal fraction, within ``[1 - beta1, 1]``) or ``"fixed"`` (the outside weighted
            by the constant ``complement_weight``: ``1 - beta1`` gives ``"exact"``, 1
            ``"subspace"``) or ``"floored"`` (``"scaled"``'s weight never below
            ``complement_weight``: like ``"fixed"`` on noisy training, like ``"scaled"``,
            its weight going to 1, on a noiseless problem; the default since 2026-12-01,
            when it and ``"fixed"`` had the lowest worst case on the selection suite's
            longer runs: docs/results.md); those five need orthonormal rows. Named so that it never
            collides with the ``momentum`` key torch's cyclic schedulers write;
            ``momentum=`` of earlier releases is still accepted, with a warning.
        complement_weight: the ``"floored"`` form's least weight of the outside (the
            ``"fixed"`` form's weight), a number in [0, 1]; None (the default) is
            ``flora.momentum.FIXED_COMPLEMENT_WEIGHT``, 0.4 (it removed ``"scaled"``'s
            deficit on tabular MLPs and tied or beat it on the other tasks; a byte-level
            language model did best with 0.1, ``"exact"``: docs/results.md).
            Any other form with a weight set is a ``ValueError``; a parameter group that
            sets another form (and no weight) does not inherit the constructor's. A
            checkpoint saved without this option loads with None.
        momentum_dtype: what the first moment (compressed or dense) is stored in:
            ``"auto"`` (the default since 2026-12-02: bfloat16 when ``rank`` is set and
            the state is float32, the state dtype otherwise, so that ``rank=None`` is HF
            Adafactor's arithmetic exactly and float64 stays float64; it halved the r32
            momentum and tied float32 on all seven CPU tasks of the selection suite:
            docs/results.md), None (the state dtype, float32, or float64 for float64
            parameters; what a checkpoint saved without the option, or before
            ``"auto"``, keeps), ``"float32"`` or ``"bfloat16"`` (or that
            ``torch.dtype``). A torch.distributed.checkpoint of float32 momentum loads
            into the loading Flora's tensors: build that one with None. Its arithmetic, the
            resample's transfer included, runs in the state dtype on a copy that is
            rounded back once per step (and after a transfer), so bfloat16 halves the
            momentum's bytes and changes little else. The rounding is stochastic (``flora.rounding``: up with
            the probability of the fraction dropped, random bits hashed from the value
            and the step count, the same on every path and shard), so updates below half
            a unit in the last place are not lost and a steady input is reached at any
            beta1. Not float16: the momentum holds lr-scaled updates, below its normal
            range at small lrs. A state of another dtype (a checkpoint, the option
            edited) is converted at its next step.
        projection: ``"gaussian"`` (N(0, 1/r) entries, unbiased: the paper's),
            ``"orthonormal"`` (QR of the same Gaussian draw, on the CPU) or
            ``"coordinates"`` (r random coordinates of the projected dimension, no
            matmul). See ``flora.projection``.
        max_aspect_ratio: leave tensors with ``max(n, m) / min(n, m)`` above this dense;
            None compresses every shape (embeddings included).
        factor_dims: the two dims of a tensor of 2+ dims over which Adafactor's second
            moment is factored (``flora.adafactor.factored_dims``): ``"largest"`` (the
            default; optax's rule: the two largest, ties to the later dims, so a
            (64, 32, 3, 3) kernel keeps 9 x (64 + 32) numbers) or ``"last"`` (HF's and
            torch's Adafactor: the last two, one pair per index of the leading dims,
            2 x 64 x 32 x 3 numbers). The same on 2-D tensors; ``"last"`` equals HF
            Adafactor on every shape. A checkpoint saved without this option loads as
            ``"last"``, the rule its state was shaped by.
        cache_projections: keep each parameter's current projection on its device until
            the next resample instead of redrawing it every step (the default): drawing
            and, for orthonormal rows, a QR every step cost 9% of a rank-32 step on
            SmolLM2's shapes on a CPU, up to a third on a GPU. It costs
            ``r x d`` values of the state dtype per compressed tensor, ``d`` its projected
            dim (``flora.cache_bytes``); False redraws instead. The cache is not part of the
            state and changes no result.
        foreach: True: step parameters of equal shape, dtype, device and counters
            together, stacked, a few batched kernels per bucket
            (``flora.functional.grouped_core``); False: one parameter at a time
            (``single_core``, the reference: with compression off it follows HF
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
            ``"triton"`` (an explicit opt-in, untested on this project's CPU machines)
            runs the eager step with Adafactor's factored normalisation of 2-D float32
            CUDA parameters done by the fused Triton kernels of ``flora.kernels``;
            without triton or CUDA it warns once and steps eagerly. ``False`` (the
            default) or ``None``: eager.

    Step counters: ``state["step"]`` is a plain integer (checkpoints hold numbers; a
    checkpoint whose counters are tensors, torch's convention, loads too), and a 1-element
    tensor per parameter on its device mirrors it for compiled steps, as torch's
    capturable optimizers keep theirs (not state: rebuilt from the integer on demand).

    State is float32 whatever the parameter dtype (float64 parameters keep float64
    state). A compressed update is clipped to RMS ``lr * clip_threshold`` after
    decompression, the bound that dense momentum obeys by construction; the
    decompression would otherwise amplify it by about sqrt(d / r). A compressed momentum
    grown past float32 (the momentum growth Flora warns of) gives no step and restarts
    from zero (not counted in :attr:`nonfinite_skips`).

    A parameter whose gradient holds a NaN or an infinity, or a value whose square
    overflows (so that the second moment or the normalised update is not finite), is not
    updated: its weights and state tensors stay as they were (its step
    counter still advances, and a resample due at that step still carries its momentum
    to the new projection, as it would have without the skip); the decision is
    taken on the device, and
    :attr:`nonfinite_skips` counts such skipped parameter updates.
    """
