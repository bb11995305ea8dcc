"""The benchmark's settings, as data: task sizes, learning-rate grids and goals.

``quick`` (the default of ``make bench``) is sized to finish in about 8 minutes on a
2-core CPU, two runs at a time; ``full`` runs every optimizer with a 3-point lr sweep and larger models (hours
on a CPU, minutes on a GPU); ``smoke`` is a few seconds, for the tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TASKS = ("pretrain", "finetune", "classify")
# The order runs start in (tables keep TASKS' order): the slowest runs first, so that with
# two or more workers the short pretraining runs fill the workers at the end.
RUN_ORDER = ("classify", "finetune", "pretrain")


@dataclass(frozen=True)
class TaskConfig:
    """One task's settings. ``threads``: torch CPU threads for the tiny models, where one
    thread is as fast as two and immune to a busy second core (ignored on a GPU)."""

    steps: int
    seq: int
    batch: int
    eval_every: int
    kappa: int  # projection refresh (also GaLore/APOLLO update_proj_gap)
    lr_points: int
    optimizers: tuple[str, ...]
    tau: int = 1  # micro-batches per optimizer step
    threads: int | None = None
    eval_batches: int | None = None  # language-model tasks: held-out batches scored
    eval_examples: int | None = None  # classification: held-out articles scored
    hidden: int | None = None  # pretrain: the Llama trained from scratch
    layers: int | None = None
    heads: int | None = None
    ffn: int | None = None
    scale_parameter: bool = False  # Adafactor's (and Flora's) lr relative to the parameter's RMS
    extend_lr: int = 0  # lr grid extensions at most, while the best lr is an end of the grid

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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

# Adafactor without a first moment (``adafactor``, beta1=None) is a row of every task at
# every size: it is what Flora's state is compared against (test_bench checks it).
SIZES: dict[str, dict[str, TaskConfig]] = {
    "smoke": {
        "pretrain": TaskConfig(hidden=32, layers=2, heads=2, ffn=64, seq=32, batch=4, steps=6, threads=1,
                               eval_every=3, eval_batches=2, kappa=3, lr_points=1,
                               optimizers=("adamw", "adafactor", "flora-r4")),
        "finetune": TaskConfig(seq=32, batch=1, tau=2, steps=2, eval_every=1, eval_batches=1, kappa=2, lr_points=1,
                               optimizers=("adamw", "adafactor", "flora-r4")),
        "classify": TaskConfig(seq=32, batch=4, steps=3, eval_every=3, eval_examples=16, kappa=2, lr_points=1,
                               optimizers=("adamw", "adafactor", "flora-r4")),
    },
    "quick": {
        # 10 optimizers x 2 lrs (+ extensions) x 100 steps of 8 x 128 bytes, 0.84 M params
        "pretrain": TaskConfig(hidden=128, layers=4, heads=4, ffn=352, seq=128, batch=8, steps=100, threads=1,
                               eval_every=20, eval_batches=8, kappa=40, lr_points=2, extend_lr=2,
                               optimizers=("adamw", "adafactor", "adafactor-b0.9", "flora-r8", "flora-r8-paper",
                                           "flora-r32", "lora-r8", "galore-r8", "apollo-r8", "flora-opt-r8")),
        # about 3.5 minutes: SmolLM2-135M, 3 steps of tau=2 micro-batches of 1 x 128 tokens
        "finetune": TaskConfig(seq=128, batch=1, tau=2, steps=3, eval_every=3, eval_batches=4, kappa=2, lr_points=1,
                               optimizers=("adamw", "adafactor", "adafactor-b0.9", "flora-r32", "flora-r32+ca-r32",
                                           "lora-r32")),
        # MiniLM-L6, 40 steps of 8 articles x 48 tokens (a title and a lead are enough for
        # the topic; at 60 steps of 64 tokens classify was half of make bench's time)
        "classify": TaskConfig(seq=48, batch=8, steps=40, eval_every=20, eval_examples=120, kappa=20, lr_points=2,
                               extend_lr=2,
                               optimizers=("adamw", "adafactor", "adafactor-b0.9", "flora-r32", "lora-r32",
                                           "galore-r32")),
    },
    "full": {
        "pretrain": TaskConfig(hidden=256, layers=6, heads=8, ffn=688, seq=256, batch=16, steps=1500,
                               eval_every=100, eval_batches=32, kappa=200, lr_points=3, optimizers=_FULL_PRETRAIN),
        "finetune": TaskConfig(seq=256, batch=2, tau=8, steps=60, eval_every=10, eval_batches=16, kappa=20,
                               lr_points=3, optimizers=_FULL_FINETUNE),
        "classify": TaskConfig(seq=256, batch=16, steps=300, eval_every=50, eval_examples=222, kappa=100,
                               lr_points=3, optimizers=_FULL_CLASSIFY),
    },
}


def flora_form_name(rank: int, suffix: str) -> str:
    """Flora's optimizer name at ``rank`` with a FORM[-PROJECTION] ``suffix`` (the projection
    omitted: gaussian); Flora's default form gets the bare ``flora-rR``."""
    from .names import flora_name  # imports flora (and torch): only when a name is made

    form, _, projection = suffix.partition("-")
    return flora_name(rank, form, projection or "gaussian")


