"""Fused mode: the optimizer steps inside backward, one parameter at a time.

``flora.Flora`` steps a parameter with ``step_parameter(p)``; any other optimizer with
``step()`` while ``p`` is the only parameter holding a gradient (optimizers skip the
others), which is why the optimizer and the accumulator must hold the same trainable
parameters. Before its step each accumulated gradient is unscaled and checked (a
``torch.amp.GradScaler``) and clipped to ``max_grad_norm`` (per parameter: the global norm
is known only when every other parameter has stepped); its squared norm is summed into
the cycle's, which ``last_grad_norm`` reports."""

from __future__ import annotations

import functools
import weakref

import torch
from torch.optim import Optimizer

from .._warn import warn
from ..optimizer import Flora
from ..options import STEPPED_DTYPES, overlaps_itself
from .cycle import Cycle
from .estimator import Slot

__all__ = ["FusedStepper", "check_fused_optimizer", "patch_zero_grad", "unpatch_zero_grad"]


def _needs_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` takes a required closure (LBFGS): fused mode calls
    ``step()`` without one, inside backward."""
    import inspect

    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def check_fused_optimizer(optimizer: Optimizer, slots: list[Slot]) -> None:
    if _needs_closure(optimizer):  # it had failed inside every backward that ends a cycle (a probe)
        raise ValueError(f"fused=True: {type(optimizer).__name__}.step() needs a closure (it re-evaluates the "
                         "loss), which a step taken inside backward cannot give; use the accumulator in normal mode "
                         "(fused=False) and call optimizer.step(closure) at each cycle's end")
    # Stepping the whole optimizer for one parameter is only right if every other
    # parameter it holds has no gradient, i.e. if this accumulator frees them all.
    mine = {id(s.param) for s in slots}
    theirs = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    extra = [tuple(p.shape) for p in theirs if id(p) not in mine]
    if extra:
        raise ValueError(f"fused=True: the optimizer holds {len(extra)} trainable parameter(s) not given to "
                         f"the accumulator (shapes {extra[:3]}...; a parameter unfrozen after the accumulator was "
                         "built is one): each would move at every other parameter's step. Give both the same "
                         "parameters (build the accumulator after unfreezing)")
    stale = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]
             if p.grad is not None and id(p) not in mine]
    if stale:
        raise ValueError(f"fused=True: the optimizer holds {len(stale)} parameter(s) that the accumulator does "
                         f"not accumulate but that hold a gradient (shapes {stale[:3]}...; frozen after a loop "
                         "that left .grad set, say): each would move at every other parameter's step, every "
                         "cycle. Call optimizer.zero_grad() before the first backward")
    odd = [f"{s.name!r} ({s.param.dtype})" for s in slots
           if s.param.is_floating_point() and s.param.dtype not in STEPPED_DTYPES]  # complex: other optimizers'
    if odd:  # float8: the norm failed inside backward, after the parameters before it had stepped (a probe)
        raise TypeError(f"fused=True: parameter(s) {', '.join(odd[:5])} are of a dtype no step here supports; "
                        f"fused mode steps floating-point parameters of {', '.join(map(str, STEPPED_DTYPES))} "
                        "(and complex ones, excluded). Keep them in one of those dtypes, or freeze them")
    views = [s.name for s in slots if not s.param.is_contiguous() and overlaps_itself(s.param)]
    if views:  # refused at its own step, after the parameters before it had stepped (a probe)
        raise ValueError(f"fused=True: parameter(s) {views[:5]} are views whose elements share memory (made by "
                         "expand(), or overlapping): no step can write them in place. Make each a tensor of its own "
                         "(p.data = p.data.clone()), or keep the smaller parameter and expand it in forward")
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}  # frozen since, too: still held
    missing = [s.name for s in slots if id(s.param) not in ids]
    if missing:
        raise ValueError(f"fused=True: parameters {missing[:5]} are not in the optimizer, so nothing "
                         "would step them; give both the same parameters")


def _fits_only(v, was: tuple, now: tuple) -> bool:
    """Whether a state entry was made for shape ``was`` and does not fit ``now``: a tensor
    of that many dims, each of its sizes 1 or ``was``'s (AdamW's moments, torch Adafactor's
    row and column factors), one of them a size that ``now`` changed (a review: a check of
    the parameter's shape alone refused states the user had resized too)."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.dim() != len(was):
        return False
    sizes = tuple(v.shape)
    return all(n in (1, w) for n, w in zip(sizes, was)) and any(
        n != 1 and n == w != m for n, w, m in zip(sizes, was, now))


def _foreign_hooks(opt: Optimizer) -> bool:
    """Whether a step hook other than flora's own may run in ``opt.step()``: the
    optimizer's, or torch's global ones (torch keeps them in private dicts: where one is
    not found, as in another torch version, any hook may run: True)."""
    from torch.optim import optimizer as torch_optimizer

    where = [(opt, "_optimizer_step_pre_hooks"), (opt, "_optimizer_step_post_hooks"),
             (torch_optimizer, "_global_optimizer_pre_hooks"), (torch_optimizer, "_global_optimizer_post_hooks")]
    dicts = [getattr(owner, name, None) for owner, name in where]
    if any(not isinstance(d, dict) for d in dicts):
        return True
    return any(not (getattr(f, "__module__", None) or "").startswith("flora.") for d in dicts for f in d.values())


def _foreign_pre_hooks(opt: Optimizer) -> list[str]:
    """The names of the step pre-hooks other than flora's that ``opt.step()`` runs: its
    own and torch's global ones (none where torch keeps them elsewhere)."""
    from torch.optim import optimizer as torch_optimizer

    dicts = [getattr(opt, "_optimizer_step_pre_hooks", None),
             getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)]
    return [getattr(f, "__qualname__", None) or repr(f) for d in dicts if isinstance(d, dict) for f in d.values()
            if not (getattr(f, "__module__", None) or "").startswith("flora.")]


def _group_values(opt: Optimizer) -> list[dict]:
    """Each group's values but its parameters, as a step may change them: a tensor by its
    identity and version, anything else by value."""
    return [{k: (id(v), v._version) if isinstance(v, torch.Tensor) else v for k, v in g.items()
             if k not in ("params", "param_names")} for g in opt.param_groups]


def _refuse_group_counters(opt: Optimizer, before: list[dict], stepped: list[str]) -> None:
    """An optimizer whose ``step()`` changes a group's values (a step counter per group, as
    Schedule-Free's ``k`` and ``weight_sum``) would advance them once per parameter in
    fused mode, which steps it once per parameter (a probe: Schedule-Free's ``k`` reached
    15 where plain accumulation has 3, weights 5e-2 off, silently). Refused at its first
    fused steps (the second, for a value the first step made), naming the value and the
    parameters that had stepped (``stepped``): they are not put back (copies of them and of
    their states, kept for every fused run in case, cost up to 6x the largest parameter's
    bytes at its start: a review)."""
    for gi, (g, was) in enumerate(zip(opt.param_groups, before)):
        for k, v in was.items():
            now = g.get(k, v)
            now = (id(now), now._version) if isinstance(now, torch.Tensor) else now
            try:
                same = bool(now == v)
            except Exception:  # a value that does not compare to a bool: not a counter
                same = True
            if not same:
                raise RuntimeError(
                    f"fused=True: {type(opt).__name__}.step() changed parameter group {gi}'s {k!r} (a value kept "
                    "per group, not per parameter), and fused mode calls step() once per parameter: it would "
                    "advance once per parameter a cycle. Use the accumulator in normal mode (fused=False) with "
                    f"this optimizer. Its step had already moved {len(stepped)} parameter(s) "
                    f"({', '.join(map(repr, stepped[:3]))}{', ...' if len(stepped) > 3 else ''}), their states and "
                    "the group's values: start again from the model and optimizer as they were (a checkpoint)")


class FusedStepper:
    """Steps one parameter whose accumulated gradient is in ``.grad``, then frees it.
    ``opts`` is read at every step (``max_grad_norm`` may change between cycles)."""

    def __init__(self, optimizer: Optimizer, opts, names: dict[int, str] | None = None):
        self.optimizer, self.opts = optimizer, opts
        self.names = names or {}  # id(parameter) -> its name, for messages
        # Another optimizer's parameters, each with its shape when it last stepped: one
        # resized since would fail inside its own step, after others had stepped (see
        # _refuse_resized). flora.Flora checks this itself (check_options).
        self._stepped_shapes: dict[int, tuple] = {}  # id -> (weak reference, shape)
        self.inside = False  # in the optimizer's step() for one parameter: its step hooks must not act
        self._where: dict | None = None  # id(parameter) -> (group index, position): see _narrow
        self._groups_checked = 0  # steps seen to leave the groups' values alone (two: a value made lazily)
        self._hooks_said = False  # _say_pre_hooks: once
        self._checked: list[str] = []  # the parameters stepped while _refuse_group_counters checks (its message)

    def check_options(self, c: Cycle) -> None:
        """flora.Flora's options, every group's, before the cycle's first step (and before
        the gradient is unscaled or clipped): an option edited between cycles is refused
        before any parameter steps, as step() refuses it, not when a late group's first
        parameter comes (a probe: the other groups had stepped)."""
        if not c.options_checked:
            if isinstance(self.optimizer, Flora):
                self.optimizer.check_options(self.names)
                self._say_pre_hooks()
            else:  # where each parameter sits, for _narrow: once a cycle
                self._refuse_resized()
                self._where = {id(p): (gi, j) for gi, g in enumerate(self.optimizer.param_groups)
                               for j, p in enumerate(g["params"])}
            c.options_checked = True

    def _say_pre_hooks(self) -> None:
        """flora.Flora steps each parameter with ``step_parameter``, which is not ``step()``:
        its step pre-hooks run at the loop's ``optimizer.step()``, after the cycle's
        parameters stepped and freed their gradients. A pre-hook that edits ``.grad``
        (centralisation, noise, clipping) then changes nothing, where under another
        optimizer, stepped through ``step()``, it runs per parameter (probe Z144: silently
        lost). Said once, at the first cycle that has one."""
        if self._hooks_said:
            return
        hooks = _foreign_pre_hooks(self.optimizer)
        if hooks:
            self._hooks_said = True
            warn(f"fused=True: flora.Flora has step pre-hooks ({', '.join(hooks[:3])}"
                 f"{', ...' if len(hooks) > 3 else ''}), which run at the loop's optimizer.step(), after the cycle's "
                 "parameters stepped inside backward and their gradients were freed: a hook that edits .grad "
                 "(centralisation, gradient noise, clipping) changes no step here. Use the accumulator in normal mode "
                 "(fused=False) for such a hook; clip with max_grad_norm=")

    def _refuse_resized(self) -> None:
        """A parameter resized since its last step (``p.data = ...``,
        ``resize_token_embeddings``) whose state this optimizer still holds in the old shape
        (:func:`_fits_only`; a step counter, or a state the user resized too, fits): its step would
        fail on the state's old shape with torch's size error, after the parameters whose
        gradients came first had stepped (a probe: AdamW, 3 of 4 parameters moved, the
        resized one's weight decay applied). Refused before the cycle steps anything."""
        state = self.optimizer.state
        for ref, was in list(self._stepped_shapes.values()):
            p = ref()
            if p is None or not p.requires_grad or tuple(p.shape) == was:  # frozen: it will not step
                continue
            if any(_fits_only(v, was, tuple(p.shape)) for v in state.get(p, {}).values()):
                name = self.names.get(id(p), f"of shape {tuple(p.shape)}")
                raise ValueError(
                    f"fused=True: parameter {name!r} has shape {tuple(p.shape)}, but "
                    f"{type(self.optimizer).__name__} holds a state made for shape {was}: it was resized after its "
                    "last step, and its step would fail after other parameters had stepped. Drop its state "
                    "(optimizer.state.pop(p)) to start it afresh, or rebuild the optimizer after resizing")

    def step(self, p: torch.Tensor, c: Cycle) -> None:
        self.check_options(c)
        if self.prepare(p, c):
            self.step_ready([p])
        p.grad = None

    def prepare(self, p: torch.Tensor, c: Cycle) -> bool:
        """Unscale (GradScaler), clip and count ``p``'s gradient; False if it must not step."""
        if self.opts.scaler is not None:
            found = self.unscale(p.grad)
            # flora.Flora skips a non-finite gradient on the device; any other optimizer
            # must be told on the host (GradScaler syncs here too).
            if found is not None and not isinstance(self.optimizer, Flora) and found.item():
                # not stepped, but counted: the cycle's norm shows the overflow (inf or nan),
                # as clip_grad_norm_ does in normal mode, not the last finite cycle's
                c.add_sq_norm(self.norm(p.grad).float().square())
                return False
        if self.opts.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p], self.opts.max_grad_norm)
        else:
            norm = self.norm(p.grad)
        c.add_sq_norm(norm.float().square())
        return True

    @staticmethod
    def norm(g: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))

    def step_ready(self, params: list[torch.Tensor]) -> None:
        """Step these parameters, every other one holding no gradient."""
        opt = self.optimizer
        step_parameter = getattr(opt, "step_parameter", None)
        if step_parameter is not None:
            for p in params:
                step_parameter(p)
            # What an LR scheduler's wrapper around step() would have recorded; without it
            # the scheduler warns that it stepped before the optimizer.
            opt._opt_called = True
        elif params:
            before = None if self._groups_checked >= 2 else _group_values(opt)  # the whole list, not narrowed
            self.inside = True
            narrowed = self._narrow(opt, params)
            try:
                opt.step()  # every other parameter's .grad is None, so only these move
            finally:
                if narrowed is not None:
                    opt.param_groups = narrowed[0]
                    for g, full in narrowed[1]:
                        g["params"] = full
                self.inside = False
            for p in params:
                self._stepped_shapes[id(p)] = (weakref.ref(p), tuple(p.shape))
            if before is not None:  # the names of what stepped while checked, for the message
                self._checked += [self.names.get(id(p), f"of shape {tuple(p.shape)}") for p in params]
                try:
                    _refuse_group_counters(opt, before, self._checked)
                except RuntimeError:
                    self._checked = []  # a new attempt names its own (a review: they had piled up)
                    raise
                self._groups_checked += 1
                if self._groups_checked >= 2:
                    self._checked = []

    def _narrow(self, opt: Optimizer, params: list[torch.Tensor]):
        """torch's own optimizers find the parameters with a gradient by scanning every
        group's list, so a step per parameter cost O(parameters), O(parameters^2) a cycle (a
        probe: AdamW in fused mode 9.7x plain accumulation at 4,000 tensors, 5x at 500).
        For the step, their ``param_groups`` is narrowed to the groups of ``params`` and
        those groups' lists to ``params``, found through a map made once a cycle (checked
        where it points); returns what to restore, or None (left whole: another library's
        optimizer may key more than its state by position, a parameter not found, or a step
        hook other than flora's: it may read the groups, or call ``state_dict()``, which
        fails on a narrowed view whose state holds other parameters: a review)."""
        if not type(opt).__module__.startswith("torch.optim.") or self._where is None or _foreign_hooks(opt):
            return None
        groups, where = opt.param_groups, self._where
        mine: dict[int, list] = {}
        for p in params:
            hit = where.get(id(p))
            if hit is None or hit[0] >= len(groups) or hit[1] >= len(groups[hit[0]]["params"]) \
                    or groups[hit[0]]["params"][hit[1]] is not p:
                return None
            mine.setdefault(hit[0], []).append(p)
        restore = (groups, [(groups[gi], groups[gi]["params"]) for gi in mine])
        opt.param_groups = [groups[gi] for gi in mine]
        for gi, ps in mine.items():
            groups[gi]["params"] = ps
        return restore

    def step_bucket(self, params: list[torch.Tensor], c: Cycle) -> None:
        """DDP: step these parameters (a bucket's) while others may hold gradients that
        wait for their own bucket's all-reduce: those are hidden from the optimizer."""
        self.check_options(c)
        ready = [p for p in params if self.prepare(p, c)]
        if ready and not hasattr(self.optimizer, "step_parameter"):
            mine = {id(p) for p in ready}
            hidden = [(p, p.grad) for g in self.optimizer.param_groups for p in g["params"]
                      if p.grad is not None and id(p) not in mine]
            for p, _ in hidden:
                p.grad = None
            try:
                self.step_ready(ready)
            finally:
                for p, g in hidden:
                    p.grad = g
        else:
            self.step_ready(ready)
        for p in params:
            p.grad = None

    def step_sharded(self, params: list[torch.Tensor], c: Cycle) -> None:
        """FSDP2: step these DTensor parameters (one unit's) together. Their local rows'
        squared norms (and a GradScaler's non-finite flags) are summed over the shards in
        one all-reduce per shard group, so that clipping, ``last_grad_norm`` and the
        scaler's findings are global; Flora's step adds two (``Flora.step_parameters``).
        Without clipping or a scaler the norms are needed after the step only: they ride
        in Flora's first all-reduce (two in all)."""
        import torch.distributed as dist

        from ..sharded import layout

        self.check_options(c)
        opt, scaling = self.optimizer, self.opts.scaler is not None and self.opts.scaler.is_enabled()
        ride = isinstance(opt, Flora) and self.opts.max_grad_norm is None and not scaling
        by_group: dict = {}
        for p in params:
            by_group.setdefault(layout(p).group, []).append(p)
        stepping, sums = [], {}
        for pg, ps in by_group.items():
            grads = [p.grad.to_local() for p in ps]
            parts = [torch.linalg.vector_norm(g, dtype=torch.float64).square() for g in grads]
            if scaling:
                parts += [self.unscale(g, record=False) for g in grads]
            packed = sums[pg] = torch.stack([t.reshape(()).to(torch.float64) for t in parts])
            if ride:
                stepping += ps
                continue
            if pg is not None:
                dist.all_reduce(packed, group=pg)
            norms = packed[:len(ps)].sqrt().float()
            found = packed[len(ps):]
            if found.numel():
                self.record_found(found.sum().clamp_(max=1.0).float(), grads[0].device)
            if self.opts.max_grad_norm is not None:  # as clip_grad_norm_ on each whole parameter
                coef = (self.opts.max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)
                torch._foreach_mul_(grads, [coef[i].to(g.dtype) for i, g in enumerate(grads)])
            skip = found.tolist() if found.numel() and not isinstance(opt, Flora) else [0.0] * len(ps)
            for p, bad in zip(ps, skip):
                if bad:  # another optimizer must be told on the host (GradScaler syncs too)
                    p.grad = None
                else:
                    stepping.append(p)
        if isinstance(opt, Flora):
            opt.step_parameters(stepping, sums=sums if ride else None)
            opt._opt_called = True
        else:
            self.step_ready(stepping)  # the other parameters hold no gradient
        for pg, ps in by_group.items():  # the norms before clipping, summed over the shards
            c.add_sq_norm(sums[pg][:len(ps)].sum().float())
        for p in params:
            p.grad = None

    def unscale(self, g: torch.Tensor, record: bool = True) -> torch.Tensor | None:
        """Unscale gradient ``g`` by the GradScaler's scale in place and (``record``) record
        whether it is finite where ``scaler.step``/``update`` look for it. Returns the
        found-inf flag."""
        from torch.amp.grad_scaler import OptState

        scaler = self.opts.scaler
        if not scaler.is_enabled():
            return None
        if scaler._scale is None:
            raise RuntimeError("CompressedAccumulator(scaler=...): the scaler has no scale yet; call "
                               "scaler.scale(loss).backward()")
        record_ = scaler._per_optimizer_states[id(self.optimizer)]
        record_["stage"] = OptState.UNSCALED  # so that scaler.step() does not unscale (nothing) again
        found = torch.zeros((), dtype=torch.float32, device=g.device)  # 0-dim, as GradScaler's own flags
        inv_scale = scaler._scale.double().reciprocal().float().to(g.device)
        torch._amp_foreach_non_finite_check_and_unscale_([g], found, inv_scale)
        if record:
            self.record_found(found, g.device)
        return found

    def expect_step(self, device) -> None:
        """A cycle opened: record with the GradScaler, as ``scaler.unscale_`` would, that
        this optimizer's gradients are unscaled (here, as they come) and nothing non-finite
        was found yet. So ``scaler.step(optimizer)`` after a short cycle reaches
        ``optimizer.step()``, whose pre-hook closes the cycle (recording what it finds
        before ``scaler.update()``); it failed with 'No inf checks were recorded for this
        optimizer' (no ``.grad`` to unscale) and left the cycle open."""
        from torch.amp.grad_scaler import OptState

        scaler = self.opts.scaler
        if scaler is None or not scaler.is_enabled() or scaler._scale is None:
            return
        record = scaler._per_optimizer_states[id(self.optimizer)]
        if record["stage"] is OptState.READY:
            record["stage"] = OptState.UNSCALED
        if not record["found_inf_per_device"]:
            record["found_inf_per_device"][device] = torch.zeros((), dtype=torch.float32, device=device)

    def record_found(self, found: torch.Tensor, device) -> None:
        """Add ``found`` to the flag ``scaler.step``/``update`` read: 0-dim, as GradScaler makes
        its own (fused AdamW and Adagrad subtract it from their 0-dim step counters, and a
        1-element flag failed to broadcast there after the first parameter had stepped: a
        probe)."""
        record = self.opts.scaler._per_optimizer_states[id(self.optimizer)]
        seen = record["found_inf_per_device"].get(device)
        found = found.reshape(())
        record["found_inf_per_device"][device] = found if seen is None else seen.add_(found)


def patch_zero_grad(optimizer: Optimizer, engine) -> tuple:
    """Fused mode keeps no .grad between backward passes, so the optimizer's zero_grad()
    cannot see the open cycle: wrap it (on this optimizer object only) to discard it.
    Returns what :func:`unpatch_zero_grad` needs."""
    original = optimizer.zero_grad
    had_own = "zero_grad" in vars(optimizer)
    ref = weakref.ref(engine)

    @functools.wraps(original)
    def zero_grad(*args, **kwargs):
        eng = ref()
        if eng is not None and any(eng.cycle.counts):
            eng.discard()
        return original(*args, **kwargs)

    optimizer.zero_grad = zero_grad
    return zero_grad, original if had_own else None


def unpatch_zero_grad(optimizer: Optimizer, patched: tuple) -> None:
    wrapper, own = patched
    if vars(optimizer).get("zero_grad") is wrapper:
        if own is None:
            del optimizer.zero_grad
        else:
            optimizer.zero_grad = own
