"""One training run (task x optimizer x lr), measured; optionally in its own process.

Each run is a child of a fork server that has imported torch and transformers but never
trained anything, so the run's peak RSS is its own: the child resets the kernel's
high-water mark (``/proc/self/clear_refs``) before building its model, and reports both the
peak and the peak above its starting RSS. On CUDA the peak of allocated memory is read
from ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

import flora

from . import optimizers as bo
from .tasks import make_task


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field == "VmHWM":  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def schedule(steps: int):
    """lr factor: linear warm-up over the first 10% of steps from 1/w (never 0), then cosine
    down to 10%. The same for every optimizer."""
    warm = max(1, steps // 10)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        frac = (s - warm) / max(1, steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac)))

    return factor


def train_run(job: dict, progress: bool | None = None) -> dict:
    """Train one (task, optimizer, lr) and return its measurements (never raises)."""
    progress = job.get("progress", True) if progress is None else progress
    rec = {k: job[k] for k in ("task", "optimizer", "lr")}
    rec.update(status="ok", steps_done=0)
    t_start = time.perf_counter()
    try:
        _train(job, rec, progress)
    except bo.Unavailable as e:
        rec["status"] = f"unavailable: {e}"
    except Exception as e:  # noqa: BLE001 - a failing optimizer is a row of the table, not a crash
        rec["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rec["traceback"] = traceback.format_exc()[-4000:]
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


def _train(job: dict, rec: dict, progress: bool) -> None:
    cfg, device = job["cfg"], torch.device(job["device"])
    spec = bo.parse(job["optimizer"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    reset_ok = _reset_peak_rss()
    rss0 = _rss_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)
    task = make_task(job["task"], cfg, job["cache_dir"], job["seed"])
    task.load()
    model = task.build_model()
    rec["model_params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.to(device)
    built = bo.build(spec, model, job["lr"], task=task, kappa=cfg["kappa"], tau=task.tau, seed=job["seed"])
    model, opt, acc = built.model, built.optimizer, built.accumulator
    rec["trainable_params"] = built.trainable_params
    rec["tau"] = task.tau
    rec["dense_grad_bytes"] = sum(p.numel() * p.element_size()
                                  for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    model.train()
    steps, tau = cfg["steps"], task.tau
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    train_curve, val_curve, step_times = [], [], []
    tokens_per_step, accum_peak = 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{job['task']}:{job['optimizer']}@{job['lr']:g}", leave=False,
                   position=1, dynamic_ncols=True)
    for step in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step_loss, tokens = 0.0, 0
        for micro in range(tau):
            batch, n_tok = task.batch(step, micro, device)
            loss = model(**batch).loss
            (loss / tau).backward()
            step_loss += loss.item() / tau
            tokens += n_tok
            if acc is not None and micro == tau - 2:
                accum_peak = max(accum_peak, acc.memory_bytes())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        tokens_per_step = tokens
        train_curve.append((step + 1, step_loss))
        rec["steps_done"] = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        if not math.isfinite(step_loss):
            rec["status"] = "diverged"
            break
        if (step + 1) % cfg["eval_every"] == 0 and step + 1 < steps:
            val_curve.append((step + 1, task.evaluate(model, "val", device, small=True)["loss"]))
    if bar is not None:
        bar.close()
    rec["state_bytes"] = flora.state_bytes(opt)
    rec["accum_bytes"] = accum_peak if acc is not None else None
    if acc is not None and hasattr(acc, "remove"):
        acc.remove()
    tail = [v for _, v in train_curve[-max(1, len(train_curve) // 10):]]
    rec["train_loss"] = sum(tail) / len(tail)
    if rec["status"] == "ok":
        val = task.evaluate(model, "val", device)
        test = task.evaluate(model, "test", device)
        val_curve.append((rec["steps_done"], val["loss"]))
        rec.update({f"val_{k}": v for k, v in val.items()})
        rec.update({f"test_{k}": v for k, v in test.items()})
    timed = step_times[1:] or step_times  # the first step pays for lazy set-up
    rec["median_step_s"] = statistics.median(timed)
    rec["tokens_per_step"] = tokens_per_step
    rec["tokens_per_s"] = tokens_per_step / rec["median_step_s"] if rec["median_step_s"] > 0 else None
    rec["curves"] = {"train": train_curve, "val": val_curve}
    peak = _rss_mb("VmHWM")
    rec["peak_rss_mb"] = peak
    rec["peak_rss_delta_mb"] = (peak - rss0) if (reset_ok and peak is not None and rss0 is not None) else None
    if device.type == "cuda":
        rec["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - cuda0) / 2**20
    rec["device"] = str(device)


# ------------------------------------------------------------------ isolation


def _child(job, conn):
    try:
        conn.send(train_run(job))
    finally:
        conn.close()


# Imported once by the fork server (failures are ignored), so each run starts in a second.
_PRELOAD = ["flora.bench.runner", "flora.bench.tasks", "transformers.optimization",
            "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert", "peft",
            "galore_torch", "apollo_torch", "flora_opt"]


class Runner:
    """Runs jobs in place (``isolate=False``) or each in a fresh child of a fork server
    (CPU) or a fresh interpreter (CUDA)."""

    def __init__(self, isolate: bool = True, device: str = "cpu"):
        self.isolate = isolate and "forkserver" in mp.get_all_start_methods()
        if self.isolate and device.startswith("cuda"):
            # Some imports (bitsandbytes) initialise CUDA, which a forked child cannot use:
            # on a GPU every run starts a fresh interpreter.
            self.ctx = mp.get_context("spawn")
        elif self.isolate:
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(_PRELOAD)

    def run(self, job: dict) -> dict:
        if not self.isolate:
            return train_run(job)
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(job, child))
        proc.start()
        child.close()
        rec = None
        try:
            rec = parent.recv()
        except EOFError:
            pass
        proc.join()
        if rec is None:
            rec = {k: job[k] for k in ("task", "optimizer", "lr")}
            rec["status"] = f"failed: run process exited with code {proc.exitcode} (out of memory?)"
        return rec


def cache_dir_default() -> Path:
    return Path(os.environ.get("FLORA_BENCH_CACHE", "runs/bench/cache"))
