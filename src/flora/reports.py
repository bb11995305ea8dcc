"""What a Flora does with each parameter, as data (``plan``) and as text (``summary``),
and the warnings when a rank is set but nothing is compressed, and when a Gaussian
projection's momentum would grow from resample to resample."""

from __future__ import annotations

import math
from typing import Any

import torch

from .compression import momentum_storage
from .options import group_names, momentum_dim, momentum_reason
from .projection import compressed_shape, matrix_shape
from .sharded import is_dtensor
from .state import free_index
from ._warn import warn


def plan(opt) -> list[dict[str, Any]]:
    """One row per parameter: ``index`` (keys the projection seeds: the position across
    groups when its state began), ``name`` (when built from ``named_parameters()``, else None),
    ``group``, ``shape``, ``compressed`` (bool), ``proj_dim`` and ``momentum_shape`` when
    compressed, else ``reason`` (why its momentum is dense or absent); ``momentum_dtype``
    (what its momentum is stored in, a name such as ``"bfloat16"``; None without ``beta1``);
    ``frozen`` (``requires_grad=False``: no state is made for it while it gets no gradient;
    one made before it was frozen is kept, and counted by ``flora.state_bytes``);
    ``stepped`` (whether it has a state: False before its first step, and for a tensor the
    model no longer uses, such as a meta tensor replaced by ``to_empty()``); ``device``.
    A parameter without a state gets the index its first step will give it."""
    rows, index = [], 0
    taken = {st["index"] for st in opt.state.values() if "index" in st}
    for gi, group in enumerate(opt.param_groups):
        names = group_names(group)  # torch keeps them when given named_parameters(); Nones otherwise
        for j, p in enumerate(group["params"]):
            shape = tuple(p.shape)
            # a sharded parameter follows FSDP2's rule ("sharded"), before its first step too
            # (one process's had said a 1 x 12 matrix stays dense, the step compressed it: a review)
            rule = {**group, "proj_dim": "sharded"} if is_dtensor(p) and group["proj_dim"] == "auto" else group
            reason = momentum_reason(shape, rule)
            st = opt.state[p] if p in opt.state else {}
            pinned = st["index"] if "index" in st else free_index(index, taken, opt.param_groups)
            row = {"index": pinned, "name": names[j], "group": gi, "shape": shape,
                   "compressed": reason is None,
                   "frozen": not p.requires_grad, "stepped": bool(st), "device": str(p.device),
                   "momentum_dtype": None if group["beta1"] is None
                   else str(momentum_storage(group, p.dtype)).removeprefix("torch.")}
            # a state says what it holds: one loaded from an older version may keep a form the
            # current rule would not choose (a (1, N, d) matrix's; a probe found the rows wrong)
            # (the tensor's dtype too: an edited momentum_dtype converts it at the next step; probe Z130)
            held, dense = st.get("exp_avg_c"), st.get("exp_avg")
            if isinstance(held, torch.Tensor) and "proj_dim" in st:
                row.update(compressed=True, proj_dim=int(st["proj_dim"]), momentum_shape=tuple(held.shape),
                           momentum_dtype=str(held.dtype).removeprefix("torch."))
            elif isinstance(dense, torch.Tensor):
                row.update(compressed=False, momentum_dtype=str(dense.dtype).removeprefix("torch."),
                           reason=reason if reason is not None and group["beta1"] is not None else
                           "its state holds a dense momentum (made under other options or an older version's rule)")
            elif reason is None:
                dim = momentum_dim(shape, rule)
                row.update(proj_dim=dim, momentum_shape=compressed_shape(shape, group["rank"], dim))
            else:
                row["reason"] = reason
            if group["beta1"] is None and isinstance(held if "proj_dim" in st else dense, torch.Tensor):
                # beta1 edited to None mid-run: the momentum is kept, as HF Adafactor keeps it (probe Z130)
                row["reason"] = ("beta1=None: its state keeps the momentum made while beta1 was set, unused "
                                 "(counted by flora.state_bytes; used again if beta1 is set)")
            rows.append(row)
            index += 1
    return rows


def summary(opt) -> str:
    """Which tensors keep compressed momentum and why the others do not, as text."""
    rows = plan(opt)
    live = [r for r in rows if not r["frozen"]]  # frozen tensors keep nothing (their rows say what they would)
    n_c = sum(r["compressed"] for r in live)
    frozen = len(rows) - len(live)
    held = sum(1 for g in opt.param_groups for p in g["params"] if not p.requires_grad and opt.state.get(p))
    kept = f"; {held} of them keep the state made before they were frozen" if held else ""
    waiting = sum(not r["stepped"] for r in live)
    meta = sum(r["device"] == "meta" for r in rows)
    lines = [f"Flora: {n_c} of {len(live)} {'trainable ' if frozen else ''}parameter tensors keep compressed momentum"
             + (f" ({frozen} more frozen: requires_grad=False, no state made while they get no gradient{kept})"
                if frozen else "")
             + (f"; {waiting} of them not stepped yet" if waiting else "")
             + (f"; {meta} on the meta device (no data: a model made there gets new parameters from to_empty(), "
                "so build Flora after it)" if meta else "")]
    for r in rows:
        what = (f"compressed to {r['momentum_shape'][0]} x {r['momentum_shape'][1]} (proj_dim={r['proj_dim']})"
                + (f"; {r['reason']}" if r.get("reason") else "") if r["compressed"] else f"dense: {r['reason']}")
        if r["momentum_dtype"] is not None:
            what += f", momentum in {r['momentum_dtype']}"
        if r["frozen"]:
            what += ", frozen"
        if not r["stepped"] and not r["frozen"]:
            what += ", not stepped yet"
        name = f"{r['name']} " if r["name"] else ""
        lines.append(f"  [{r['index']}] {name}group {r['group']} {r['shape']}: {what}")
    return "\n".join(lines)


