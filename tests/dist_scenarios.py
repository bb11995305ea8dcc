"""Scenarios run on 2 gloo processes by tests/test_distributed.py (see tests/_dist.py).
Each takes (rank, world) and returns plain values and tensors."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn

from flora import CompressedAccumulator, Flora

STEPS = 5
OPTS = dict(lr=1e-2, rank=3, beta1=0.9, kappa=2, seed=3, scale_parameter=True, weight_decay=0.01)


class Net(nn.Module):
    """Shapes that FSDP2 shards unevenly (11 rows: 6 + 5), emptily (1 row: 1 + 0), a 3-D
    parameter and 1-D ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 11)
        self.b = nn.Linear(11, 12, bias=False)
        self.c = nn.Parameter(torch.randn(5, 4, 3) * 0.3)
        self.d = nn.Linear(12, 1)

    def forward(self, x):
        h = self.b(torch.tanh(self.a(x)))
        h = h * (1 + self.c.reshape(5, 12).mean(0))
        return self.d(torch.tanh(h))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _batches(n: int = STEPS, size: int = 8):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 12, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _train_single(opts: dict, batches, model=None, opt=None):
    model = model or _net()
    opt = opt or Flora(model.parameters(), **opts)
    for x, y in batches:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return model, opt


def _steps(model, opt, batches, rank, world):
    """One step per batch, each rank on its share of the batch's rows."""
    for x, y in batches:
        n = x.shape[0] // world
        opt.zero_grad()
        _loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
        opt.step()


def _fsdp(model):
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    return model


def _full(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _train_fsdp(opts: dict, rank: int, world: int, batches, *, count=False):
    from torch.distributed.tensor.debug import CommDebugMode

    model = _fsdp(_net())
    opt = Flora(model.parameters(), **opts)
    counts = []
    for x, y in batches:
        n = x.shape[0] // world
        opt.zero_grad()
        _loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
        with CommDebugMode() as comm:
            opt.step()
        counts.append({str(k): v for k, v in comm.get_comm_counts().items()})
    return model, opt, counts


# (name, options of the sharded run, proj_dim of the one-process reference)
FSDP_CASES = {
    "dense": (dict(rank=None), "auto"),
    "proj_dim0": (dict(proj_dim=0), 0),
    "proj_dim1": (dict(proj_dim=1), 1),
    "auto": (dict(), 1),  # under FSDP2, "auto" projects the unsharded dimension
    "exact_gaussian_dim0": (dict(proj_dim=0, momentum_form="exact", projection="gaussian"), 0),
    "paper_gaussian_dim1": (dict(proj_dim=1, momentum_form="paper", projection="gaussian"), 1),
    "coordinates_dim0": (dict(proj_dim=0, projection="coordinates"), 0),
    "no_momentum": (dict(beta1=None), "auto"),
    "relative_step": (dict(lr=None, relative_step=True), 1),
}


def fsdp_equals_one_process(rank, world):
    out = {}
    batches = _batches()
    for name, (kw, ref_dim) in FSDP_CASES.items():
        opts = {**OPTS, **kw}
        model, opt, counts = _train_fsdp(opts, rank, world, batches)
        ref, _ = _train_single({**opts, "proj_dim": ref_dim}, batches)
        got = _full(model)
        diff = max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
        from torch.distributed.tensor import DTensor

        kinds = {}
        for n, p in model.named_parameters():
            st = opt.state[p]
            kinds[n] = {k: (type(v).__name__, str(v.placements) if isinstance(v, DTensor) else None)
                        for k, v in st.items() if isinstance(v, torch.Tensor)}
            kinds[n]["proj_dim"] = st.get("proj_dim")
        out[name] = {"diff": diff, "counts": counts, "state": kinds}
    return out


def fsdp_nonfinite_gradient(rank, world):
    """A NaN in one rank's rows of a.weight: that parameter is skipped on every rank (its
    weights and state unchanged), the others step."""
    opts = {**OPTS}
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **opts)
    x, y = _batches(1)[0]
    _loss(model, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]).backward()
    opt.step()
    before = _full(model)
    opt.zero_grad()
    _loss(model, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]).backward()
    if rank == 1:
        model.a.weight.grad.to_local()[0, 0] = float("nan")
    opt.step()
    after = _full(model)
    return {"a_unchanged": bool(torch.equal(before["a.weight"], after["a.weight"])),
            "b_moved": not torch.equal(before["b.weight"], after["b.weight"]),
            "skips": int(opt.nonfinite_skips), "finite": all(bool(torch.isfinite(v).all()) for v in after.values())}


def fsdp_shard1_refused(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = _net()
    # FSDP2 allows Shard(1) where dim 1 divides evenly: a.weight (11 x 12)
    fully_shard(model, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % 2 == 0 else None)
    opt = Flora(model.parameters(), **OPTS)
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    w = model.a.weight.to_local().clone()
    try:
        opt.step()
    except ValueError as e:
        return {"error_message": str(e), "unchanged": bool(torch.equal(w, model.a.weight.to_local())),
                "state_empty": all(len(opt.state[p]) == 0 for p in model.parameters())}
    return {"error_message": None}


def _dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def fsdp_checkpoint_save(rank, world):
    """2 processes train 3 steps and save with torch.distributed.checkpoint; the test
    loads it in one process (dcp_resume_single) and continues."""
    path = os.environ["FLORA_TEST_CKPT"]
    batches = _batches()
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **OPTS)
    _steps(model, opt, batches[:3], rank, world)
    _dcp_save(model, opt, os.path.join(path, "two"))
    return {}


