"""The accumulator's checkpoint: tensors and plain numbers only (loads with
``torch.load(weights_only=True)``). Keys: ``rank``, ``tau``, ``seed``, ``proj_dim``,
``projection``, ``exact_last``, ``cycle``, ``backwards``, ``indices`` (parameter positions),
``dims`` (each parameter's projected dimension, -1 where dense; since 2026-12-04: a resume
under another layout is said), ``counts`` (backward passes per parameter in the open cycle), ``follow_accelerate``,
``driven`` and ``unsynced`` (0 or 1: whether accelerate's sync flag ends the open cycle,
every cycle, and the next one; ``unsynced`` since 2026-12-05; ``driven`` is saved but not
loaded since 2026-12-06, the other two saved as 0 while it is set: the Trainer's callback
sets it),
``compressed`` and ``dense`` (partial sums by parameter position), ``world_size`` and
``process_index`` (torch.distributed's default group when saved, 1 and 0 without it; since
2026-12-05: each process's partial sums cover its share of the batch, so a mid-cycle state
resumes only in the process, and at the world size, that saved it). Projections are not
saved: they are a pure function of ``(seed, index, cycle)``. A state saved before ``projection`` existed used Gaussian
matrices."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..projection import state_dtype
from ..state import count_value
from .cycle import Cycle
from .engine import Engine
from .estimator import buffer_shape
from .._warn import warn

__all__ = ["state_dict", "load_state_dict"]


def world_size() -> int:
    """The processes of torch.distributed's default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_index() -> int:
    """This process's rank in torch.distributed's default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

# A mid-cycle partial sum made under another compression rule (probe, 2026-12-04): say how to move on.
_OTHER_RULE = (" (other options, or a mid-cycle checkpoint of a version that compressed this tensor otherwise: "
               "before 2026-12-04, stacks and (1, N, d) tensors were compressed differently). Save at a cycle "
               "boundary, after the step, to move a run across versions, or load it with the version that saved it")


def state_dict(eng: Engine) -> dict[str, Any]:
    eng.sweep()
    c, o = eng.cycle, eng.opts
    if c.overdue is not None:
        # some parameters' cycles are complete (stepped, or their estimates in .grad) and
        # others got fewer gradients: a state between the two, which no resume could continue
        lagging = ", ".join(repr(eng.names[k]) for k, _ in c.overdue[:5])
        raise RuntimeError(f"CompressedAccumulator.state_dict(): cycle {c.number} waits to be closed (it ended "
                           f"for some parameters; {lagging} got gradients in fewer micro-batches). Close it "
                           "first with optimizer.step() or acc.finish_cycle() (or drop it with "
                           "optimizer.zero_grad() or acc.discard_cycle()), then save")
    if c.done:  # complete for some parameters, and no backward pass ended it: one raised midway
        done = ", ".join(repr(eng.names[k]) for k in sorted(c.done)[:5])
        raise RuntimeError(f"CompressedAccumulator.state_dict(): cycle {c.number} is complete for some parameters "
                           f"({done}{', ...' if len(c.done) > 5 else ''}) but the backward pass that completed "
                           "them did not finish (it raised?). Close the cycle with optimizer.step() or "
                           "acc.finish_cycle(), or drop it with optimizer.zero_grad() or acc.discard_cycle(), "
                           "then save")
    compressed, dense = {}, {}
    for k, s in enumerate(eng.slots):
        if not c.counts[k]:
            continue
        if s.dim is not None:
            compressed[s.index] = c.buffers[k].clone() if k in c.buffers else None
        elif o.fused:
            dense[s.index] = c.buffers[k].clone()
        elif s.param.grad is not None:
            dense[s.index] = s.param.grad.detach().clone()
    compressed = {i: t for i, t in compressed.items() if t is not None}
    return {
        "rank": o.rank, "tau": o.tau, "seed": o.seed, "proj_dim": o.proj_dim,
        "projection": o.projection,
        "exact_last": o.exact_last, "cycle": c.number, "backwards": c.backwards,
        "indices": torch.tensor([s.index for s in eng.slots], dtype=torch.int64),
        # each parameter's projected dimension (-1: dense), so that a resume under another
        # layout (an option such as max_aspect_ratio, a later version's rule) is said
        "dims": torch.tensor([-1 if s.dim is None else s.dim for s in eng.slots], dtype=torch.int64),
        "counts": torch.tensor(c.counts, dtype=torch.int64),
        # a resumed run's first cycle may be short: accelerate's sync must end it as it would have;
        # and the cycle after it follows accelerate too where this one had an unsynced backward.
        # Under the Trainer (driven) neither is saved: its callback marks a resumed run driven
        # again, and a plain loop loading its checkpoint must count tau from the first backward
        # (accelerate's flag is True outside the Trainer; review Z104)
        "follow_accelerate": int((c.follow_accelerate or c.unsynced) and not c.driven), "driven": int(c.driven),
        "unsynced": int(c.unsynced and not c.driven),
        "compressed": compressed, "dense": dense, "world_size": world_size(), "process_index": process_index(),
    }


def _layout_changes(dims, slots, names) -> list[str]:
    """The parameters whose saved projected dimension (``dims``: -1 dense; absent before
    2026-12-04) is not this accumulator's, as text; a malformed entry is refused."""
    if dims is None:
        return []
    if not (isinstance(dims, torch.Tensor) and dims.dim() == 1 and not dims.is_floating_point()
            and len(dims) == len(slots)):
        raise ValueError(f"state_dict['dims'] must be a 1-D integer tensor of {len(slots)} entries (each parameter's "
                         "projected dimension, -1 where dense)")

    def said(d):
        return "dense" if d is None or d < 0 else f"proj_dim {d}"

    return [f"{names[k]!r} ({said(d)} saved, {said(s.dim)} here)" for k, (d, s) in enumerate(zip(dims.tolist(), slots))
            if (None if d < 0 else d) != s.dim]


