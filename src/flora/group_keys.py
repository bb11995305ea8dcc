"""Keys of a parameter group that are not Flora's options: another torch optimizer's
(``betas``, ``maximize``, ...: said in a warning, the two that would change the step
refused) and a misspelt option (``rnak``: said with the option it is close to). torch keeps
any key in a group without a word, so each would be ignored silently otherwise."""

from __future__ import annotations

import difflib
import functools
import inspect

import torch
from torch.optim import Optimizer

from ._warn import warn

BETAS_HELP = ("the first moment's coefficient is beta1 (e.g. beta1=0.9; None: no first moment) and the second "
              "moment follows Adafactor's decay_rate (default -0.8: beta2 at step t is 1 - t^-0.8)")


# Options of torch's optimizers (AdamW, SGD, torch.optim.Adafactor) that Flora does not
# have. torch keeps a group's unknown keys without a word, so a group built for one of
# those optimizers would have them silently ignored: each is named in a warning
# (maximize=True, which would flip the objective, and a numeric momentum are refused).
FOREIGN_KEYS = ("betas", "amsgrad", "nesterov", "dampening", "beta2_decay", "d", "decoupled_weight_decay",
                "maximize", "capturable", "differentiable", "fused")
# Switches that change nothing when off: not said then (torch's __setstate__ adds
# differentiable=False to the defaults; AdamW's groups hold maximize=False, capturable=False,
# amsgrad=False, fused=None, and Flora(adamw.param_groups) was warned of them: a probe)
_OFF_SWITCHES = ("differentiable", "maximize", "capturable", "fused", "amsgrad", "nesterov")
# torch.optim.Adafactor's names for options Flora has under HF's names
_RENAMED = {"beta2_decay": "decay_rate", "d": "clip_threshold"}


# Flora's group options (its defaults' keys; a test holds them equal), for telling a
# misspelt one: torch keeps any key in a group, so {"rnak": 4} had been ignored silently (a probe)
OPTION_NAMES = frozenset(("beta1", "cache_projections", "clip_threshold", "complement_weight", "decay_rate", "eps",
                          "factor_dims", "foreach", "kappa", "lr", "max_aspect_ratio", "momentum_dtype",
                          "momentum_form", "proj_dim", "projection", "rank", "relative_step", "scale_parameter",
                          "seed", "warmup_init", "weight_decay"))
# names of an option that difflib does not find close (or finds close to the wrong one)
_ALIASES = {"learning_rate": "lr", "epsilon": "eps", "beta": "beta1", "beta2": "decay_rate"}


@functools.lru_cache(maxsize=1)
def _other_optimizers_options() -> frozenset:
    """Every option of torch.optim's optimizers (NAdam's momentum_decay is not a misspelt
    momentum_dtype): a group copied from one is said by FOREIGN_KEYS' warning or not at all."""
    names = set()
    for cls in vars(torch.optim).values():
        if isinstance(cls, type) and issubclass(cls, Optimizer) and cls is not Optimizer:
            names.update(inspect.signature(cls.__init__).parameters)
    return frozenset(names)


def _misspelt(group: dict) -> dict:
    """``{key: the option it is close to}`` for the keys of ``group`` that are neither
    Flora's options nor another torch optimizer's. Only close ones, and not a key that holds
    an option's words among others (``initial_weight_decay``, which schedulers write,
    ``weight_decay_mult``, a user's tag): schedulers and users keep keys of their own in
    groups (initial_lr, max_lr, a layer's name)."""
    out = {}
    for k in group:
        if isinstance(k, str) and k not in OPTION_NAMES and k not in ("params", "param_names"):
            close = _close_option(k)
            if close is not None:
                out[k] = close
    return out