@dataclass(frozen=True)
class Preset:
    """A sweep that replaces the size's optimizer lists (``--preset``): on ``tasks`` (unless
    ``--tasks`` says otherwise), the ``baselines`` and every Flora form of ``flora_forms``
    (FORM[-PROJECTION] suffixes) at every rank of ``RANKS[size]`` (or ``--ranks``), each on
    ``lr_points`` lrs, the grid extended up to ``extend_lr`` times while the best lr is an
    end of it."""

    tasks: tuple[str, ...]
    baselines: tuple[str, ...]
    flora_forms: tuple[str, ...]
    lr_points: int = 3
    extend_lr: int = 3
    about: str = ""

    def optimizers(self, ranks) -> tuple[str, ...]:
        """Baselines, then every form at each rank (a rank at a time, so that an interrupted
        sweep has compared every form at the ranks it finished)."""
        return self.baselines + tuple(flora_form_name(r, f) for r in ranks for f in self.flora_forms)


# Flora ranks a preset sweeps, per size: powers of two below the pretrain model's width
# (smoke 32, quick 128, full 256); the classify model (MiniLM, 384 wide) runs the same.
RANKS: dict[str, tuple[int, ...]] = {"smoke": (4, 8, 16), "quick": (4, 8, 16, 32, 64),
                                     "full": (4, 8, 16, 32, 64, 128)}

PRESETS: dict[str, Preset] = {
    # Issue 9: which momentum form becomes Flora's default.
    "forms": Preset(tasks=("pretrain", "classify"), baselines=("adafactor", "adafactor-b0.9"),
                    flora_forms=("exact", "exact-orthonormal", "exact-coordinates", "subspace-orthonormal",
                                 "floored-orthonormal", "fixed-orthonormal", "scaled-orthonormal",
                                 "scaled-coordinates"),
                    about="Flora's momentum forms and projections against Adafactor with and without momentum, "
                          "across ranks (issue 9: the default form)"),
}


def task_config(size: str, task: str, *, steps: int | None = None, optimizers=None, lr_points: int | None = None,
                tau: int | None = None, preset: str | None = None, ranks=None, scale_parameter: bool = False,
                extend_lr: int | None = None) -> TaskConfig:
    """One task's settings with command-line overrides applied (``tau``: micro-batches a step;
    ``preset``: its optimizers at ``ranks`` (default ``RANKS[size]``), lr points and grid
    extensions; explicit ``optimizers``, ``lr_points`` and ``extend_lr`` win)."""
    if size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    cfg = SIZES[size][task]
    if preset is not None:
        pre = PRESETS[preset]
        cfg = dataclasses.replace(cfg, optimizers=pre.optimizers(ranks or RANKS[size]), lr_points=pre.lr_points,
                                  extend_lr=pre.extend_lr)
    if scale_parameter:
        cfg = dataclasses.replace(cfg, scale_parameter=True)
    if extend_lr is not None:
        cfg = dataclasses.replace(cfg, extend_lr=extend_lr)
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps, eval_every=max(1, min(cfg.eval_every, steps)))
    if optimizers is not None:
        cfg = dataclasses.replace(cfg, optimizers=tuple(optimizers))
    if lr_points is not None:
        cfg = dataclasses.replace(cfg, lr_points=lr_points)
    if tau is not None:  # on every task (it had been finetune's only): accumulation is measured where asked
        cfg = dataclasses.replace(cfg, tau=tau)
    return cfg


