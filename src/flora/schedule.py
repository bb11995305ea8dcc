"""A learning-rate scheduler for Flora's relative-step mode (``lr=None``)."""

from __future__ import annotations

from torch.optim.lr_scheduler import LRScheduler

from .adafactor import relative_step_size

__all__ = ["RelativeStepSchedule"]


class RelativeStepSchedule(LRScheduler):
    """Pair it with ``Flora(params, lr=None)`` wherever a scheduler is required, as with
    the Hugging Face Trainer: ``Trainer(..., optimizers=(opt, RelativeStepSchedule(opt)))``.

    In relative-step mode Flora sets its own step size, ``min(1e-2, 1/sqrt(t))`` (times
    ``RMS(p)`` when ``scale_parameter``), so this scheduler changes nothing: it never
    writes ``lr`` into the parameter groups (which must stay None) and reports, through
    ``get_last_lr()``, each group's relative step for its next step, as torch's
    schedulers report the lr the next ``optimizer.step()`` will use: the Trainer logs it
    before its ``scheduler.step()``, as the lr of the step just taken (it had been one
    step late there). It plays the part of transformers' ``AdafactorSchedule``, which
    Flora cannot use. A group with a fixed lr of its own (``{"params": ..., "lr": 1e-4}``
    under ``Flora(..., lr=None)``) is left alone: its lr is reported as it is.

    It stands alone: torch's ``ChainedScheduler`` and ``SequentialLR`` read or scale each
    group's ``lr``, which stays None here (the first reports ``[None]``, the second fails
    on ``initial_lr``), and there is nothing to chain: a warm-up is Flora's own
    ``warmup_init=True``. To schedule an lr, give Flora one (``lr=1e-3``) and any torch
    scheduler.
    """

    def __init__(self, optimizer, last_epoch: int = -1):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        groups = getattr(inner, "param_groups", None)
        if not isinstance(groups, list) or not any("relative_step" in g for g in groups):  # AdamW, say
            raise TypeError(f"RelativeStepSchedule takes a Flora optimizer with lr=None, got {type(optimizer).__name__}")
        if not any(g.get("relative_step", False) for g in inner.param_groups):
            raise ValueError("RelativeStepSchedule needs relative_step=True (Flora with lr=None) in a parameter "
                             "group; every group uses a fixed lr: use any torch scheduler")
        for g in inner.param_groups:  # left by a torch scheduler tried over lr=None first: not one now
            if "initial_lr" in g and g["initial_lr"] is None and g.get("lr") is None:
                del g["initial_lr"]
        self.optimizer = inner
        self.base_lrs = [0.0] * len(inner.param_groups)
        self.last_epoch = last_epoch + 1
        self._step_count = 1
        self._last_lr = self.get_lr()

    def get_lr(self) -> list[float]:
        lrs = []
        for g in self.optimizer.param_groups:
            if not g.get("relative_step", False):  # a group with a fixed lr of its own: left as it is
                lrs.append(g["lr"])
                continue
            steps = [self.optimizer.state[p].get("step", 0) for p in g["params"] if p in self.optimizer.state]
            t = max(steps, default=0)
            lrs.append(relative_step_size(t + 1, g["warmup_init"]))  # the next step's
        return lrs

    def step(self, epoch: int | None = None) -> None:
        self._step_count += 1
        self.last_epoch += 1
        self._last_lr = self.get_lr()
