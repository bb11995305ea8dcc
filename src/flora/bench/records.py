"""Typed records of the ``train`` subcommand: a job (one task x optimizer x lr x seed) and
what its run measured. Both cross a process boundary (pickled) and a run's result is
written to ``results.json`` as a flat dict (:meth:`RunResult.to_dict`) and read back
(:meth:`RunResult.from_dict`, which ignores keys it does not know, so older files load)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import TaskConfig


@dataclass(frozen=True)
class Job:
    task: str
    optimizer: str
    lr: float
    cfg: TaskConfig
    seed: int = 0
    device: str = "cpu"
    cache_dir: str = "runs/bench/cache"
    threads: int | None = None
    progress: bool = False  # a per-step progress bar (on a terminal only)

    @property
    def label(self) -> str:
        return f"{self.task}:{self.optimizer}@{self.lr:g}"


@dataclass
class RunResult:
    """One run's measurements. ``status``: ``ok``, ``diverged``, ``failed: <why>``,
    ``unavailable: <why>`` or ``n/a: <why>`` (the last two: not run)."""

    task: str
    optimizer: str
    lr: float
    seed: int = 0
    status: str = "ok"
    steps_done: int = 0
    wall_s: float | None = None
    device: str | None = None
    model_params: int | None = None
    trainable_params: int | None = None
    tau: int | None = None
    state_bytes: int | None = None  # flora.state_bytes(optimizer) after the last step
    # the projections Flora caches beside its state then (flora.cache_bytes; cache_projections=True,
    # the default), as step's rows count them; 0 for other optimizers
    cache_bytes: int | None = None
    dense_grad_bytes: int | None = None  # what the trainable parameters' .grad take
    accum_bytes: int | None = None  # flora.CompressedAccumulator's buffers (+ca runs)
    compresses_nothing: bool | None = None  # a Flora whose rank is >= every projected dim: dense momentum
    train_loss: float | None = None  # mean of the last 10% of steps
    val_loss: float | None = None
    val_ppl: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    test_ppl: float | None = None
    test_accuracy: float | None = None
    median_step_s: float | None = None
    tokens_per_step: int | None = None
    tokens_per_s: float | None = None
    peak_rss_mb: float | None = None
    peak_rss_delta_mb: float | None = None  # above the run's starting RSS
    cuda_peak_mb: float | None = None
    curves: dict | None = None  # {"train": [(step, loss)], "val": [(step, loss)]}
    traceback: str | None = field(default=None, repr=False)

    @classmethod
    def for_job(cls, job: Job, status: str = "ok") -> RunResult:
        return cls(task=job.task, optimizer=job.optimizer, lr=job.lr, seed=job.seed, status=status)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def set_scores(self, split: str, scores: dict[str, float]) -> None:
        """``scores`` from a task's ``evaluate``: loss and ppl or accuracy."""
        for k, v in scores.items():
            setattr(self, f"{split}_{k}", v)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunResult:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
