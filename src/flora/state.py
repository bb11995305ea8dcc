"""The layout of Flora's per-parameter state: what a new parameter gets, and the shapes a
loaded state must have. Every entry is a tensor or a plain number (``weights_only``)."""

from __future__ import annotations

import math

import torch

from . import sharded
from ._validation import COUNTER_LIMIT, STEP_LIMIT
from .adafactor import factored_shapes
from .compression import momentum_storage
from .options import momentum_dim, name_in
from .projection import compressed_shape, is_stack, one_matrix, state_dtype
from .sharded import is_dtensor


def prepare_state(state: dict, p: torch.Tensor, group: dict) -> None:
    """Fill in what parameter ``p`` (its ``.grad``) lacks before a step: all of its state
    the first time, the first moment once ``beta1`` is set; FSDP2's shards their own."""
    if is_dtensor(p):
        sharded.init_state(state, p, group)
        store_momentum_as([state], momentum_storage(group, p.dtype))
        return
    if not state:
        init_state(state, p.grad, group["factor_dims"])
    if group["beta1"] is not None and "exp_avg" not in state and "exp_avg_c" not in state:
        init_momentum(state, p.grad, group)


def free_index(position: int, taken: set[int], param_groups: list[dict]) -> int:
    """A new state's projection index: its ``position`` among the groups' parameters, unless
    a live state holds it (``taken``): then the first free one of position + N, + 2N, ...
    (N: the parameters in the groups). Those sequences are disjoint for distinct positions,
    so no two parameters share projections, whatever the order the new states are made in."""
    if position in taken:
        n = max(1, sum(len(g["params"]) for g in param_groups))
        position += n
        while position in taken:
            position += n
    return position


def follow_dtype(state: dict, p: torch.Tensor) -> None:
    """A parameter cast to another dtype after its first step (``model.to(torch.float64)``):
    its second moment takes the state dtype a fresh state would have, as a loaded state does
    (the first moment follows its group's ``momentum_dtype`` in the step). Left as it was, a
    float32 second moment beside float64 arithmetic failed in a compiled step's graph."""
    if is_dtensor(p):
        return
    want = state_dtype(p.dtype)
    for k in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
        v = state.get(k)
        if isinstance(v, torch.Tensor) and v.dtype != want:
            state[k] = v.to(want)


def store_momentum_as(states: list[dict], dtype: torch.dtype) -> None:
    """Keep the first moment of ``states`` in ``dtype`` (``momentum_dtype``): one of another
    (a checkpoint, the option edited since) is converted, rounding to nearest. (The
    local path calls this once per bucket, from ``functional.prepare``.)"""
    for state in states:
        for k in ("exp_avg_c", "exp_avg"):
            m = state.get(k)
            if m is not None and m.dtype != dtype:
                state[k] = m.to(dtype)


def init_state(state: dict, grad: torch.Tensor, factor_dims: str = "largest") -> None:
    """Adafactor's state for a parameter with this gradient: the step count and the second
    moment (row and column factors for 2+ dims, over the dims ``factor_dims`` picks)."""
    shape, dtype = grad.shape, state_dtype(grad.dtype)
    state["step"] = 0
    if grad.dim() >= 2:
        row, col = factored_shapes(shape, factor_dims)
        state["exp_avg_sq_row"] = torch.zeros(row, dtype=dtype, device=grad.device)
        state["exp_avg_sq_col"] = torch.zeros(col, dtype=dtype, device=grad.device)
    else:
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=grad.device)


def init_momentum(state: dict, grad: torch.Tensor, group: dict) -> None:
    """The first moment: dense, or compressed with its projection counters."""
    dim = momentum_dim(grad.shape, group)
    dtype = momentum_storage(group, grad.dtype)
    if dim is None:
        state["exp_avg"] = torch.zeros(grad.shape, dtype=dtype, device=grad.device)
    else:
        state["exp_avg_c"] = torch.zeros(
            compressed_shape(grad.shape, group["rank"], dim), dtype=dtype, device=grad.device
        )
        state["proj_dim"] = dim
        state["proj_count"] = 0  # projections drawn so far, minus one
        state["proj_age"] = 0  # steps taken with the current projection


