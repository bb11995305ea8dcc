"""Loading a Flora checkpoint: the saved state must come from a Flora of the same rank
whose tensors fit this optimizer's parameters; states of earlier releases load; a change
of algorithm (``ALGORITHM_KEYS``) is warned about, naming old and new."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .adafactor import factored_dims
from .compression import momentum_storage
from .options import (ALGORITHM_KEYS, CORE_KEYS, group_names, momentum_dim, momentum_reason, upgrade_group,
                      validate_group)
from .projection import is_stack, one_matrix, state_dtype
from . import sharded
from .state import COUNTERS, check_loaded_entries, check_state_shapes, count_value
from ._warn import warn


def _storage_differs(params, mine: dict, saved: dict) -> bool:
    """Whether two groups' ``momentum_dtype`` store some parameter's momentum apart ("auto"
    and None store alike without a rank, or without a momentum)."""
    if mine.get("beta1") is None and saved.get("beta1") is None:
        return False
    return any(momentum_storage(mine, p.dtype) != momentum_storage(saved, p.dtype) for p in params)


def _factors_differ(params, rule_a: str, rule_b: str) -> bool:
    """Whether two ``factor_dims`` rules factor some of ``params`` differently (they never
    do on 2-D tensors: a checkpoint of such a model loads silently as ``"last"``)."""
    return any(factored_dims(tuple(p.shape), rule_a) != factored_dims(tuple(p.shape), rule_b) for p in params)


def _proj_dims_kept(mine: dict, loaded: list[tuple[torch.Tensor, int]]) -> bool:
    """Whether every loaded momentum's projected dim (``loaded``: parameter, the state's
    ``proj_dim``) is the one ``mine`` gives its parameter: then a saved ``proj_dim`` that
    reads otherwise changes nothing (an FSDP2 checkpoint's "auto" took the unsharded
    dim, 1, which one process resumes with ``proj_dim="sharded"``; docs/distributed.md)."""
    from . import sharded
    from .options import momentum_dim

    rule = lambda p: sharded.momentum_dim if sharded.is_dtensor(p) else momentum_dim  # noqa: E731
    return bool(loaded) and all(rule(p)(tuple(p.shape), mine) == dim for p, dim in loaded)


# Options of the compressed momentum alone: where neither the built nor the loaded group
# compresses any of its parameters (rank None, beta1 None, or every tensor dense), a change
# of them changes nothing, and is not said (a probe: every old Flora(rank=None) checkpoint
# warned "momentum_form: 'floored' -> 'scaled'")
_COMPRESSION_KEYS = ("momentum_form", "projection", "kappa", "seed", "complement_weight", "max_aspect_ratio")


def _inert(key: str, params, mine: dict, saved: dict) -> bool:
    if key not in _COMPRESSION_KEYS:
        return False
    theirs = {**mine, **saved}
    shapes = [tuple(p.shape) for p in params]
    dims = lambda g: [momentum_dim(x, g) if momentum_reason(x, g) is None else None for x in shapes]  # noqa: E731
    if not any(d is not None for d in dims(mine) + dims(theirs)):
        return True
    # a max_aspect_ratio that leaves every tensor as it was
    return key == "max_aspect_ratio" and dims(mine) == dims(theirs)


# The options of a transformers Adafactor parameter group (all of them, and none of Flora's own).
_HF_ADAFACTOR_KEYS = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                      "relative_step", "warmup_init")


def _is_hf_adafactor(saved) -> bool:
    return isinstance(saved, dict) and "rank" not in saved and all(k in saved for k in _HF_ADAFACTOR_KEYS)


def _from_hf_adafactor(saved: dict, mine: dict) -> dict:
    """A group saved by ``transformers.optimization.Adafactor`` as the Flora group it is:
    no compression (``rank=None``; its state is Flora's dense one), this optimizer's other
    options of Flora's own (which then shape nothing), and, as in a Flora state saved
    before those options existed (``upgrade_group``), second moments factored over the
    last two dims and the momentum in the state dtype. Any other group is returned as is."""
    if not _is_hf_adafactor(saved):
        return saved
    own = {k: v for k, v in mine.items() if k not in saved and k not in ("params", "factor_dims", "momentum_dtype")}
    return {**own, **saved, "rank": None}


def _written_in_place(opt, pid, s, id_to_param: dict) -> bool:
    """Whether the loaded state ``s`` holds this optimizer's own state tensors: a loader
    wrote the checkpoint into them (``dcp.load`` into ``get_optimizer_state_dict``'s)."""
    own = opt.state.get(id_to_param[pid][0]) if pid in id_to_param else None
    return bool(own) and isinstance(s, dict) and any(
        isinstance(v, torch.Tensor) and own.get(k) is v for k, v in s.items())


def _said_if_written_in_place(error: ValueError, opt, states: dict, id_to_param: dict) -> ValueError:
    """A refused load whose entries are the optimizer's own state tensors: a loader wrote
    the checkpoint into them before handing it over (torch.distributed.checkpoint's
    ``dcp.load`` into ``get_optimizer_state_dict``'s tensors does), so the refusal cannot
    leave the state as it was; said (a probe)."""
    if not any(_written_in_place(opt, pid, s, id_to_param) for pid, s in states.items()):
        return error
    return ValueError(f"{error}. This state_dict's tensors are the optimizer's own state: a loader that writes a "
                      "checkpoint in place (torch.distributed.checkpoint's dcp.load into get_optimizer_state_dict's "
                      "tensors) has put it there already, and the refusal leaves them so; load a good checkpoint, or "
                      "build the optimizer afresh, before stepping")


def _same_under_a_wrapper(a: str, b: str) -> bool:
    """Whether two parameter names differ by a wrapper's prefix only (``module.`` of DDP,
    ``_orig_mod.`` of torch.compile, a peft or FSDP wrapper): one ends with ``"." +`` the
    other (a probe: the same tensors, saved plain and loaded compiled, were warned of)."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def load_state_dict(opt, state_dict: dict[str, Any], base_load) -> None:
    """Load after checking that the state comes from a Flora of the same rank and that
    every saved state tensor fits this optimizer's parameters. Each state tensor takes the
    dtype a fresh state of its parameter would have (float32 for float32 and half
    parameters, float64 for float64 ones; the momentum in its group's ``momentum_dtype``),
    where torch would cast it to the parameter's: a checkpoint resumed on parameters of
    the same dtype loads unchanged. State saved by earlier releases (option ``momentum``)
    loads.

    As in torch, the loaded parameter groups replace this optimizer's options (lr,
    beta1, kappa, ... all come from the checkpoint). A ``UserWarning`` names each
    option of ``ALGORITHM_KEYS`` (momentum_form, projection, beta1, kappa, seed,
    proj_dim, factor_dims, complement_weight, momentum_dtype, max_aspect_ratio) whose loaded value
    differs from this optimizer's, old and new
    (``factor_dims`` only where it changes how one of the group's tensors is factored).
    A group saved without ``factor_dims`` (before it existed) loads as ``"last"``, the
    rule its state was shaped by; one saved without ``complement_weight`` with None.

    torch's load hooks keep their contract: the dict a pre-hook returns is the one
    checked and loaded, and post-hooks run once the state is final (their edits of it
    stay; an edit of an option that shapes the state is refused at the next step). Its
    warnings come once the load is complete, so that warnings raised as errors cannot
    leave a half-loaded state."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict (an optimizer's state_dict()), got {type(state_dict).__name__}")
    state_dict = state_dict.copy()  # shallow, as torch's
    for hook in tuple(getattr(opt, "_optimizer_load_state_dict_pre_hooks", {}).values()):
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
            f"this optimizer has {len(opt.param_groups)}"
        )
    from_hf = [_is_hf_adafactor(g) for g in groups]
    groups = [_from_hf_adafactor(g, mine) for g, mine in zip(groups, opt.param_groups)]
    for gi, saved in enumerate(groups):
        missing = [k for k in CORE_KEYS if k not in saved]
        if missing:
            has = sorted(k for k in saved if k != "params")
            raise ValueError(
                f"state_dict is not a Flora state: its parameter group {gi} has options {has} and lacks "
                f"{missing}; it was saved by a different optimizer (such as AdamW). Load it into that "
                "optimizer, or start Flora from a fresh state"
            )
    groups = [upgrade_group(dict(g)) for g in groups]
    id_to_param: dict[Any, tuple[torch.Tensor, dict]] = {}
    renamed = []  # groups whose saved names are not this optimizer's: said after the load
    live_names = [g.get("param_names") for g in opt.param_groups]
    live_beta1: dict = {}  # parameter id -> this optimizer's beta1 for it (see _refuse_dropped_momentum)
    for gi, (saved, mine) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(
                f"state_dict has a parameter group of {len(saved['params'])} parameters where this "
                f"optimizer has {len(mine['params'])}: it was saved from a different model, or with its "
                "parameter groups in another order or split otherwise (build the groups as when it was saved)"
            )
        names_saved, names_mine = saved.get("param_names"), mine.get("param_names")
        if names_saved and names_mine and list(names_saved) != list(names_mine) \
                and sorted(names_saved) == sorted(names_mine):
            moved = next(f"{a!r} at position {i} where this optimizer has {b!r}"
                         for i, (a, b) in enumerate(zip(names_saved, names_mine)) if a != b)
            raise ValueError(
                f"state_dict lists the parameters of group {gi} in another order than this optimizer "
                f"({moved}): each state would load into another parameter. Build the group with its "
                "parameters in the checkpoint's order"
            )
        if names_saved and names_mine and sorted(names_saved) != sorted(names_mine):
            at = {n: i for i, n in enumerate(names_saved)}
            clash = next(((n, at[n], i) for i, n in enumerate(names_mine) if at.get(n, i) != i), None)
            if clash is not None:
                raise ValueError(
                    f"state_dict lists {clash[0]!r} at position {clash[1]} of group {gi}, where this optimizer "
                    f"has it at position {clash[2]}: each state would load into another parameter (the "
                    "checkpoint's parameters are not this optimizer's). Build the group with the checkpoint's "
                    "parameters, in its order")
            if not all(_same_under_a_wrapper(a, b) for a, b in zip(names_saved, names_mine)):
                renamed.append(next(f"group {gi}: {a!r} where this optimizer has {b!r}"
                                    for a, b in zip(names_saved, names_mine) if not _same_under_a_wrapper(a, b)))
        if saved["rank"] != mine["rank"] and from_hf[gi]:
            raise ValueError(
                f"state_dict was saved by transformers' Adafactor (parameter group {gi}), whose state is "
                f"Flora's uncompressed one: build Flora with rank=None to resume it (this optimizer has "
                f"rank={mine['rank']!r})"
            )
        if saved["rank"] != mine["rank"]:
            raise ValueError(
                f"state_dict was saved with rank={saved['rank']!r} in parameter group {gi}, but this optimizer "
                f"has rank={mine['rank']!r}: build Flora with rank={saved['rank']!r} to resume this state"
            )
        validate_group({**opt.defaults, **{k: v for k, v in saved.items() if k != "params"}})
        for pid, p in zip(saved["params"], mine["params"]):
            id_to_param[pid] = (p, saved)
            live_beta1[pid] = mine.get("beta1")
    states = state_dict.get("state")
    if not isinstance(states, dict):
        raise ValueError(f"state_dict['state'] must be a dict (parameter id -> its state), got "
                         f"{type(states).__name__}: not an optimizer's state_dict")
    names = {id(q): n for g in opt.param_groups for q, n in zip(g["params"], group_names(g))}
    shard_damage: dict = {}  # FSDP2: a shard's damage, refused on every process together
    refused = None  # this process's refusal of a state: under FSDP2, agreed on before it is raised
    try:
        for pid, s in states.items():
            if pid not in id_to_param:
                raise ValueError(f"state_dict holds a state for parameter id {pid!r}, which none of its parameter "
                                 "groups lists: the checkpoint is damaged")
            p, g = id_to_param[pid]
            name = names.get(id(p))
            if not sharded.is_dtensor(p) and isinstance(s, dict) and any(sharded.is_dtensor(v) for v in s.values()):
                # a sharded run's opt.state_dict(): accepted, its first step failed inside torch after
                # advancing every counter (probe Z100)
                raise ValueError(
                    f"state_dict's state for {repr(name) if name else f'parameter id {pid!r}'} holds DTensors (a "
                    "sharded optimizer's opt.state_dict(), FSDP2), but this parameter is a plain tensor: save the "
                    "sharded run with torch.distributed.checkpoint (get_state_dict and dcp.save; "
                    "docs/distributed.md) and load it here with proj_dim='sharded', or turn each DTensor into a "
                    "whole tensor (.full_tensor(), on every process) before loading")
            check_loaded_entries(p, s, repr(pid), name, shard_damage)
            check_state_shapes(p, s, g, name)
            if sharded.is_dtensor(p):
                sharded.check_loaded_stack(p, s)
            if _written_in_place(opt, pid, s, id_to_param):
                _refuse_dropped_momentum(s, g, live_beta1[pid], repr(name) if name else f"id {pid!r}")
    except ValueError as e:
        refused = e
    try:
        params = [q for g in opt.param_groups for q in g["params"]]
        if any(sharded.is_dtensor(q) for q in params):
            loaded = {id(id_to_param[pid][0]) for pid in states if pid in id_to_param}
            sharded.agree_on_load(params, shard_damage, refused, loaded)
        elif refused is not None:
            raise refused
    except ValueError as e:
        raise _said_if_written_in_place(e, opt, states, id_to_param) from None
    group_of = {id(q): gi for gi, g in enumerate(opt.param_groups) for q in g["params"]}
    loaded_dims: dict[int, list] = {gi: [] for gi in range(len(groups))}  # group -> (param, its state's proj_dim)
    for pid, s in state_dict["state"].items():
        if "proj_dim" in s:
            p = id_to_param[pid][0]
            loaded_dims[group_of[id(p)]].append((p, s["proj_dim"]))
    changed = [(gi, k, mine[k], saved[k]) for gi, (saved, mine) in enumerate(zip(groups, opt.param_groups))
               for k in ALGORITHM_KEYS if k in saved and k in mine and saved[k] != mine[k]
               and (k != "factor_dims" or _factors_differ(mine["params"], mine[k], saved[k]))
               and (k != "momentum_dtype" or _storage_differs(mine["params"], mine, saved))
               and (k != "proj_dim" or not _proj_dims_kept(mine, loaded_dims[gi]))
               and not _inert(k, mine["params"], mine, saved)]
    with _load_hooks_off(opt):  # run here, around Flora's own checks and final pass
        base_load({**state_dict, "param_groups": groups})
    opt._proj_cache.clear()
    opt._where = None
    opt._device_steps.clear()
    opt._stacks.clear()
    opt._lr_tensors.clear()
    for group, names in zip(opt.param_groups, live_names):
        if names:  # the names of the tensors held (torch's load puts the checkpoint's in)
            group["param_names"] = names
    for group in opt.param_groups:  # options added since the state was saved
        upgrade_group(group)
        for k, v in opt.defaults.items():
            group.setdefault(k, v)
    for pid, s in state_dict["state"].items():
        p, g = id_to_param[pid]
        for k, v in s.items():
            if k in COUNTERS or (k == "proj_dim" and "exp_avg_c" in s):
                # a plain number (ours) or a tensor (torch's convention): the number, checked above
                opt.state[p][k] = count_value(v)
            elif isinstance(v, torch.Tensor):
                # the dtype this parameter's state takes (float64 for float64 parameters;
                # the momentum in its group's momentum_dtype), as a fresh state would: a
                # checkpoint resumed on parameters of another dtype does not mix the two
                want = None if not v.is_floating_point() else (
                    momentum_storage(g, p.dtype) if k in ("exp_avg", "exp_avg_c") else state_dtype(p.dtype))
                opt.state[p][k] = v.detach().to(device=p.device, dtype=want, copy=True)
        if sharded.is_dtensor(p):  # in the layout Flora's sharded step reads
            sharded.place_loaded_state(p, opt.state[p], g)
    opt._remember_layouts()  # an edit of seed, projection, proj_dim... before the next step is checked
    for hook in tuple(getattr(opt, "_optimizer_load_state_dict_post_hooks", {}).values()):
        hook(opt)
    # warnings last: under warnings-as-errors the load is complete (torch's base load shares
    # the checkpoint's tensors until the pass above copies them)
    if renamed:
        warn(f"Flora.load_state_dict: the checkpoint names other parameters than this optimizer holds "
             f"({'; '.join(renamed)}); their states were given to this optimizer's parameters in its order, "
             "as torch's optimizers do. If these are not the same tensors renamed, build the optimizer on the "
             "checkpoint's parameters", UserWarning)
    if changed:
        said = "; ".join(f"{k}: {old!r} -> {new!r}" + (f" (group {gi})" if len(groups) > 1 else "")
                         for gi, k, old, new in changed)
        warn(f"Flora.load_state_dict: the loaded parameter groups change the algorithm this optimizer "
             f"was built with: {said}. As in torch, the loaded options win; build Flora with the "
             "checkpoint's options to silence this (options that shape the state, rank, factor_dims, "
             "seed, projection, proj_dim, max_aspect_ratio, cannot be set back in param_groups while "
             "the state exists; the others can, where the state's projection takes them: a Gaussian one "
             "takes momentum_form 'paper' or 'exact' only)",
             UserWarning)
    _warn_narrowed_momentum(id_to_param, state_dict["state"])
    _warn_dense_stacks(id_to_param, state_dict["state"])


def _refuse_dropped_momentum(s: dict, saved: dict, live_beta1, which: str) -> None:
    """A state written in place (``dcp.load``: the caller checks) that has stepped under a
    group whose ``beta1`` is set but holds no first moment, loaded into a Flora built with
    ``beta1=None``: torch.distributed.checkpoint fills only the state entries the loading
    optimizer made (at its lr-0 step, none for a momentum), so the checkpoint's momentum was
    left out while its ``beta1`` won (a probe: the run went on with the momentum restarted
    from zero, 9e-3 off, under a warning that said only that beta1 changed). Refused, naming
    the parameter; built with the checkpoint's ``beta1``, the same load is exact. A plain
    ``load_state_dict`` of such a state is not refused: it holds what was saved (a state
    saved between an edit of beta1 and the next step has no momentum yet; a review)."""
    if live_beta1 is not None or saved.get("beta1") is None or "exp_avg" in s or "exp_avg_c" in s:
        return
    if count_value(s.get("step", 0)) > 0:
        raise ValueError(
            f"Flora.load_state_dict: parameter {which} has stepped {count_value(s['step'])} time(s) under the "
            f"checkpoint's beta1={saved['beta1']!r}, but its loaded state holds no momentum, and this optimizer "
            "was built with beta1=None. torch.distributed.checkpoint (dcp.load) fills only the state entries the "
            "loading optimizer made, so the checkpoint's momentum was left out. Build Flora with "
            f"beta1={saved['beta1']!r} (and the checkpoint's other options) and load again (set_state_dict "
            "has loaded the model's weights already: rebuild it too, or load both again)")


@contextlib.contextmanager
def _load_hooks_off(opt):
    """torch's ``Optimizer.load_state_dict`` without its load hooks (Flora runs them)."""
    names = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
    saved = {n: getattr(opt, n) for n in names if hasattr(opt, n)}
    for n in saved:
        setattr(opt, n, type(saved[n])())
    try:
        yield
    finally:
        for n, hooks in saved.items():
            setattr(opt, n, hooks)


def _warn_dense_stacks(id_to_param: dict, states: dict) -> None:
    """Stacks of matrices (stacked experts) saved with a dense momentum that the loading
    Flora would compress: before 2026-12-04 a stack of E <= rank matrices stayed dense.
    It stays dense (a momentum is never compressed mid-run), more state than plan() and
    flora_state_bytes say: say so."""
    dense = []
    for pid, s in states.items():
        p, group = id_to_param[pid]
        if "exp_avg" in s and "exp_avg_c" not in s and is_stack(tuple(p.shape)) and group["beta1"] is not None \
                and (sharded.momentum_dim if sharded.is_dtensor(p) else momentum_dim)(tuple(p.shape), group) is not None:
            dense.append(tuple(p.shape))
    ones = [s for s in dense if one_matrix(s)]  # a position embedding's (1, N, d)
    stacks = [s for s in dense if not one_matrix(s)]
    if stacks:
        warn(f"Flora.load_state_dict: {len(stacks)} stack(s) of matrices (stacked experts, e.g. shape "
             f"{stacks[0]}) hold a dense momentum, which this Flora would compress: saved before 2026-12-04, "
             "when a stack of no more matrices than the rank stayed dense. They stay dense (more state than "
             "the current rule keeps; plan() says so); drop their state (optimizer.state.pop(p)) to compress "
             "them", UserWarning)
    if ones:
        warn(f"Flora.load_state_dict: {len(ones)} matrix(es) behind leading dims of 1 (e.g. shape {ones[0]}, "
             "a position embedding) hold a dense momentum, which this Flora would compress: saved before "
             "2026-12-04, when such a tensor was seen as a single 1 x (n * m) row. They stay dense (plan() "
             "says so); drop their state (optimizer.state.pop(p)) to compress them", UserWarning)


def _warn_narrowed_momentum(id_to_param: dict, states: dict) -> None:
    """A loaded momentum narrower than its group stores it was rounded on its way in, or
    saved so (a parameter idle since ``momentum_dtype`` was edited: the warning names both,
    since the load cannot tell them apart). The usual cause is torch.distributed.checkpoint
    (and the Trainer's FSDP checkpoints), which loads into the tensors the loading optimizer made, so a float32 checkpoint
    (``momentum_dtype=None``, every one saved before "auto" became the default) read into
    a default-built Flora arrives in bfloat16. Its next step widens the rounded values:
    the run continues, but not as the saved one would have."""
    narrowed = 0
    for pid, s in states.items():
        p, group = id_to_param[pid]
        if group.get("momentum_dtype") == "auto":
            # what "auto" stores follows the parameter's dtype, which may have changed since
            # the state was made (model.double() before the save): a narrower momentum is
            # widened at the next step, nothing was rounded (a probe saw this warned)
            continue
        want = momentum_storage(group, p.dtype)
        for k in ("exp_avg_c", "exp_avg"):
            v = s.get(k)
            if isinstance(v, torch.Tensor) and torch.finfo(v.dtype).bits < torch.finfo(want).bits:
                narrowed += 1
    if narrowed:
        warn(f"Flora.load_state_dict: {narrowed} loaded momentum tensor(s) are narrower than their group's "
             "momentum_dtype stores them (bfloat16 where the checkpoint's group says float32). Either they "
             "were rounded on the way in, as torch.distributed.checkpoint does when it loads a float32 "
             "checkpoint into an optimizer built with the default momentum_dtype='auto' (to resume such "
             "a checkpoint exactly, build Flora with momentum_dtype=None, as it was saved), or they were "
             "saved so, by parameters that had not stepped since their group's momentum_dtype was edited "
             "(then nothing was lost: they are widened now, as their next step would have)",
             UserWarning)
