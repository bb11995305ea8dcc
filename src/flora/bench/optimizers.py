"""The optimizers the benchmark compares, by name.

Names (``--optimizers``, comma separated):

- ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, no weight decay).
- ``adafactor``, ``adafactor-b0.9``: ``transformers.optimization.Adafactor`` with a fixed
  lr (``scale_parameter=False, relative_step=False``), without / with first moment.
- ``flora-r<R>`` / ``flora-r<R>-paper``: ``flora.Flora`` (same Adafactor settings,
  ``beta1=0.9``, rank R) with the "exact" / the paper's momentum form.
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

import logging
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

import flora


# The peers import bitsandbytes, which logs about optional CPU kernels; GaLore's and
# APOLLO's AdamW and peft warn about deprecations. None of it concerns the benchmark.
for _name in ("bitsandbytes", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)


class Unavailable(RuntimeError):
    """The optimizer cannot run here (a peer is not installed, a feature is missing)."""


# lr grids: index 1 is the centre, used when a size sweeps one value; two values = the lower two.
LR_GRIDS = {
    "pretrain": {"adam": (1e-3, 3e-3, 1e-2), "adafactor": (1e-3, 3e-3, 1e-2), "lora": (3e-3, 1e-2, 3e-2)},
    "finetune": {"adam": (1e-5, 3e-5, 1e-4), "adafactor": (1e-5, 3e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3)},
    "classify": {"adam": (3e-5, 1e-4, 3e-4), "adafactor": (3e-5, 1e-4, 3e-4), "lora": (3e-4, 1e-3, 3e-3)},
}

_NAME = re.compile(r"^(?P<base>adamw|adafactor(?:-b0\.9)?|flora-r(?P<fr>\d+)(?P<paper>-paper)?|lora-r(?P<lr>\d+)"
                   r"|galore-r(?P<gr>\d+)|apollo-r(?P<ar>\d+)|flora-opt-r(?P<or>\d+))"
                   r"(?:\+ca-r(?P<ca>\d+))?$")


@dataclass
class Spec:
    name: str
    family: str  # adamw, adafactor, flora, lora, galore, apollo, flora-opt
    rank: int | None = None
    beta1: float | None = None
    momentum: str = "exact"
    accumulate_rank: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def lr_family(self) -> str:
        return {"adamw": "adam", "galore": "adam", "apollo": "adam", "lora": "lora"}.get(self.family, "adafactor")

    @property
    def is_peer(self) -> bool:
        return self.family in ("galore", "apollo", "flora-opt")


def parse(name: str) -> Spec:
    m = _NAME.match(name.strip())
    if not m:
        raise ValueError(f"unknown optimizer {name!r}; names look like adamw, adafactor, adafactor-b0.9, "
                         "flora-r8, flora-r8-paper, lora-r8, galore-r8, apollo-r8, flora-opt-r8, "
                         "and any of them with +ca-r8 (compressed accumulation)")
    base, ca = m["base"], int(m["ca"]) if m["ca"] else None
    if base == "adamw":
        s = Spec(name, "adamw")
    elif base.startswith("adafactor"):
        s = Spec(name, "adafactor", beta1=0.9 if base.endswith("b0.9") else None)
    elif m["fr"]:
        s = Spec(name, "flora", rank=int(m["fr"]), beta1=0.9, momentum="paper" if m["paper"] else "exact")
    elif m["lr"]:
        s = Spec(name, "lora", rank=int(m["lr"]), beta1=0.9)
    elif m["gr"]:
        s = Spec(name, "galore", rank=int(m["gr"]))
    elif m["ar"]:
        s = Spec(name, "apollo", rank=int(m["ar"]))
    else:
        s = Spec(name, "flora-opt", rank=int(m["or"]), beta1=0.9)
    if ca is not None and s.family == "lora":
        raise ValueError(f"{name}: compressed accumulation of LoRA adapters is not offered (they are already low-rank)")
    s.accumulate_rank = ca
    return s


# With two points, which pair of the grid: short pretraining runs of small models liked the
# lower end (quick pretrain: 3e-3 beat 1e-2); classification the upper end (Flora's
# noisy momentum, clipped to RMS lr, picked 3e-4 of 3e-5..3e-4 for MiniLM).
_TWO_POINTS_UPPER = {"classify"}


def lr_grid(spec: Spec, task: str, points: int) -> tuple[float, ...]:
    grid = LR_GRIDS[task][spec.lr_family]
    if points >= len(grid):
        return grid
    if points == 1:
        return (grid[1],)
    return grid[-points:] if task in _TWO_POINTS_UPPER else grid[:points]


def peer_status() -> dict[str, str]:
    """'ok' or the import error of each peer package."""
    out = {}
    for mod in ("galore_torch", "apollo_torch", "flora_opt"):
        try:
            __import__(mod)
            out[mod] = "ok"
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            out[mod] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return out


def _import_peer(mod: str):
    try:
        return __import__(mod)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"{mod} not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "install the peers extra: pip install -c constraints.txt -e '.[peers]'") from e


def _adafactor_kwargs(lr: float) -> dict:
    return dict(lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


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


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    accumulator: object | None
    trainable_params: int


def build(spec: Spec, model: nn.Module, lr: float, *, task, kappa: int, tau: int, seed: int) -> Built:
    """Set up ``spec`` on ``model`` (LoRA wraps it) and return what the loop needs."""
    if spec.accumulate_rank is not None:
        if tau <= 1:
            raise Unavailable("compressed accumulation needs tau > 1 (this task steps every micro-batch)")
        if not hasattr(flora, "CompressedAccumulator"):
            raise Unavailable("flora.CompressedAccumulator is not in this flora version")
    if spec.family == "lora":
        model = task.lora_model(model, spec.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.family == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif spec.family in ("adafactor", "lora"):
        from transformers.optimization import Adafactor

        opt = Adafactor(params, beta1=spec.beta1, **_adafactor_kwargs(lr))
    elif spec.family == "flora":
        opt = flora.Flora(params, rank=spec.rank, beta1=spec.beta1, kappa=kappa, momentum_form=spec.momentum,
                          seed=seed, **_adafactor_kwargs(lr))
    elif spec.family == "flora-opt":
        fo = _import_peer("flora_opt")
        opt = fo.Flora(params, rank=spec.rank, beta1=spec.beta1, kappa=kappa, seed=seed, **_adafactor_kwargs(lr))
    elif spec.family in ("galore", "apollo"):
        mats, rest = projected_matrices(model, task.head_names)
        groups = [{"params": rest}] if rest else []
        if spec.family == "galore":
            opt_cls = _import_peer("galore_torch").GaLoreAdamW
            groups.append({"params": mats, "rank": spec.rank, "update_proj_gap": kappa, "scale": 1.0,
                           "proj_type": "std"})
        else:
            opt_cls = _import_peer("apollo_torch").APOLLOAdamW
            groups.append({"params": mats, "rank": spec.rank, "update_proj_gap": kappa, "scale": 1.0,
                           "proj_type": "std", "proj": "random", "scale_type": "channel"})
        opt = opt_cls(groups, lr=lr, weight_decay=0.0)
    else:  # pragma: no cover - parse() only makes the families above
        raise ValueError(spec.family)
    acc = None
    if spec.accumulate_rank is not None:
        acc = flora.CompressedAccumulator(model, rank=spec.accumulate_rank, tau=tau, seed=seed + 7919,
                                          optimizer=opt)
    trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    return Built(model, opt, acc, trainable)