_DROP = "or drop that parameter's state (optimizer.state.pop(p)) to start its momentum and second moment afresh"


def check_not_resized(p: torch.Tensor, s: dict, group: dict, name: str | None = None) -> None:
    """A parameter resized or reshaped since its state began (``p.data = ...`` after the
    first step, e.g. ``resize_token_embeddings``) is refused, naming both shapes, before any
    change; the arithmetic would fail to broadcast (or read a missing entry) half-way
    through the step. The optimizer runs it when a parameter's shape is not the one its
    state was last checked against. Not checked for FSDP2's DTensors (global shapes).
    ``name`` names ``p`` where its group holds no ``param_names``."""
    if not s or is_dtensor(p):
        return
    v = s.get("exp_avg_sq")
    if v is not None:
        have = v.numel()
    else:
        row = s.get("exp_avg_sq_row")
        if row is None:
            return
        have = row.numel() * s["exp_avg_sq_col"].shape[-1]
    if have != p.numel():
        raise ValueError(
            f"{_called(p, group, name)} ({p.numel()} values) has a state made for {have} values: it was "
            "resized after its first step (for example by resize_token_embeddings, or p.data = ...). Resize it "
            f"before building the optimizer, {_DROP}")
    wrong = _shape_mismatch(p, s, group)
    if wrong is not None:
        k, got, want = wrong
        if k == "exp_avg_c":
            _refuse_old_stack_view(tuple(p.shape), got, want)
        need = f"this shape needs {want}" if want is not None else "this shape has no such entry"
        raise ValueError(
            f"{_called(p, group, name)} has a state made for another shape of as many values (its "
            f"{k!r} is {got}, {need}): it was reshaped after its first step (p.data = "
            f"p.data.reshape(...), say). Reshape it before building the optimizer, {_DROP}")


def _refuse_old_stack_view(shape: tuple, got: tuple, want) -> None:
    """A stack's compressed momentum of the view before 2026-12-04 (one ``E x (n * m)``
    matrix: ``r x (n * m)`` or ``E x r``): refused, saying so."""
    rest = math.prod(shape[1:])
    if is_stack(shape) and len(got) == 2 and (got[1] == rest or got[0] == shape[0]):
        if one_matrix(shape):  # a position embedding's (1, N, d)
            raise ValueError(
                f"a parameter of shape {shape} (one {shape[-2]} x {shape[-1]} matrix behind leading dims of 1) has a "
                f"compressed momentum of shape {got}, made by a Flora before 2026-12-04, which projected it as one "
                f"1 x {rest} row; it is projected as the {shape[-2]} x {shape[-1]} matrix now (needing {want}). "
                f"Load that checkpoint with the Flora that saved it, {_DROP}")
        raise ValueError(
            f"a stack of matrices of shape {shape} (stacked experts) has a compressed momentum of shape {got}, "
            f"made by a Flora before 2026-12-04, which projected it as one {shape[0]} x {rest} matrix (across "
            f"its matrices); each matrix is projected on its own now (needing {want}). Load that checkpoint "
            f"with the Flora that saved it, {_DROP}")


def _shape_mismatch(p: torch.Tensor, s: dict, group: dict) -> tuple[str, tuple, tuple | None] | None:
    """The first state entry whose shape is not what ``p``'s shape, the group's rank and
    factor_dims need: (key, its shape, the shape needed; None where this parameter needs no
    such entry), or None."""
    shape = tuple(p.shape)
    expected = {"exp_avg": shape, "exp_avg_sq": shape if len(shape) < 2 else None}
    if len(shape) >= 2:
        expected["exp_avg_sq_row"], expected["exp_avg_sq_col"] = factored_shapes(shape, group["factor_dims"])
    else:
        expected["exp_avg_sq_row"] = expected["exp_avg_sq_col"] = None
    if "exp_avg_c" in s:
        dim = s.get("proj_dim")
        expected["exp_avg_c"] = (compressed_shape(shape, group["rank"], dim)
                                 if dim in (0, 1) and len(shape) >= 2 and group["rank"] is not None else None)
    for k, want in expected.items():
        if k in s and (want is None or tuple(s[k].shape) != tuple(want)):
            return k, tuple(s[k].shape), None if want is None else tuple(want)
    return None


