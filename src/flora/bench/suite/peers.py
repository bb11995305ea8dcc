"""The peers a memory-minded user would pick instead of Flora, built on a workload's
model: AdamW (the reference for state), Adam-mini (``adam-mini``: one second moment per
block), APOLLO-Mini (``apollo-torch``: rank 1, tensor-wise scaling) and 8-bit AdamW
(torchao's ``AdamW8bit`` as ``adamw-8bit``; bitsandbytes' ``AdamW8bit`` as ``adamw-8bit-bnb``:
0.50.2 runs it on a CPU too, blockwise uint8 moments for tensors of 4096 elements or more,
float32 below). Each is imported when used; a missing one is :class:`Unavailable` with the
reason."""

from __future__ import annotations

import importlib
import sys
import types

import torch
from torch import nn

from ..optimizers import Unavailable, projected_matrices

PEERS = ("adamw", "adam-mini", "apollo-mini", "adamw-8bit", "adamw-8bit-bnb")

# Adam-family lrs, low to high (factor 2), per task.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "bytelm": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "newslm": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3),
    "tokenlm": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "finetune": (3.1e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4),
    "classify": (1.5e-5, 3.1e-5, 6.25e-5, 1.25e-4, 2.5e-4),
    "cnn": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "vit": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "tabular": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "stream": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "cnnstream": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    "tabstream": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
}


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken dependency
        raise Unavailable(f"{name} cannot be imported: {type(e).__name__}: {e}") from e


def _apollo():
    """apollo-torch imports bitsandbytes for its 8-bit variants only; where bitsandbytes
    is absent, a stub stands in (APOLLO-Mini itself never touches it)."""
    if importlib.util.find_spec("bitsandbytes") is None and "bitsandbytes" not in sys.modules:
        bnb = types.ModuleType("bitsandbytes")
        for sub in ("optim", "optim.optimizer", "functional"):
            sys.modules[f"bitsandbytes.{sub}"] = types.ModuleType(f"bitsandbytes.{sub}")
        sys.modules["bitsandbytes.optim.optimizer"].Optimizer2State = type("Optimizer2State", (), {})
        bnb.functional = sys.modules["bitsandbytes.functional"]
        sys.modules["bitsandbytes"] = bnb
    return _import("apollo_torch")


def build(name: str, model: nn.Module, lr: float, *, head_names=(), dim: int = 1, heads: int = 1,
          kappa: int = 200) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adam-mini":
        mod = _import("adam_mini")
        return mod.Adam_mini(named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
                             lr=lr, weight_decay=0.0, dim=dim, n_heads=heads, n_kv_heads=heads, verbose=False)
    if name == "apollo-mini":
        mats, rest = projected_matrices(model, head_names)
        # APOLLO-Mini as its authors run it: rank 1, tensor-wise scaling, scale 128,
        # projection refreshed every 200 steps.
        group = {"params": mats, "rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128,
                 "update_proj_gap": kappa, "proj_type": "std"}
        return _apollo().APOLLOAdamW(([{"params": rest}] if rest else []) + [group], lr=lr, weight_decay=0.0)
    if name == "adamw-8bit":
        optim = _import("torchao.optim")
        return optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    if name == "adamw-8bit-bnb":
        bnb = _import("bitsandbytes.optim")
        return bnb.AdamW8bit(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEERS)}")
