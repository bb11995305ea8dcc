"""Flora on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 hands the optimizer DTensors sharded by rows (``Shard(0)``, possibly uneven or
empty on a rank); each rank steps its own rows. Adafactor's factors and Flora's clips are
global quantities, so a step needs sums over the shards: the column factor of a matrix
(and its row factor's mean), RMS(p), the update's norm, and the r-sized terms of the
compressed momentum. They are packed, for every parameter of the step, into two
all-reduces per step and process group:

1. before the update exists: ``sum_i sq_ij`` (the column sums), ``sum_i row_i``, ``|p|^2``
   and, where dim 0 is not factored, a count of non-finite factor entries (where it is,
   their finiteness is read from the summed factors; the factors are those of the view with the
   factored dims last, ``flora.adafactor.factored_dims``: where the sharded dim 0 is one
   of them, it is the rows, and the column sums and the row factor's mean are summed as
   for a matrix, one per index of the other dims; otherwise dim 0 leads the view and the
   factors are local);
2. once the update ``u`` exists locally: ``|u|^2`` and the compressed momentum's terms
   (:func:`flora.momentum.compressed_terms`), or, where the projection removes the
   sharded dimension, ``A_local u_local`` itself (``r x m``, summed into ``A u``).

No gradient, parameter or update is ever gathered. Projecting the unsharded dimension
(``proj_dim=1``, columns) keeps the momentum ``n x r`` sharded like the rows, so ``"auto"``
picks it under FSDP2 whenever it compresses (a single process's ``"auto"`` picks the
smaller dimension instead), except for one matrix behind leading dims of 1 (``(1, N, d)``,
whole on one rank), whose rows it projects; ``proj_dim=0`` works too, with an ``r x m`` momentum held whole
on every rank. A saved ``proj_dim`` wins when a state is loaded. Everything else
(projection seeds, counters, options) is plain integers, so one process and several agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import adafactor as af
from .agreement import check_on_meshes, mesh_device, mesh_groups
from .compression import compressed_dim, momentum_storage
from .rounding import AFTER_TRANSFER, to_stored
from .momentum import compressed_apply_, compressed_terms, dense_momentum_
from .projection import (HALF, as_matrix, compress, compressed_shape, is_coordinates, is_stack, matrix_shape,
                         state_dtype, transfer)



@functools.cache
def _dtensor_class():
    """DTensor's class, imported once (the prelude asks for each parameter); None on a
    torch built without distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


@dataclass
class Layout:
    """Where a DTensor parameter's local rows sit: ``group`` sums over its shards (None:
    not sharded) and ``offset``, where this rank's rows of its first dimension begin."""

    group: Any
    offset: int
    mesh: Any
    placements: tuple
    shape: tuple


