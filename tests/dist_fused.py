"""Fused mode across replicas (issue 20), on 2 gloo processes (see tests/_dist.py): the
optimizer steps inside backward under FSDP2 (per unit, after its reduce-scatter) and
under DDP (per bucket, in its communication hook). Each scenario takes (rank, world)
and returns plain values and tensors; tests/test_distributed_fused.py reads them."""

from __future__ import annotations

import warnings

import torch

from flora import CompressedAccumulator, Flora

from dist_scenarios import OPTS, REF, _accumulate_alone, _batches, _full, _loss, _net


def ddp_fused_accumulator_refused(rank, world):
    """Fused mode on a DDP model is refused before anything changes when the model already
    has a communication hook (DDP takes one only), finds unused parameters (a parameter
    one replica did not use would step on the others only) or has a static graph (its
    first backward must synchronise: DDP's internal assert before, a probe)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for case in ("hook", "find_unused", "static"):
        model = DDP(_net(), find_unused_parameters=case == "find_unused", static_graph=case == "static")
        if case == "hook":
            model.register_comm_hook(None, allreduce_hook)
        opt = Flora(model.parameters(), **OPTS)
        try:
            CompressedAccumulator(model, rank=3, tau=2, optimizer=opt, fused=True)
            out[case] = None
        except (TypeError, ValueError) as e:
            out[case] = str(e)
        out[f"{case}_free"] = all(p.grad is None for p in model.parameters())
    return out


# ------------------------------------------------------------------ fused mode across replicas (issue 20)


FUSED_TAU = 2


def _fused_opt(kind, params, opts):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=False)
    return Flora(params, **opts)


# (name, optimizer, accumulator options): each run over 2 full cycles and a short third one
FUSED_CASES = {
    "compressed": ("flora", dict(rank=3)),
    "compressed_exact_last_false": ("flora", dict(rank=3, exact_last=False)),
    "dense": ("flora", dict(rank=None)),
    "clipped": ("flora", dict(rank=3, max_grad_norm=0.05)),
    "adamw": ("adamw", dict(rank=3)),
    "adamw_clipped": ("adamw", dict(rank=None, max_grad_norm=0.05)),
    "scheduled": ("flora", dict(rank=3)),  # with an LR scheduler stepped at each cycle's end
}


def _scheduler(name, opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)) if name == "scheduled" else None


def _one_process_fused_ref(kind, acc_kw, batches, *, fused_ref: bool, name: str = ""):
    """One process on the full batch: unfused (normal accumulation, the optimizer's own
    step) unless ``fused_ref`` (per-parameter clipping exists only in fused mode)."""
    opts = {**OPTS, "proj_dim": 1, **REF}
    ref = _net()
    opt = _fused_opt(kind, ref.parameters(), opts)
    acc = CompressedAccumulator(ref, tau=FUSED_TAU, optimizer=opt, seed=5, proj_dim=1,
                                fused=fused_ref, **acc_kw)
    sched = _scheduler(name, opt)
    norms = []
    for i, (x, y) in enumerate(batches):
        (_loss(ref, x, y) / FUSED_TAU).backward()
        if (i + 1) % FUSED_TAU == 0 or i == len(batches) - 1:
            if fused_ref:
                acc.finish_cycle()
                norms.append(acc.last_grad_norm.item())
            else:
                opt.step()
                opt.zero_grad()
            if sched is not None:
                sched.step()
    acc.remove()
    return ref, norms


def _after_backward(i: int, n: int, acc, sched, norms: list) -> None:
    """The loop's end of micro-batch ``i`` of ``n``: the short last cycle is finished; at
    each cycle's end its norm is read and the scheduler steps."""
    if i == n - 1:
        acc.finish_cycle()
    if (i + 1) % FUSED_TAU == 0 or i == n - 1:
        norms.append(acc.last_grad_norm.item())
        if sched is not None:
            sched.step()