def _check_process(sd: dict[str, Any], counts: list[int]) -> None:
    """A mid-cycle state holds one process's partial sums of its share of the cycle's batch:
    it resumes only in that process of a run of as many (``world_size`` and
    ``process_index``, absent before 2026-12-05: not checked). A cycle boundary's state is
    the same on every process and moves anywhere."""
    saved = {}
    for key, low in (("world_size", 1), ("process_index", 0)):
        v = sd.get(key)
        if v is not None and (count_value(v) is None or count_value(v) < low):
            raise ValueError(f"state_dict[{key!r}] must be an integer of at least {low}, got {v!r}")
        saved[key] = None if v is None else count_value(v)
    if not any(counts):
        return
    world, me = world_size(), process_index()
    later = "" if dist.is_available() and dist.is_initialized() else \
        " (torch.distributed is not initialised yet: load the state after init_process_group)"
    what = (f"state_dict was saved in the middle of cycle {sd['cycle']}, holding the partial sums of process "
            f"{saved['process_index'] if saved['process_index'] is not None else '?'} of {saved['world_size'] or '?'}")
    if saved["world_size"] is not None and saved["world_size"] != world:
        raise ValueError(f"{what}; this run has {world} process(es){later}. Each process's partial sums cover its "
                         "share of the cycle's batch, so they resume only at the world size that saved them: resume "
                         "there, or from a checkpoint saved at a cycle boundary (after optimizer.step()), which "
                         "moves between world sizes")
    if saved["process_index"] is not None and saved["process_index"] != me:
        raise ValueError(f"{what}; this is process {me}. Each process must load its own state (accelerate's "
                         "save_state writes registered objects from the main process only, so a mid-cycle save_state "
                         "of several processes cannot be resumed): save each process's acc.state_dict(), or save "
                         "at a cycle boundary (after optimizer.step())")


def _at_boundary(sd: dict[str, Any]) -> bool:
    """Saved between cycles: no partial sum, no backward pass counted (a malformed record
    reads as not, and is refused later by its own check)."""
    counts = sd.get("counts")
    return (isinstance(counts, torch.Tensor) and not counts.is_floating_point() and not bool(counts.any())
            and count_value(sd.get("backwards", 0)) == 0 and sd.get("compressed") == {} and sd.get("dense") == {})