@functools.lru_cache(maxsize=512)
def _close_option(key: str) -> str | None:
    if key in _other_optimizers_options() or key in FOREIGN_KEYS:
        return None
    if key.lower() in OPTION_NAMES or key.lower() in _ALIASES:
        return _ALIASES.get(key.lower(), key.lower())
    match = difflib.get_close_matches(key, sorted(OPTION_NAMES), n=1, cutoff=0.75)
    if not match:
        return None
    words, option = key.split("_"), match[0].split("_")
    if len(words) > len(option) and any(words[i:i + len(option)] == option for i in range(len(words))):
        return None  # the option's words and more: a key of its own
    return match[0]


def foreign_found(group: dict, spelling: bool = True) -> list:
    """The foreign keys of ``group`` that would change something (an off switch, and
    decoupled_weight_decay=True, which Flora's weight decay is, change nothing), and
    (``spelling``) the keys that look like a misspelt option."""
    found = [k for k in FOREIGN_KEYS if k in group and not (k in _OFF_SWITCHES and not group[k])
             and not (k == "decoupled_weight_decay" and group[k] is True)]
    return found + list(_misspelt(group)) if spelling else found


def check_foreign_keys(group: dict, warned: set | None = None, spelling: bool = True) -> None:
    """Refuse maximize=True and a numeric momentum; warn of the other foreign keys and
    (``spelling``: the step asks when the group's keys changed) of a key that
    looks like a misspelt option (once a group and key, with ``warned``: at each step a
    key edited in since is said too)."""
    if group.get("maximize"):
        raise ValueError("maximize=True in a parameter group: Flora has no maximize option and would descend; "
                         "negate the loss instead")
    momentum = group.get("momentum")
    if momentum is not None and not isinstance(momentum, str):
        raise ValueError(f"a parameter group's momentum={momentum!r}: Flora's momentum coefficient is beta1 "
                         "(beta1=0.9; None: no first moment)")
    if isinstance(momentum, str) and momentum != group.get("momentum_form", momentum) and (
            warned is None or (id(group), "momentum=" + momentum) not in warned):
        # the old name, edited into param_groups mid-run: renamed only where a group is made,
        # so the edit had been ignored without a word (a mutation probe, Z147). Said, not
        # refused: a ZeroRedundancyOptimizer built with momentum= keeps the old key in its
        # groups, and copies it into Flora's, beside a momentum_form edited since (a review)
        if warned is not None:
            warned.add((id(group), "momentum=" + momentum))
        warn(f"a parameter group's momentum={momentum!r} beside momentum_form={group.get('momentum_form')!r}: "
             "'momentum' is the old name of 'momentum_form' (renamed where a group is made, with a "
             "FutureWarning); beside momentum_form it is ignored. Edit param_groups[i]['momentum_form']", UserWarning)
    # torch's own __setstate__ puts differentiable=False into every loaded optimizer's
    # defaults, hence into a group added after load_state_dict: not said (a probe saw the
    # user warned of an option they never set)
    misspelt = _misspelt(group) if spelling else {}
    found = foreign_found(group, spelling=False) + list(misspelt)
    if warned is not None:
        found = [k for k in found if (id(group), k) not in warned]
        warned.update((id(group), k) for k in found)
    for k in found:
        if k in misspelt:
            warn(f"a parameter group's {k!r} is not an option of Flora, which ignores it: did you mean "
                 f"{misspelt[k]!r}?" + (f" ({BETAS_HELP})" if misspelt[k] in ("beta1", "decay_rate") else ""),
                 UserWarning)
    found = [k for k in found if k not in misspelt]
    if found:
        helps = ([BETAS_HELP] if "betas" in found else []) + \
            [f"torch.optim.Adafactor's {k} is Flora's {_RENAMED[k]}" for k in found if k in _RENAMED]
        help_ = f" ({'; '.join(helps)})" if helps else ""
        warn(f"a parameter group's {', '.join(repr(k) for k in found)}: options of torch's optimizers "
             f"that Flora does not have, so it ignores them{help_}", UserWarning)


__all__ = ["BETAS_HELP", "FOREIGN_KEYS", "OPTION_NAMES", "check_foreign_keys", "foreign_found"]