def layout(p) -> Layout:
    """The shard layout of a DTensor parameter; a ``ValueError`` for placements Flora
    cannot step (anything but ``Shard(0)`` and ``Replicate``)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    for pl in placements:
        if pl.is_shard() and pl.dim != 0:
            raise ValueError(
                f"Flora steps parameters sharded on dim 0 only (FSDP2's default); got a parameter of shape "
                f"{tuple(p.shape)} with placements {placements}: Adafactor's row factor must stay local to a "
                "shard. Under FSDP2, use fully_shard without shard_placement_fn (or return Shard(0) from it); "
                "tensor parallelism's RowwiseParallel shards a weight on dim 1 (ColwiseParallel's Shard(0) steps), "
                "so give such weights to another optimizer, or shard them with fully_shard only")
        if not (pl.is_shard() or pl.is_replicate()):
            raise ValueError(f"Flora cannot step a parameter with placement {pl} (shape {tuple(p.shape)}); "
                             "expected Shard(0) or Replicate()")
    if len(shard_dims) > 1:
        raise ValueError(f"Flora steps parameters sharded over one mesh dimension; got placements {placements}")
    if not shard_dims:
        return Layout(None, 0, mesh, placements, tuple(p.shape))
    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return Layout(mesh.get_group(shard_dims[0]), offset[0] if offset else 0, mesh, placements, tuple(p.shape))


def check_options_agree(param_groups, checked: dict, only: set | None = None, keys: tuple = ()) -> None:
    """Every process of a DTensor parameter's device mesh must step it under the same
    options that shape the step (``ALGORITHM_KEYS``: the seed, rank, kappa, form,
    projection, ...): a ``seed`` set per rank (``seed=rank``) stepped each rank's rows under
    its own projections and summed their compressed momenta regardless, and under HSDP
    (a mesh of replicas x shards) it let the replicas drift apart (probe Z19: 5e-3 after 3
    steps), as another ``kappa``, form or rank on one rank did. Checked before any change,
    once per parameter group and mesh, with one all-reduce per mesh dimension (the step's
    one host read). ``only``: the ids of the parameters stepping (step_parameters), else
    all; ``keys``: the options compared (``flora.options.ALGORITHM_KEYS``)."""
    if not (dist.is_available() and dist.is_initialized()):  # no DTensors: one process's step pays nothing
        return
    for gi, group in enumerate(param_groups):
        stepping = [p for p in group["params"]
                    if p.grad is not None and is_dtensor(p) and (only is None or id(p) in only)]
        if not stepping:
            continue
        fields = {k: group[k] for k in keys}
        values = tuple(fields.values())  # checked again after an edit (probes Z54, Z55: edited
        try:  # after the first step, on one rank, they went unseen and HSDP's replicas drifted)
            hash(values)
        except TypeError:
            values = repr(values)
        seen = {m for (g, m), v in checked.items() if g == gi and v == values}  # meshes checked under these
        check_on_meshes(f"Flora, parameter group {gi}", fields, stepping,
                        checked=seen,
                        why="every process must step a sharded parameter under the same options (a seed set per "
                            "rank, seed=rank, draws other projections on each; HSDP's replicas would drift apart): "
                            "give every rank the same options (the default seed 0 is the same everywhere)")
        checked.update({(gi, m): values for m in seen})  # the latest values only: a schedule keeps it small


def agree_on_load(params, damage: dict, refused: ValueError | None, loaded: set) -> None:
    """Under FSDP2 each process checks its own checkpoint (its shards): the processes of a
    DTensor parameter's mesh agree before anything is loaded, so that all of them refuse a
    load that any one refuses. Refused on one alone, the others loaded, and the next step's
    collectives went out of step (gloo aborted; NCCL would hang) or one parameter's shards
    stepped with other counters (a probe). ``damage``: ``id(p) ->`` the refusal of a shard's
    non-finite or negative statistics (``state.check_loaded_entries``); ``refused``: this
    process's refusal for any other reason; ``loaded``: the ids of the parameters this
    process's checkpoint holds a state for (the processes must hold states for the same
    ones: an entry dropped on one only). One all-reduce of five integers per mesh
    dimension, over ``params`` (the optimizer's, in order: the same on every process)."""
    meshes: dict = {}  # id(mesh) -> [mesh, its DTensor parameters here, in order]
    for p in params:
        if is_dtensor(p):
            meshes.setdefault(id(p.device_mesh), [p.device_mesh, []])[1].append(p)
    for mesh, members in meshes.values():
        first = next((i for i, p in enumerate(members) if id(p) in damage), len(members))
        count = sum(id(p) in loaded for p in members)
        # which ones, as one number (as many on each process, but other ones, had passed: a probe)
        which = sum(((i + 1) * 0x9E3779B97F4A7C15) % (1 << 61) for i, p in enumerate(members)
                    if id(p) in loaded) % (1 << 61)
        t = torch.tensor([-1 if refused is not None else first, count, -count, which, -which], dtype=torch.int64,
                         device=mesh_device(mesh))
        for g in mesh_groups(mesh):  # the minimum over every process of the mesh
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
        at, least, most = int(t[0]), int(t[1]), -int(t[2])
        same_ones = int(t[3]) == -int(t[4])
        if at < 0:
            if refused is not None:
                raise ValueError(f"{refused} (every process refuses this load with it; nothing was loaded)") from None
            raise ValueError("another process refused this load (its state_dict failed a check there: see its "
                             "error), so every process refuses it, this one included (nothing was loaded)")
        if at < len(members):
            p = members[at]
            if id(p) in damage:
                raise ValueError(f"{damage[id(p)]} (every process refuses this load with it, since the parameter's "
                                 "state must be dropped on every process or none; nothing was loaded)") from None
            raise ValueError(f"the loaded state of a parameter of shape {tuple(p.shape)} holds non-finite or "
                             "negative values in another process's shard: the checkpoint is damaged (saved after "
                             "a step on a non-finite gradient?), and every process refuses it, this one included "
                             "(nothing was loaded). Drop the parameter's entry from state_dict['state'] on every "
                             "process to start its statistics afresh")
        if least != most:
            raise ValueError(f"the processes' state_dicts hold states for different numbers of the sharded "
                             f"parameters ({count} here; from {least} to {most} across the processes): an entry "
                             "dropped on some processes only? Its shards would step with other counters. Drop it "
                             "on every process or on none (nothing was loaded)")
        if not same_ones:
            raise ValueError("the processes' state_dicts hold states for different sharded parameters (as many on "
                             "each, but not the same ones): entries dropped on some processes only? Their shards "
                             "would step with other counters. Drop an entry on every process or on none (nothing "
                             "was loaded)")
    if refused is not None:
        raise refused


def _placements(lay: Layout, sharded: bool, dim: int = 0) -> tuple:
    """A state tensor's placements: its dim ``dim`` sharded as the parameter's rows, or
    ``Replicate`` on every mesh dim."""
    from torch.distributed.tensor import Replicate, Shard

    if not sharded:
        return tuple(Replicate() for _ in lay.placements)
    if dim == 0:
        return tuple(lay.placements)
    return tuple(Shard(dim) if pl.is_shard() else pl for pl in lay.placements)


def _wrap(local: torch.Tensor, lay: Layout, global_shape, sharded: bool, dim: int = 0):
    """A state tensor as a DTensor: sharded like the parameter's rows (which are its dim
    ``dim``), or whole on every rank (``Replicate``)."""
    from torch.distributed.tensor import DTensor

    placements = _placements(lay, sharded, dim)
    global_shape = torch.Size(global_shape)
    stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
    return DTensor.from_local(local, lay.mesh, placements, run_check=False, shape=global_shape, stride=stride)


def momentum_dim(shape, group: dict) -> int | None:
    """The projected dimension of a sharded parameter's momentum: ``proj_dim`` when given;
    ``"auto"`` takes the unsharded one (1) when it compresses, else the usual rule; for one
    matrix behind leading dims of 1, its rows (0)."""
    # the rule is compression's "sharded" (one process's name for it, to resume a sharded
    # run's checkpoint): a (1, N, d) matrix sits whole on one rank, whose momentum rows could
    # not follow the shards (refused as an uneven stack, a probe), so r x d, whole on every rank
    pd = "sharded" if group["proj_dim"] == "auto" else group["proj_dim"]
    return compressed_dim(shape, group["rank"], proj_dim=pd, max_aspect_ratio=group["max_aspect_ratio"])


def init_state(state: dict, p, group: dict) -> None:
    """Flora's state for a DTensor parameter: DTensors, sharded where they follow the rows
    (:func:`_sharding`)."""
    lay = layout(p)
    g = p.grad.to_local()
    shape, dtype, dev = tuple(p.shape), state_dtype(g.dtype), g.device

    if group["beta1"] is not None and "exp_avg" not in state and "exp_avg_c" not in state \
            and momentum_dim(shape, group) == 1:  # before any entry is made
        _check_stack_rows(shape, lay, compressed_shape(shape, group["rank"], 1),
                          compressed_shape(g.shape, group["rank"], 1, like=shape))

    def put(key, local_shape, global_shape, dtype):
        state[key] = _wrap(torch.zeros(local_shape, dtype=dtype, device=dev), lay, global_shape,
                           *_sharding(key, shape, group, state.get("proj_dim")))

    if not state:
        state["step"] = 0
        if len(shape) >= 2:
            rule = group["factor_dims"]
            row_shape, col_shape = af.factored_shapes(shape, rule)
            view = af.to_factored(g, af.factor_move(shape, rule)).shape  # the local rows' view
            put("exp_avg_sq_row", view[:-1], row_shape, dtype)
            put("exp_avg_sq_col", col_shape if _rows_factored(shape, rule) else view[:-2] + view[-1:], col_shape,
                dtype)
        else:
            put("exp_avg_sq", g.shape, shape, dtype)
    if group["beta1"] is None or "exp_avg" in state or "exp_avg_c" in state:
        return
    dim = momentum_dim(shape, group)
    dtype = momentum_storage(group, g.dtype)
    if dim is None:
        put("exp_avg", g.shape, shape, dtype)
        return
    state["proj_dim"] = dim
    full = compressed_shape(shape, group["rank"], dim)
    put("exp_avg_c", compressed_shape(g.shape, group["rank"], 1, like=shape) if dim == 1 else full, full, dtype)
    state["proj_count"] = 0
    state["proj_age"] = 0


def _check_stack_rows(shape, lay: Layout, full, mine, *, loading: bool = False) -> None:
    """A stack's momentum has ``n`` rows per matrix (``E x n`` in all): sharded as a DTensor
    of those rows, its shards must be the parameter's (``E`` a multiple of the shard
    group's size), else DTensor (a gather, a distributed checkpoint) would place them
    wrongly. ``loading``: a checkpoint's momentum, whose saved proj_dim a load keeps."""
    if not lay.placements or not any(pl.is_shard() for pl in lay.placements):
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placed = compute_local_shape_and_global_offset(torch.Size(full), lay.mesh, lay.placements)[0]
    if tuple(placed) != tuple(mine):
        ranks = dist.get_world_size(lay.group) if lay.group is not None else lay.mesh.size()
        remedy = ("Load it in a run that shards it evenly, or in one process, or drop its entry from "
                  "state_dict['state'] to start its momentum afresh (the saved proj_dim=1 is kept at a load)"
                  if loading else "Shard it evenly, or put it in a group with rank=None or proj_dim=0")
        raise ValueError(
            f"a stack of matrices of shape {tuple(shape)} (its last two dims are its largest: stacked experts, one "
            f"matrix behind leading dims of 1, or a convolution kernel whose spatial dims are its largest) "
            f"sharded over {ranks} ranks by its first dim, of {shape[0]}, not a multiple of the ranks, "
            f"with its columns projected{' in the checkpoint' if loading else ''}: its compressed momentum's rows "
            f"would not follow the parameter's shards. {remedy}")


def check_loaded_stack(p, s: dict) -> None:
    """Before a load changes anything: a checkpoint's momentum of DTensor ``p`` projected on
    its columns (``proj_dim=1``: ``n x r`` rows per matrix) must shard with the parameter's
    rows (:func:`_check_stack_rows`; it had been checked after torch's load, leaving the
    optimizer half loaded, a probe)."""
    c, dim = s.get("exp_avg_c"), s.get("proj_dim")
    if isinstance(dim, torch.Tensor):  # torch's convention for a number in a state (state.count_value's too)
        dim = dim.item() if dim.numel() == 1 else None
    if isinstance(c, torch.Tensor) and dim == 1 and c.dim() == 2:
        _check_stack_rows(tuple(p.shape), layout(p), tuple(c.shape),
                          compressed_shape(p.to_local().shape, c.shape[1], 1, like=tuple(p.shape)), loading=True)


def _sharding(key: str, shape, group: dict, proj_dim: int | None) -> tuple[bool, int]:
    """Where the state tensor ``key`` of a DTensor parameter of ``shape`` lives: sharded like
    the parameter's rows (which are its dim given second), or whole on every rank."""
    if key in ("exp_avg_sq", "exp_avg"):
        return True, 0
    if key == "exp_avg_c":  # n x r: rows follow the parameter's; r x m: whole on every rank
        return proj_dim == 1, 0
    rows = _rows_factored(shape, group["factor_dims"])
    if key == "exp_avg_sq_row":  # dim 0 is the view's rows (the row factor's last dim), or leads it
        return True, (len(af.factored_shapes(shape, group["factor_dims"])[0]) - 1 if rows else 0)
    # exp_avg_sq_col: a column's sum runs over every shard's rows (whole on each rank), or is local
    return not rows, 0


def place_loaded_state(p, state: dict, group: dict) -> None:
    """A loaded state of DTensor parameter ``p`` in the layout :func:`init_state` gives it.
    torch's full-state-dict loader (``set_state_dict(..., full_state_dict=True)``) shards
    every state tensor like its parameter, an ``r x m`` momentum (kept whole here) too, and
    a plain ``load_state_dict`` of one process's checkpoint gives whole tensors. Each is
    redistributed (a collective: every rank loads) or cut from the whole tensor every rank
    holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    lay = layout(p)  # (a momentum whose rows cannot follow the shards was refused before the load)
    for key in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg", "exp_avg_c"):
        v = state.get(key)
        if v is None:
            continue
        want = _placements(lay, *_sharding(key, tuple(p.shape), group, state.get("proj_dim")))
        if not isinstance(v, DTensor):
            state[key] = distribute_tensor(v, lay.mesh, want, src_data_rank=None)
        elif tuple(v.placements) != want:
            state[key] = v.redistribute(lay.mesh, want)


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def _rows_factored(shape, rule: str) -> bool:
    """Whether the sharded dim 0 is one of the factored dims (then the first: the view's
    rows), so that the column factor and the row factor's mean need sums over the shards."""
    return af.factored_dims(shape, rule)[0] == 0


@dataclass
class _Item:
    p: Any
    state: dict
    group: dict
    index: int
    lay: Layout
    g: torch.Tensor = None
    p32: torch.Tensor = None
    numel: int = 0
    t: int = 0
    beta2t: float = 0.0
    new: dict = field(default_factory=dict)  # second-moment statistics before commit
    parts1: list = field(default_factory=list)
    parts2: list = field(default_factory=list)
    r_factor: torch.Tensor | None = None
    c_factor: torch.Tensor | None = None
    u: torch.Tensor | None = None
    cu: torch.Tensor | None = None
    a: torch.Tensor | None = None
    full_a: torch.Tensor | None = None  # the whole r x m projection when the local rows take a's columns
    c_before: torch.Tensor | None = None
    move: tuple | None = None  # the factored dims when not the last two (adafactor.factor_move)
    across: bool = False  # dim 0 is factored: the factors' sums run over the shards
    stored: torch.dtype | None = None  # the momentum's dtype when stored narrower (momentum_dtype)


def _allsum(items: list[_Item], attr: str, group, extra: torch.Tensor | None = None) -> None:
    """One all-reduce of every item's ``attr`` parts (float64, packed); the parts are
    replaced by their sums over the shards. ``extra``, a float64 vector, rides along and
    is summed in place."""
    parts = [x for it in items for x in getattr(it, attr)] + ([] if extra is None else [extra])
    if not parts:
        return
    flat = torch.cat([x.reshape(-1).to(torch.float64) for x in parts])
    if group is not None:
        dist.all_reduce(flat, group=group)
    out = iter(flat.split([x.numel() for x in parts]))
    for it in items:
        setattr(it, attr, [next(out).view(x.shape) for x in getattr(it, attr)])
    if extra is not None:
        extra.copy_(next(out))


def _projection_for(it: _Item, projections, count: int) -> torch.Tensor:
    """The whole projection (drawn from the seed like a single process's), as a matrix
    when the sharded rows are projected away (coordinates made one-hot, so that the
    local rows' columns can be taken)."""
    st, group = it.state, it.group
    dim = st["proj_dim"]
    size = matrix_shape(it.lay.shape)[dim]
    c = _local(st["exp_avg_c"])
    a = projections(group, [it.index], count, size, c.device, c.dtype, stacked=False)
    if dim == 0 and is_coordinates(a):
        a = torch.zeros(a.numel(), size, dtype=c.dtype, device=c.device).scatter_(1, a[:, None], 1.0)
    return a


def sharded_step(entries, *, projections, count_skip, sums: dict | None = None) -> None:
    """One Flora step of the DTensor parameters in ``entries`` (``(p, state, group,
    index)`` with initialised state), two all-reduces per process group. ``sums``: process
    group -> a float64 vector of the caller's to sum over that group's shards in the
    first one (fused mode's gradient norms), in place."""
    by_group: dict[Any, list[_Item]] = {}
    for p, state, group, index in entries:
        if p.numel() == 0:  # counted, nothing to update: its statistics would be means of nothing
            state["step"] += 1  # (NaN, a false non-finite skip), as on the other paths
            continue
        lay = layout(p)
        by_group.setdefault(lay.group, []).append(_Item(p, state, group, index, lay))
    for pg, items in by_group.items():
        kept = _widen(items)
        try:
            for it in items:
                _phase1(it)
            _allsum(items, "parts1", pg, None if sums is None else sums.get(pg))
            for it in items:
                _phase2(it, projections)
            _allsum(items, "parts2", pg)
            for it in items:
                _phase3(it, count_skip)
            for st, k, m in kept:  # rounded back into the stored dtype (flora.rounding)
                _local(m).copy_(to_stored(_local(st[k]), m.dtype, st["step"]))
        finally:
            for st, k, m in kept:
                st[k] = m


def _widen(items) -> list:
    """A first moment kept narrower than the state dtype (``momentum_dtype``) steps on a
    copy in the state dtype, put in its state for the step: ``(state, key, stored)`` of each."""
    kept = []
    for it in items:
        want = state_dtype(it.p.dtype)
        for k in ("exp_avg_c", "exp_avg"):
            m = it.state.get(k)
            if m is not None and m.dtype != want:
                it.state[k] = m.to(want)
                it.stored = m.dtype
                kept.append((it.state, k, m))
    return kept


def _phase1(it: _Item) -> None:
    """Local statistics of the second moment (and |p|^2)."""
    st, group = it.state, it.group
    g = it.p.grad.to_local()
    it.g = g.float() if g.dtype in HALF else g
    pl = it.p.to_local()
    it.p32 = pl.float() if pl.dtype in HALF else pl
    it.numel = it.p.numel()
    st["step"] += 1
    it.t = st["step"]
    it.beta2t = af.second_moment_decay(it.t, group["decay_rate"])
    eps1 = group["eps"][0]
    parts = [it.p32.square().sum() if group["scale_parameter"] else it.g.new_zeros(())]
    if it.g.dim() >= 2:
        rule = group["factor_dims"]
        it.move, it.across = af.factor_move(it.lay.shape, rule), _rows_factored(it.lay.shape, rule)
        sq = af.to_factored(it.g, it.move).square().add_(eps1)
        row = _local(st["exp_avg_sq_row"])
        it.new["row"] = row.mul(it.beta2t).add_(sq.mean(dim=-1), alpha=(1.0 - it.beta2t))
        if it.across:  # column sums over every shard's rows; the row factor's sum (per leading index)
            row_sum = it.new["row"].sum() if it.g.dim() == 2 else it.new["row"].sum(dim=-1)
            parts += [sq.sum(dim=-2), row_sum]
        else:
            col = _local(st["exp_avg_sq_col"])
            it.new["col"] = col.mul(it.beta2t).add_(sq.mean(dim=-2), alpha=(1.0 - it.beta2t))
            bad = (~torch.isfinite(it.new["row"])).sum() + (~torch.isfinite(it.new["col"])).sum()
            parts += [bad]
        del sq
    else:
        sq_avg = _local(st["exp_avg_sq"])
        it.new["sq"] = sq_avg.mul(it.beta2t).add_(it.g.square().add_(eps1), alpha=(1.0 - it.beta2t))
        parts += [(~torch.isfinite(it.new["sq"])).sum()]
    it.parts1 = parts


def _update(it: _Item) -> torch.Tensor:
    """Adafactor's normalised update of the local rows (not yet masked, clipped or scaled)."""
    if it.g.dim() >= 2:
        u = torch.mul(it.r_factor, it.c_factor).mul_(af.to_factored(it.g, it.move))
        return af.from_factored(u, it.move)
    return torch.rsqrt(it.new["sq"]).mul_(it.g)


def _phase2(it: _Item, projections) -> None:
    """With the factors' global sums: the local update, |u|^2 and the compressed terms."""
    st, group = it.state, it.group
    n = it.lay.shape[0]
    if it.across:
        _, col_sum, row_sum = it.parts1
        col = _local(st["exp_avg_sq_col"])
        it.new["col"] = col.mul(it.beta2t).add_((col_sum / n).to(col.dtype), alpha=(1.0 - it.beta2t))
        it.new["row_sum"] = row_sum
        row_mean = (row_sum / n).to(col.dtype)
        if row_mean.dim():  # one per index of the leading dims
            row_mean = row_mean.unsqueeze(-1)
        it.r_factor = (it.new["row"] / row_mean).rsqrt_().unsqueeze(-1)
        it.c_factor = it.new["col"].unsqueeze(-2).rsqrt()
    elif it.g.dim() >= 2:
        it.r_factor = (it.new["row"] / it.new["row"].mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        it.c_factor = it.new["col"].unsqueeze(-2).rsqrt()
    u = _update(it)
    parts = [u.square().sum()]
    if group["beta1"] is not None and "exp_avg_c" in st:
        c = _local(st["exp_avg_c"])
        dim = st["proj_dim"]
        a = _projection_for(it, projections, st["proj_count"])
        if st["proj_age"] >= group["kappa"]:  # resample before this step's terms, as one process does
            st["proj_count"] += 1
            st["proj_age"] = 0
            a_new = _projection_for(it, projections, st["proj_count"])
            c.copy_(transfer(c, a, a_new, dim))
            if it.stored is not None:  # a narrower momentum is rounded after the transfer too, as one process does
                c.copy_(to_stored(c, it.stored, it.t, AFTER_TRANSFER))
            a = a_new
        st["proj_age"] += 1
        it.c_before = c.clone()
        um = as_matrix(u, like=it.lay.shape)
        if dim == 1:  # local rows of an n x r momentum: sum the terms
            it.a = a
            it.cu = compress(um, a, 1)
            parts += [compressed_terms(c, it.cu, a, 1, isometric=group["projection"] != "gaussian",
                                       dtype=torch.float64)]
        else:  # the local rows' share of A u: sum it into A u
            first = it.lay.offset * (math.prod(it.lay.shape[1:-1]) if is_stack(it.lay.shape) else 1)  # matrix rows
            it.a = a[:, first:first + um.shape[0]]
            it.full_a = a
            parts += [it.a @ um]
    if it.g.dim() == 1:
        it.u = u  # 1-D: small, kept
    it.parts2 = parts


def _phase3(it: _Item, count_skip) -> None:
    """With the global |u|^2 and terms: commit the factors, clip, momentum, apply."""
    st, group = it.state, it.group
    p1, p2 = it.parts1, it.parts2
    u_sq = p2[0]
    ok = torch.isfinite(u_sq)
    if it.across:
        row_ok = torch.isfinite(it.new["row_sum"])
        if row_ok.dim():  # one sum per index of the leading dims
            row_ok = row_ok.all()
        ok = ok & row_ok & torch.isfinite(it.new["col"]).all()
    else:
        ok = ok & (p1[-1] == 0)
    if it.g.dim() >= 2:
        for key, name in (("row", "exp_avg_sq_row"), ("col", "exp_avg_sq_col")):
            s = _local(st[name])
            s.copy_(torch.where(ok, it.new[key], s))
    else:
        s = _local(st["exp_avg_sq"])
        s.copy_(torch.where(ok, it.new["sq"], s))
    count_skip(ok)
    u = it.u if it.u is not None else _update(it)
    u.masked_fill_(~ok, 0.0)
    u_sq = torch.where(ok, u_sq, 0.0)
    eps2 = group["eps"][1]
    prms = (p1[0] / it.numel).sqrt().to(it.p32.dtype)
    lr = af.step_size(af.lr_in(group["lr"]), it.t, prms, eps2=eps2, relative_step=group["relative_step"],
                      warmup_init=group["warmup_init"], scale_parameter=group["scale_parameter"])
    beta1 = group["beta1"]
    sign = None
    if beta1 is not None and "exp_avg_c" in st:
        c = _local(st["exp_avg_c"])
        dim = st["proj_dim"]
        isometric = group["projection"] != "gaussian"
        um = as_matrix(u, like=it.lay.shape)
        # Where the step is skipped, C(u) and its terms may hold NaN: zero them (selected,
        # not multiplied), so that the update comes out exactly 0 as on one process.
        if dim == 1:
            cu, terms = torch.where(ok, it.cu, 0.0), torch.where(ok, p2[1], 0.0)
        else:
            cu = torch.where(ok, p2[1].to(c.dtype), 0.0)
            terms = compressed_terms(c, cu, it.full_a, 0, isometric=isometric, dtype=torch.float64)
        # The step is what compressed_apply_ returns (um is a view of u only where u's
        # dims merge), never the tensor it was given.
        update = compressed_apply_(group["momentum_form"], c, um, cu, it.a, dim, beta1, lr, group["clip_threshold"],
                                   u_sq=u_sq, terms=terms, numel=it.numel, isometric=isometric,
                                   bias_correction=1.0 - beta1 ** it.t, ok=ok,
                                   complement_weight=group["complement_weight"]).view(u.shape)
        c.copy_(torch.where(ok, c, it.c_before))
    else:
        rms = (u_sq / it.numel).sqrt().to(u.dtype)
        update = u.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if beta1 is not None:
            m = _local(st["exp_avg"])
            dense_momentum_(m, update, torch.where(ok, torch.full((), beta1, dtype=m.dtype, device=m.device), 1.0),
                            alpha=1 - beta1)
            update, sign = None, torch.where(ok, -1.0, 0.0)
    p32 = it.p32
    if group["weight_decay"] != 0:
        af.weight_decay_(p32, ok, lr, group["weight_decay"])
    if update is None:
        p32.addcmul_(_local(st["exp_avg"]), sign)
    else:
        p32.sub_(update)
    pl = it.p.to_local()
    if p32 is not pl:
        pl.copy_(p32)


__all__ = ["is_dtensor", "layout", "init_state", "sharded_step", "momentum_dim"]