def load_state_dict(eng: Engine, state_dict: dict[str, Any]) -> None:
    """Everything is checked before anything changes."""
    o, slots = eng.opts, eng.slots
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict (CompressedAccumulator.state_dict()'s), got "
                        f"{type(state_dict).__name__}")
    missing = [k for k in ("rank", "tau", "seed", "proj_dim", "cycle", "indices", "counts", "compressed", "dense")
               if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {missing}: not a CompressedAccumulator's state_dict, or a damaged one")
    sd = {"projection": "gaussian", **state_dict}  # saved before projection kinds: Gaussian
    if "exact_last" in sd:  # how the last micro-batch enters: a resume with the other would not continue the run
        if sd["exact_last"] not in (0, 1) or not isinstance(sd["exact_last"], (bool, int)):
            raise ValueError(f"state_dict has exact_last={sd['exact_last']!r}; it holds True or False (or 1 or 0)")
        sd["exact_last"] = bool(sd["exact_last"])
    else:
        sd["exact_last"] = o.exact_last
    try:  # (a malformed record is refused below, in order)
        same_dims = sd.get("dims") is not None and _layout_changes(sd["dims"], slots, eng.names) == []
    except ValueError:
        same_dims = False
    boundary = _at_boundary(sd)
    for key in ("rank", "tau", "seed", "proj_dim", "projection", "exact_last"):
        if key in ("tau", "exact_last") and boundary:
            # saved between cycles (every Trainer checkpoint): nothing summed under the saved
            # value, so this accumulator's holds, as if set after the load (a resume with
            # another gradient_accumulation_steps had no way through, a probe)
            continue
        if key == "proj_dim" and same_dims:
            # the option's words differ, each tensor's projected dim agrees: FSDP2's "auto" is 1
            # (a state saved there loads in one process with proj_dim=1; it had been refused
            # as "auto" against 1, a probe)
            continue
        if sd.get(key) != getattr(o, key):
            if key == "projection" and "projection" not in state_dict:  # the user never chose one (a probe)
                raise ValueError(f"state_dict was saved before CompressedAccumulator had projection kinds, when its "
                                 f"projections were Gaussian, but this accumulator has projection="
                                 f"{o.projection!r}: build it with projection='gaussian' to resume this state")
            raise ValueError(f"state_dict has {key}={sd.get(key)!r} but this accumulator has "
                             f"{key}={getattr(o, key)!r}; build it with the same {key}")
    for key in ("indices", "counts"):
        t = sd[key]
        if not (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and not t.is_complex()):
            raise ValueError(f"state_dict[{key!r}] must be a 1-D integer tensor, got "
                             + (f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, torch.Tensor)
                                else type(t).__name__))
    indices = [int(i) for i in sd["indices"].tolist()]
    if indices != [s.index for s in slots]:
        k = next((k for k, (i, s) in enumerate(zip(indices, slots)) if i != s.index), min(len(indices), len(slots)))
        first = (f"; the first that differs: {slots[k].name!r} is parameter {slots[k].index} of the model here, the "
                 f"saved one's was parameter {indices[k]}" if k < len(indices) and k < len(slots) else "")
        raise ValueError(f"state_dict covers {len(indices)} parameters, this accumulator {len(slots)} "
                         f"(or different ones): it was saved from a different model or parameter list{first}. "
                         "Positions count every parameter the accumulator was given, frozen ones included (an adapter "
                         "added or deleted since shifts them): build it on the model as it was saved")
    changed = _layout_changes(sd.get("dims"), slots, eng.names)
    counts = [int(c) for c in sd["counts"].tolist()]
    if len(counts) != len(slots):
        raise ValueError(f"state_dict has {len(counts)} counts for {len(slots)} parameters: it is damaged")
    if any(c < 0 or c >= o.tau for c in counts):
        raise ValueError(f"state_dict counts must lie in [0, tau={o.tau}); got {counts[:8]}...")
    _check_process(sd, counts)
    flags = ("follow_accelerate", "driven", "unsynced")
    for key in ("cycle", "backwards") + flags:
        v = sd.get(key, 0)
        n = count_value(v)
        if n is None or n < 0 or (key in flags and n > 1):
            allowed = "0 or 1" if key in flags else "a non-negative integer"
            raise ValueError(f"state_dict[{key!r}] must be {allowed}, got {v!r}")
    if count_value(sd.get("backwards", 0)) >= o.tau:  # a cycle is closed at its tau-th: never saved so
        raise ValueError(f"state_dict['backwards'] must be below tau={o.tau} (backward passes of the open cycle), "
                         f"got {sd.get('backwards')!r}: the checkpoint is damaged")
    for kind in ("compressed", "dense"):
        if not isinstance(sd[kind], dict):
            raise ValueError(f"state_dict[{kind!r}] must be a dict (parameter index -> partial sum), got "
                             f"{type(sd[kind]).__name__}")
    by_index = {s.index: (k, s) for k, s in enumerate(slots)}
    for kind in ("compressed", "dense"):
        for i, t in sd[kind].items():
            if i not in by_index:
                raise ValueError(f"state_dict holds a {kind} buffer for parameter index {i}, unknown here")
            k, s = by_index[i]
            if (s.dim is not None) != (kind == "compressed"):
                raise ValueError(f"state_dict holds a {kind} buffer for {s.name!r}, which this accumulator "
                                 f"accumulates {'densely' if s.dim is None else 'compressed'}{_OTHER_RULE}")
            want = buffer_shape(s, o.rank)
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                raise ValueError(f"state_dict's {kind} buffer for {s.name!r} must be a floating-point tensor, got "
                                 + (f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__))
            if tuple(t.shape) != want:
                raise ValueError(f"state_dict buffer for {s.name!r} has shape {tuple(t.shape)}, expected {want}"
                                 f"{_OTHER_RULE}")
    # A parameter counted in the open cycle has its partial sum in the state: state_dict() saves
    # every one (a compressed buffer, or the dense sum of .grad / of fused mode's buffer). One
    # missing would start the cycle again from nothing while its count says otherwise: the
    # cycle's estimate would silently lose those micro-batches (a probe, 2026-12-04)
    for s, n in zip(slots, counts):
        kind = "dense" if s.dim is None else "compressed"
        if n and s.index not in sd[kind]:
            raise ValueError(f"state_dict counts {n} micro-batch(es) of {s.name!r} (parameter index {s.index}) in "
                             f"the open cycle but holds no {kind} partial sum for it: the checkpoint is damaged. "
                             "Load an undamaged one, or save at a cycle boundary (after the step)")
        if not n and s.index in sd[kind]:  # state_dict() saves none for an untouched slot
            raise ValueError(f"state_dict holds a {kind} partial sum for {s.name!r} (parameter index {s.index}) "
                             "but counts no micro-batch of it: the checkpoint is damaged (the sum would be added "
                             "into the next cycle). Load an undamaged one")
    if changed:
        warn(f"CompressedAccumulator.load_state_dict: {len(changed)} parameter(s) were accumulated under "
             f"another layout when saved ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): "
             "other options (max_aspect_ratio, say) or an older version's rule. The run continues under this "
             "accumulator's layout: unbiased as before, but not the saved run's continuation",
             UserWarning)
    # All checked: apply.
    if eng.replicas is not None:
        eng.replicas.agreed = False  # the replicas are compared again at the next collective
    eng.grads.release(eng.cycle)  # the placeholders of the state replaced
    live = eng.cycle.counts
    cycle = Cycle.start(len(slots), count_value(sd["cycle"]), bool(count_value(sd.get("follow_accelerate", 0))),
                        eng.cycle.driven)  # saved "driven" is the Trainer's, which the callback sets again
    # at every train(): taken from a checkpoint into a plain loop, every backward read accelerate's
    # flag (True outside the Trainer) and closed a cycle (review Z101)
    cycle.counts = counts
    cycle.unsynced = bool(count_value(sd.get("unsynced", 0)))  # absent before 2026-12-05: as then
    if any(counts):  # mid-cycle (every replica alike): a DDP built since knows nothing of these
        cycle.loaded = {k for k, n in enumerate(counts) if n}
    # backward passes of the open cycle (the tau-th ends it even where no parameter got tau: experts
    # routed in turn); a state saved before every mode counted them holds 0: the most any slot got
    cycle.backwards = max(count_value(sd.get("backwards", 0)), max(counts, default=0))
    eng.cycle = cycle
    for k, s in enumerate(slots):
        in_grad = s.dim is None and not o.fused  # a dense sum that lives in .grad (normal mode)
        if (counts[k] or live[k]) and not (in_grad and counts[k]):
            # the partial sum lives in the buffers here; what the live cycle left in .grad (a
            # dense sum, a placeholder, an estimate written for a lagging or done slot) is
            # replaced by the loaded state (a dense sum loaded is written below)
            s.param.grad = None
    for i, t in sd["compressed"].items():
        k, s = by_index[i]
        cycle.buffers[k] = t.detach().to(device=s.param.device, dtype=state_dtype(s.param.dtype), copy=True)
    for i, t in sd["dense"].items():
        k, s = by_index[i]
        # the dtype the live cycle sums it in (Cycle.gradient_dtype): a bfloat16 parameter may keep
        # float32 gradients (p.grad_dtype); loaded in its own dtype, .grad refused it (probe Z72).
        # With p.grad_dtype = None the saved sum's own dtype is the one its gradients came in
        if getattr(s.param, "grad_dtype", False) is None:
            cycle.arrived[k] = t.dtype
        t = t.detach().to(device=s.param.device, dtype=cycle.gradient_dtype(k, s.param), copy=True)
        if o.fused:
            cycle.buffers[k] = t
        else:
            s.param.grad = t
            cycle.versions[k] = t._version
    for k, n in enumerate(counts):
        if n and k in cycle.buffers and eng.grads.parks(k):
            eng.grads.mark(cycle, k)
