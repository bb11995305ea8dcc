"""The one spawn helper of the distributed tests (test_distributed.py, whose scenarios are in
dist_scenarios.py, and test_distributed_comm.py): scenarios run on 2 CPU processes with
gloo, many per spawn; each is ``f(rank, world) -> dict`` of tensors and plain values, read
back through a file per rank."""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init: str, out: str, module: str, names: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    # A scenario that fails on one rank must not leave the other waiting forever; 300 s, not
    # less: on 2 loaded cores a checkpoint scenario's rank can wait over a minute at a barrier.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    import importlib

    mod = importlib.import_module(module)
    importlib.import_module("torch._dynamo")  # DDP's constructor imports it anyway

    # What the imports made lives as long as the process: out of the collector's reach,
    # the gc.collect() after each scenario (and the one CompressedAccumulator runs to
    # find a live DDP) skip it (0.3 s each once dynamo is imported).
    gc.freeze()
    results = {}
    for name in names:
        try:
            results[name] = getattr(mod, name)(rank, world)
        except Exception:  # reported by the test that reads it
            results[name] = {"error": traceback.format_exc()}
        gc.collect()  # the scenario's models and their reducers go now, not at interpreter shutdown
        dist.barrier()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # The results are saved: leave without interpreter shutdown, where destroying what is
    # left of gloo's or FSDP2's state has aborted a rank (SIGABRT) on loaded cores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# One spawn runs many scenarios, for minutes on 2 loaded cores; the gloo timeout
# (300 s) catches a rank stuck in a collective, this one anything else.
SPAWN_DEADLINE_S = 1500


def spawn(module: str, names: list[str], world: int = 2) -> list[dict]:
    """Run the functions ``names`` of ``module`` (each ``f(rank, world) -> dict``) in
    ``world`` processes; returns each rank's results."""
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "init")
        ctx = mp.start_processes(_worker, args=(world, init, tmp, module, names), nprocs=world,
                                 start_method="spawn", join=False)
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        while not ctx.join(timeout=5):  # raises, naming the rank, when one fails
            if time.monotonic() > deadline:  # a hang outside a collective: fail, not hang CI
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{module} {names}: still running after {SPAWN_DEADLINE_S} s")
        del ctx
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def spawn_once(tmp_path_factory, module: str, names: list[str], world: int = 2) -> list[dict]:
    """``spawn`` once per test run. pytest-xdist runs a module-scoped fixture in every
    worker given some of the module's tests, and a module split between two workers had
    spawned its scenarios twice (the fused replicas': 12 s). The first worker to ask spawns
    and saves every rank's results in the run's temporary folder, which the workers share;
    another waits on a file lock and loads them. A spawn that raises saves nothing (the
    next worker spawns again)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return spawn(module, names, world)
    from filelock import FileLock  # (torch's dependency)

    key = hashlib.sha1(repr((module, list(names), world)).encode()).hexdigest()[:12]
    path = tmp_path_factory.getbasetemp().parent / f"spawn-{module}-{key}.pt"
    with FileLock(f"{path}.lock"):
        if path.exists():
            return torch.load(path, weights_only=False)
        results = spawn(module, names, world)
        torch.save(results, f"{path}.part")  # (a worker killed while saving leaves no half-written file)
        os.replace(f"{path}.part", path)
        return results


def check(results: list[dict], name: str) -> list[dict]:
    """Every rank's result of scenario ``name``, failing with the rank's traceback."""
    out = []
    for r, res in enumerate(results):
        got = res[name]
        if "error" in got:
            raise AssertionError(f"rank {r}, scenario {name}:\n{got['error']}")
        out.append(got)
    return out
