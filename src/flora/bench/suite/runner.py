"""One suite run, and the pool that runs many: worker processes (spawned, one CPU thread
each; on a GPU they share it), every finished run appended to ``runs.jsonl`` as it
completes, so that ``--resume`` skips what is there."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from ..core import environ, quiet_loggers
from .space import Job

_WORKLOADS: dict = {}
_CTX: dict = {}

# The C library's allocator settings of a CPU worker (glibc reads them when a process
# starts; other C libraries ignore them). glibc maps every buffer over 32 MiB afresh and
# unmaps it when freed, so each step of a model with a large activation (tokenlm's logits
# over a 26 k vocabulary: 216 MB) page-faults it in again: half of tokenlm's time went to
# the kernel. From the heap, kept, tokenlm runs in 0.6x the time; the other tasks in the
# same time; every loss the same to the bit (docs/results.md). A value the user set is kept.
CPU_WORKER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def worker_env(device: str) -> dict[str, str]:
    """The environment variables a suite worker on ``device`` starts with, besides the
    parent's (``CPU_WORKER_ENV`` on a CPU, each unless already set)."""
    if not device.startswith("cpu"):
        return {}
    return {k: v for k, v in CPU_WORKER_ENV.items() if k not in os.environ}


def _exit_with_parent() -> None:
    """End this worker when the sweep's process dies: a ProcessPoolExecutor worker whose
    parent was killed (SIGTERM from a scheduler or ``timeout``) waits on its task queue for
    good (found by a new-user probe: 478 MB left behind)."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="flora-suite-parent-watch").start()


def _init(folder: str, device: str, scale: float, threads: int) -> None:
    _exit_with_parent()
    quiet_loggers()
    import signal

    # Ctrl-C reaches every worker too: each ends at once and quietly (no traceback per
    # worker); the sweep's process reports the interrupt once. Ignoring it here instead
    # would leave the pool's shutdown waiting for every queued run.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _CTX.update(folder=folder, device=device, scale=scale)


def _workload(task: str):
    from . import workloads

    if task not in _WORKLOADS:
        _WORKLOADS[task] = workloads.make(task, Path(_CTX["folder"]), _CTX["device"], _CTX["scale"])
    return _WORKLOADS[task]


def _optimizer(name: str, model, lr: float, *, kappa: int, seed: int, workload=None):
    from .. import optimizers
    from . import peers

    if name in peers.PEERS:
        return peers.build(name, model, lr, head_names=workload.head_names, dim=workload.dim, heads=workload.heads)

    spec = optimizers.parse(name)
    params = [p for p in model.parameters() if p.requires_grad]
    return optimizers.make_optimizer(spec, params, lr, kappa=kappa, seed=seed, scale_parameter=False)


def run_job(job: Job, curve_every: int = 0) -> dict:
    """Train ``job`` and score it on the validation and test splits. ``curve_every``: also
    score every that many steps (and the training split where the task has a fixed one),
    as ``curve`` in the result: a list of {step, train_loss?, val_loss, test_loss}."""
    from flora import state_bytes

    w = _workload(job.task)
    spec = w.spec
    t0 = time.perf_counter()
    model = w.build(job.seed)
    opt = _optimizer(job.optimizer, model, job.lr, kappa=job.kappa, seed=job.seed, workload=w)
    tail = max(1, spec.steps // 10)
    train_sum, summed = torch.zeros((), device=w.device), 0
    curve = []
    for step in range(spec.steps):
        if curve_every and step % curve_every == 0:
            curve.append(_point(w, model, step))
        in_tail = step >= spec.steps - tail
        for micro in range(spec.tau):
            x, y = w.batch(step, micro)
            loss = w.loss(model, x, y)
            (loss / spec.tau).backward()
            if in_tail:  # the mini-batch's loss: the mean of its micro-batches' (the last one alone had been)
                train_sum += loss.detach() / spec.tau
        summed += in_tail
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 49 and not math.isfinite(float(loss.detach())):
            break
    train_time = time.perf_counter() - t0
    # a run that diverged before its tail has no training loss (0.0 had been logged: probe Z80)
    train_loss = float(train_sum) / tail if summed == tail else math.nan
    out = {**job.to_dict(), "key": job.key, "steps": spec.steps,
           "train_loss": train_loss if math.isfinite(train_loss) else None,  # the log stays strict JSON
           "train_s": round(train_time, 2), "state_bytes": state_bytes(opt),
           "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "scale": _CTX["scale"], "device": _CTX["device"]}  # what --resume checks a log against
    if hasattr(w, "BASE_INIT"):  # finetune: its base's init (a base per seed since 2026-12-06)
        out["base_init"] = w.BASE_INIT + job.seed
    for split in ("val", "test"):
        for k, v in w.evaluate(model, split).items():
            out[f"{split}_{k}"] = v if math.isfinite(v) else None
    out["status"] = "ok" if out["val_loss"] is not None else "diverged"
    if curve_every:
        out["curve"] = curve + [_point(w, model, spec.steps)]
    return out


def _point(w, model, step: int) -> dict:
    splits = ("train", "val", "test") if "train" in getattr(w, "split", {}) else ("val", "test")
    return {"step": step, **{f"{s}_loss": w.evaluate(model, s)["loss"] for s in splits}}


def adamw_state_bytes(task: str) -> int:
    """AdamW's state on ``task``'s model after one step, counted from its tensors."""
    from flora import state_bytes

    w = _workload(task)
    model = w.build(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    x, y = w.batch(0, 0)
    w.loss(model, x, y).backward()
    opt.step()
    return state_bytes(opt)


def _prepare_in_worker(task: str) -> int:
    _workload(task)
    return adamw_state_bytes(task)


def _base_in_worker(seed: int) -> None:
    _workload("finetune")._base(seed)


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    return rows


def run_all(jobs: list[Job], tasks: list[str], *, log: Path, folder: Path, device: str, workers: int,
            scale: float, threads: int = 1, progress=None, more=None) -> dict[str, int]:
    """Run ``jobs`` not yet in ``log`` on ``workers`` processes, then each list of jobs
    ``more()`` returns (lr extensions, read from the log) until it returns none: the workers
    stay for every round, since each spawn imports torch and the tasks' libraries anew.
    Returns AdamW's state bytes per task. Tasks are prepared (a fine-tune base pretrained for
    each seed of the jobs) before any job starts."""
    ctx = mp.get_context("spawn")
    adamw = {}
    # the pool spawns its workers as jobs arrive: the environment stays set while it runs
    with environ(worker_env(device)), ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init,
            initargs=(str(folder), device, scale, threads)) as pool:
        # each finetune seed's base is pretrained here, one a worker, not by its first jobs at
        # once: those of the seeds with jobs still to run, and seed 0's (AdamW's state bytes
        # below build its model); all before the tasks' preparation, which would otherwise
        # build seed 0's a second time beside its own job (a review)
        done = {r["key"] for r in read_log(log) if not str(r.get("status", "ok")).startswith("error")}
        seeds = {j.seed for j in jobs if j.task == "finetune" and j.key not in done}
        seeds |= {0} if "finetune" in tasks else set()
        for fut in [pool.submit(_base_in_worker, s) for s in sorted(seeds)]:
            fut.result()
        for task, fut in [(t, pool.submit(_prepare_in_worker, t)) for t in tasks]:
            adamw[task] = fut.result()
        state_file = log.parent / "adamw_state.json"
        old = json.loads(state_file.read_text()) if state_file.exists() else {}
        state_file.write_text(json.dumps({**old, **adamw}))
        while jobs:
            _run_round(pool, jobs, log, progress)
            jobs = more() if more is not None else []
    return adamw


class WorkerLost(RuntimeError):
    """A worker process died (killed, as by the out-of-memory killer): the jobs it and the
    pool still held have no result and are not logged, so that ``--resume`` runs them."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        super().__init__(f"a worker process died (killed: out of memory?); {len(jobs)} run(s) have no result and "
                         "were not logged: run the same command with --resume to run them (with fewer --workers "
                         "if memory ran out)")