def _called(p: torch.Tensor, group: dict, name: str | None = None) -> str:
    """How a refusal names ``p``: by its name where the group holds ``param_names`` (looked up
    on the way to an error only), else by ``name`` where given, else by shape."""
    return _which(tuple(p.shape), name_in(group, p) or name)


def _param_name(p: torch.Tensor, group: dict) -> str:
    """``'name' `` where the group holds ``param_names``, else ''."""
    name = name_in(group, p)
    return "" if name is None else f"{name!r} "


def check_momentum_layout(p: torch.Tensor, s: dict, group: dict, edited: dict | None = None) -> None:
    """A live compressed momentum must have the shape and projected dim the group's
    ``rank``, ``proj_dim`` and ``max_aspect_ratio`` give it (and a dense one must stay
    dense under them: it is not compressed mid-run), and be read under the
    projections it was made under (``edited``: ``seed`` or ``projection`` changed since the
    last step, ``{name: (old, new)}``). An option edited in a group mid-run is refused,
    naming it, before any change, instead of failing to broadcast half-way through a step
    or reading the momentum under unrelated projections."""
    c = s.get("exp_avg_c")
    if c is None:
        if "exp_avg" in s and group["beta1"] is not None and \
                (sharded.momentum_dim if is_dtensor(p) else momentum_dim)(tuple(p.shape), group) is not None:
            raise ValueError(
                f"rank={group['rank']!r}, proj_dim={group['proj_dim']!r} and max_aspect_ratio="
                f"{group['max_aspect_ratio']!r} would compress the momentum of {_called(p, group)}, which holds it "
                f"dense (made when these options left it uncompressed): set them "
                f"back, {_DROP}")
        return
    shape, dim, rank = tuple(p.shape), s["proj_dim"], group["rank"]
    have = tuple(c.shape)
    old = have[0] if dim == 0 else have[1]
    if rank is None or have != tuple(compressed_shape(shape, rank, dim)):
        raise ValueError(
            f"rank={rank!r} does not fit the compressed momentum of {_called(p, group)} ({have}, made "
            f"with rank={old}). Set rank back to {old}, {_DROP}")
    # "auto" takes a saved side that compresses under these options (one process's rule and
    # FSDP2's differ, and a load keeps the saved side: a probe found each refusing the other's)
    fits = momentum_dim(shape, {**group, "proj_dim": dim} if group["proj_dim"] == "auto" else group) == dim
    if group["beta1"] is not None and not fits:
        raise ValueError(
            f"proj_dim={group['proj_dim']!r} and max_aspect_ratio={group['max_aspect_ratio']!r} do not fit the "
            f"compressed momentum of {_called(p, group)} ({have}, projecting dim {dim}): set them back, "
            + _DROP)
    for name, (was, now) in (edited or {}).items():
        # its group's option edited, or the parameter moved into a group of another one: the
        # record is the parameter's, so both read alike (a probe: a moved parameter was told
        # to set the other group's seed back, which then refused that group's own parameter)
        called = _param_name(p, group)
        raise ValueError(
            f"{name}={now!r} in the group of the parameter {called}of shape {shape}, whose compressed momentum "
            f"was made under {name}={was!r} (the group's {name} edited, or the parameter moved into this group, "
            f"since its last step): this would read the compressed momentum under projections it was not made "
            f"under, scrambling it. Set "
            f"{name} back to {was!r} or move the parameter back, {_DROP}")


COUNTERS = ("step", "proj_count", "proj_age", "index")  # plain non-negative integers (a tensor of one is read)


