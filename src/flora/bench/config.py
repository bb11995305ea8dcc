"""Sizes of the benchmark: model shapes, steps, optimizers and lr sweep per task.

``quick`` (the default of ``make bench``) is sized to finish in about 10 minutes on a
2-core CPU; ``full`` runs every optimizer with a 3-point lr sweep and larger models (hours
on a CPU, minutes on a GPU); ``smoke`` is a few seconds, for the tests."""

from __future__ import annotations

import copy

TASKS = ("pretrain", "finetune", "classify")

# ``threads``: torch CPU threads for the tiny models, where one thread is as fast as two
# and immune to a busy second core. Ignored on a GPU.

# Every optimizer the full size runs, per task (ranks scaled to the model widths).
_FULL_PRETRAIN = ("adamw", "adafactor-b0.9", "flora-r32", "flora-r32-paper", "lora-r32", "galore-r32",
                  "apollo-r32", "flora-opt-r32", "adafactor", "flora-r8", "flora-r8-paper", "lora-r8",
                  "galore-r8", "apollo-r8", "flora-opt-r8")
_FULL_FINETUNE = ("adamw", "adafactor", "adafactor-b0.9",
                  "flora-r8", "flora-r8-paper", "flora-r32", "flora-r32-paper",
                  "adamw+ca-r32", "adafactor-b0.9+ca-r32", "flora-r32+ca-r32",
                  "lora-r8", "lora-r32", "galore-r32", "apollo-r32", "flora-opt-r32")
_FULL_CLASSIFY = ("adamw", "adafactor", "adafactor-b0.9",
                  "flora-r8", "flora-r8-paper", "flora-r32", "flora-r32-paper",
                  "lora-r8", "lora-r32", "galore-r32", "apollo-r32", "flora-opt-r32")

SIZES: dict[str, dict[str, dict]] = {
    "smoke": {
        "pretrain": dict(hidden=32, layers=2, heads=2, ffn=64, seq=32, batch=4, tau=1, steps=6, threads=1,
                         eval_every=3, eval_batches=2, kappa=3, lr_points=1,
                         optimizers=("adamw", "flora-r4")),
        "finetune": dict(seq=32, batch=1, tau=2, steps=2, eval_every=1, eval_batches=1, kappa=2, lr_points=1,
                         optimizers=("adamw", "flora-r4")),
        "classify": dict(seq=32, batch=4, tau=1, steps=3, eval_every=3, eval_examples=16, kappa=2, lr_points=1,
                         optimizers=("adamw", "flora-r4")),
    },
    "quick": {
        # about 3 minutes: 10 optimizers x 2 lrs x 120 steps of 8 x 128 bytes, 1.1 M params
        "pretrain": dict(hidden=128, layers=4, heads=4, ffn=352, seq=128, batch=8, tau=1, steps=120, threads=1,
                         eval_every=20, eval_batches=8, kappa=40, lr_points=2,
                         optimizers=("adamw", "adafactor", "adafactor-b0.9", "flora-r8", "flora-r8-paper",
                                     "flora-r32", "lora-r8", "galore-r8", "apollo-r8", "flora-opt-r8")),
        # about 3 minutes: SmolLM2-135M, 3 steps of tau=2 micro-batches of 1 x 128 tokens
        "finetune": dict(seq=128, batch=1, tau=2, steps=3, eval_every=3, eval_batches=4, kappa=2, lr_points=1,
                         optimizers=("adamw", "adafactor-b0.9", "flora-r32", "flora-r32+ca-r32", "lora-r32")),
        # about 4 minutes: MiniLM-L6, 60 steps of 8 articles x 64 tokens
        "classify": dict(seq=64, batch=8, tau=1, steps=60, eval_every=20, eval_examples=120, kappa=20,
                         lr_points=2, optimizers=("adamw", "adafactor-b0.9", "flora-r32", "lora-r32",
                                                  "galore-r32")),
    },
    "full": {
        "pretrain": dict(hidden=256, layers=6, heads=8, ffn=688, seq=256, batch=16, tau=1, steps=1500,
                         eval_every=100, eval_batches=32, kappa=200, lr_points=3, optimizers=_FULL_PRETRAIN),
        "finetune": dict(seq=256, batch=2, tau=8, steps=60, eval_every=10, eval_batches=16, kappa=20, lr_points=3,
                         optimizers=_FULL_FINETUNE),
        "classify": dict(seq=256, batch=16, tau=1, steps=300, eval_every=50, eval_examples=222, kappa=100,
                         lr_points=3, optimizers=_FULL_CLASSIFY),
    },
}


def task_config(size: str, task: str, *, steps: int | None = None, optimizers=None, lr_points: int | None = None,
                tau: int | None = None) -> dict:
    """A copy of one task's settings, with command-line overrides applied."""
    if size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    cfg = copy.deepcopy(SIZES[size][task])
    if steps is not None:
        cfg["steps"] = steps
        cfg["eval_every"] = max(1, min(cfg["eval_every"], steps))
    if optimizers is not None:
        cfg["optimizers"] = tuple(optimizers)
    if lr_points is not None:
        cfg["lr_points"] = lr_points
    if tau is not None and task == "finetune":
        cfg["tau"] = tau
    return cfg