def fsdp_fused(rank, world):
    """Fused mode on a fully_shard model (two units: ``a`` and the root): every
    parameter steps in the hook FSDP2 calls after its unit's reduce-scatter; over two
    cycles of tau=2 and a short third one (finish_cycle). Equal to one process unfused on
    the full batch (clipping: one process fused)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    batches = _batches(2 * FUSED_TAU + 1)
    out = {}
    for name, (kind, acc_kw) in FUSED_CASES.items():
        model = _net()
        fully_shard(model.a)
        fully_shard(model)
        opt = _fused_opt(kind, model.parameters(), {**OPTS, "proj_dim": 1})
        acc = CompressedAccumulator(model, tau=FUSED_TAU, optimizer=opt, seed=5, fused=True, **acc_kw)
        sched = _scheduler(name, opt)
        norms, counts = [], []
        for i, (x, y) in enumerate(batches):
            n = x.shape[0] // world
            loss = _loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) / FUSED_TAU
            with CommDebugMode() as comm:
                loss.backward()
            counts.append({str(k): v for k, v in comm.get_comm_counts().items()})
            _after_backward(i, len(batches), acc, sched, norms)
        grads_left = [n for n, p in model.named_parameters() if p.grad is not None]
        ref, ref_norms = _one_process_fused_ref(kind, acc_kw, batches, fused_ref="max_grad_norm" in acc_kw,
                                                name=name)
        got = _full(model)
        out[name] = {"diff": max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()),
                     "norms": norms, "ref_norms": ref_norms, "counts": counts, "grads_left": grads_left}
        acc.remove()
    return out


def ddp_fused(rank, world):
    """Fused mode on a DDP model (small buckets: several per backward; and
    gradient_as_bucket_view): each bucket steps in DDP's communication hook on its mean
    over replicas, the accumulator choosing which micro-batch DDP synchronises (the loop
    calls backward() only); over two cycles and a short third one (finish_cycle, averaged
    by one packed all-reduce). Equal to one process unfused on the full batch (clipping:
    one process fused)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = _batches(2 * FUSED_TAU + 1)
    out = {}
    cases = {**FUSED_CASES, "bucket_view": ("flora", dict(rank=3)), "adamw_bucket_view": ("adamw", dict(rank=3))}
    for name, (kind, acc_kw) in cases.items():
        model = DDP(_net(), bucket_cap_mb=0.0002, gradient_as_bucket_view="bucket_view" in name)
        opt = _fused_opt(kind, model.parameters(), {**OPTS, "proj_dim": 1})
        acc = CompressedAccumulator(model, tau=FUSED_TAU, optimizer=opt, seed=5, proj_dim=1, fused=True, **acc_kw)
        sched = _scheduler(name, opt)
        norms, grads_seen = [], []
        for i, (x, y) in enumerate(batches):
            n = x.shape[0] // world
            (_loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) / FUSED_TAU).backward()
            grads_seen.append(sum(p.grad is not None for p in model.parameters()))
            _after_backward(i, len(batches), acc, sched, norms)
        ref, ref_norms = _one_process_fused_ref(kind, acc_kw, batches, fused_ref="max_grad_norm" in acc_kw,
                                                name=name)
        out[name] = {"diff": max((a - b).abs().max().item()
                                 for a, b in zip(model.module.parameters(), ref.parameters())),
                     "norms": norms, "ref_norms": ref_norms, "grads_seen": grads_seen,
                     "buckets": len(model.reducer._get_zeros_like_grad_buckets())}
        acc.remove()
    return out


def _engine_model(engine: str):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _net()
    if engine == "ddp":
        return DDP(model, bucket_cap_mb=0.0002)
    fully_shard(model.a)
    fully_shard(model)
    return model


def _params_of(model, engine):
    if engine == "ddp":
        return {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return _full(model)


def _diff(got: dict, ref) -> float:
    return max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())


def _micro(model, x, y, rank, world):
    n = x.shape[0] // world
    return _loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) / FUSED_TAU