def count_value(v) -> int | None:
    """A counter's value: an int, or a one-element tensor (torch's convention) holding an
    integral value; None for anything else."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex():
            return None
        x = v.item()
        return int(x) if float(x).is_integer() else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _which(shape: tuple, name: str | None) -> str:
    """How an error names a parameter: by its name where the groups hold ``param_names``."""
    return f"parameter {name!r}, of shape {shape}" if name else f"a parameter of shape {shape}"


def check_loaded_entries(p: torch.Tensor, s, where: str, name: str | None = None,
                         shard_damage: dict | None = None) -> None:
    """A loaded state's entries, before anything is loaded: the counters non-negative
    integers (``step`` present in a non-empty state), the second moment present (Adafactor's
    factors for 2+ dims, else a vector), every moment a real floating-point tensor (an
    integer one would truncate the statistics; a complex one was never Flora's), the second
    moments finite and non-negative and the momentum finite (a state that is not would
    skip every step of its parameter as non-finite, silently: HF Adafactor's after a step
    on an infinite gradient is). ``name``: the parameter's, for the messages.
    ``shard_damage``: where a DTensor's shard (FSDP2: each process checks its own) is
    damaged, its refusal is put there, keyed by ``id(p)``, for the processes to agree on
    (``sharded.agree_on_load``) rather than raised on this process alone."""
    shape = tuple(p.shape)
    which = _which(shape, name)
    if not isinstance(s, dict):
        # (None: torch's ZeroRedundancyOptimizer.load_state_dict writes it, in the dict it is
        # given, for the parameters other ranks hold; probe Z131)
        why = (": a ZeroRedundancyOptimizer that loaded this dict first wrote None there for the parameters "
               "other ranks hold; give each load its own copy (copy.deepcopy)" if s is None else "")
        raise ValueError(f"state_dict['state'][{where}] must be a dict of the parameter's state, got "
                         f"{type(s).__name__}{why}")
    if not s:
        return
    for k in COUNTERS:
        if k in s or k == "step":
            n = count_value(s.get(k))
            limit, bound = (STEP_LIMIT, "2**53") if k == "step" else (COUNTER_LIMIT, "2**63")
            if n is None or not 0 <= n < limit:
                raise ValueError(f"state_dict['state'][{where}][{k!r}] must be a non-negative integer below {bound}, "
                                 f"got {s.get(k)!r} ({which}); the checkpoint is damaged")
    if "exp_avg_c" in s and count_value(s.get("proj_dim")) not in (0, 1):
        raise ValueError(f"state_dict['state'][{where}]['proj_dim'] must be 0 or 1 beside a compressed momentum, "
                         f"got {s.get('proj_dim')!r} ({which}); the checkpoint is damaged")
    lacks = [k for k in ("proj_count", "proj_age") if k not in s]
    if "exp_avg_c" in s and lacks:  # written with it since the first version: the step read them (a KeyError)
        raise ValueError(f"state_dict['state'][{where}] holds a compressed momentum (exp_avg_c) without {lacks} "
                         f"({which}): the checkpoint is damaged. Drop the parameter's entry from "
                         "state_dict['state'] to start its statistics afresh")
    factored = ("exp_avg_sq_row", "exp_avg_sq_col")
    if not is_dtensor(p) and "exp_avg_sq" not in s and not (len(shape) >= 2 and all(k in s for k in factored)):
        lacks = [k for k in factored if k not in s] if len(shape) >= 2 else ["exp_avg_sq"]
        raise ValueError(f"state_dict['state'][{where}] lacks {lacks} ({which}): the parameters are listed in "
                         "another order than when it was saved (build the groups as then), or the checkpoint is "
                         "damaged, or not Flora's")
    for k in ("exp_avg", "exp_avg_c", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
        v = s.get(k)
        if k in s and not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            got = f"a tensor of dtype {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"state_dict['state'][{where}][{k!r}] must be a floating-point tensor, got {got} "
                             f"({which}): the checkpoint is damaged")
    for k in ("exp_avg", "exp_avg_c", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"):
        if k not in s or p.numel() == 0:  # an empty parameter's: HF's mean over no rows is NaN, and steps nothing
            continue
        v = s[k].to_local() if is_dtensor(s[k]) else s[k]  # a shard: each process checks its own
        if v.is_meta:  # no values to check (a model built on "meta", as AdamW loads it: a probe)
            continue
        second = k.startswith("exp_avg_sq")
        if not bool(torch.isfinite(v).all()) or (second and bool((v < 0).any())):
            what = "non-finite or negative values" if second else "non-finite values"
            error = ValueError(f"state_dict['state'][{where}][{k!r}] holds {what} ({which}): the checkpoint is "
                               "damaged (saved after a step on a non-finite gradient?); every step of this "
                               "parameter would be skipped. Drop its entry from state_dict['state'] to start its "
                               "statistics afresh")
            if shard_damage is not None and is_dtensor(p):
                shard_damage.setdefault(id(p), error)
                return
            raise error


def check_state_shapes(p: torch.Tensor, s: dict, group: dict, name: str | None = None) -> None:
    """A loaded state's tensors must have the shapes this parameter, rank and the group's
    ``factor_dims`` need. ``name``: the parameter's, for the messages."""
    shape = tuple(p.shape)
    if "exp_avg" in s and "exp_avg_c" in s:
        raise ValueError(
            f"state_dict holds both a dense (exp_avg) and a compressed (exp_avg_c) first moment for a parameter of "
            f"shape {shape}: a loader merged a checkpoint into a fresh state of another layout (torch's "
            "set_state_dict(..., full_state_dict=True) does when a matrix kept dense where the checkpoint was saved "
            "is compressed here, e.g. one process's proj_dim='auto' and FSDP2's). Save and load with the same "
            "proj_dim (docs/distributed.md: proj_dim=\"sharded\" in one process) or load with torch.distributed.checkpoint")
    if len(shape) >= 2 and "exp_avg_sq" in s:  # the step keeps a matrix's second moment factored, as HF's does
        raise ValueError(
            f"state_dict holds an unfactored second moment ('exp_avg_sq' of shape {tuple(s['exp_avg_sq'].shape)}) "
            f"for {_which(shape, name)}: Flora, like HF Adafactor, keeps a tensor of 2 or more dims as row and "
            "column factors (exp_avg_sq_row, exp_avg_sq_col). It was saved by another optimizer, or from a model "
            "whose parameter had fewer dims, or with the parameters in another order (build the groups as then)")
    expected = {"exp_avg": shape, "exp_avg_sq": shape}
    if len(shape) >= 2:
        expected["exp_avg_sq_row"], expected["exp_avg_sq_col"] = factored_shapes(shape, group["factor_dims"])
    if "exp_avg_c" in s:
        dim = s.get("proj_dim")
        if dim not in (0, 1) or len(shape) < 2:
            raise ValueError(f"state_dict holds compressed momentum for {_which(shape, name)} "
                             f"with proj_dim={dim!r}: it was saved from a different model, or with the "
                             "parameters in another order (build the groups as then)")
        expected["exp_avg_c"] = compressed_shape(shape, group["rank"], dim)
    for k, want in expected.items():
        if k in s and tuple(s[k].shape) != tuple(want):
            if k == "exp_avg_c":
                _refuse_old_stack_view(shape, tuple(s[k].shape), tuple(want))
            raise ValueError(
                f"state_dict entry {k!r} has shape {tuple(s[k].shape)} but this optimizer's "
                f"{_which(shape, name).removeprefix('a ')} needs {tuple(want)}: it was saved from a different model "
                "or rank, or with the parameters in another order"
                + (f", or with another factor_dims than {group['factor_dims']!r}"
                   if k.startswith("exp_avg_sq_") else "")
            )


def check_factoring(p: torch.Tensor, s: dict, factor_dims: str) -> None:
    """A live state's second moment must be factored as ``factor_dims`` says (the option
    edited in a group mid-run is refused, naming it, instead of failing to broadcast)."""
    if "exp_avg_sq_row" not in s:  # a DTensor's state has the global shapes too
        return
    shape = tuple(p.shape)
    row, col = factored_shapes(shape, factor_dims)
    have = (tuple(s["exp_avg_sq_row"].shape), tuple(s["exp_avg_sq_col"].shape))
    if have != (row, col):
        raise ValueError(
            f"factor_dims={factor_dims!r} does not fit the second moment of a parameter of shape {shape} "
            f"(row and column factors {have[0]} and {have[1]}, made with another factor_dims; "
            f"{factor_dims!r} needs {row} and {col}). Set factor_dims back, or drop that parameter's state "
            "(optimizer.state.pop(p)) to start its second moment afresh")
