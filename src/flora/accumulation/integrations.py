"""What the accumulator recognises of the libraries around it, without importing them.

- accelerate (and the Hugging Face Trainer, which drives accumulation through accelerate's
  ``sync_gradients``): :func:`accelerate_ends_cycle`, read from accelerate's shared gradient
  state only when accelerate is imported, and refusing a ``tau`` that disagrees with it;
- wrapped optimizers (accelerate's ``AcceleratedOptimizer``): :func:`unwrap`;
- ``torch.amp.GradScaler``: :func:`check_scaler` (its use is in ``fused.py``).

A new integration goes here: a function that recognises the library's state (from
``sys.modules``, never by importing it) and says what it means for the cycle; the engine
calls it where the cycle's end is decided (``Engine.accumulate``)."""

from __future__ import annotations

import sys
import weakref

import torch
from torch.optim import Optimizer

from .cycle import Cycle

__all__ = ["AccelerateWatch", "accelerate_ends_cycle", "unwrap", "wrapper_scaler", "check_scaler"]


def unwrap(optimizer):
    # Wrappers such as accelerate's AcceleratedOptimizer keep the real one in .optimizer;
    # hooks and per-parameter steps must reach the real one.
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, Optimizer) else optimizer


def wrapper_scaler(optimizer):
    """The GradScaler a wrapped optimizer steps through (accelerate's ``AcceleratedOptimizer``
    under fp16 mixed precision, on a GPU), or None."""
    scaler = getattr(optimizer, "scaler", None) if unwrap(optimizer) is not optimizer else None
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


def check_scaler(scaler, fused: bool) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if scaler is not None and not fused:
        raise ValueError("scaler applies to fused=True only; in normal mode use the GradScaler as usual "
                         "(scaler.step(optimizer) after the tau-th backward)")


def _shared() -> dict | None:
    mod = sys.modules.get("accelerate.state")
    return getattr(getattr(mod, "GradientState", None), "_shared_state", None)


class AccelerateWatch:
    """Whether accelerate's sync flag may be read as this accumulator's driver. Its
    gradient state is one per process, and neither a new ``Accelerator`` nor the end of a
    run resets it: a run stopped mid-window (a notebook's interrupt) leaves
    ``sync_gradients=False`` for good, which a later plain loop's new accumulator would
    take for a live driver. A False already there when the accumulator is built is
    trusted only once the flag has been True since."""

    def __init__(self) -> None:
        shared = _shared()
        self.trusted = not (shared and shared.get("sync_gradients", True) is False)

    def sees(self, sync: bool) -> bool:
        """Whether an unsynced flag (``sync`` False) counts; True once a sync was seen."""
        if sync:
            self.trusted = True
        return self.trusted


def accelerate_syncs(c: Cycle, tau: int | None = None) -> bool:
    """True when accelerate drives the accumulation (it has marked a backward of this or
    the previous cycle unsynced; with ``tau``, also: its prepared dataloader's last batch
    under ``accumulate()``) and synchronises now: it ends the cycle here, short or not.
    Reads accelerate's gradient state without changing the cycle."""
    shared = _shared()
    if not shared or not shared.get("sync_gradients", True):
        return False
    return c.follows_accelerate() or (tau is not None and _ends_at_dataloader_end(shared, tau))


def _ends_at_dataloader_end(shared: dict, tau: int) -> bool:
    """``accelerator.accumulate()`` over a prepared dataloader of one batch (on this
    process), with ``gradient_accumulation_steps`` equal to ``tau``: it syncs at every batch
    and ends every cycle there, a cycle of one micro-batch with no unsynced backward to show
    that accelerate drives it (every cycle had stayed open, and clipping met the placeholder
    in ``.grad`` in every epoch: probe Z107). A longer dataloader's first backward is
    unsynced, which is followed; limited to one batch because a plain loop (no
    ``accumulate()``) with ``gradient_accumulation_steps`` set looks the same at a longer
    dataloader's last batch, and must not have its cycle ended there (review Z109)."""
    kw = shared.get("plugin_kwargs") or {}
    steps = kw.get("num_steps", 1)
    if not (isinstance(steps, int) and steps == tau > 1 and kw.get("sync_with_dataloader", True) is not False):
        return False
    # the dataloader being iterated: the last of its references (weak ones since accelerate 1.0)
    refs = shared.get("_dataloader_references_ref") or shared.get("dataloader_references") or [None]
    loader = refs[-1]() if isinstance(refs[-1], weakref.ref) else refs[-1]
    if loader is None or getattr(loader, "end_of_dataloader", False) is not True:
        return False
    try:
        return len(loader) == 1
    except TypeError:  # an iterable dataset's: no length
        return False


def accelerate_ends_cycle(c: Cycle, tau: int, count: int, watch: AccelerateWatch | None = None) -> bool:
    """True when accelerate (the HF Trainer, ``accelerator.accumulate()``) drives the
    accumulation and marks this backward as the last of its cycle. Its gradient state
    is read only if accelerate is imported, and followed only once it has marked some
    backward of this or the previous cycle as unsynced (a plain loop never does).
    ``count``: backward passes this parameter had in the cycle before this one. A tau
    that disagrees with accelerate's accumulation is refused. ``watch``: whether an
    unsynced flag is trusted (:class:`AccelerateWatch`)."""
    shared = _shared()
    if not shared:
        return False
    sync = bool(shared.get("sync_gradients", True))
    if watch is not None and not watch.sees(sync) and not c.driven:
        c.doubted = True
        return False  # a leftover of a run stopped mid-window: not a driver (yet)
    if not sync or c.doubted:  # a flag that turned True: the False it read in this cycle was live
        c.unsynced = True
    if not c.follows_accelerate():
        # a one-batch dataloader under accumulate() ends each cycle at its only, synced backward,
        # which nothing else shows (probe Z107): this cycle only, nothing carried to the next
        return sync and _ends_at_dataloader_end(shared, tau)
    steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
    if isinstance(steps, int) and steps > 1 and steps != tau:  # accelerator.accumulate()
        raise ValueError(f"CompressedAccumulator(tau={tau}) under accelerate with "
                         f"gradient_accumulation_steps={steps}: the two must agree; set acc.tau = {steps} (or "
                         f"build the accumulator with tau={steps})")
    if not sync and count + 1 >= tau:  # the Trainer (which leaves accelerate's num_steps at 1)
        raise ValueError(
            f"CompressedAccumulator(tau={tau}) under the Hugging Face Trainer or accelerate, whose "
            f"gradient accumulation is longer: backward pass {count + 1} of this cycle is not the last of its "
            f"optimizer step, so gradient_accumulation_steps > tau={tau}. The accumulator would close "
            "several cycles per step and compress the first estimate again. Give it tau equal to "
            "gradient_accumulation_steps (flora.AccumulatorCallback checks both when training starts): "
            "acc.discard_cycle() drops the micro-batches this cycle has summed, then acc.tau = "
            "gradient_accumulation_steps (a retry runs as a fresh one); if they "
            "are equal, a parameter is reached by more than one backward pass per micro-batch (a GAN's "
            "errD_real.backward(); errD_fake.backward()): tau counts backward passes, so sum the losses into one "
            "backward per micro-batch")
    return sync
