"""What both results reports write (``report``: the main tables; ``forms``: the momentum
forms side by side): the summary row of one (task, optimizer), the task order, number
formatting and CSV output. Kept below both, so that ``report`` can call ``forms``."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import config
from .records import RunResult

TASK_ORDER = config.TASKS




# The scores averaged over seeds: a summary row holds their mean (under the run's own
# key) and their sample standard deviation (``<key>_std``, None for one seed).
SEED_KEYS = ("train_loss", "val_loss", "val_ppl", "val_accuracy", "test_loss", "test_ppl", "test_accuracy")


def mean_std(values) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation (n - 1)) of the values that are not None; the std is
    None below two values, both are None without any."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


@dataclass
class Chosen:
    """One (task, optimizer): the lr with the best validation score (mean over seeds).
    ``run`` is that lr's first seed (its memory, timings and curves stand for the row);
    ``runs`` every seed of it; ``stats`` the mean and std over them of ``SEED_KEYS``."""

    run: RunResult
    lrs_tried: list[float]
    status: str  # the run's; when no lr ran ok, every lr's status
    state_vs_adamw: float | None = None
    # state plus what the optimizer holds beside it (RunResult.cache_bytes), over AdamW's state
    held_vs_adamw: float | None = None
    runs: list[RunResult] = field(default_factory=list)
    lr_edge: str | None = None  # "lower"/"upper": the chosen lr is the end of two or more tried
    lr_capped: bool = False  # on the edge still when the grid extension reached its cap
    lr_scores: dict = field(default_factory=dict)  # lr -> its validation score (mean over seeds; higher is better)
    # lr -> (seeds it finished on, the most any lr of the row did), for lrs on fewer: not compared
    short_lrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.runs = self.runs or [self.run]
        ok = [r for r in self.runs if r.ok]
        self.stats = {}
        for k in SEED_KEYS:
            m, sd = mean_std(getattr(r, k) for r in ok)
            if m is not None:
                self.stats[k], self.stats[f"{k}_std"] = m, sd

    @property
    def task(self) -> str:
        return self.run.task

    @property
    def edge_tied(self) -> bool:
        """Whether the chosen lr, an end of those tried, scores the same as its neighbour (a
        flat score: accuracy on a small split), so that no lr beyond it is run."""
        if self.lr_edge is None:
            return False
        lrs = sorted(x for x in self.lrs_tried if x == x)
        inner = lrs[-2] if self.lr_edge == "upper" else lrs[1]
        return self.lr_scores.get(inner) == self.lr_scores.get(self.run.lr)

    @property
    def optimizer(self) -> str:
        return self.run.optimizer

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def get(self, key: str):
        """A flat field, as in :meth:`to_dict`."""
        if key in ("status", "lrs_tried", "state_vs_adamw", "held_vs_adamw", "lr_edge", "lr_capped"):
            return getattr(self, key)
        if key in self.stats:
            return self.stats[key]
        return getattr(self.run, key, None)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.run.to_dict().items() if k not in ("curves", "traceback")}
        d.update(self.stats)
        d.update(status=self.status, lrs_tried=self.lrs_tried, state_vs_adamw=self.state_vs_adamw,
                 held_vs_adamw=self.held_vs_adamw,
                 seeds=len(self.runs), seed_list=self.seeds, lr_edge=self.lr_edge, lr_capped=self.lr_capped)
        return d


def fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}g}"
    return str(v)


def plus_minus(v, sd) -> str:
    return fmt(v) + ("" if sd is None else f" ± {fmt(sd, 2)}")


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys and k not in ("curves", "traceback"):
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