def fused_scaler(rank, world):
    """A GradScaler in fused mode across replicas, with a NaN in one rank's loss in the
    second cycle: the step is skipped everywhere, the scale backs off alike on every
    rank, and all equals one process fused on the full batch with the same NaN."""
    batches = _batches(2 * FUSED_TAU + 1)
    out = {}
    for engine in ("ddp", "fsdp"):
        for kind in ("flora", "adamw"):
            def run(model, shard: bool):
                opt = _fused_opt(kind, model.parameters(), {**OPTS, "proj_dim": 1, **({} if shard else REF)})
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
                acc = CompressedAccumulator(model, rank=3, tau=FUSED_TAU, optimizer=opt, seed=5, proj_dim=1,
                                            fused=True, scaler=scaler)
                scales = []
                for i, (x, y) in enumerate(batches):
                    loss = _micro(model, x, y, rank, world) if shard else _loss(model, x, y) / FUSED_TAU
                    if i == FUSED_TAU and (rank == 0 or not shard):
                        loss = loss * float("nan")
                    scaler.scale(loss).backward()
                    if i == len(batches) - 1:
                        acc.finish_cycle()
                    if (i + 1) % FUSED_TAU == 0 or i == len(batches) - 1:
                        scaler.step(opt)
                        scaler.update()
                        scales.append(scaler.get_scale())
                acc.remove()
                return scales

            model = _engine_model(engine)
            scales = run(model, True)
            ref = _net()
            ref_scales = run(ref, False)
            out[f"{engine}_{kind}"] = {"diff": _diff(_params_of(model, engine), ref), "scales": scales,
                                       "ref_scales": ref_scales}
    return out


def fused_resume(rank, world):
    """Fused mode across replicas resumes exactly from the middle of a cycle: the model
    and optimizer (DCP under FSDP2, state_dict under DDP) and each rank's accumulator
    state (its own partial sums; torch.load(weights_only=True)) saved after 3 of 5
    micro-batches, loaded into fresh objects, equal an uninterrupted run."""
    import io
    import tempfile

    import torch.distributed as dist

    from dist_scenarios import _dcp_load, _dcp_save

    batches = _batches(2 * FUSED_TAU + 1)
    box = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(box)
    out = {}
    for engine in ("ddp", "fsdp"):
        def build():
            model = _engine_model(engine)
            opt = Flora(model.parameters(), **OPTS, proj_dim=1)
            return model, opt, CompressedAccumulator(model, rank=3, tau=FUSED_TAU, optimizer=opt, seed=5,
                                                     fused=True)

        def train(model, acc, part):
            for i, (x, y) in part:
                _micro(model, x, y, rank, world).backward()
                if i == len(batches) - 1:
                    acc.finish_cycle()

        model, opt, acc = build()
        train(model, acc, list(enumerate(batches)))
        whole = _params_of(model, engine)
        acc.remove()

        model, opt, acc = build()
        train(model, acc, list(enumerate(batches))[:3])
        path = f"{box[0]}/{engine}"
        buf = io.BytesIO()
        if engine == "fsdp":
            _dcp_save(model, opt, path)
            torch.save(acc.state_dict(), buf)
        else:
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()}, buf)
        acc.remove()
        model, opt, acc = build()
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        if engine == "fsdp":
            _dcp_load(model, opt, path)
            acc.load_state_dict(saved)
        else:
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            acc.load_state_dict(saved["acc"])
        micro = acc.micro_step
        train(model, acc, list(enumerate(batches))[3:])
        resumed = _params_of(model, engine)
        acc.remove()
        out[engine] = {"diff": max((whole[n] - resumed[n]).abs().max().item() for n in whole),
                       "micro_step_loaded": micro}
    return out


