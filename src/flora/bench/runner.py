"""One training run (task x optimizer x lr), measured; and :class:`Runner`, which runs a
job in a process of its own.

Each run is a child of a fork server that has imported torch and transformers but never
trained anything, so the run's peak RSS is its own: the child resets the kernel's
high-water mark before building its model (:class:`core.PeakMemory`) and reports both the
peak and the peak above its starting RSS. On CUDA the peak of allocated memory is read
from ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import flora

from . import core
from . import optimizers as bo
from .records import Job, RunResult
from .tasks import Task, make_task


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


def train_run(job: Job) -> RunResult:
    """Train one (task, optimizer, lr, seed) and return its measurements (never raises:
    a failing optimizer is a row of the table, with why, not a crash)."""
    core.offline_env()
    res = RunResult.for_job(job)
    t_start = time.perf_counter()
    with core.quiet():
        try:
            _measured_run(job, res)
        except bo.Unavailable as e:
            res.status = f"unavailable: {e}"
        except Exception as e:  # noqa: BLE001
            res.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            res.traceback = traceback.format_exc()[-4000:]
    res.wall_s = time.perf_counter() - t_start
    return res


def _measured_run(job: Job, res: RunResult) -> None:
    """Memory around the whole run: set-up, loop and evaluation."""
    device = torch.device(job.device)
    if job.threads:
        torch.set_num_threads(job.threads)
    mem = core.PeakMemory(device)
    mem.reset()
    task, built = _setup(job, res, device)
    res.compresses_nothing = core.compresses_nothing(built.optimizer)
    loop = _loop(job, task, built, device, res)
    res.state_bytes = flora.state_bytes(built.optimizer)
    res.cache_bytes = flora.cache_bytes(built.optimizer)
    res.accum_bytes = loop.accum_peak if built.accumulator is not None else None
    if built.accumulator is not None:
        built.accumulator.remove()
    _evaluate(task, built.model, device, res, loop)
    m = mem.read()
    res.peak_rss_mb, res.peak_rss_delta_mb = m.rss_peak, m.rss_over_start
    if m.cuda_peak is not None:
        res.cuda_peak_mb = m.cuda_peak - m.cuda_start
    res.device = str(device)


def _setup(job: Job, res: RunResult, device: torch.device) -> tuple[Task, bo.Built]:
    task = make_task(job.task, job.cfg, job.cache_dir, job.seed)
    task.load()
    model = task.build_model()
    res.model_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.to(device)
    built = bo.build(bo.parse(job.optimizer), model, job.lr, task=task, kappa=job.cfg.kappa, tau=task.tau,
                     seed=job.seed, scale_parameter=job.cfg.scale_parameter)
    res.trainable_params = built.trainable_params
    res.tau = task.tau
    res.dense_grad_bytes = sum(p.numel() * p.element_size()
                               for p in {id(p): p for p in built.model.parameters() if p.requires_grad}.values())
    return task, built


@dataclass
class _Loop:
    train: list = field(default_factory=list)  # (step, loss)
    val: list = field(default_factory=list)  # (step, val loss), a small eval every eval_every steps
    step_times: list = field(default_factory=list)
    tokens_per_step: int = 0
    accum_peak: int = 0


def _loop(job: Job, task: Task, built: bo.Built, device: torch.device, res: RunResult) -> _Loop:
    """The training loop: tau micro-batches per optimizer step, the shared lr schedule."""
    model, opt, acc = built.model, built.optimizer, built.accumulator
    steps, tau = job.cfg.steps, task.tau
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps))
    out = _Loop()
    model.train()
    bar = None
    if job.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=job.label, leave=False, position=1, dynamic_ncols=True)
    with bar if bar is not None else contextlib.nullcontext():
        for step in range(steps):
            core.sync(device)
            t0 = time.perf_counter()
            step_loss, tokens = 0.0, 0
            for micro in range(tau):
                batch, n_tok = task.batch(step, micro, device)
                loss = model(**batch).loss
                (loss / tau).backward()
                step_loss += loss.item() / tau
                tokens += n_tok
                if acc is not None and micro == tau - 2:
                    out.accum_peak = max(out.accum_peak, acc.memory_bytes())
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            core.sync(device)
            out.step_times.append(time.perf_counter() - t0)
            out.tokens_per_step = tokens
            out.train.append((step + 1, step_loss))
            res.steps_done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}")
            if not math.isfinite(step_loss):
                res.status = "diverged"
                break
            if (step + 1) % job.cfg.eval_every == 0 and step + 1 < steps:
                out.val.append((step + 1, task.evaluate(model, "val", device, small=True)["loss"]))
    return out


def _evaluate(task: Task, model, device: torch.device, res: RunResult, loop: _Loop) -> None:
    """Final scores on the validation (picks the lr) and test splits, and the loop's figures."""
    tail = [v for _, v in loop.train[-max(1, len(loop.train) // 10):]]
    res.train_loss = sum(tail) / len(tail)
    if res.ok:
        val = task.evaluate(model, "val", device)
        res.set_scores("val", val)
        res.set_scores("test", task.evaluate(model, "test", device))
        loop.val.append((res.steps_done, val["loss"]))
    timed = loop.step_times[1:] or loop.step_times  # the first step pays for lazy set-up
    res.median_step_s = statistics.median(timed)
    res.tokens_per_step = loop.tokens_per_step
    res.tokens_per_s = loop.tokens_per_step / res.median_step_s if res.median_step_s > 0 else None
    res.curves = {"train": loop.train, "val": loop.val}


# ------------------------------------------------------------------ isolation


def _child(fn, job, conn):
    try:
        conn.send(fn(job))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it, once
        raise SystemExit(130) from None
    finally:
        conn.close()


# Imported once by the fork server (failures are ignored), so each run starts in a second.
_PRELOAD = ["flora.bench._preload", "flora.bench.runner", "flora.bench.tasks", "transformers.optimization",
            "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert", "peft",
            "galore_torch", "apollo_torch", "flora_opt"]


_LIVE: set = set()  # the run processes alive now


def interrupt_runs() -> None:
    """Pass a SIGINT to every run process alive, as Ctrl-C does through the process group
    (a SIGTERM reaches the parent alone)."""
    import signal

    for proc in list(_LIVE):
        with contextlib.suppress(OSError, TypeError):
            os.kill(proc.pid, signal.SIGINT)


class Runner:
    """Runs a job in place (``isolate=False``) or in a process of its own: a fresh child of
    a fork server on the CPU, a fresh interpreter on CUDA (some imports initialise CUDA,
    which a forked child cannot use) or where ``env`` must be set before the interpreter
    starts (e.g. ``MALLOC_MMAP_THRESHOLD_``, read by the C library at start-up)."""

    def __init__(self, isolate: bool = True, device: str = "cpu", *, env: dict[str, str] | None = None,
                 preload: list[str] | None = None):
        self.env = dict(env or {})
        self.isolate = isolate and "forkserver" in mp.get_all_start_methods()
        if self.isolate and (device.startswith("cuda") or self.env):
            self.ctx = mp.get_context("spawn")
        elif self.isolate:
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(_PRELOAD if preload is None else preload)

    def run(self, fn: Callable, job, on_crash: Callable[[int | None], object]):
        """``fn(job)``; ``on_crash(exitcode)`` is the result when the process dies without one
        (killed for memory, say)."""
        if not self.isolate:
            return fn(job)
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(fn, job, child))
        with core.environ(self.env):
            proc.start()
        _LIVE.add(proc)
        child.close()
        res = None
        try:
            res = parent.recv()
        except EOFError:
            pass
        finally:
            proc.join()
            _LIVE.discard(proc)
        return on_crash(proc.exitcode) if res is None else res


def run_train_job(runner: Runner, job: Job) -> RunResult:
    return runner.run(train_run, job, lambda code: RunResult.for_job(
        job, f"failed: run process exited with code {code} (out of memory?)"))


def cache_dir_default() -> Path:
    return Path(os.environ.get("FLORA_BENCH_CACHE", "runs/bench/cache"))