def warn_if_nothing_compressed(opt) -> None:
    if all(g["rank"] is None for g in opt.param_groups):
        return
    # frozen tensors (a peft model's base weights) step nothing: what the trainable ones get counts
    ranked = [r for r in plan(opt) if opt.param_groups[r["group"]]["rank"] is not None]
    rows = [r for r in ranked if not r["frozen"]]
    if not rows or any(r["compressed"] for r in rows):
        return
    # but a frozen one may train later (an inactive adapter, made active by peft's set_adapter:
    # a probe was told nothing is compressed, then 12 tensors were)
    later = sum(1 for r in ranked if r["frozen"] and r["compressed"])
    reasons: dict[str, int] = {}
    for r in rows:
        reason = r["reason"]
        key = "projected dim <= " + reason.split(" <= ")[1] if reason.startswith("projected dim") else reason
        reasons[key] = reasons.get(key, 0) + 1
    said = "; ".join(f"{k} ({v} tensor{'s' * (v > 1)})" for k, v in reasons.items())
    also = (f"; {later} frozen tensor{'s' * (later > 1)} would, if made trainable (frozen base weights under an "
            "adapter, or an inactive adapter)" if later else "")
    warn(f"Flora: a rank is set but no tensor keeps compressed momentum (of those trainable now): {said}{also}. "
         "See Flora.summary(); compression needs beta1 set and a projected dimension above the rank.",
         UserWarning)


# compile set: shape signatures (a tensor's shape, dtype and device in a group) above
# which construction warns that the first step compiles for minutes
SIGNATURES_WARN = 64


def warn_if_many_signatures(opt) -> None:
    """compile set: the first step compiles a graph per bucket signature, seconds each with
    inductor (0.3 s with aot_eager), so a model of hundreds of distinct shapes (a
    recommender's tables) compiles for minutes and may then step slower than eagerly (a
    probe: 200 shapes, 64 s with aot_eager, 312 ms a step against 130 eager). Said once, at
    construction, with the count."""
    from .compiled import compiles_on

    if opt._compile is None:
        return
    kinds = {(gi, tuple(p.shape), p.dtype, p.device) for gi, g in enumerate(opt.param_groups)
             for p in g["params"] if p.requires_grad and compiles_on(opt._compile, p.device)}
    if len(kinds) > SIGNATURES_WARN:
        warn(f"Flora(compile={opt._compile!r}): {len(kinds)} distinct parameter shapes (per group, dtype "
             "and device); the first step compiles a graph for each (seconds each with inductor), so it "
             "will take minutes, and so many small graphs may step slower than compile=False. Consider "
             "compile=False for such a model", UserWarning)


def gaussian_growth(rank: int, dim: int, beta1: float, kappa: int) -> float:
    """How much a Gaussian projection's compressed momentum grows, in norm, from one resample
    to the next: decayed by ``beta1**kappa`` in between, carried over by ``A_old A_new^T``,
    whose entries (rows of independent N(0, 1/r) draws) multiply its norm by about
    ``sqrt(dim / rank)``. Above 1 it grows without bound (a probe: inf after 44 steps at
    kappa 1, rank 8 of 128; x3 per resample at beta1 0.99, kappa 100, rank 8 of 512).
    Orthonormal rows carry it over by a projection, which never grows it."""
    return beta1**kappa * math.sqrt(dim / rank)


def _kappa_needed(rank: int, dim: int, beta1: float) -> int:
    """The least kappa at which :func:`gaussian_growth` is at most 1."""
    return math.ceil(math.log(math.sqrt(dim / rank)) / -math.log(beta1)) if beta1 > 0 else 1


def warn_if_momentum_grows(opt) -> None:
    if not any(g["projection"] == "gaussian" and g["beta1"] is not None and g["rank"] is not None
               for g in opt.param_groups):
        return  # plan() is the constructor's largest cost (a probe: 24 us a parameter, twice)
    growing = []
    for r in plan(opt):
        group = opt.param_groups[r["group"]]
        if not r["compressed"] or r["frozen"] or group["projection"] != "gaussian" or group["beta1"] is None:
            continue
        dim = matrix_shape(r["shape"])[r["proj_dim"]]
        growth = gaussian_growth(group["rank"], dim, group["beta1"], group["kappa"])
        if growth > 1:
            growing.append((growth, r, group, dim))
    if not growing:
        return
    growth, r, group, dim = max(growing, key=lambda x: x[0])
    # the advice covers every growing tensor, not only the worst (a probe: following it for
    # one group's tensor left another group's growing, and the next warning asked for more)
    needed = max(_kappa_needed(g["rank"], d, g["beta1"]) for _, _, g, d in growing)
    where = " in every group with a Gaussian projection" if len({id(g) for _, _, g, _ in growing}) > 1 else ""
    warn(f"Flora: projection='gaussian' with beta1={group['beta1']}, kappa={group['kappa']}: the compressed "
         f"momentum of {r['name'] or 'parameter'} {r['shape']} (rank {group['rank']} of {dim}) grows about "
         f"{growth:.3g}x from one resample to the next (beta1**kappa * sqrt(dim / rank)), without bound: "
         f"the Gaussian carry-over A_old A_new^T multiplies its norm by about sqrt(dim / rank). Use "
         f"projection='orthonormal' (the default), or kappa >= {needed}{where}", UserWarning)
