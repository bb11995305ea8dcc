"""When the engine runs: autograd hooks on every attached parameter, the end of each
backward pass, and the optimizer's step.

- a tensor hook before each accumulation into ``.grad`` (FSDP2's sharded parameters are
  not in the graph: their gradients arrive by the post-accumulate hook alone);
- a post-accumulate-grad hook, where the gradient is summed;
- a callback queued at the end of each backward pass that accumulated (deferred to the
  outer pass when a backward runs inside another: reentrant activation checkpointing);
- normal mode: a step pre-hook on ``optimizer=`` (or, without it, torch's global optimizer
  step pre-hook, holding the accumulator weakly) closes a short cycle; fused mode: the
  optimizer's ``zero_grad()`` is wrapped to drop an open cycle, and its step pre-hook
  closes an open cycle, as in normal mode.

A parameter carries the hooks of at most one accumulator (:data:`ATTACHED`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
import sys
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .. import _autocast
from ..sharded import is_dtensor
from .engine import Engine
from .estimator import Slot
from .fused import patch_zero_grad, unpatch_zero_grad
from .integrations import unwrap
from .units import ModelHook
from .._warn import warn

__all__ = ["Hooks", "ATTACHED", "attached", "check_unattached", "attach", "detach"]

# parameter -> a weak reference to the accumulator whose hooks it carries (at most one:
# two would each free the gradient the other expects to see). Weak: a value holding its
# own key (the accumulator holds its parameters) would keep the model alive for good; the
# accumulator lives as long as its hooks do (Hooks.owner), so a dropped model and its
# accumulator are freed together.
ATTACHED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def attached(p: torch.Tensor):
    """The accumulator whose hooks ``p`` carries, or None."""
    ref = ATTACHED.get(p)
    return None if ref is None else ref()


def check_unattached(slots: list[Slot]) -> None:
    for s in slots:
        owner = attached(s.param)
        if owner is not None:
            raise RuntimeError(f"parameter {s.name!r} already has a CompressedAccumulator attached; "
                               "call .remove() on that one first (two would each free the other's gradients), "
                               "or flora.CompressedAccumulator.remove_from(model) if you no longer hold it "
                               "(a notebook cell run again)")


def attach(slots: list[Slot], owner) -> None:
    ref = weakref.ref(owner)
    for s in slots:
        ATTACHED[s.param] = ref


def detach(slots: list[Slot], owner) -> None:
    for s in slots:
        if attached(s.param) is owner:
            del ATTACHED[s.param]


# torch's global step pre-hooks of accumulators that were garbage-collected: removed at the
# next accumulator's construction or removal (a safe point), not by the collector.
_DEAD_GLOBAL_HOOKS: list = []


def remove_dead_global_hooks() -> None:
    while _DEAD_GLOBAL_HOOKS:
        _DEAD_GLOBAL_HOOKS.pop().remove()


class _WeakPostHook:
    """``hooks.on_grad(k, p)`` through a weak reference to ``hooks``."""

    __slots__ = ("ref", "k")

    def __init__(self, hooks: "Hooks", k: int):
        self.ref, self.k = weakref.ref(hooks), k

    def __call__(self, p: torch.Tensor) -> None:
        hooks = self.ref()
        if hooks is not None:
            hooks.on_grad(self.k, p)


def _refuse_compiled_autograd() -> None:
    """The hooks keep per-backward-pass bookkeeping (graph tasks, an end-of-pass callback)
    that compiled autograd cannot trace: its own error named ``queue_callback``."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")  # not imported: not enabled
    if ca is not None and ca.in_compiled_autograd_region:
        raise RuntimeError(
            "CompressedAccumulator does not run under compiled autograd (torch._dynamo.config.compiled_autograd "
            "or torch._dynamo.compiled_autograd._enable): its hooks keep per-backward-pass bookkeeping that "
            "compiled autograd cannot trace. Run the backward passes it accumulates without compiled autograd; "
            "torch.compile of the model itself works (its backward runs these hooks eagerly)")


