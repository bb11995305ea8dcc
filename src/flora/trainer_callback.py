"""``flora.AccumulatorCallback``: a Hugging Face Trainer callback for a
``CompressedAccumulator``. The Trainer knows nothing of the accumulator, so without it a
resumed run restarts the accumulator's cycle count, hence its projections, and differs from
a run that never stopped. The callback

- checks, when training starts, that the accumulator's ``tau`` equals the Trainer's
  ``gradient_accumulation_steps`` (otherwise it would close several cycles per optimizer
  step, or close every cycle short);
- writes the accumulator's ``state_dict()`` into every checkpoint, inside the checkpoint's
  ``trainer_state.json`` (plain JSON: it travels with the checkpoint folder wherever it is
  copied, and nothing is unpickled to read it), under the key ``"flora.CompressedAccumulator"``;
- restores it when ``trainer.train(resume_from_checkpoint=...)`` starts from such a checkpoint.

The Trainer checkpoints between optimizer steps, where the accumulator's cycle is closed:
what is saved is then its options and cycle number, the same on every data-parallel replica
(the main process writes ``trainer_state.json``; every process reads it back)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from .accumulation import CompressedAccumulator
from .accumulation.integrations import wrapper_scaler
from ._warn import warn

__all__ = ["AccumulatorCallback", "STATE_KEY"]

STATE_KEY = "flora.CompressedAccumulator"  # not a class name: the Trainer never tries to rebuild it
# CompressedAccumulator.state_dict()'s 1-D int64 tensors, written to JSON as lists
LIST_KEYS = ("indices", "dims", "counts")


def _to_json(sd: dict[str, Any]) -> dict[str, Any]:
    def tensor(t: torch.Tensor) -> dict[str, Any]:
        return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": t.flatten().tolist()}

    out = {k: v for k, v in sd.items() if not isinstance(v, (torch.Tensor, dict))}
    # the top-level tensors (indices, counts, dims, ...) are 1-D int64: plain lists
    out.update({k: v.tolist() for k, v in sd.items() if isinstance(v, torch.Tensor)})
    for kind in ("compressed", "dense"):  # empty between optimizer steps, where the Trainer checkpoints
        out[kind] = {str(i): tensor(t.detach().cpu()) for i, t in sd[kind].items()}
    return out


def _from_json(js: dict[str, Any]) -> dict[str, Any]:
    def tensor(d: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(d["values"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])

    sd = dict(js)
    for k in LIST_KEYS:
        if k in js:  # "dims" is absent from checkpoints written before it was saved
            sd[k] = torch.tensor(js[k], dtype=torch.int64)
    for kind in ("compressed", "dense"):
        sd[kind] = {int(i): tensor(d) for i, d in js.get(kind, {}).items()}
    return sd


class AccumulatorCallback(TrainerCallback):
    """Save a ``CompressedAccumulator``'s state with every Trainer checkpoint and restore it
    on resume, so that a resumed run equals one that never stopped; refuse a ``tau`` that
    disagrees with the Trainer's ``gradient_accumulation_steps``.

    Usage::

        acc = flora.CompressedAccumulator(model, rank=32, tau=8, optimizer=opt)
        trainer = Trainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=8),
                          optimizers=(opt, None), callbacks=[flora.AccumulatorCallback(acc)])
        trainer.train(resume_from_checkpoint=...)   # or None on the first run

    Args:
        accumulator: the ``CompressedAccumulator`` attached to the Trainer's model.
    """

    def __init__(self, accumulator: CompressedAccumulator):
        if not isinstance(accumulator, CompressedAccumulator):
            raise TypeError(f"AccumulatorCallback needs a flora.CompressedAccumulator, got "
                            f"{type(accumulator).__name__}")
        self.accumulator = accumulator

    def _record(self, state) -> None:
        state.stateful_callbacks[STATE_KEY] = _to_json(self.accumulator.state_dict())

    def on_train_begin(self, args, state, control, **kwargs):
        acc = self.accumulator
        steps = args.gradient_accumulation_steps
        if steps != acc.tau:
            raise ValueError(f"CompressedAccumulator(tau={acc.tau}) under a Trainer with "
                             f"gradient_accumulation_steps={steps}: the two must agree (the accumulator would close "
                             f"{'several cycles per optimizer step' if steps > acc.tau else 'every cycle short'}); "
                             f"build the accumulator with tau={steps}")
        if acc.fused and acc.micro_step:
            # a train() interrupted mid-window and started again: the Trainer's model.zero_grad()
            # drops the window's gradients, which fused mode cannot see (normal mode does); the
            # leftover read as "gradient_accumulation_steps > tau" at the next window (a probe).
            # First: the scaler below may change on a cycle boundary only
            acc.discard_cycle()
        scaler = wrapper_scaler(kwargs.get("optimizer"))
        if acc.fused and scaler is not None and acc.scaler is not scaler:
            # fp16 (a GPU): accelerate's prepared optimizer steps through its GradScaler, which an
            # accumulator built before the Trainer (as above) never saw; fused mode steps inside
            # backward, so without it each parameter stepped on its scaled gradient (probe Z29).
            # A second Trainer on the same accumulator brings a scaler of its own: the first one's,
            # kept, failed its scaler.step ("No inf checks were recorded": probe Z78), as would any
            # scaler but the one the Trainer steps through (a scaler= of the user's included)
            acc.scaler = scaler
        if acc.fused and (args.max_grad_norm or 0) > 0 and acc.max_grad_norm is None:
            warn(f"AccumulatorCallback: TrainingArguments(max_grad_norm={args.max_grad_norm}) clips nothing "
                 "in fused mode (each parameter steps during backward, before the Trainer clips, and its "
                 "logged grad_norm reads 0; acc.last_grad_norm holds the cycle's norm). Pass "
                 "max_grad_norm= to the accumulator (it clips each parameter's gradient), or "
                 "max_grad_norm=0 to the Trainer to say no clipping is wanted")
        saved = (state.stateful_callbacks or {}).get(STATE_KEY) if state.global_step else None
        if state.global_step and saved is None:
            warn(f"AccumulatorCallback: resuming at global step {state.global_step} from a checkpoint "
                 "that holds no CompressedAccumulator state (saved without this callback): the "
                 "accumulator starts again at cycle 0, so its projections, and the run, differ from one "
                 "that never stopped")
        elif saved is not None:
            acc.load_state_dict(_from_json(saved))
            optimizer = kwargs.get("optimizer")
            if optimizer is not None and not optimizer.state:
                # save_only_model=True: the Trainer restores the model and its own state only (probe Z22)
                warn(f"AccumulatorCallback: resuming at global step {state.global_step} from a checkpoint "
                     "whose optimizer state the Trainer did not restore (saved with save_only_model=True, or "
                     "optimizer.pt removed): the accumulator continues at cycle "
                     f"{acc.cycle} while the optimizer, and the lr schedule, start again, so the run is not "
                     "the saved one's continuation. Resume from a checkpoint with the optimizer's state for "
                     "that", UserWarning)
        # The Trainer's synced backward ends every cycle, even a first short one (an epoch of
        # one micro-batch, or what is left of an epoch after a resume): else the Trainer's
        # clipping would meet the placeholder the cycle leaves in .grad
        acc._driven_by_accelerate()

    def on_train_end(self, args, state, control, **kwargs):
        # a plain loop after train() (probe Z87): left driven, every backward read accelerate's
        # sync flag, True once training is over, and closed a cycle (fused: a step per micro-batch)
        self.accumulator._released_by_accelerate()

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state)  # before the Trainer writes trainer_state.json into a checkpoint

    def on_epoch_end(self, args, state, control, **kwargs):
        # on a cycle boundary only: training stopped mid-window (a callback's should_training_stop
        # in on_substep_end) still ends the epoch, and a checkpoint saved there resumes at the last
        # optimizer step, re-running the window; the open cycle recorded with it was refused on
        # resume (probe Z78). What on_step_end recorded at that step stands
        if not self.accumulator.micro_step:
            self._record(state)
