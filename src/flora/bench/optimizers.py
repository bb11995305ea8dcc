"""The optimizers the benchmark compares, by name: every subcommand parses names here.

Names (``--optimizers``, comma separated):

- ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, no weight decay).
- ``adafactor``, ``adafactor-b0.9``: ``transformers.optimization.Adafactor`` with a fixed
  lr (``relative_step=False``), without / with first moment.
- ``flora-r<R>``: ``flora.Flora`` (same Adafactor settings, ``beta1=0.9``, rank R) in its
  default form (``DEFAULT_FLORA_FORM``: "floored" momentum, orthonormal projection; before
  that default changed, the bench's ``flora-r<R>`` meant ``flora-r<R>-exact``); generally
  ``flora-r<R>-<FORM>[-<PROJECTION>]``, FORM one of ``flora.Flora``'s momentum forms
  (paper, exact, subspace, scaled, adaptive, fixed, floored) and PROJECTION one of its
  projections (gaussian, the default when left out; orthonormal; coordinates), e.g.
  ``flora-r8-paper``, ``flora-r8-exact-orthonormal``, ``flora-r8-scaled-coordinates``.
  subspace, scaled, adaptive, fixed and floored need a non-Gaussian projection
  (``VALID_FLORA_FORMS``). The fixed and floored forms take their ``complement_weight``
  after their name, ``flora-r8-fixed0.25-orthonormal``, ``flora-r8-floored0.3-orthonormal``
  (``flora-r8-fixed-orthonormal``: Flora's default weight). ``flora-dense``: ``flora.Flora``
  with ``beta1=0.9`` and no rank (dense momentum: Adafactor itself).
- ``lora-r<R>``: LoRA (``peft``) of rank R on the linear layers, trained with Adafactor
  beta1 0.9 (the base optimizer of every Flora run, as in the paper's comparison).
- ``galore-r<R>``: ``galore_torch.GaLoreAdamW``; ``apollo-r<R>``: ``apollo_torch.APOLLOAdamW``
  (random projection, channel scaling); ``flora-opt-r<R>``: the authors' ``flora_opt.Flora``
  (beta1 0.9). The peers are an optional extra (``pip install -e '.[peers]'``).
- ``<any>+ca-r<R>``: the same optimizer fed by ``flora.CompressedAccumulator`` (rank R,
  tau micro-batches a step); only where the task accumulates (tau > 1).

Every projection-based method resamples its projection every ``kappa`` steps (GaLore's
and APOLLO's ``update_proj_gap``), so the comparison is at equal refresh rates.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import types
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

import flora
from flora.momentum import MOMENTUM_FORMS, SUBSPACE_FORMS, WEIGHTED_FORMS, fixed_weight
from flora.projection import PROJECTIONS

from . import config
from .config import flora_form_name  # noqa: F401 - one name maker, here with the parser
from .names import DEFAULT_FLORA_FORM, flora_name  # noqa: F401 - used here, and bo.flora_name elsewhere


class Unavailable(RuntimeError):
    """The optimizer cannot run here (a peer is not installed, a feature is missing)."""


_NAME = re.compile(r"^(?P<base>adamw|adafactor(?:-b0\.9)?|flora-dense"
                   r"|flora-r(?P<fr>\d+)(?P<form>(?:-[a-z]+[0-9.]*){0,2})"
                   r"|lora-r(?P<lr>\d+)"
                   r"|galore-r(?P<gr>\d+)|apollo-r(?P<ar>\d+)|flora-opt-r(?P<or>\d+))"
                   r"(?:\+(?P<md>bf16|fp32))?(?:\+ca-r(?P<ca>\d+))?$")

# A Flora name's momentum dtype suffix (flora.Flora's momentum_dtype): flora-r32+bf16 (every
# momentum in bfloat16), flora-r32+fp32 (in float32, the default before 2026-12-02); without
# one, Flora's default "auto": bfloat16 with a rank, so flora-rR and flora-rR+bf16 step alike.
MOMENTUM_DTYPE_SUFFIXES = {"bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class Spec:
    name: str
    family: str  # adamw, adafactor, flora, lora, galore, apollo, flora-opt
    rank: int | None = None
    beta1: float | None = None
    momentum_form: str = DEFAULT_FLORA_FORM[0]  # flora.Flora's momentum_form
    projection: str = "orthonormal"  # flora.Flora's projection
    accumulate_rank: int | None = None
    complement_weight: float | None = None  # flora.Flora's complement_weight (the "fixed" and "floored" forms')
    momentum_dtype: str | None = None  # flora.Flora's momentum_dtype ("+bf16", "+fp32"); None: its default

    @property
    def flora_form(self) -> str:
        """FORM-PROJECTION, the form with its complement weight (``fixed0.25-orthonormal``)."""
        weight = "" if self.complement_weight is None else f"{self.complement_weight:g}"
        return f"{self.momentum_form}{weight}-{self.projection}"

    @property
    def lr_family(self) -> str:
        return {"adamw": "adam", "galore": "adam", "apollo": "adam", "lora": "lora"}.get(self.family, "adafactor")

    @property
    def is_peer(self) -> bool:
        return self.family in PEER_MODULES

    @property
    def peer_module(self) -> str | None:
        return PEER_MODULES.get(self.family)


# The peers, by family: the package each one needs.
PEER_MODULES = {"galore": "galore_torch", "apollo": "apollo_torch", "flora-opt": "flora_opt"}


# What a name may be (R: a rank), for messages.
NAME_FORMS = ("adamw", "adafactor", "adafactor-b0.9", "flora-rR", "flora-rR-FORM[-PROJECTION]", "flora-rR[...]+bf16",
              "flora-rR[...]+fp32", "flora-dense",
              "lora-rR", "galore-rR", "apollo-rR", "flora-opt-rR")

# Flora's (momentum form, projection) pairs that it accepts: the subspace forms need rows
# that are orthonormal (flora.Flora raises ValueError for them with a Gaussian projection).
VALID_FLORA_FORMS = tuple((f, p) for f in MOMENTUM_FORMS for p in PROJECTIONS
                          if not (f in SUBSPACE_FORMS and p == "gaussian"))


# A form's name with its complement weight after it (WEIGHTED_FORMS): "fixed0.25", "floored0.3".
_WEIGHTED = re.compile(r"^(?P<form>[a-z]+)(?P<weight>\d+(?:\.\d+)?)?$")


def _flora_form(name: str, suffix: str) -> tuple[str, str, float | None]:
    """(momentum form, projection, complement weight) of a ``flora-rR`` name's suffix
    ("", "-paper", "-scaled-coordinates", "-fixed0.25-orthonormal", "-floored0.3-orthonormal")."""
    parts = suffix.split("-")[1:]
    if not parts:  # a bare flora-rR: Flora's default form
        return (*DEFAULT_FLORA_FORM, None)
    m = _WEIGHTED.match(parts[0])
    form, weight = (m["form"], m["weight"]) if m else (parts[0], None)
    projection = parts[1] if len(parts) > 1 else "gaussian"
    if weight is not None and (form not in WEIGHTED_FORMS or not 0.0 <= float(weight) <= 1.0):
        raise ValueError(f"{name}: a complement weight ({weight}) follows only the fixed or floored form's name, "
                         "and is in [0, 1] (e.g. flora-r8-fixed0.25-orthonormal, flora-r8-floored0.3-orthonormal)")
    if (form, projection) not in VALID_FLORA_FORMS:
        valid = ", ".join(flora_name(0, f, p).replace("r0", "rR") for f, p in VALID_FLORA_FORMS)
        if form in SUBSPACE_FORMS and projection == "gaussian":
            why = f"momentum form {form!r} needs projection orthonormal or coordinates, not gaussian"
        else:
            why = (f"{suffix[1:]!r} is not FORM[-PROJECTION] (forms: {', '.join(MOMENTUM_FORMS)}; projections: "
                   f"{', '.join(PROJECTIONS)})")
        raise ValueError(f"{name}: {why}; valid Flora names: {valid} (R a rank; the projection defaults to gaussian; "
                         "fixed and floored may carry their complement weight: flora-rR-fixed0.25-orthonormal)")
    return form, projection, None if weight is None else float(weight)


def parse(name: str) -> Spec:
    """The optimizer a name stands for; ``ValueError`` naming the valid forms otherwise."""
    m = _NAME.match(name.strip())
    if not m:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(NAME_FORMS)}, and any but "
                         "lora-rR with +ca-rR (compressed accumulation), R a rank, FORM one of "
                         f"{', '.join(MOMENTUM_FORMS)}, PROJECTION one of {', '.join(PROJECTIONS)} (e.g. flora-r32, "
                         "flora-r32-scaled-orthonormal, flora-r32+ca-r32)")
    base, ca = m["base"], int(m["ca"]) if m["ca"] else None
    # The pattern takes any digits: a rank of 0 would pass here and fail only inside a run.
    zero = [g for g in ("fr", "lr", "gr", "ar", "or", "ca") if m[g] is not None and int(m[g]) < 1]
    if zero:
        raise ValueError(f"{name}: a rank (R in -rR, +ca-rR) must be at least 1 (e.g. flora-r32, flora-r32+ca-r32)")
    if base == "adamw":
        s = Spec(name, "adamw")
    elif base.startswith("adafactor"):
        s = Spec(name, "adafactor", beta1=0.9 if base.endswith("b0.9") else None)
    elif base == "flora-dense":
        s = Spec(name, "flora", beta1=0.9)
    elif m["fr"]:
        form, projection, weight = _flora_form(name, m["form"])
        s = Spec(name, "flora", rank=int(m["fr"]), beta1=0.9, momentum_form=form, projection=projection,
                 complement_weight=weight)
    elif m["lr"]:
        s = Spec(name, "lora", rank=int(m["lr"]), beta1=0.9)
    elif m["gr"]:
        s = Spec(name, "galore", rank=int(m["gr"]))
    elif m["ar"]:
        s = Spec(name, "apollo", rank=int(m["ar"]))
    else:
        s = Spec(name, "flora-opt", rank=int(m["or"]), beta1=0.9)
    if m["md"]:
        if s.family != "flora" or s.rank is None:
            raise ValueError(f"{name}: +{m['md']} (the momentum's storage dtype) follows a flora-rR name only "
                             "(e.g. flora-r32+bf16, flora-r32+fp32, flora-r32-exact-orthonormal+bf16)")
        s = dataclasses.replace(s, momentum_dtype=MOMENTUM_DTYPE_SUFFIXES[m["md"]])
    if ca is not None and s.family == "lora":
        raise ValueError(f"{name}: compressed accumulation of LoRA adapters is not offered (they are already low-rank)")
    return dataclasses.replace(s, accumulate_rank=ca)


def aliases(names) -> list[tuple[str, str]]:
    """Pairs of different names that parse to one optimizer (``flora-r8`` and
    ``flora-r8-floored-orthonormal``, the default form spelt out; ``fixed0.4``, the default
    weight spelt out): each would run the same runs again under its own name. A name
    given twice is not here (``core.refuse_repeats`` says it)."""
    first: dict[Spec, str] = {}
    out = []
    for n in names:
        key = dataclasses.replace(parse(n), name="")
        if key.momentum_form in WEIGHTED_FORMS:  # the default weight spelt out: fixed0.4 is fixed
            key = dataclasses.replace(key, complement_weight=fixed_weight(key.complement_weight))
        if key in first and first[key] != n:  # the same name twice: refuse_repeats' to say
            out.append((first[key], n))
        else:
            first[key] = n
    return out


def lr_grid(spec: Spec, task: str, points: int) -> tuple[float, ...]:
    """The lr values swept for ``spec`` on ``task`` (``config.LR_GRIDS``)."""
    return config.lr_values(task, spec.lr_family, points)


def peer_status() -> dict[str, str]:
    """'ok' or the import error of each peer package."""
    out = {}
    for mod in PEER_MODULES.values():
        try:
            _import_peer(mod)
            out[mod] = "ok"
        except Unavailable as e:
            out[mod] = str(e.__cause__ or e).splitlines()[0][:200]
    return out


def _import_peer(mod: str):
    try:
        m = __import__(mod)
        if mod == "flora_opt" and getattr(m, "Flora", None) is None:  # its torch module failed to import
            from flora_opt.optimizers.torch import flora  # noqa: F401 - raises the real error
        return m
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        raise Unavailable(f"{mod} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "install the peers extra: pip install -c constraints.txt -e '.[peers]'") from e


def allow_flora_opt_without_bitsandbytes() -> None:
    """flora-opt's torch module imports bitsandbytes at the top but uses it only with
    ``quantization=True``. Where bitsandbytes is not installed, put a stub that refuses to
    quantize in its place, so that flora-opt can be timed unquantized (the ``step``
    subcommand does; it changes ``sys.modules`` for the rest of the process)."""
    if importlib.util.find_spec("bitsandbytes") is not None or "bitsandbytes" in sys.modules:
        return

    def _refuse(*a, **k):
        raise RuntimeError("bitsandbytes stub: quantization is not available in this benchmark")

    bnb = types.ModuleType("bitsandbytes")
    bnb.functional = types.ModuleType("bitsandbytes.functional")
    bnb.functional.quantize_blockwise = bnb.functional.dequantize_blockwise = _refuse
    sys.modules["bitsandbytes"] = bnb
    sys.modules["bitsandbytes.functional"] = bnb.functional


def projected_matrices(model: nn.Module, head_names: tuple[str, ...]) -> tuple[list, list]:
    """(weights of the linear layers inside the network, every other trainable parameter).

    Output heads (``lm_head``, ``classifier``) and embeddings go to the second list: that
    is where GaLore's and APOLLO's reference scripts put them."""
    mats, rest = [], []
    linear_weights = {id(m.weight) for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not any(h in n for h in head_names)}
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (mats if id(p) in linear_weights else rest).append(p)
    return mats, rest


def make_optimizer(spec: Spec, params, lr: float, *, kappa: int, seed: int, scale_parameter: bool = False,
                   foreach: bool | None = None, flora_module=flora, flora_options: dict | None = None
                   ) -> torch.optim.Optimizer:
    """``spec``'s optimizer over a flat list of tensors (AdamW, Adafactor, Flora, flora-opt).

    Adafactor, Flora and flora-opt run with a fixed lr (``relative_step=False``) and the
    same ``scale_parameter``; ``foreach`` goes to AdamW; ``flora_module`` is the package
    whose ``Flora`` to build (another copy of flora, to time one against the other), with
    ``flora_options`` (e.g. ``cache_projections``) added."""
    params = list(params)
    ada = dict(lr=lr, scale_parameter=scale_parameter, relative_step=False, warmup_init=False)
    if spec.family == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=foreach)
    if spec.family in ("adafactor", "lora"):
        from transformers.optimization import Adafactor

        return Adafactor(params, beta1=spec.beta1, **ada)
    if spec.family == "flora":
        # A baseline copy of flora may predate `projection` (then all was Gaussian) and the
        # rename of `momentum` to `momentum_form`; a form it lacks fails there, clearly.
        known = inspect.signature(flora_module.Flora).parameters
        form = {"momentum_form" if "momentum_form" in known else "momentum": spec.momentum_form}
        if spec.projection != "gaussian" or "projection" in known:
            form["projection"] = spec.projection
        if spec.complement_weight is not None:  # Flora's default weight otherwise
            form["complement_weight"] = spec.complement_weight
        if spec.momentum_dtype is not None:
            form["momentum_dtype"] = spec.momentum_dtype
        return flora_module.Flora(params, rank=spec.rank, beta1=spec.beta1, kappa=kappa, seed=seed, **form, **ada,
                                  **(flora_options or {}))
    if spec.family == "flora-opt":
        return _import_peer("flora_opt").Flora(params, rank=spec.rank, beta1=spec.beta1, kappa=kappa, seed=seed,
                                               **ada)
    raise ValueError(f"{spec.name}: {spec.family} needs the model (its layers), not a list of tensors")


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    accumulator: object | None
    trainable_params: int


def build(spec: Spec, model: nn.Module, lr: float, *, task, kappa: int, tau: int, seed: int,
          scale_parameter: bool = False) -> Built:
    """Set up ``spec`` on ``model`` (LoRA wraps it) and return what the loop needs
    (``scale_parameter``: Adafactor's, for Adafactor, LoRA's Adafactor, Flora and flora-opt)."""
    if spec.accumulate_rank is not None and tau <= 1:
        raise Unavailable("compressed accumulation needs tau > 1 (this task steps every micro-batch)")
    if spec.family == "lora":
        model = task.lora_model(model, spec.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.family in ("galore", "apollo"):
        mats, rest = projected_matrices(model, task.head_names)
        groups = [{"params": rest}] if rest else []
        group = {"params": mats, "rank": spec.rank, "update_proj_gap": kappa, "scale": 1.0, "proj_type": "std"}
        if spec.family == "galore":
            opt_cls = _import_peer("galore_torch").GaLoreAdamW
        else:
            opt_cls = _import_peer("apollo_torch").APOLLOAdamW
            group.update(proj="random", scale_type="channel")
        opt = opt_cls(groups + [group], lr=lr, weight_decay=0.0)
    else:
        opt = make_optimizer(spec, params, lr, kappa=kappa, seed=seed, scale_parameter=scale_parameter)
    acc = None
    if spec.accumulate_rank is not None:
        acc = flora.CompressedAccumulator(model, rank=spec.accumulate_rank, tau=tau, seed=seed + 7919,
                                          optimizer=opt)
    trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    return Built(model, opt, acc, trainable)