def fsdp_checkpoint_load(rank, world):
    """2 processes load what one process saved (dcp_save_single) and continue."""
    path = os.environ["FLORA_TEST_CKPT"]
    batches = _batches()
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **OPTS)
    _dcp_load(model, opt, os.path.join(path, "one"))
    steps = [opt.state[p]["step"] for p in model.parameters()]
    _steps(model, opt, batches[3:], rank, world)
    ref, _ = _train_single({**OPTS, "proj_dim": 1}, batches)
    got = _full(model)
    return {"diff": max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()),
            "steps_loaded": steps}


def accelerate_switch(rank, world):
    """accelerate's FSDP2 path (``Accelerator.prepare``), step by step: the optimizer is
    built on the plain parameters; accelerate swaps them for placeholders that remember
    the old ``data_ptr``, runs ``fully_shard``, then maps them to the DTensors with
    ``fsdp2_switch_optimizer_parameters``."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    batches = _batches()
    model = _net()
    opt = Flora(model.parameters(), **OPTS)
    old = {n: p.data_ptr() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            ptr = p.data_ptr()
            group["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
            group["params"][i].data_ptr = ptr
    _fsdp(model)
    fsdp2_switch_optimizer_parameters(opt, {old[n]: p for n, p in model.named_parameters()})
    _steps(model, opt, batches, rank, world)
    ref, _ = _train_single({**OPTS, "proj_dim": 1}, batches)
    got = _full(model)
    return {"diff": max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())}


# ------------------------------------------------------------------ DDP


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model)


def ddp_flora(rank, world):
    batches = _batches()
    model = _ddp(_net())
    opt = Flora(model.parameters(), **OPTS)
    _steps(model, opt, batches, rank, world)
    ref, _ = _train_single(OPTS, batches)
    return {"diff": max((a - b).abs().max().item() for a, b in zip(model.module.parameters(), ref.parameters()))}


def ddp_accumulator(rank, world):
    """CompressedAccumulator(tau=2) under DDP, no_sync() on the first micro-batch: equal
    to one process accumulating the same micro-batches (each the union of the ranks')."""
    tau = 2
    batches = _batches(2 * tau, size=8)
    model = _ddp(_net())
    opt = Flora(model.parameters(), **OPTS)
    acc = CompressedAccumulator(model.module, rank=3, tau=tau, optimizer=opt, seed=5)
    for i, (x, y) in enumerate(batches):
        n = x.shape[0] // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        if (i + 1) % tau:
            with model.no_sync():
                (_loss(model, xs, ys) / tau).backward()
        else:
            (_loss(model, xs, ys) / tau).backward()
            opt.step()
            opt.zero_grad()
    ref = _net()
    ropt = Flora(ref.parameters(), **OPTS)
    racc = CompressedAccumulator(ref, rank=3, tau=tau, optimizer=ropt, seed=5)
    for i, (x, y) in enumerate(batches):
        (_loss(ref, x, y) / tau).backward()
        if (i + 1) % tau == 0:
            ropt.step()
            ropt.zero_grad()
    del acc, racc
    return {"diff": max((a - b).abs().max().item() for a, b in zip(model.module.parameters(), ref.parameters()))}


def ddp_fused_accumulator_refused(rank, world):
    model = _ddp(_net())
    opt = Flora(model.parameters(), **OPTS)
    try:
        CompressedAccumulator(model, rank=3, tau=2, optimizer=opt, fused=True)
    except (TypeError, ValueError) as e:
        return {"error_message": str(e)}
    return {"error_message": None}


# ------------------------------------------------------------------ the accumulator under FSDP2


def fsdp_accumulator(rank, world):
    """CompressedAccumulator(tau=2) on a fully_shard model: each micro-batch's gradient
    arrives as this rank's rows after the reduce-scatter and is compressed there; equal to
    one process accumulating the same micro-batches (proj_dim=1, what "auto" takes under
    FSDP2), over two cycles and a short third one closed by the step."""
    tau, opts = 2, {**OPTS, "proj_dim": 1}
    batches = _batches(2 * tau + 1)
    out = {}
    for exact_last in (True, False):
        model = _fsdp(_net())
        opt = Flora(model.parameters(), **opts)
        acc = CompressedAccumulator(model, rank=3, tau=tau, optimizer=opt, seed=5, exact_last=exact_last)
        for i, (x, y) in enumerate(batches):
            n = x.shape[0] // world
            (_loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) / tau).backward()
            if (i + 1) % tau == 0 or i == len(batches) - 1:
                opt.step()
                opt.zero_grad()
        ref = _net()
        ropt = Flora(ref.parameters(), **opts)
        racc = CompressedAccumulator(ref, rank=3, tau=tau, optimizer=ropt, seed=5, proj_dim=1, exact_last=exact_last)
        for i, (x, y) in enumerate(batches):
            (_loss(ref, x, y) / tau).backward()
            if (i + 1) % tau == 0 or i == len(batches) - 1:
                ropt.step()
                ropt.zero_grad()
        got = _full(model)
        plan = {r["name"]: r.get("proj_dim") for r in acc.plan()}
        out[f"exact_last={exact_last}"] = {
            "diff": max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()),
            "plan": plan}
        acc.remove()
        racc.remove()
    errors = {}
    for kw in (dict(proj_dim=0), dict(fused=True), dict(reduce=True)):
        model = _fsdp(_net())
        try:
            CompressedAccumulator(model, rank=3, tau=2, optimizer=Flora(model.parameters(), **OPTS), **kw)
            errors[str(kw)] = None
        except ValueError as e:
            errors[str(kw)] = str(e)
    out["errors"] = errors
    return out