class Hooks:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.queued: dict[int, bool] = {}  # graph task -> a gradient was accumulated in it (its end is queued)
        slots = engine.slots
        # torch keeps a post-accumulate-grad hook where the garbage collector cannot see it:
        # one holding these hooks (and so the parameter) strongly would keep the model, its
        # optimizer and the accumulator alive after the user dropped them (a leak per model
        # in a sweep). It holds them weakly where the tensor hook below (which the collector
        # sees) holds them strongly; FSDP2's sharded parameters have no tensor hook.
        self.handles = [s.param.register_post_accumulate_grad_hook(
            functools.partial(self.on_grad, k) if is_dtensor(s.param) else _WeakPostHook(self, k))
            for k, s in enumerate(slots)]
        self.handles += [s.param.register_hook(functools.partial(self.before_grad, k))
                         for k, s in enumerate(slots) if not is_dtensor(s.param)]
        self.guard = None
        self.also = None  # normal mode with optimizer=: the global hook, where another optimizer steps some
        self.patched = None  # fused mode: the optimizer's zero_grad wrapper
        self.unfrozen = None  # on a module: guard_unfrozen's forward pre-hook
        self.owner = None  # the accumulator: alive while its hooks are (they reach it through here)
        self.foreign_said = False  # fused mode: another optimizer's step of these parameters, said once

    def guard_steps(self) -> None:
        eng = self.engine
        if eng.opts.fused:
            self.patched = patch_zero_grad(eng.optimizer, eng)
            self.guard = eng.optimizer.register_step_pre_hook(self.on_fused_step)
            self.also = self.global_guard()  # another optimizer's step of these parameters: said
        elif eng.optimizer is not None:
            self.guard = eng.optimizer.register_step_pre_hook(self.on_step)
            # another optimizer may step a compressed parameter too (one this optimizer does
            # not hold, or one both hold: a shared layer): its step must close a short cycle
            # too, or it would step on the placeholder (zeros). Found by new-user probes.
            self.also = self.global_guard()
        else:
            self.guard = self.global_guard()

    def guard_unfrozen(self, model) -> None:
        """On a module, a forward pass (with gradients on) while the module has a trainable
        parameter this accumulator was not built with (unfrozen since, or added). Fused mode
        refuses it: nothing would ever step it (its gradient piles up in ``.grad``), and
        where the accumulator's own parameters were frozen meanwhile (peft's
        ``set_adapter``) none of its hooks runs to see it (found by a new-user probe).
        Normal mode warns once and stops looking: the parameter trains, but its gradients
        accumulate uncompressed in ``.grad``, at full size (found by a later probe)."""
        if not isinstance(model, torch.nn.Module):
            return
        # FSDP2 registers stand-ins (unsharded, plain tensors) for its sharded parameters on
        # the modules during their forward, and keeps them between micro-batches under
        # set_reshard_after_backward(False): there a plain parameter is known by its name (a
        # stand-in is registered under its sharded parameter's), a DTensor by identity. By
        # identity alone the check skipped FSDP2, then (one version) saw only the DTensors,
        # missing a submodule inside an FSDP2 unit (probes)
        sharded = self.engine.sharded
        mine = {id(s.param) for s in self.engine.slots}
        mine_names = {n for n, p in model.named_parameters() if id(p) in mine} if sharded else set()
        ref, own = weakref.ref(self), weakref.ref(model)
        fused = self.engine.opts.fused

        def check(module, args):
            # module: a deep copy of the model carries this hook too, and is not watched
            if not torch.is_grad_enabled() or ref() is None or module is not own():
                return
            # leaves only: under torch.func.functional_call the module yields the tensors given
            # (MAML's fast weights, computed from the parameters): no .grad of their own (a probe)
            def new(n, p):
                if not (p.requires_grad and p.is_leaf) or id(p) in mine:
                    return False
                return not sharded or is_dtensor(p) or n not in mine_names

            if any(new(n, p) for n, p in module.named_parameters()):
                extra = [n for n, p in module.named_parameters() if new(n, p)]
                if not fused:
                    hooks = ref()
                    if hooks.unfrozen is not None:
                        hooks.unfrozen.remove()
                        hooks.unfrozen = None
                    opt = hooks.engine.optimizer
                    held = None if opt is None else {id(p) for g in opt.param_groups for p in g["params"]}
                    outside = [] if held is None else [n for n, p in module.named_parameters()
                                                       if new(n, p) and id(p) not in held]
                    # a layer swapped in (resize_token_embeddings untied, a new head) is in neither
                    fate = (f"{', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''} "
                            f"{'is' if len(outside) == 1 else 'are'} not in the optimizer either: they do not train, "
                            "and their .grad grows at every backward (optimizer.zero_grad() does not reach them). Give "
                            "the optimizer and a new accumulator the model's parameters after the change" if outside
                            else "they train, but their gradients accumulate uncompressed in .grad, at full size. "
                            "Build a new accumulator (acc.remove() first) after the change to compress them")
                    warn(
               f"CompressedAccumulator: the model has {len(extra)} trainable parameter(s) not given to the "
               f"accumulator ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}; unfrozen after it "
               f"was built, or added): {fate}", UserWarning)
                    return
                raise ValueError(
                    f"CompressedAccumulator(fused=True): the model has {len(extra)} trainable parameter(s) not given "
                    f"to the accumulator ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}; unfrozen after "
                    "it was built, added, or switched to by peft's set_adapter): fused mode steps only its own, so "
                    "they would never step. Build a new accumulator (acc.remove() first) after the change")

        self.unfrozen = model.register_forward_pre_hook(ModelHook(check), prepend=bool(sharded))

    def global_guard(self):
        """torch's global optimizer step pre-hook, closing a short cycle for any optimizer
        holding these parameters; it must not keep the accumulator (and the model) alive."""
        ref = weakref.ref(self)

        def on_any_step(optimizer, args, kwargs):
            hooks = ref()
            if hooks is not None:
                return hooks.on_any_step(optimizer, args, kwargs)
            return None

        remove_dead_global_hooks()
        handle = register_optimizer_step_pre_hook(on_any_step)
        # Not removed by the finalizer itself: the garbage collector may run it while torch
        # iterates the global hooks (inside any optimizer's step), which then raised
        # "OrderedDict mutated during iteration". A dead one is a no-op until removed.
        weakref.finalize(self, _DEAD_GLOBAL_HOOKS.append, handle)
        return handle

    def remove(self) -> None:
        remove_dead_global_hooks()
        for h in self.handles:
            h.remove()
        for g in (self.guard, self.also, self.unfrozen):
            if g is not None:
                g.remove()
        if self.patched is not None:
            unpatch_zero_grad(self.engine.optimizer, self.patched)
            self.patched = None
        self.handles, self.guard, self.also, self.unfrozen = [], None, None, None

    # ------------------------------------------------------------------ autograd

    def before_grad(self, k: int, grad: torch.Tensor) -> None:  # no tensor arithmetic: no no_grad() needed
        """Tensor hook: runs before autograd adds this backward's gradient to ``.grad``."""
        _refuse_compiled_autograd()
        eng = self.engine
        with eng.lock:
            eng.check_ddp()
            task = torch._C._current_graph_task_id()
            if task not in self.queued:
                # a backward pass's first gradient: a zero_grad() since the last pass applies to every
                # parameter now, also to those this pass will not reach (before, only a parameter reached
                # again saw it: a cleared branch that the cycle's last pass skipped stepped its dropped
                # estimate, and dropped passes still counted towards tau; a probe)
                eng.sweep()
                eng.refuse_edits()  # before anything of this pass is summed
            self.queue_end()
            try:
                eng.before_grad(k, task)
            except BaseException:  # a refusal ends the backward pass: its end callback never runs
                self.queued.pop(task, None)
                raise

    @torch.no_grad()
    def on_grad(self, k: int, p: torch.Tensor) -> None:
        _refuse_compiled_autograd()
        eng = self.engine
        with eng.lock:
            eng.cycle.inflight.pop(k, None)
            self.queue_end(accumulated=True)
            if k in eng.sharded:  # no tensor hook ran before this one
                eng.check_cycle_open(k)
            with _autocast.disabled():  # a backward run inside autocast: compress in the state dtype
                eng.accumulate(k, p)

    def queue_end(self, accumulated: bool = False) -> None:
        """Have ``after_backward`` run once at the end of the running backward pass."""
        task = torch._C._current_graph_task_id()
        if task not in self.queued:
            self.queued[task] = accumulated
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self.after_backward, task))
        elif accumulated:
            self.queued[task] = True

    def after_backward(self, task: int) -> None:
        node = torch._C._current_autograd_node()
        eng = self.engine
        with eng.lock:
            accumulated = self.queued.pop(task, False)
            eng.task_ended(task)
            if node is not None and self.defer(node, accumulated):
                eng.cycle.nested.add(task)
                return
            if accumulated:
                with _autocast.disabled():
                    eng.backward_done()

    def defer(self, node, accumulated: bool) -> bool:
        """A backward pass run inside another one (reentrant activation checkpointing) ends
        inside one of the outer pass's nodes: look at the cycle when the outer pass ends."""
        fired = []

        def outer_node_done(grad_inputs, grad_outputs):
            if not fired:
                fired.append(True)
                with self.engine.lock:
                    self.queue_end(accumulated)

        try:
            node.register_hook(outer_node_done)
        except (RuntimeError, TypeError, AttributeError):
            return False
        return True

    # ------------------------------------------------------------------ optimizer

    def on_step(self, optimizer, args, kwargs):
        """Normal mode: the optimizer's ``step()`` closes a short cycle (the estimate into
        ``.grad``) before the step reads the gradients; with a closure, after it."""
        return _after_closure(args, kwargs, self.finish_open)

    def say_foreign(self, opt) -> None:
        """Fused mode: another optimizer stepping these parameters moves none of them (their
        ``.grad`` stays None; fused mode steps them with its own optimizer, inside backward).
        A loop that switched optimizers went on training with the old one, silently (a
        probe). Said once."""
        eng = self.engine
        held = sum(id(p) in eng.ids for g in opt.param_groups for p in g["params"])
        if not held:
            return
        self.foreign_said = True
        warn(f"CompressedAccumulator(fused=True): another optimizer ({type(opt).__name__}) steps {held} of its "
             "parameters; fused mode steps them inside backward with the optimizer it was built with "
             f"({type(unwrap(eng.optimizer)).__name__}) and leaves their .grad None, so this step moves none of "
             "them. To switch optimizers: acc.remove(), then a new CompressedAccumulator(..., optimizer=new). A "
             "tensor stepped by two optimizers (one of them this accumulator's) needs normal mode (fused=False)",
             UserWarning)

    def finish_open(self) -> None:
        if self.engine.micro_step():
            with _autocast.disabled():  # a step inside autocast: decompress in the state dtype
                self.engine.finish()

    def on_fused_step(self, optimizer, args, kwargs):
        """Fused mode: the user's ``step()`` closes an open cycle, as in normal mode: a short
        one (the end of an epoch) and one that waits for it (some parameters stepped at
        their tau-th gradient, others got fewer); each parameter steps on what it got. Else
        the ``zero_grad()`` that follows would drop them. On a boundary, the usual place of
        the step, there is nothing open: a no-op. With a closure, after it."""
        if self.engine.stepper.inside:  # a parameter's own step, from inside the engine
            return None
        return _after_closure(args, kwargs, self.finish_open)

    def on_any_step(self, optimizer, args=(), kwargs=None):
        eng = self.engine
        opt = unwrap(optimizer)
        if eng.opts.fused:
            if opt is not unwrap(eng.optimizer) and not self.foreign_said and not eng.stepper.inside:
                self.say_foreign(opt)
            return None
        # Another optimizer's step (one holding none of these parameters) has no cycle of this
        # accumulator's to close: returns before the sweep, whose cost grows with the slots
        # (a probe: an unrelated 4-element SGD step took 2 ms beside 3,000 slots, 15 us alone).
        # What the sweep applies (a zero_grad() since: partial sums dropped, their memory freed)
        # is applied at the next backward's hooks or this accumulator's optimizer's step, as
        # when no other optimizer steps between them (a review).
        if not any(id(p) in eng.ids for g in opt.param_groups for p in g["params"]):
            return None
        return _after_closure(args, kwargs or {}, self.finish_open)


def _after_closure(args, kwargs, finish: Callable[[], None]):
    """A step pre-hook's work, ``finish`` (close the open cycle), done now, or, where the
    step was given a closure, after the closure has run: a closure runs its backward
    inside ``step()``, after the pre-hooks (PyTorch Lightning runs a window's last
    micro-batch so, ``optimizer.step(closure)``; closing the cycle first stepped the
    compressed tensors on the placeholder's zeros and left that micro-batch to a new
    cycle, a probe). Returns the step's arguments with the closure wrapped, or None.
    torch hands a step pre-hook the step's ``args`` with the optimizer first."""
    closure = kwargs.get("closure") if "closure" in kwargs else args[1] if len(args) > 1 else None
    if not callable(closure):
        finish()
        return None

    def closure_then_finish():
        loss = closure()
        finish()
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_finish}
    return (args[0], closure_then_finish, *args[2:]), kwargs
