"""Fused mode under FSDP2: the parameters of one FSDP unit step together.

FSDP2 calls a sharded parameter's post-accumulate-grad hooks right after its unit's
reduce-scatter, one parameter after another (``foreach_reduce`` in
``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``); the hooks of one unit run
back to back. A unit's gradients are views of one flat reduce-scatter output, freed only
when every one of them is, so stepping the unit as a whole costs no memory and packs its
sums over the shards: Flora's two all-reduces (``flora.sharded``), the gradient norms
riding in the first, per unit and step; one more, before them, where clipping or a
GradScaler needs the norms first (``FusedStepper.step_sharded``).

A unit is the innermost ``fully_shard`` module holding the parameter. The unit's parameters
are stepped when the last of them arrives, when another unit's first one arrives (a
parameter that got no gradient), or at the end of the backward pass. Parameters given
without their module have no known unit: each steps on its own."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from .estimator import Slot

__all__ = ["ModelHook", "Units", "fsdp_units", "guard_gradient_sync"]


def fsdp_units(model_or_params, slots: list[Slot], sharded: set[int]) -> dict[int, int]:
    """slot -> an id of the innermost ``fully_shard`` module holding its parameter."""
    if not isinstance(model_or_params, nn.Module) or not sharded:
        return {}
    from torch.distributed.fsdp import FSDPModule

    where = {id(slots[k].param): k for k in sharded}
    unit: dict[int, int] = {}
    # modules() lists a module before its descendants: reversed, the innermost owner comes first.
    for m in reversed(list(model_or_params.modules())):
        if isinstance(m, FSDPModule):
            for p in m.parameters():
                k = where.get(id(p))
                if k is not None and k not in unit:
                    unit[k] = id(m)
    return unit


class Units:
    """The slots of the unit whose hooks are running, until they step."""

    def __init__(self, unit_of: dict[int, int]):
        self.unit_of = unit_of
        self.size = Counter(unit_of.values())
        self.pending: list[int] = []
        self.current: int | None = None

    def add(self, k: int, step: Callable[[list[int]], None]) -> None:
        """Slot ``k`` completed its cycle; ``step`` steps a list of slots together."""
        u = self.unit_of.get(k)
        if self.pending and u != self.current:
            step(self.take())
        self.current = u
        self.pending.append(k)
        if u is None or len(self.pending) == self.size[u]:
            step(self.take())

    def flush(self, step: Callable[[list[int]], None]) -> None:
        """The end of a backward pass: what is left steps now."""
        if self.pending:
            step(self.take())

    def take(self) -> list[int]:
        out, self.pending, self.current = self.pending, [], None
        return out


SYNC_OFF = (
    "CompressedAccumulator under FSDP2: gradient sync is off on {n} fully_shard module(s) "
    "(set_requires_gradient_sync(False)). FSDP2 would then sum unsharded gradients itself and call the "
    "accumulator's hooks only on the synchronised micro-batch, so every micro-batch before it would count as "
    "none of the cycle's. Keep gradient sync on: the accumulator compresses each micro-batch's "
    "reduce-scattered rows, which is what saves the memory. Nothing of this forward pass ran")


def _syncs(m) -> bool:
    group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
    return getattr(group, "reduce_grads", True) if group is not None else True


class _Inert:
    """What a :class:`ModelHook` becomes in a pickled or deep-copied model: a no-op."""

    def __call__(self, module, args):
        return None


class ModelHook:
    """A forward pre-hook the accumulator puts on the user's model. It watches that model
    only, so a copy of the model (``torch.save(model)``, a deep copy kept as the best so
    far) carries a no-op in its place: a closure there could not be pickled, and saving
    the whole model failed while an accumulator was attached (a probe)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, module, args):
        return self.fn(module, args)

    def __reduce__(self):
        return (_Inert, ())


def guard_gradient_sync(model_or_params):
    """A forward pre-hook on the model that refuses a forward pass while FSDP2's gradient
    sync is off on any of its ``fully_shard`` modules; None when there are none."""
    if not isinstance(model_or_params, nn.Module):
        return None
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in model_or_params.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        return None

    def check(module, args):
        off = [m for m in fsdp if not _syncs(m)]
        if off and torch.is_grad_enabled():
            raise RuntimeError(SYNC_OFF.format(n=len(off)))

    # Before FSDP2's own pre-forward hooks: a refusal after them would leave the all-gathers
    # they launched unwaited (a process then aborts at exit).
    return model_or_params.register_forward_pre_hook(ModelHook(check), prepend=True)
