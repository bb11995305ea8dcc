"""What the suite compares, as data: the candidates, their ranks, the lr grid of each
task, the seeds. A job is one (task, optimizer, lr, seed, kappa) run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flora import Flora

# The floor (no first moment: almost no state) and the target (full first moment) are rows
# of every task; Flora's candidate forms run at every rank.
FLOOR, TARGET = "adafactor", "adafactor-b0.9"
BASELINES = (FLOOR, TARGET)
# The default form first ("floored" since 2026-12-01; "adaptive" and "scaled" were
# candidates before it).
FORMS = ("floored-orthonormal", "fixed-orthonormal", "exact-orthonormal")
RANKS = (8, 32)
SEEDS = 3
# The library's default kappa: the primary setting (1000 until 2026-12-01, when the suite chose 100).
KAPPA = Flora.__init__.__kwdefaults__["kappa"]  # as bench.names reads the default form

# lr grids (Adafactor's and Flora's lr, scale_parameter=False), low to high, factor 2.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "bytelm": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "newslm": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
    "tokenlm": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "finetune": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3),
    "classify": (6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3),
    "cnn": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "vit": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "tabular": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "stream": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "cnnstream": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    "tabstream": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
}


@dataclass(frozen=True)
class Job:
    task: str
    optimizer: str  # a flora-bench optimizer name (flora.bench.optimizers.parse)
    lr: float
    seed: int
    kappa: int = KAPPA

    @property
    def key(self) -> str:
        return f"{self.task}|{self.optimizer}|{self.lr:g}|{self.seed}|{self.kappa}"

    def to_dict(self) -> dict:
        return asdict(self)


def candidates(forms=FORMS, ranks=RANKS, baselines=BASELINES) -> tuple[str, ...]:
    return tuple(baselines) + tuple(f"flora-r{r}-{f}" for r in ranks for f in forms)


def lr_grid(task: str, optimizer: str, lrs: dict | None = None) -> tuple[float, ...]:
    from .peers import LR_GRIDS as PEER_GRIDS, PEERS

    if lrs and task in lrs:
        return tuple(lrs[task])
    return (PEER_GRIDS if optimizer in PEERS else LR_GRIDS)[task]


def plan(tasks, optimizers, seeds: int = SEEDS, kappas=(KAPPA,), lrs: dict | None = None,
         seed_list=None) -> list[Job]:
    """Every job, seed-major: an interrupted sweep has screened everything on seed 0
    before it confirms on seeds 1 and 2. Extra kappas run for Flora alone."""
    out = []
    for seed in (seed_list if seed_list is not None else range(seeds)):
        for task in tasks:
            for kappa in kappas:
                for opt in optimizers:
                    if kappa != kappas[0] and not opt.startswith("flora-"):
                        continue
                    for lr in lr_grid(task, opt, lrs):
                        out.append(Job(task, opt, lr, seed, kappa))
    return out


def staged_plan(tasks, seeds: int = SEEDS, forms=FORMS, ranks=RANKS, extra_ranks=(4, 128),
                extra_kappas=(1000,)) -> list[Job]:
    """The whole study in the order that makes an interrupted run most useful: every
    candidate on seed 0, the peers on seed 0, the candidates on the other seeds, then the
    default form (``FORMS[0]``) at ``extra_ranks`` and the forms at rank 8 with ``extra_kappas`` (the
    paper's 1000 beside the primary), then
    the peers, extra ranks and kappas on the other seeds."""
    from .peers import PEERS

    main = candidates(forms, ranks)
    more_ranks = tuple(f"flora-r{r}-{FORMS[0]}" for r in extra_ranks)
    kappa_forms = tuple(f"flora-r8-{f}" for f in forms)
    out = plan(tasks, main, seed_list=[0]) + plan(tasks, PEERS, seed_list=[0])
    out += plan(tasks, main, seed_list=range(1, seeds))
    out += plan(tasks, more_ranks, seed_list=[0])
    out += [j for k in extra_kappas for j in plan(tasks, kappa_forms, seed_list=[0], kappas=(k,))]
    rest = range(1, seeds)
    out += plan(tasks, PEERS, seed_list=rest) + plan(tasks, more_ranks, seed_list=rest)
    out += [j for k in extra_kappas for j in plan(tasks, kappa_forms, seed_list=rest, kappas=(k,))]
    return out


def extensions(jobs: list[Job], rows: list[dict], cap: int) -> list[Job]:
    """The lr-grid extension due after ``jobs`` ran (``rows``: the run log): for each
    (task, optimizer, kappa) of ``jobs`` whose best lr -- lowest mean validation loss over
    the planned seeds that ran it, a diverged run counting as infinite -- is the lowest
    or highest of two or more tried, the next lr beyond it (the grid's step once more: x2
    or /2 on the suite's grids), on every planned seed; at most ``cap`` lrs beyond the
    planned grid per (task, optimizer, kappa). A tie with the inner neighbour is flat: no
    extension.

    The edge is decided on the lrs that ran on every planned seed: an lr beyond the
    grid that ran on some only (a sweep stopped inside an extension round, or resumed
    with more ``--seeds``) had looked interior on its one-seed mean and was never
    finished; when the best is an edge and such an lr lies beyond it, that lr runs on its
    missing seeds instead of a new one. While a planned seed of a grid lr has no finished
    run (it crashed), nothing is decided for that (task, optimizer, kappa).
    """
    import math
    import statistics

    from ..train import next_lr

    if cap <= 0:
        return []
    planned: dict[tuple, tuple[set, set]] = {}
    for j in jobs:
        lrs, seeds = planned.setdefault((j.task, j.optimizer, j.kappa), (set(), set()))
        lrs.add(j.lr)
        seeds.add(j.seed)
    scores: dict[tuple, dict[float, dict[int, float]]] = {}
    for r in rows:
        key = (r["task"], r["optimizer"], r["kappa"])
        if key in planned and r["seed"] in planned[key][1] and r.get("status") in ("ok", "diverged"):
            v = r.get("val_loss")
            scores.setdefault(key, {}).setdefault(r["lr"], {})[r["seed"]] = math.inf if v is None else v
    out = []
    for key, by_lr in scores.items():
        grid, seeds = planned[key]
        on_grid = {lr: any(math.isclose(lr, g) for g in grid) for lr in by_lr}
        complete = {lr: v for lr, v in by_lr.items() if set(v) == seeds}
        if any(not any(math.isclose(g, lr) for lr in complete) for g in grid) or len(complete) < 2:
            continue
        mean = {lr: statistics.fmean(v.values()) for lr, v in complete.items()}
        lrs = sorted(mean)
        best = min(lrs, key=lambda lr: (mean[lr], lr))
        if best not in (lrs[0], lrs[-1]):
            continue
        up = best == lrs[-1]
        inner = lrs[-2] if up else lrs[1]
        if mean[inner] == mean[best]:
            continue
        partial = sorted((lr for lr in by_lr if lr not in complete and (lr > best if up else lr < best)),
                         reverse=not up)
        if partial:  # the extension already begun beyond the edge: finish it
            lr = partial[0]
            out += [Job(key[0], key[1], lr, seed, key[2]) for seed in sorted(seeds - set(by_lr[lr]))]
            continue
        if sum(not on_grid[lr] for lr in lrs) >= cap:
            continue
        nxt = float(f"{next_lr(lrs, up):.6g}")  # the train bench's rule: the grid's step once more
        out += [Job(key[0], key[1], nxt, seed, key[2]) for seed in sorted(seeds)]
    return out