# ------------------------------------------------------------------ learning rates

# Per task and lr family (adam: AdamW/GaLore/APOLLO; adafactor: Adafactor/Flora/flora-opt;
# lora): three values, low to high. One point sweeps the centre.
LR_GRIDS: dict[str, dict[str, tuple[float, float, float]]] = {
    "pretrain": {"adam": (1e-3, 3e-3, 1e-2), "adafactor": (1e-3, 3e-3, 1e-2), "lora": (3e-3, 1e-2, 3e-2)},
    "finetune": {"adam": (1e-5, 3e-5, 1e-4), "adafactor": (1e-5, 3e-5, 1e-4), "lora": (1e-4, 3e-4, 1e-3)},
    "classify": {"adam": (3e-5, 1e-4, 3e-4), "adafactor": (3e-5, 1e-4, 3e-4), "lora": (3e-4, 1e-3, 3e-3)},
}

# With two points, which end of the grid: short pretraining runs of small models liked the
# lower end (quick pretrain: 3e-3 beat 1e-2); classification the upper end (Flora's noisy
# momentum, clipped to RMS lr, picked 3e-4 of 3e-5..3e-4 for MiniLM).
TWO_POINT_END: dict[str, str] = {"pretrain": "lower", "finetune": "lower", "classify": "upper"}


def lr_values(task: str, lr_family: str, points: int) -> tuple[float, ...]:
    grid = LR_GRIDS[task][lr_family]
    if points >= len(grid):
        return grid
    if points == 1:
        return (grid[len(grid) // 2],)
    return grid[-points:] if TWO_POINT_END[task] == "upper" else grid[:points]


# ------------------------------------------------------------------ goals


@dataclass(frozen=True)
class Goal:
    """What ``optimizers`` should reach. Each check applies where its figures exist:

    - ``near``: the test metric within ``tolerance`` of this optimizer's (a loss: relative,
      0.01 = 1%; an accuracy: absolute, 0.01 = 1 point);
    - ``beats``: a better test metric than this optimizer's;
    - ``max_state_vs_adamw``: optimizer state at most this fraction of AdamW's, Flora's
      projection cache counted with it where a run recorded it (``cache_projections=True``,
      the default, holds it beside the state; since 2026-12-06);
    - ``max_step_vs``: (optimizer, ratio): the step time at most ``ratio`` times that
      optimizer's (the ``step`` subcommand)."""

    optimizers: tuple[str, ...]
    near: str | None = None
    tolerance: float = 0.01
    beats: str | None = None
    max_state_vs_adamw: float | None = None
    max_step_vs: tuple[str, float] | None = None
    source: str = ""  # where the goal comes from, e.g. an issue; shown with the check


# The training benchmark's goal: Flora r32 (beta1 0.9) as good as Adafactor with momentum,
# better than LoRA of the same rank, at a tenth of AdamW's state (its projection cache included).
TRAIN_GOALS: tuple[Goal, ...] = (
    Goal(("flora-r32", "flora-r32-paper"), near="adafactor-b0.9", tolerance=0.01, beats="lora-r32",
         max_state_vs_adamw=0.10),
    # Compressed momentum must never lose to no momentum at all (the floor, almost no state).
    Goal(("flora-r8", "flora-r32"), beats="adafactor", source="issue 17: above the no-momentum floor"),
)

# The optimizer step on SmolLM2-135M's shapes: Flora r32 with at most 5% of AdamW's state
# (its projection cache included),
# a step no slower than HF Adafactor's with momentum.
STEP_GOALS: tuple[Goal, ...] = (
    Goal(("flora-r32",), max_state_vs_adamw=0.05, max_step_vs=("adafactor-b0.9", 1.0)),
)