def ddp_fused_projection_hook(rank, world):
    """comm_hook=(ProjectionState, projection_hook): each bucket steps on the hook's
    compressed mean, equal to normal mode under DDP with the same hook registered
    (no_sync() on the first micro-batch, then optimizer.step())."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flora.distributed import ProjectionState, projection_hook

    batches = _batches(2 * FUSED_TAU)
    fused = DDP(_net(), bucket_cap_mb=0.0002)
    opt = Flora(fused.parameters(), **OPTS, proj_dim=1)
    acc = CompressedAccumulator(fused, rank=3, tau=FUSED_TAU, optimizer=opt, seed=5, fused=True,
                                comm_hook=(ProjectionState(rank=2, seed=1), projection_hook))
    for x, y in batches:
        _micro(fused, x, y, rank, world).backward()
    acc.remove()
    plain = DDP(_net(), bucket_cap_mb=0.0002)
    plain.register_comm_hook(ProjectionState(rank=2, seed=1), projection_hook)
    popt = Flora(plain.parameters(), **OPTS, proj_dim=1)
    pacc = CompressedAccumulator(plain, rank=3, tau=FUSED_TAU, optimizer=popt, seed=5)
    for i, (x, y) in enumerate(batches):
        if (i + 1) % FUSED_TAU:
            with plain.no_sync():
                _micro(plain, x, y, rank, world).backward()
        else:
            _micro(plain, x, y, rank, world).backward()
            popt.step()
            popt.zero_grad()
    pacc.remove()
    moved = max((a - b).abs().max().item() for a, b in zip(fused.module.parameters(), _net().parameters()))
    return {"diff": max((a - b).abs().max().item() for a, b in zip(fused.module.parameters(), plain.module.parameters())),
            "moved": moved}


def fsdp_gradient_sync_off_refused(rank, world):
    """FSDP2's set_requires_gradient_sync(False) would call the accumulator's hooks on the
    synchronised micro-batch only: refused at the forward pass, normal and fused mode."""
    out = {}
    for fused in (False, True):
        model = _engine_model("fsdp")
        opt = Flora(model.parameters(), **OPTS)
        acc = CompressedAccumulator(model, rank=3, tau=2, optimizer=opt, fused=fused)
        model.set_requires_gradient_sync(False)
        x, y = _batches(1)[0]
        try:
            _micro(model, x, y, rank, world).backward()
            out[fused] = None
        except RuntimeError as e:
            out[fused] = str(e)
        # refused before FSDP2's own pre-forward: the root's parameters were never gathered
        out[f"{fused}_still_sharded"] = type(model.b.weight).__name__ == "DTensor"
        # an evaluation forward under no_grad with sync off builds no gradient: allowed (probe
        # Z72: a mutant refused it, and no test had run one)
        with torch.no_grad():
            model(x[:2])
        out[f"{fused}_eval"] = acc.micro_step
        model.set_requires_gradient_sync(True)
        _micro(model, x, y, rank, world).backward()  # on again: runs
        out[f"{fused}_after"] = acc.micro_step
        acc.remove()
    return out


def fsdp_fused_unit_with_an_unused_parameter(rank, world):
    """(Probe Z72.) Fused mode under FSDP2 with a parameter of the root unit that gets no
    gradient: that unit never completes, so it steps when the next unit's first gradient
    arrives, on its own (its two all-reduces, then the next unit's two), not merged with
    the next one; equal to one process unfused on the full batch."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    def build():
        model = _net()
        model.unused = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
        return model

    batches = _batches(2 * FUSED_TAU)
    model = build()
    fully_shard(model.a)
    fully_shard(model)
    opts = {**OPTS, "proj_dim": 1}
    opt = Flora(model.parameters(), **opts)
    acc = CompressedAccumulator(model, rank=3, tau=FUSED_TAU, optimizer=opt, seed=5, fused=True)
    counts = []
    for x, y in batches:
        with CommDebugMode() as comm:
            _micro(model, x, y, rank, world).backward()
        counts.append(comm.get_comm_counts().get(torch.ops.c10d.allreduce_, 0))
    acc.remove()
    ref = _accumulate_alone(build(), batches, FUSED_TAU, {"proj_dim": 1}, **{**opts, **REF})
    return {"counts": counts, "diff": _diff(_full(model), ref)}


def ddp_fused_removed(rank, world):
    """After remove() (after a full cycle, mid-cycle, after a short one), a backward on
    that DDP model says that DDP kept the accumulator's hook (it cannot be
    unregistered); and the model is freed once dropped (the reducer
    holds the accumulator only weakly: a model kept alive until interpreter shutdown can
    abort the process there)."""
    import gc
    import weakref

    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    x, y = _batches(1)[0]
    # removed after a full cycle; mid-cycle; after a short cycle that finish_cycle() closed
    # (these two had left DDP's synchronisation off: the next backward ran unsynchronised,
    # each replica on its own gradients; found by a new-user probe)
    for case, tau, before in (("full", 1, 1), ("mid", 3, 1), ("short", 3, 4)):
        model = DDP(_net())
        opt = Flora(model.parameters(), **OPTS)
        acc = CompressedAccumulator(model, rank=3, tau=tau, optimizer=opt, fused=True)
        for _ in range(before):
            _micro(model, x, y, rank, world).backward()
        if case == "short":
            acc.finish_cycle()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # remove() mid-cycle warns that it drops the partial sums
            acc.remove()
        try:
            _micro(model, x, y, rank, world).backward()
            out[case] = None
        except RuntimeError as e:
            out[case] = str(e)
        if case == "full":
            ref = weakref.ref(model)
        del model, opt, acc
    gc.collect()
    out["freed"] = ref() is None
    return out


class _ConvNet(torch.nn.Module):
    """A 4-D weight (channels_last where asked: DDP's bucket views follow the parameter's
    strides) and a matrix."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.head = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


LAYOUT_CASES = {"float32": (torch.float32, False), "float32_channels_last": (torch.float32, True),
                "bfloat16": (torch.bfloat16, False), "float64": (torch.float64, False)}


def fused_layouts_dtypes(rank, world):
    """Fused mode across replicas over layouts and dtypes (the single-process fused path
    is checked against the single-tensor reference over every layout and dtype in
    test_paths.py): DDP and FSDP2 against one process fused on the full batch; returns
    the error relative to the parameters' movement."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 2, 6, 6, generator=g), torch.randn(8, 3, generator=g))
               for _ in range(2 * FUSED_TAU + 1)]  # and a short cycle
    out = {}
    for engine in ("ddp", "fsdp"):
        for name, (dtype, channels_last) in LAYOUT_CASES.items():
            if engine == "fsdp" and channels_last:
                continue  # FSDP2 shards into contiguous rows

            def build():
                torch.manual_seed(0)
                m = _ConvNet().to(dtype)
                if channels_last:
                    m.conv.to(memory_format=torch.channels_last)
                return m

            def train(model, shard):
                opt = Flora(model.parameters(), **OPTS, proj_dim=1, **({} if shard else REF))
                acc = CompressedAccumulator(model, rank=3, tau=FUSED_TAU, optimizer=opt, seed=5, proj_dim=1,
                                            fused=True, max_grad_norm=0.5)
                for x, y in batches:
                    x, y = x.to(dtype), y.to(dtype)
                    if shard:
                        n = x.shape[0] // world
                        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
                    (torch.nn.functional.mse_loss(model(x), y) / FUSED_TAU).backward()
                acc.finish_cycle()
                acc.remove()

            init = {n: p.detach().double().clone() for n, p in build().named_parameters()}
            model = build()
            if engine == "ddp":
                model = DDP(model, bucket_cap_mb=0.0002)
            else:
                fully_shard(model)
            train(model, True)
            got = {n.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()
                   for n, p in model.named_parameters()}
            ref = build()
            train(ref, False)
            err = max((got[n] - p.detach().double()).abs().max().item() for n, p in ref.named_parameters())
            moved = max((p.detach().double() - init[n]).abs().max().item() for n, p in ref.named_parameters())
            out[f"{engine}_{name}"] = {"relative": err / moved, "moved": moved}
    return out
