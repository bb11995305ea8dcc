"""``flora-bench accum-memory --replicas N``: the memory configurations run in N processes
(gloo on the CPU, NCCL on CUDA, one GPU per rank), the model wrapped in DDP or FSDP2
(``--wrap``; FSDP2 shards each decoder layer and the root), and each rank's peak memory
measured as in one process. Every rank gets the same micro-batches (memory only).

- ``reference``: forward and backward, every (sharded) gradient dropped in a hook, no
  step: weights (FSDP2: this rank's shard) + activations (+ DDP's buckets, which DDP
  keeps, told not to copy them back into ``.grad``), the floor of fused mode;
- ``plain``: DDP with ``no_sync()`` on the first ``tau - 1`` micro-batches, FSDP2
  reduce-scattering each one into its sharded ``.grad``; then the optimizer's step;
- ``rR``: the same through ``CompressedAccumulator`` (normal mode);
- ``rR-fused`` / ``dense-fused``: fused mode across replicas (DDP: each bucket steps in
  its communication hook; FSDP2: each unit after its reduce-scatter).

One more cycle, after the measured ones, counts the collectives of a cycle
(``flora.distributed.CollectiveCounter``)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import tempfile

from . import core

__all__ = ["WRAPS", "check_wrap", "memory"]

WRAPS = ("ddp", "fsdp2")


def check_wrap(name: str) -> None:
    if name not in WRAPS:
        raise ValueError(f"unknown wrap {name!r}; valid: {', '.join(WRAPS)}")


def memory(job) -> dict:
    """Run ``job`` (an ``AccumJob`` with ``replicas > 1``) on its ranks; the row holds the
    largest per-rank figures and every rank's."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(job, tmp), nprocs=job.replicas, start_method="spawn", join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(job.replicas)]
    row = {k: max(r[k] for r in ranks) for k in ("peak_mib", "baseline_mib", "peak_over_baseline_mib",
                                                   "median_step_s", "optimizer_state_mib", "weights_mib",
                                                   "grad_mib_at_step")}
    row.update({k: ranks[0][k] for k in ("rank", "fused", "device", "tau", "batch", "seq", "steps", "optimizer",
                                         "collectives_per_cycle")},
               wrap=job.wrap, replicas=job.replicas, loss=ranks[0]["loss"], per_rank=ranks,
               accumulator_mib_between_cycles=max(r["accumulator_mib_between_cycles"] for r in ranks))
    return row


def _rank_main(rank: int, job, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    cuda = job.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="file://" + os.path.join(tmp, "init"),
                            rank=rank, world_size=job.replicas, timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(job.seed)
    torch.set_num_threads(job.threads)
    try:
        torch.save(_measure(job, rank), os.path.join(tmp, f"rank{rank}.pt"))
        gc.collect()  # the model and its FSDP2/DDP state go while the process group exists
    finally:
        dist.destroy_process_group()
    core.leave_worker()  # the row is saved


def _wrap(model, how: str):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(layer)
    fully_shard(model)
    return model


def _measure(job, rank: int) -> dict:
    from flora.distributed import CollectiveCounter

    from . import optimizers as bo
    from .accum_parts import _attach, _cycle, _model, measured, memory_row

    device = f"cuda:{rank}" if job.device.startswith("cuda") else job.device
    task, model = _model(dataclasses.replace(job, device=device))
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    model = _wrap(model, job.wrap)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    shard = sum(t.numel() * t.element_size() for t in local)
    opt = bo.make_optimizer(bo.parse(job.optimizer), model.parameters(), job.lr, kappa=1000, seed=job.seed)
    acc = _attach(model, opt, job.rank, job.fused, task.tau)
    if job.rank == "reference" and job.wrap == "ddp":
        # the gradients its hooks drop must not come back from DDP's buckets after backward
        model.reducer._set_optimizer_in_backward()
    stepping = not (job.fused or job.rank == "reference")
    # DDP unfused: no_sync() on the first tau - 1 micro-batches (fused mode decides by itself)
    quiet = (lambda micro: model.no_sync() if micro < task.tau - 1 else contextlib.nullcontext()) \
        if job.wrap == "ddp" and not job.fused else None
    held: list[int] = []
    run = lambda s: _cycle(task, model, opt, s, device, step_optimizer=stepping, quiet=quiet, held=held)  # noqa: E731
    row = memory_row(job, task, opt, acc, shard if job.wrap == "fsdp2" else whole, *measured(run, job.steps, device),
                     device=device, held=held)
    with CollectiveCounter() as comm:
        run(job.steps + 1)
    counts: dict[str, int] = {}
    for op, _, _ in comm.calls:
        counts[op] = counts.get(op, 0) + 1
    row["collectives_per_cycle"] = counts
    return row