def _run_round(pool, jobs: list[Job], log: Path, progress) -> None:
    # an error row (a crash) runs again; a finished run, diverged or not, is a result
    done = {r["key"] for r in read_log(log) if not str(r.get("status", "ok")).startswith("error")}
    todo = [j for j in jobs if j.key not in done]
    futures = {pool.submit(run_job, j): j for j in todo}
    bar = progress(total=len(todo)) if progress else None
    lost = []
    with open(log, "a") as f:
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except BrokenProcessPool:  # the pool is gone: nothing more runs in it
                lost.append(futures[fut])
                continue
            except Exception as e:  # a crash is a result too, not the end of the sweep
                j = futures[fut]
                row = {**j.to_dict(), "key": j.key, "status": f"error: {type(e).__name__}: {e}"[:300]}
            f.write(json.dumps(row) + "\n")
            f.flush()
            if bar:
                bar.update(1)
            else:  # stderr is no terminal (a log): one line per finished run, no bar
                lr = row.get("lr")
                print(f"suite: {row.get('task')} {row.get('optimizer')} kappa={row.get('kappa')} "
                      f"lr={lr:g} seed={row.get('seed')}: {row.get('status', 'ok')}" if isinstance(lr, float)
                      else f"suite: {row.get('key')}: {row.get('status', 'ok')}", file=sys.stderr, flush=True)
    if bar:
        bar.close()
    if lost:
        raise WorkerLost(lost)
