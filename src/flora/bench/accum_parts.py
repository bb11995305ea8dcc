"""What ``flora-bench accum-memory`` does in one process and in each of ``--replicas``
processes: load the task's model, attach the configuration, run cycles, measure them,
and the row of a memory configuration."""

from __future__ import annotations

import statistics
import time

from . import core

__all__ = ["grad_bytes", "measured", "memory_row"]


def _model(job):
    import torch

    from .tasks import make_task

    task = make_task(job.task, job.cfg, job.cache_dir, job.seed)
    task.load()
    model = task.build_model().to(torch.device(job.device))
    model.train()
    return task, model


def _attach(model, opt, rank, fused, tau, seed=0, **kw):
    import flora

    if rank == "plain":
        return None
    if rank == "reference":
        def drop(p):
            p.grad = None
        return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters()]
    return flora.CompressedAccumulator(model, rank=rank, tau=tau, seed=seed, optimizer=opt, fused=fused, **kw)


def grad_bytes(model) -> int:
    """Bytes of the ``.grad`` tensors this process holds (a DTensor's local shard)."""
    local = (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for p in model.parameters() if p.grad is not None)
    return sum(g.numel() * g.element_size() for g in local)


def _cycle(task, model, opt, step: int, device, *, step_optimizer: bool, quiet=None, held=None) -> float:
    """tau micro-batches (the task's batches for this step), then the optimizer's step.
    ``quiet(micro)``: a context for micro-batch ``micro`` (DDP's ``no_sync()``); ``held``: a
    list that gets the bytes of ``.grad`` held after the last backward, before the step."""
    import contextlib

    loss_sum = 0.0
    for micro in range(task.tau):
        batch, _ = task.batch(step, micro, device)
        with quiet(micro) if quiet is not None else contextlib.nullcontext():
            loss = model(**batch).loss
            (loss / task.tau).backward()
        loss_sum += loss.item()
    if held is not None:
        held.append(grad_bytes(model))
    if step_optimizer:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum / task.tau


def measured(cycle, steps: int, device):
    """``cycle(0)`` to warm up (state, caches, buckets), then ``cycle(1..steps)`` measured:
    (the memory reading, step times, losses)."""
    mem = core.PeakMemory(device)
    cycle(0)
    mem.reset(trim=True)
    times, losses = [], []
    for s in range(1, steps + 1):
        t0 = time.perf_counter()
        losses.append(cycle(s))
        core.sync(device)
        times.append(time.perf_counter() - t0)
    return mem.read(), times, losses


def memory_row(job, task, opt, acc, weights_bytes: int, reading, times, losses, *, device: str,
               held: list[int]) -> dict:
    import flora

    ref = job.rank == "reference"
    return {"rank": job.rank, "fused": job.fused, "device": device, "tau": task.tau, "batch": job.cfg.batch,
            "seq": job.cfg.seq, "steps": job.steps, "optimizer": job.optimizer, "weights_mib": weights_bytes / core.MiB,
            "baseline_mib": reading.baseline, "peak_mib": reading.peak,
            "peak_over_baseline_mib": reading.peak - reading.baseline,
            "optimizer_state_mib": flora.state_bytes(opt) / core.MiB if not ref else 0.0,
            # counted from the tensors, so exact where RSS at small sizes is not
            "grad_mib_at_step": max(held[1:] or held) / core.MiB,
            "accumulator_mib_between_cycles": acc.memory_bytes() / core.MiB if hasattr(acc, "memory_bytes") else 0.0,
            "median_step_s": statistics.median(times), "step_times_s": times, "loss": losses}
