"""Scenarios run on 2 gloo processes by tests/test_distributed.py (see tests/_dist.py).
Each takes (rank, world) and returns plain values and tensors."""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from flora import CompressedAccumulator, Flora

from _configs import MOMENTUM_CONFIGS, form_options

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


# The one-process reference of every comparison here: the single-tensor step (foreach=False).
REF = dict(foreach=False)


def _train_single(opts: dict, batches, model=None, opt=None):
    model = model or _net()
    opt = opt or Flora(model.parameters(), **{**opts, **REF})
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


# (name, options of the sharded run, proj_dim of the one-process reference): training
# end to end (FSDP2's forward, backward and reduce-scatter); every form and projection,
# and bf16, are in fsdp_forms_equal_single_tensor.
FSDP_CASES = {
    "dense": (dict(rank=None), "auto"),
    "proj_dim0": (dict(proj_dim=0), 0),
    "proj_dim1": (dict(proj_dim=1), 1),
    "auto": (dict(), 1),  # under FSDP2, "auto" projects the unsharded dimension
    "no_momentum": (dict(beta1=None), "auto"),
    "relative_step": (dict(lr=None, relative_step=True), 1),
    # c (5, 4, 3): factored per index of dim 0 (local) rather than over dims (0, 1) (summed)
    "factor_last": (dict(factor_dims="last"), 1),
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
            # a state DTensor's global strides are its full tensor's (probe Z71: a wrong rule
            # made (16, 2) say (32, 2), which no number showed)
            kinds[n]["strides"] = {k: (v.stride(), v.full_tensor().stride()) for k, v in st.items()
                                   if isinstance(v, DTensor)}
        out[name] = {"diff": diff, "counts": counts, "state": kinds}
    return out


# ------------------------------------------------- every form and projection, and bf16


class Params(nn.Module):
    """Parameters only, never called: their gradients are given. Shapes that FSDP2 shards
    unevenly (11 rows: 6 + 5) and emptily (1 row: 1 + 0), a 3-D one and 4-D ones
    (channels_last in the one-process reference), and a 1-D one. The names say which
    dimension each one's momentum projects away (param groups of proj_dim 0 and 1).
    Under the default factor_dims="largest", c0 and k1 are factored over dims (0, 1) (the
    sharded rows are factored: sums over the shards, 5 rows uneven), k0 over (1, 3) (a
    permuted view whose leading dim is the sharded one: local). sa and sb are stacks of 4
    matrices of 6 x 5 (stacked experts, 2 a rank), seen as 24 x 5, in groups of their own
    after the others: sa's 24 rows projected (this rank's 12 of them through its columns of
    the projection), sb's columns. psa is one 6 x 5 matrix behind a leading 1 (a position
    embedding's (1, N, d)), all on the first rank, its 6 rows projected with sa's group."""

    SHAPES = {"w0": (11, 12), "c0": (5, 4, 3), "k0": (2, 6, 3, 5), "w1": (11, 12), "e1": (1, 12),
              "k1": (6, 4, 3, 3), "b1": (11,), "sa": (4, 6, 5), "sb": (4, 6, 5), "psa": (1, 6, 5)}

    def __init__(self, dtype, channels_last=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in self.SHAPES.items():
            t = (torch.rand(shape, generator=g) * 0.1 - 0.05).to(dtype)  # |p| <= 0.05: far above a bf16 ulp
            if channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            self.register_parameter(name, nn.Parameter(t))


def _param_groups(model):
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("0")], "proj_dim": 0},
            {"params": [p for n, p in named if n.endswith("1")], "proj_dim": 1},
            {"params": [p for n, p in named if n.endswith("sa")], "proj_dim": 0},
            {"params": [p for n, p in named if n.endswith("sb")], "proj_dim": 1}]


def _given_grads(step: int, dtype):
    """Full gradients, the same on every rank: a fixed direction plus noise, so that
    momentum builds up and the parameters move about lr a step."""
    g0, g = torch.Generator().manual_seed(99), torch.Generator().manual_seed(100 + step)
    return {n: (torch.randn(s, generator=g0) + 0.5 * torch.randn(s, generator=g)).to(dtype)
            for n, s in Params.SHAPES.items()}


def _rows(t, full):
    """This rank's part of ``full``, for a DTensor ``t`` (a parameter, sharded by rows, or
    a state tensor, sharded where the parameter's rows are: dim 0, or the last dim of a
    row factor whose rows are factored), or all of it where ``t`` is whole on every rank."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, local))]


def _as_dtensor_like(p, full):
    """``full`` as a DTensor laid out like the DTensor parameter ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(_rows(p, full).contiguous(), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


FORM_OPTS = dict(lr=0.2, rank=3, beta1=0.9, kappa=2, seed=3, scale_parameter=True, weight_decay=0.01)
FORM_STEPS = 4  # kappa=2: the third step resamples
# (name, dtype, options): every (form, projection) pair, each with one param group per
# projected dimension (the sharded rows, through A_local u_local; the unsharded columns,
# through the terms), and bf16 parameters.
FORM_CASES = {f"{f}-{p}": (torch.float32, form_options(f, p)) for f, p in MOMENTUM_CONFIGS}
FORM_CASES.update({
    "bf16-scaled-orthonormal": (torch.bfloat16, dict()),
    "bf16-exact-gaussian": (torch.bfloat16, dict(momentum_form="exact", projection="gaussian")),
    # the first moment stored in bfloat16, its arithmetic in float32: compressed, and dense
    "bf16-momentum": (torch.float32, dict(momentum_dtype="bfloat16")),
    "bf16-dense-momentum": (torch.float32, dict(rank=None, momentum_dtype=torch.bfloat16)),
    # the compressed first moment in float32 (the default "auto" stores it in bfloat16)
    "fp32-momentum": (torch.float32, dict(momentum_dtype=None)),
})
ULPS = {torch.float32: 0, torch.bfloat16: 2}  # a half-precision parameter rounds at every step


def _movement_error(p0, ref, got, dtype) -> dict:
    """How far ``got`` moved from ``p0`` against ``ref``'s movement: ``scale`` (the largest
    movement), ``err`` (the largest difference beyond ``ULPS`` units in the last place,
    relative to ``scale``) and ``ulps`` (that allowance, relative to ``scale``)."""
    if ref.numel() == 0:
        return {"scale": None, "err": 0.0, "ulps": 0.0}
    d_ref, d_got = ref.double() - p0.double(), got.double() - p0.double()
    scale = d_ref.abs().max().item()
    allow = ULPS[dtype] * torch.finfo(dtype).eps * ref.double().abs()
    return {"scale": scale, "err": ((d_got - d_ref).abs() - allow).max().item() / scale,
            "ulps": allow.max().item() / scale}


def _form_models(channels_last=False):
    """One ``Params`` per case."""
    return nn.ModuleDict({name: Params(dtype, channels_last) for name, (dtype, _) in FORM_CASES.items()})


def _form_groups(models):
    """Param groups that give each case its options, so that one optimizer (and one pair
    of all-reduces a step) runs every case."""
    return [{**g, **kw} for name, (_, kw) in FORM_CASES.items() for g in _param_groups(models[name])]


def fsdp_forms_equal_single_tensor(rank, world):
    """Every (form, projection) pair and bf16: FSDP2 against the single-tensor step of one
    process (foreach=False), fed the same gradients, over 4 steps with a resample, all
    cases in one optimizer (a param group per case and projected dimension); the
    collectives of the resample step counted. Each rank compares its own rows."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    models, ref_models = _form_models(), _form_models(channels_last=True)
    for m in models.values():
        _fsdp(m)  # each case on its own: FSDP2 wants one dtype per fully_shard
    opt = Flora(_form_groups(models), **FORM_OPTS)
    ref_opt = Flora(_form_groups(ref_models), **FORM_OPTS, **REF)
    p0 = {n: p.detach().clone() for n, p in ref_models.named_parameters()}
    params, ref_params = dict(models.named_parameters()), dict(ref_models.named_parameters())
    counts = []
    for step in range(FORM_STEPS):
        grads = {dtype: _given_grads(step, dtype) for dtype in (torch.float32, torch.bfloat16)}
        for n, p in params.items():
            g = grads[p.dtype][n.split(".")[-1]]
            p.grad = _as_dtensor_like(p, g)
            ref_params[n].grad = torch.empty_like(ref_params[n]).copy_(g)
        if step == 2:  # a resample step; counting every op is slow (fsdp_equals_one_process counts all)
            with CommDebugMode() as comm:
                opt.step()
            counts.append({str(k): v for k, v in comm.get_comm_counts().items()})
        else:
            opt.step()
        ref_opt.step()
    out = {name: {"params": {}, "state": {}} for name in FORM_CASES}
    for n, p in params.items():
        case, short = n.split(".")
        rp = ref_params[n]
        local = p.to_local().detach()
        res = _movement_error(_rows(p, p0[n]), _rows(p, rp.detach()), local, p.dtype)
        out[case]["params"][short] = {**res, "dtype": str(local.dtype)}
        st, ref_st = opt.state[p], ref_opt.state[rp]
        state = {"keys": sorted(st) == sorted(ref_st)}
        for k, v in ref_st.items():
            mine = st[k]
            if not isinstance(mine, DTensor):
                state[k] = mine == v
                continue
            want = _rows(mine, v)
            mine = mine.to_local()
            scale = v.abs().max().item() if v.numel() else 0.0
            state[k] = {"dtype": str(mine.dtype), "shape": tuple(mine.shape) == tuple(want.shape),
                        "err": (mine - want).abs().max().item() / scale if mine.numel() else 0.0}
        out[case]["state"][short] = state
    out["counts"] = counts
    # factor_dims edited mid-run on a group holding 3-D and 4-D DTensors: refused, naming
    # it, before any change (the state's global shapes are checked, as on one process)
    before = {n: p.to_local().clone() for n, p in params.items()}
    opt.param_groups[0]["factor_dims"] = "last"
    try:
        opt.step()
        out["factor_dims_edit"] = None
    except ValueError as e:
        out["factor_dims_edit"] = {"message": str(e), "unchanged": all(torch.equal(before[n], p.to_local())
                                                                        for n, p in params.items())}
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
    state = {k: v.full_tensor().clone() for k, v in opt.state[model.a.weight].items() if hasattr(v, "full_tensor")}
    opt.step()
    after = _full(model)
    # its state too: the compressed momentum, the factors (probe Z71: the momentum decayed by
    # beta1 on the skipped step, and no test looked)
    same = {k: bool(torch.equal(v, opt.state[model.a.weight][k].full_tensor())) for k, v in state.items()}
    return {"a_unchanged": bool(torch.equal(before["a.weight"], after["a.weight"])), "a_state_unchanged": same,
            "b_moved": not torch.equal(before["b.weight"], after["b.weight"]),
            "skips": int(opt.nonfinite_skips), "finite": all(bool(torch.isfinite(v).all()) for v in after.values())}


def fsdp_empty_parameter(rank, world):
    """A parameter with no elements, sharded by rows as FSDP2 lays out its parameters (FSDP2
    itself cannot reduce-scatter an empty gradient, but DTensor parameters of another
    engine can be empty): it is counted and not stepped, with no false non-finite skip (its
    means over no rows were NaN: two skips in two steps, a review), and the others equal
    one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(8, 5), (0, 16), (7,)]
    torch.manual_seed(0)
    full = [torch.randn(s) for s in shapes]
    ref = [nn.Parameter(t.clone()) for t in full]
    got = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    opts = {**OPTS, "rank": None}
    ref_opt, opt = Flora(ref, **{**opts, **REF}), Flora(got, **opts)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, gr in zip(ref, got, grads):
            p.grad, q.grad = gr.clone(), _as_dtensor_like(q, gr)
        ref_opt.step()
        opt.step()
    return {"skips": int(opt.nonfinite_skips), "e_steps": opt.state[got[1]]["step"],
            "diff": max(float((q.full_tensor() - p.detach()).abs().max()) for p, q in zip(ref, got) if p.numel())}


def fsdp_compile_option(rank, world):
    """Flora(compile=...) under FSDP2: its DTensors step on the eager sharded path (equal to
    compile=False bit for bit), said by one warning, not silently."""
    import warnings

    batches = _batches(3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled, _, _ = _train_fsdp({**OPTS, "compile": "aot_eager"}, rank, world, batches)
    eager, _, _ = _train_fsdp(dict(OPTS), rank, world, batches)
    a, b = _full(compiled), _full(eager)
    with warnings.catch_warnings(record=True) as fused_seen:  # fused accumulation steps it too (a probe)
        warnings.simplefilter("always")
        model = _fsdp(_net())
        opt = Flora(model.parameters(), **{**OPTS, "compile": "aot_eager"})
        acc = CompressedAccumulator(model, rank=3, tau=1, optimizer=opt, seed=5, fused=True)
        x, y = batches[0]
        n = x.shape[0] // world
        _loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
        acc.remove()
    said = "FSDP2's sharded parameters (DTensors) step on the eager sharded path"
    return {"equal": all(torch.equal(a[k], b[k]) for k in a),
            "warnings": sum(said in str(w.message) for w in seen),
            "fused_warnings": sum(said in str(w.message) for w in fused_seen)}


def fsdp_shard1_refused(rank, world):
    """A weight sharded on dim 1, by FSDP2's shard_placement_fn or by tensor parallelism's
    RowwiseParallel (probe Z19: the message had named fully_shard only): refused before any
    change, naming both ways out."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    out = {}
    for how in ("fsdp", "tp"):
        if how == "fsdp":  # FSDP2 allows Shard(1) where dim 1 divides evenly: a.weight (11 x 12)
            model = _net()
            fully_shard(model, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % 2 == 0 else None)
            sharded = model.a.weight
            opt = Flora(model.parameters(), **OPTS)  # before the forward (which swaps in unsharded tensors)
            x, y = _batches(1)[0]
            loss = _loss(model, x, y)
        else:  # the usual pair: the first Linear column-wise (Shard(0)), the second row-wise (Shard(1))
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 14), nn.Tanh(), nn.Linear(14, 3))
            parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
            sharded = model[2].weight
            opt = Flora(model.parameters(), **OPTS)
            loss = model(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).square().mean()
        loss.backward()
        w = sharded.to_local().clone()
        try:
            opt.step()
            out[how] = {"error_message": None}
        except ValueError as e:
            out[how] = {"error_message": str(e), "unchanged": bool(torch.equal(w, sharded.to_local())),
                        "state_empty": all(len(opt.state[p]) == 0 for p in model.parameters())}
    return out


def fsdp_uneven_stack_refused(rank, world):
    """Three stacked experts over two ranks (2 + 1): the compressed momentum's 3 x 6 rows
    would be placed 9 + 9 by DTensor, not 12 + 6 as the parameter's. Refused, before any
    change; with rank=None it steps."""
    model = nn.Module()
    model.register_parameter("s", nn.Parameter(torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))))
    _fsdp(model)
    out = {}
    for rank_opt in (3, None):
        opt = Flora(model.parameters(), lr=1e-2, rank=rank_opt, beta1=0.9)
        model.s.grad = _as_dtensor_like(model.s, torch.ones(3, 6, 5))
        w = model.s.to_local().clone()
        try:
            opt.step()
            out[str(rank_opt)] = {"error_message": None, "moved": not torch.equal(w, model.s.to_local())}
        except ValueError as e:
            out[str(rank_opt)] = {"error_message": str(e), "unchanged": bool(torch.equal(w, model.s.to_local()))}
    return out


def _one_matrices(seed=0):
    model = nn.Module()
    g = torch.Generator().manual_seed(seed)
    for name, shape in (("pos", (1, 6, 5)), ("tall", (1, 16, 8)), ("w", (11, 12))):
        model.register_parameter(name, nn.Parameter(torch.randn(shape, generator=g)))
    return model


def fsdp_one_matrix_auto(rank, world):
    """(Probe Z55.) ViT-style (1, N, d) parameters under FSDP2 with proj_dim="auto": the
    whole matrix sits on one rank, so its momentum is projected on its rows (r x d, whole on
    every rank); "auto" had taken the columns and refused them as an uneven stack. Equal to
    one process's single-tensor step with proj_dim=0 for them, over 4 steps with a resample."""
    model, ref = _fsdp(_one_matrices()), _one_matrices()
    opt = Flora(model.parameters(), **OPTS)
    ref_opt = Flora([{"params": [ref.pos, ref.tall], "proj_dim": 0}, {"params": [ref.w], "proj_dim": 1}], **OPTS, **REF)
    for step in range(4):
        g = torch.Generator().manual_seed(50 + step)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            full = torch.randn(q.shape, generator=g)
            p.grad = _as_dtensor_like(p, full)
            q.grad = full.clone()
        opt.step()
        ref_opt.step()
    got = _full(model)
    out = {"diff": max((got[n] - q.detach()).abs().max().item() for n, q in ref.named_parameters()),
           "proj_dims": [opt.state[p].get("proj_dim") for p in model.parameters()]}
    # an edit that changes no parameter's form is taken (probe Z56: the edit check read one
    # process's rule, columns, for the (1, N, d) ones and refused it)
    opt.param_groups[0]["max_aspect_ratio"] = 1000.0
    opt.step()
    out["edit"] = "stepped"
    return out


def one_matrix_grads(model, step):
    """fsdp_one_matrix_auto's gradients of ``step`` (whole tensors, or DTensors laid out
    like a sharded model's parameters)."""
    g = torch.Generator().manual_seed(50 + step)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g)
        p.grad = _as_dtensor_like(p, full) if hasattr(p, "device_mesh") else full


def fsdp_one_matrix_checkpoint_save(rank, world):
    """(Probe Z91.) 3 steps of fsdp_one_matrix_auto's model under FSDP2 ("auto": rows for
    its (1, N, d) tensors, columns for the matrix), saved with torch.distributed.checkpoint;
    the test loads it in one process with proj_dim="sharded"."""
    model = _fsdp(_one_matrices())
    opt = Flora(model.parameters(), **OPTS)
    for step in range(3):
        one_matrix_grads(model, step)
        opt.step()
    _dcp_save(model, opt, os.path.join(os.environ["FLORA_TEST_CKPT"], "two"))
    return {"proj_dims": [opt.state[p].get("proj_dim") for p in model.parameters()]}


def fsdp_one_matrix_checkpoint_load(rank, world):
    """2 processes load what one process saved with proj_dim="sharded" after 3 steps, and
    take the fourth."""
    model = _fsdp(_one_matrices())
    opt = Flora(model.parameters(), **OPTS)
    _dcp_load(model, opt, os.path.join(os.environ["FLORA_TEST_CKPT"], "one"))
    one_matrix_grads(model, 3)
    opt.step()
    return {"params": {n: p.tolist() for n, p in _full(model).items()}}


def fsdp_plan_before_first_step(rank, world):
    """(Review Z94.) plan() of a sharded Flora before its first step follows FSDP2's rule:
    one process's had said d.weight (1 x 12, rank 3) stays dense ("projected dim 1 <= rank
    3"), and the step then compressed its columns."""
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **OPTS)
    before = {r["name"] or str(r["index"]): (r["compressed"], r.get("proj_dim")) for r in opt.plan()}
    _steps(model, opt, _batches()[:1], rank, world)
    after = {r["name"] or str(r["index"]): (r["compressed"], r.get("proj_dim")) for r in opt.plan()}
    return {"before": before, "after": after}


def fsdp_stack_checkpoint_refused_before_any_change(rank, world):
    """(Probe Z55.) One process's checkpoint of a 3-expert stack, its momentum on the
    columns (proj_dim=1), loaded into FSDP2 over 2 ranks (2 + 1 experts, whose momentum
    rows cannot follow): refused before torch's load (it had been refused after, leaving
    the optimizer half loaded, and the next step failed with torch's size error), naming
    the checkpoint; the optimizer then steps as before."""
    def build():
        m = nn.Module()
        g = torch.Generator().manual_seed(0)
        m.register_parameter("w", nn.Parameter(torch.randn(11, 12, generator=g)))
        m.register_parameter("s", nn.Parameter(torch.randn(3, 6, 5, generator=g)))
        return m

    one = build()
    one_opt = Flora(one.parameters(), lr=1e-2, rank=3, beta1=0.9)
    for p in one.parameters():
        p.grad = torch.ones_like(p)
    one_opt.step()
    sd = one_opt.state_dict()
    model = _fsdp(build())
    opt = Flora(model.parameters(), lr=1e-2, rank=3, beta1=0.9)
    out = {"saved_proj_dim": sd["state"][1].get("proj_dim")}
    try:
        opt.load_state_dict(sd)
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    out["state_after"] = len(opt.state)
    model.w.grad = _as_dtensor_like(model.w, torch.ones(11, 12))  # the stack left out: "auto" refuses it fresh too
    opt.step()
    out["stepped"] = len(opt.state)
    return out


def fsdp_seed_per_rank_refused(rank, world):
    """(Found by a new-user probe.) Flora(seed=rank) under FSDP2 stepped each rank's rows
    under its own projections and summed their compressed momenta anyway (3e-3 off one
    process after 5 steps). Refused at the first step, before any change, on step() and
    step_parameters(); with one seed on every rank it steps."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for how in ("step", "step_parameters"):
        model = _net()
        fully_shard(model)
        opt = Flora(model.parameters(), **{**OPTS, "seed": rank})
        x, y = _batches(1)[0]
        _loss(model, x, y).backward()
        w = model.a.weight.to_local().clone()
        try:
            opt.step() if how == "step" else opt.step_parameters(list(model.parameters()))
            out[how] = None
        except ValueError as e:
            out[how] = str(e)
        out[how + "_unchanged"] = bool(torch.equal(w, model.a.weight.to_local())) and all(
            len(opt.state[p]) == 0 for p in model.parameters())
        opt.param_groups[0]["seed"] = 7
        opt.step() if how == "step" else opt.step_parameters(list(model.parameters()))
        out[how + "_then_steps"] = not torch.equal(w, model.a.weight.to_local())
    return out


def hsdp_equals_one_process(rank, world):
    """(Probe Z71.) HSDP, a mesh of replicas of one shard each, each replica on its share of
    the batch: equal to one process on the whole batch. The statistics of a sharded tensor
    are summed over the shards only (summed over the replicas too, they came out doubled:
    5e-4 off in 4 steps, where every HSDP test had only compared the replicas)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    batches = _batches()
    for name, (kw, ref_dim) in (("proj_dim1", (dict(proj_dim=1), 1)), ("auto", (dict(), 1)),
                                ("dense", (dict(rank=None), "auto"))):
        opts = {**OPTS, **kw}
        model = _net()
        fully_shard(model, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")))
        opt = Flora(model.parameters(), **opts)
        _steps(model, opt, batches, rank, world)
        ref, _ = _train_single({**opts, "proj_dim": ref_dim}, batches)
        got = _full(model)
        out[name] = max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
    return out


def fsdp_options_disagree_refused(rank, world):
    """(Probe Z19.) Options that shape the step, differing on one rank (kappa, the form, the
    rank), under FSDP2, and a per-rank seed under HSDP (a 2 x 1 mesh: replicas of one
    shard), stepped silently (the replicas drifted 5e-3 apart in 3 steps): refused at the
    first step on every rank, before any change, naming the option. HSDP with one seed
    steps, its replicas equal; CompressedAccumulator(seed=rank) under FSDP2 or HSDP is
    refused at construction on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def hsdp(model):
        return fully_shard(model, mesh=init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard")))

    def hsdp_one_replica(model):  # a mesh whose first dim has one process: the shards are on its second
        return fully_shard(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))

    out = {}
    x, y = _batches(1)[0]
    cases = {"kappa": (fully_shard, {"kappa": 1 + rank}), "momentum_form": (fully_shard, {"momentum_form": (
        "exact" if rank else "floored")}), "rank": (fully_shard, {"rank": 3 + rank}), "hsdp seed": (hsdp, {"seed": rank}),
        "hsdp same seed": (hsdp, {}),
        # (probe Z71) values whose encodings differ in one 32-bit half only, None against 0,
        # and a mesh compared over its second dim: each had stepped on one mutant
        "beta1 high half": (fully_shard, {"beta1": 0.45 if rank else 0.9}),  # the same mantissa
        "beta1 none": (fully_shard, {"beta1": None if rank else 0.0}),
        "hsdp shards seed": (hsdp_one_replica, {"seed": rank})}
    for name, (shard, kw) in cases.items():
        model = _net()
        shard(model)
        opt = Flora(model.parameters(), **{**OPTS, **kw})
        _loss(model, x[rank::world], y[rank::world]).backward()
        before = [p.to_local().clone() for p in model.parameters()]
        try:
            opt.step()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
        out[name + " unchanged"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters())) and \
            all(len(opt.state[p]) == 0 for p in model.parameters())
        if name == "hsdp same seed":
            for _ in range(2):
                opt.zero_grad()
                _loss(model, x[rank::world], y[rank::world]).backward()
                opt.step()
            out["hsdp params"] = [p.to_local().detach().clone() for p in model.parameters()]
    for name, shard in (("accumulator fsdp seed", fully_shard), ("accumulator hsdp seed", hsdp)):
        model = _net()
        shard(model)
        try:
            CompressedAccumulator(model, rank=3, tau=2, optimizer=Flora(model.parameters(), **OPTS), seed=rank)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def fsdp_options_compared_again_after_an_edit(rank, world):
    """(Probes Z54, Z55.) The options were compared across processes once per group and
    mesh: an edit after the first step went unseen (edited on one rank, HSDP's replicas
    drifted 5.7e-3 apart). An edit now makes the next step compare them again (one more
    all-reduce); made on every rank alike, it passes."""
    from flora.distributed import CollectiveCounter

    model = _fsdp(_net())
    opt = Flora(model.parameters(), **OPTS)
    x, y = _batches(1)[0]
    counts = []
    for step in range(5):
        if step >= 2:
            opt.param_groups[0]["kappa"] = 5 + step  # on every rank alike: a schedule
        opt.zero_grad()
        _loss(model, x[rank::world], y[rank::world]).backward()
        counter = CollectiveCounter()
        with counter:
            opt.step()
        counts.append(counter.count("allreduce"))
    # the latest values per group and mesh only (probe Z56: a schedule had grown the record every step)
    return {"allreduces": counts, "records": len(opt._options_checked)}


def fsdp_loads_one_process_state(rank, world):
    """(Found by a new-user probe.) A one-process Flora's state (default proj_dim "auto")
    resumed under FSDP2, then stepped on, against the uninterrupted one-process run:
    - by ``opt.load_state_dict`` (whole tensors, cut here into the sharded layout; they
      had stayed whole and the next step failed after moving the step counters);
    - by torch's ``set_state_dict(full_state_dict=True)``, which shards every state tensor
      like its parameter, an ``r x m`` momentum (kept whole) too: redistributed (the next
      step had failed after moving the counters). Here d.weight (1 x 12) stays dense in both
      (its own group, rank=None);
    - with d.weight compressed under FSDP2's "auto" but dense in one process, that loader
      merges the two layouts into one state (dense and compressed momentum together, the
      step then read the fresh compressed one): refused, naming both;
    - the other way, below."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    full = StateDictOptions(full_state_dict=True)
    batches = _batches()

    def groups(model, dense_d):
        if not dense_d:
            return model.parameters()
        d = [model.d.weight, model.d.bias]
        return [{"params": [p for p in model.parameters() if all(p is not q for q in d)]},
                {"params": d, "rank": None}]

    out = {}
    for how, dense_d in (("plain", False), ("full", True), ("merged", False)):
        ref = _net()  # the uninterrupted run
        _train_single(OPTS, batches, ref, Flora(groups(ref, dense_d), **{**OPTS, **REF}))
        one = _net()
        one_opt = Flora(groups(one, dense_d), **{**OPTS, **REF})
        _train_single(OPTS, batches[:3], one, one_opt)
        model = _fsdp(_net())
        opt = Flora(groups(model, dense_d), **OPTS)
        try:
            if how == "plain":
                set_model_state_dict(model, one.state_dict(), options=full)
                opt.load_state_dict(copy.deepcopy(one_opt.state_dict()))
            else:
                msd, osd = get_state_dict(one, one_opt, options=full)
                set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=full)
        except ValueError as e:
            out[how] = str(e)
            continue
        _steps(model, opt, batches[3:], rank, world)
        got, want = _full(model), dict(ref.named_parameters())
        out[how] = max((got[n] - want[n].detach()).abs().max().item() for n in got)
    # The other way: the sharded run's opt.state_dict() (DTensors) into one process's Flora.
    # It was accepted, and the first step failed inside torch after advancing every counter
    # (probe Z100): refused, nothing loaded; each DTensor made whole first, it resumes
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **OPTS)
    _steps(model, opt, batches[:3], rank, world)
    sd = copy.deepcopy(opt.state_dict())
    whole = _full(model)
    _steps(model, opt, batches[3:], rank, world)
    one = _net()
    one.load_state_dict(whole)
    one_opt = Flora(one.parameters(), **{**OPTS, **REF, "proj_dim": "sharded"})
    try:
        one_opt.load_state_dict(copy.deepcopy(sd))
        out["back"] = "accepted"
    except ValueError as e:
        out["back"] = str(e)
    out["back_state"] = len(one_opt.state)
    for st in sd["state"].values():
        for k, v in list(st.items()):
            if hasattr(v, "full_tensor"):
                st[k] = v.full_tensor()
    one_opt.load_state_dict(sd)
    _train_single(OPTS, batches[3:], one, one_opt)
    got = _full(model)
    out["back_whole"] = max((got[n] - q.detach()).abs().max().item() for n, q in one.named_parameters())
    return out


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


def ckpt_opts() -> dict:
    """OPTS, with the momentum_dtype the checkpoint test runs (FLORA_TEST_MOMENTUM_DTYPE;
    "none" for None, unset for the default)."""
    md = os.environ.get("FLORA_TEST_MOMENTUM_DTYPE")
    return {**OPTS, **({"momentum_dtype": None if md == "none" else md} if md else {})}


def fsdp_checkpoint_save(rank, world):
    """2 processes train 3 steps and save with torch.distributed.checkpoint; the test
    loads it in one process (dcp_resume_single) and continues."""
    path = os.environ["FLORA_TEST_CKPT"]
    batches = _batches()
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **ckpt_opts())
    _steps(model, opt, batches[:3], rank, world)
    _dcp_save(model, opt, os.path.join(path, "two"))
    return {}


def fsdp_checkpoint_load(rank, world):
    """2 processes load what one process saved (dcp_save_single) and continue."""
    path = os.environ["FLORA_TEST_CKPT"]
    batches = _batches()
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **ckpt_opts())
    _dcp_load(model, opt, os.path.join(path, "one"))
    steps = [opt.state[p]["step"] for p in model.parameters()]
    moments = sorted({str(st[k].dtype) for st in opt.state.values() for k in ("exp_avg_c", "exp_avg") if k in st})
    _steps(model, opt, batches[3:], rank, world)
    ref, _ = _train_single({**ckpt_opts(), "proj_dim": 1}, batches)
    got = _full(model)
    return {"diff": max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()),
            "steps_loaded": steps, "momentum_dtypes": moments}


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


def ddp_wrapper_found_when_alive(rank, world):
    """An accumulator built on a module finds the live DDP that wraps it (and guards its
    synchronisation), not a wrapper the user dropped that the collector has not freed yet
    (kept in a reference cycle here): the dropped one guarded nothing and would have refused
    fused=True for a model no longer under DDP."""
    import gc

    out = {}
    gc.disable()  # the dropped wrapper stays uncollected until the accumulator collects
    try:
        net = _net()
        dropped = _ddp(net)
        dropped.__dict__["_cycle"] = dropped
        del dropped
        opt = Flora(net.parameters(), **OPTS)
        acc = CompressedAccumulator(net, rank=3, tau=2, optimizer=opt, seed=5)
        out["dropped_guarded"] = acc._engine.ddp_guard is not None
        acc.remove()
        fused = CompressedAccumulator(net, rank=3, tau=2, optimizer=opt, seed=5, fused=True)
        x, y = _batches(1, size=8)[0]
        _loss(net, x, y).backward()  # checked at the first backward: not under DDP any more
        out["fused_backward_ran"] = True
        fused.remove()
        live = _ddp(net)
        acc = CompressedAccumulator(net, rank=3, tau=2, optimizer=Flora(net.parameters(), **OPTS), seed=5)
        out["live_guarded"] = acc._engine.ddp_guard is not None and acc._engine.ddp_guard.ddp() is live
        acc.remove()
    finally:
        gc.enable()
    return out


def ddp_unused_wrapper_alive(rank, world):
    """(Probe Z124, a notebook.) A DDP wrapper alive but never called (an output history
    holds it) while the unwrapped module trains with an accumulator in normal mode: the
    same weights as without the wrapper (it had closed the cycle at every backward, as if
    tau were 1). A removed fused accumulator on a DDP model, kept in a variable, no longer
    keeps that model alive: a fused accumulator on its module then trains."""
    tau = 2
    batches = _batches(2 * tau + 1, size=8)  # two cycles and a short one, closed by the step

    def train(wrapper: str | None):
        net = _net()
        held = _ddp(net) if wrapper == "before" else None  # alive, never called
        opt = Flora(net.parameters(), **OPTS)
        acc = CompressedAccumulator(net, rank=3, tau=tau, optimizer=opt, seed=5)
        if wrapper == "after":  # made after the accumulator: found at the first backward
            held = _ddp(net)  # noqa: F841
        for i, (x, y) in enumerate(batches):
            (_loss(net, x, y) / tau).backward()
            if (i + 1) % tau == 0 or i + 1 == len(batches):
                opt.step()
                opt.zero_grad()
        acc.remove()
        return [p.detach().clone() for p in net.parameters()]

    alone = train(None)
    out = {f"diff_{w}": max((a - b).abs().max().item() for a, b in zip(train(w), alone)) for w in ("before", "after")}
    net = _net()
    ddp = _ddp(net)
    opt = Flora(net.parameters(), **OPTS)
    old = CompressedAccumulator(ddp, rank=3, tau=tau, optimizer=opt, seed=5, fused=True)
    x, y = batches[0]
    n = x.shape[0] // world
    _loss(ddp, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
    old.remove()
    del ddp
    acc = CompressedAccumulator(net, rank=3, tau=tau, optimizer=opt, seed=5, fused=True)
    try:
        _loss(net, x, y).backward()
        out["fused_after_removed"] = "ran"
    except RuntimeError as e:
        out["fused_after_removed"] = str(e)
    acc.remove()
    del old
    return out


def ddp_flora(rank, world):
    batches = _batches()
    model = _ddp(_net())
    opt = Flora(model.parameters(), **OPTS)
    _steps(model, opt, batches, rank, world)
    ref, _ = _train_single(OPTS, batches)
    return {"diff": max((a - b).abs().max().item() for a, b in zip(model.module.parameters(), ref.parameters()))}


def zero_checkpoint(rank, world):
    """torch's ZeroRedundancyOptimizer over Flora, as docs/distributed.md says it runs: each
    rank steps its share (DDP's averaged gradients); the consolidated checkpoint, read with
    weights_only=True, resumes bit for bit in a fresh ZeRO, and continues the run in one
    process's Flora, each state keeping its index (its projections' seed). That state holds
    one index twice (each rank's local positions start at 0), which a refusal of duplicate
    indices as damage had broken (probe Z131). Returns each rank's parameters after the
    run, the fresh ZeRO's and the one process's after the same last steps, and the indices."""
    import io

    from torch.distributed.optim import ZeroRedundancyOptimizer

    batches = _batches(6)

    def build():
        model = _net()
        return model, _ddp(model), ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Flora, **OPTS)

    model, ddp, opt = build()
    _steps(ddp, opt, batches[:3], rank, world)
    opt.consolidate_state_dict(to=0)
    saved = [None]
    if rank == 0:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        saved = [buf.getvalue()]
    dist.broadcast_object_list(saved, src=0)
    checkpoint = torch.load(io.BytesIO(saved[0]), weights_only=True)
    _steps(ddp, opt, batches[3:], rank, world)
    model2, ddp2, opt2 = build()
    model2.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(copy.deepcopy(checkpoint["opt"]))  # (ZeRO's load writes None into the others' states)
    _steps(ddp2, opt2, batches[3:], rank, world)
    one = _net()
    one.load_state_dict(checkpoint["model"])
    one_opt = Flora(one.parameters(), **OPTS)
    one_opt.load_state_dict(checkpoint["opt"])
    _train_single(OPTS, batches[3:], one, one_opt)
    return {"whole": [p.detach().clone() for p in model.parameters()],
            "resumed": [p.detach().clone() for p in model2.parameters()],
            "one_process": [p.detach().clone() for p in one.parameters()],
            "indices": sorted(int(s["index"]) for s in checkpoint["opt"]["state"].values())}


def fsdp1(rank, world):
    """FSDP1 (FullyShardedDataParallel) hands Flora flat 1-D pieces when it shards: refused at
    construction, naming FSDP2, with either use_orig_params. Unsharded (NO_SHARD) with the
    model's own parameters it is data parallelism, and equals one process."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    out = {}
    for name, orig in (("flat", False), ("orig", True)):
        model = FSDP(_net(), use_orig_params=orig, device_id=torch.device("cpu"))
        try:
            Flora(model.parameters(), **OPTS)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    model = _net()
    opt = Flora(model.parameters(), **OPTS)  # built before FSDP1 shards the same tensors
    model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
        out["built_before"] = None
    except ValueError as e:
        out["built_before"] = str(e)
    out["built_before_unchanged"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    out["built_before_no_state"] = not any(opt.state[p] for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # NO_SHARD is deprecated in favour of DDP
        model = FSDP(_net(), use_orig_params=True, device_id=torch.device("cpu"),
                     sharding_strategy=ShardingStrategy.NO_SHARD)
    opt = Flora(model.parameters(), **OPTS)
    _steps(model, opt, _batches(), rank, world)
    ref, _ = _train_single(OPTS, _batches())
    out["no_shard_diff"] = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    for name, orig in (("acc_flat", False), ("acc_orig", True)):  # the accumulator: exact, dense, said so
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            CompressedAccumulator(FSDP(_net(), use_orig_params=orig, device_id=torch.device("cpu")), rank=3, tau=2)
        out[name] = [str(w.message) for w in seen if "compresses nothing" in str(w.message)]
    return out


def _ddp_no_sync_cycles(model, opt, batches, rank, world, tau):
    """DDP accumulation as documented: no_sync() on the first tau - 1 micro-batches."""
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


def _accumulate_alone(net, batches, tau, acc_opts=None, **opts):
    """``net`` trained by this process alone: Flora(**opts) and CompressedAccumulator(rank=3,
    **acc_opts) over ``batches`` (whole micro-batches), ``tau`` a cycle."""
    opt = Flora(net.parameters(), **opts)
    acc = CompressedAccumulator(net, rank=3, tau=tau, optimizer=opt, seed=5, **(acc_opts or {}))
    for i, (x, y) in enumerate(batches):
        (_loss(net, x, y) / tau).backward()
        if (i + 1) % tau == 0:
            opt.step()
            opt.zero_grad()
    acc.remove()
    return net


def _diff_from_one_process_accumulating(model, batches, tau):
    """Largest difference of ``model``'s parameters from one process accumulating the same
    micro-batches (each the union of the ranks') with CompressedAccumulator(rank=3)."""
    ref = _accumulate_alone(_net(), batches, tau, **OPTS, **REF)
    return max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))


def ddp_accumulator(rank, world):
    """CompressedAccumulator(tau=2) under DDP, no_sync() on the first micro-batch: equal
    to one process accumulating the same micro-batches (each the union of the ranks')."""
    tau = 2
    batches = _batches(2 * tau, size=8)
    model = _ddp(_net())
    opt = Flora(model.parameters(), **OPTS)
    acc = CompressedAccumulator(model.module, rank=3, tau=tau, optimizer=opt, seed=5)
    _ddp_no_sync_cycles(model, opt, batches, rank, world, tau)
    del acc
    return {"diff": _diff_from_one_process_accumulating(model.module, batches, tau)}


def _flora_accumulating(ddp: bool, tau: int):
    """A net (wrapped in DDP or not), Flora on it (one process: the reference options) and a
    rank-3 accumulator on it: (net, model, optimizer, accumulator)."""
    net = _net()
    model = _ddp(net) if ddp else net
    opt = Flora(model.parameters(), **OPTS, **({} if ddp else REF))
    return net, model, opt, CompressedAccumulator(net, rank=3, tau=tau, optimizer=opt, seed=5)


def ddp_accumulator_short_cycle(rank, world):
    """Normal mode under DDP, an epoch's short last cycle (found as a new user would: its
    estimates had never been averaged, and the replicas drifted apart): tau=2 over 3
    micro-batches, the short cycle run under no_sync() and closed by the step. Equal to
    one process accumulating the same micro-batches (each the union of the ranks') and
    closing its short cycle the same way."""
    tau, n_micro = 2, 3
    batches = _batches(n_micro, size=8)

    def train(ddp: bool):
        net, model, opt, acc = _flora_accumulating(ddp, tau)
        for i, (x, y) in enumerate(batches):
            if ddp:
                n = x.shape[0] // world
                x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            full_end = (i + 1) % tau == 0
            with model.no_sync() if ddp and not full_end else contextlib.nullcontext():
                (_loss(model, x, y) / tau).backward()
            if full_end or i + 1 == n_micro:
                opt.step()
                opt.zero_grad()
        acc.remove()
        return net

    net, ref = train(True), train(False)
    return {"diff": max((a - b).abs().max().item() for a, b in zip(net.parameters(), ref.parameters()))}


def ddp_accumulator_sync_refused(rank, world):
    """Normal mode under DDP without no_sync() on an early micro-batch: refused with a
    clear message before anything runs (before: torch's "more than one element of the
    written-to tensor refers to a single memory location" from DDP's copy into the
    placeholder), whether the accumulator was built on the DDP model, on its module, or
    before DDP wrapped it (then at that first backward). An evaluation forward under
    no_grad() and a synchronised last micro-batch pass; then a cycle run properly equals
    one process."""
    tau = 2
    batches = _batches(2 * tau, size=8)
    out = {}
    for where in ("module", "ddp", "wrapped_after"):
        net = _net()
        if where == "wrapped_after":
            opt = Flora(net.parameters(), **OPTS)
            acc = CompressedAccumulator(net, rank=3, tau=tau, optimizer=opt, seed=5)
            model = _ddp(net)
        else:
            model = _ddp(net)
            opt = Flora(model.parameters(), **OPTS)
            acc = CompressedAccumulator(model.module if where == "module" else model, rank=3, tau=tau,
                                        optimizer=opt, seed=5)
        before = [p.detach().clone() for p in net.parameters()]
        x, y = batches[0]
        n = x.shape[0] // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        with torch.no_grad():  # evaluation mid-cycle: never refused
            model(xs)
        try:
            (_loss(model, xs, ys) / tau).backward()
            out[where] = "not refused"
        except RuntimeError as e:
            out[where] = str(e)
        out[where + "_untouched"] = (all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
                                     and acc.micro_step == 0
                                     and (where == "wrapped_after" or all(p.grad is None for p in net.parameters())))
        if where == "wrapped_after":  # the aborted backward left DDP mid-reduction: the run is over
            acc.remove()
            continue
        _ddp_no_sync_cycles(model, opt, batches, rank, world, tau)  # the same model, run properly
        out[where + "_diff"] = _diff_from_one_process_accumulating(net, batches, tau)
        acc.remove()
    # DDP(static_graph=True) must synchronise its first backward (its reducer's internal
    # assert under no_sync() before, a probe): the recipe's first micro-batch is refused
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _net()
    model = DDP(net, static_graph=True)
    acc = CompressedAccumulator(model, rank=3, tau=tau, optimizer=Flora(model.parameters(), **OPTS), seed=5)
    x, y = batches[0]
    n = x.shape[0] // world
    try:
        with model.no_sync():
            (_loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) / tau).backward()
        out["static"] = "not refused"
    except RuntimeError as e:
        out["static"] = str(e)
    out["static_untouched"] = acc.micro_step == 0 and all(p.grad is None for p in net.parameters())
    acc.remove()
    return out


def ddp_accumulator_accelerate_short_cycle(rank, world):
    """Normal mode under DDP driven by accelerate's gradient state (as accelerate's
    accumulate() sets it; set here by hand): a short cycle that accelerate ends after 3 of
    tau=4 micro-batches synchronises its third backward, and the guard lets it through;
    then a full cycle. Equal to one process under the same gradient state."""
    import contextlib

    from accelerate.state import GradientState

    gs = GradientState()
    tau, ends = 4, {2, 6}  # accelerate syncs the 3rd micro-batch (end of data), then the 7th
    batches = _batches(7, size=8)

    def train(ddp: bool):
        net, model, opt, acc = _flora_accumulating(ddp, tau)
        try:
            for i, (x, y) in enumerate(batches):
                if ddp:
                    n = x.shape[0] // world
                    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
                gs._set_sync_gradients(i in ends)
                with model.no_sync() if ddp and i not in ends else contextlib.nullcontext():
                    (_loss(model, x, y) / tau).backward()
                if i in ends:
                    opt.step()
                    opt.zero_grad()
            return net, acc.cycle
        finally:
            gs._set_sync_gradients(True)
            acc.remove()

    net, cycles = train(True)
    ref, ref_cycles = train(False)
    return {"cycles": (cycles, ref_cycles),
            "diff": max((a - b).abs().max().item() for a, b in zip(net.parameters(), ref.parameters()))}


def ddp_accumulator_accelerate_one_batch(rank, world):
    """Normal mode under DDP, accelerate's accumulate() over a prepared dataloader of one
    batch per epoch (its gradient state set by hand as accelerate sets it: the dataloader
    being iterated at its end, every backward synchronised): every cycle is one micro-batch,
    which no unsynced backward ever showed accelerate ending. The guard had refused its
    forward (the docs said: use fused=True) and, on one process, clipping met the
    placeholder in .grad (probe Z107). Three epochs with clipping equal one process."""
    from accelerate.state import GradientState

    class Loader:  # what accelerate's DataLoaderShard of one batch shows at it
        end_of_dataloader = True

        def __len__(self):
            return 1

    gs = GradientState()
    tau = 4
    batches = _batches(3, size=8)

    def train(ddp: bool):
        net, model, opt, acc = _flora_accumulating(ddp, tau)
        loader, kwargs = Loader(), gs.plugin_kwargs
        gs.plugin_kwargs = {"num_steps": tau}
        gs._add_dataloader(loader)
        try:
            for x, y in batches:
                if ddp:
                    n = x.shape[0] // world
                    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
                gs._set_sync_gradients(True)
                (_loss(model, x, y) / tau).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                opt.zero_grad()
            return net, acc.cycle
        finally:
            gs._remove_dataloader(loader)
            gs.plugin_kwargs = kwargs
            acc.remove()

    net, cycles = train(True)
    ref, ref_cycles = train(False)
    return {"cycles": (cycles, ref_cycles),
            "diff": max((a - b).abs().max().item() for a, b in zip(net.parameters(), ref.parameters()))}


class AuxNet(Net):
    """Net with an auxiliary head (a compressed matrix and a dense bias) that some
    micro-batches use and others do not, as an MoE expert or a head run on some batches."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(12, 6)

    def forward(self, x, use_aux: bool = False):
        out = super().forward(x)
        return (out, self.aux(x)) if use_aux else (out, None)


def _aux_loss(model, x, y, use_aux: bool):
    out, aux = model(x, use_aux)
    loss = nn.functional.mse_loss(out, y)
    return loss if aux is None else loss + 0.5 * aux.square().mean()


def ddp_accumulator_find_unused(rank, world):
    """Normal mode under DDP(find_unused_parameters=True), the HF Trainer's default
    without gradient checkpointing: a head used in the first micro-batches of a cycle but
    not in its last, synchronised one (on both ranks, or on rank 0 only), or in the first
    on rank 0 and only in the last on rank 1. Found by a new-user probe: DDP averaged the
    placeholder of a compressed partial sum as zeros, losing it, and a rank whose head
    lagged ran a collective alone at the step (gloo aborted). Compressed (rank 3) and
    dense (rank None); equal to one process accumulating the same micro-batches (each
    the mean of the ranks' losses)."""
    torch.manual_seed(0)
    tau, cycles = 3, 2
    batches = _batches(tau * cycles, size=8)

    def uses(r: int, i: int, who: str) -> bool:  # micro-batch i of the run
        if who == "mixed":  # rank 0 in the first micro-batch, rank 1 in the synchronised one
            return i % tau == (0 if r == 0 else tau - 1)
        return i % tau < tau - 1 and (who == "both" or r == 0)

    def build():
        torch.manual_seed(0)
        return AuxNet()

    out = {}
    # "mixed", compressed: the synchronised backward is every parameter's last, so rank 1's
    # only gradient of the head is added exactly under exact_last=True, where one process
    # (whose head's 2nd gradient is not its tau-th) compresses it: compared with
    # exact_last=False, where both compress it; with True the ranks must still agree.
    cases = [(who, r, None) for who in ("both", "rank0") for r in (3, None)]
    cases += [("mixed", 3, False), ("mixed", None, None), ("mixed", 3, True)]
    for who, acc_rank, exact_last in cases:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = build()
        model = DDP(net, find_unused_parameters=True)
        opt = Flora(model.parameters(), **OPTS)
        acc = CompressedAccumulator(net, rank=acc_rank, tau=tau, optimizer=opt, seed=5, exact_last=exact_last)
        for i, (x, y) in enumerate(batches):
            n = x.shape[0] // world
            xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
            with model.no_sync() if (i + 1) % tau else contextlib.nullcontext():
                (_aux_loss(model, xs, ys, uses(rank, i, who)) / tau).backward()
            if (i + 1) % tau == 0:
                opt.step()
                opt.zero_grad()
        acc.remove()
        ref = build()
        ropt = Flora(ref.parameters(), **OPTS, **REF)
        racc = CompressedAccumulator(ref, rank=acc_rank, tau=tau, optimizer=ropt, seed=5, exact_last=exact_last)
        for i, (x, y) in enumerate(batches):
            n = x.shape[0] // world
            loss = sum(_aux_loss(ref, x[r * n:(r + 1) * n], y[r * n:(r + 1) * n], uses(r, i, who))
                       for r in range(world)) / world
            (loss / tau).backward()
            if (i + 1) % tau == 0:
                ropt.step()
                ropt.zero_grad()
        racc.remove()
        out[f"{who}, rank={acc_rank}, exact_last={exact_last}"] = {
            "diff": max((a - b).abs().max().item() for a, b in zip(net.parameters(), ref.parameters())),
            "aux moved": (net.aux.weight - build().aux.weight).abs().max().item(),
            "params": [p.detach().clone() for p in net.parameters()]}
    return out


def ddp_accumulator_find_unused_resume(rank, world):
    """(Found by probe Z17.) Normal mode under DDP(find_unused_parameters=True), resumed
    in the middle of a cycle into fresh model, DDP, optimizer and accumulator objects: a
    head used before the save but in no micro-batch after it (on both ranks, on rank 0
    only), or on rank 0 before and rank 1 after it, and not in the synchronised one.
    The fresh DDP has no record of the uses before the save and leaves the head's
    ``.grad`` unaveraged; the accumulator must average it. Returns each rank's parameters
    after the whole run and the resumed one (tau 3, two cycles, saved after micro-batch
    ``save``), compressed (rank 3) and dense (rank None); with Flora, and with SGD, whose
    step is linear in the gradient: the head's first Flora step is scale-free (g/sqrt(g^2)),
    so a sum for the mean (2x, a power of two) had passed bit for bit (probe Z70)."""
    import io

    from torch.nn.parallel import DistributedDataParallel as DDP

    tau = 3
    batches = _batches(2 * tau, size=8)
    uses = {"both": lambda r, i: i in (3, 4), "rank0": lambda r, i: r == 0 and i in (3, 4),
            "split": lambda r, i: i == (3 if r == 0 else 4)}
    saves = {"both": 5, "rank0": 5, "split": 4}  # micro-batches run before the save

    def build(acc_rank, view, sgd=False):
        torch.manual_seed(0)
        net = AuxNet()
        model = DDP(net, find_unused_parameters=True, gradient_as_bucket_view=view)
        opt = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else Flora(model.parameters(), **OPTS)
        return net, model, opt, CompressedAccumulator(net, rank=acc_rank, tau=tau, optimizer=opt, seed=5)

    def run(model, opt, who, part):
        n = batches[0][0].shape[0] // world
        for i, (x, y) in part:
            with model.no_sync() if (i + 1) % tau else contextlib.nullcontext():
                (_aux_loss(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n], uses[who](rank, i))
                 / tau).backward()
            if (i + 1) % tau == 0:
                opt.step()
                opt.zero_grad()

    out = {}
    cases = [(*c, False) for c in itertools.product(uses, (3, None), (False, True))]
    cases += [(who, acc_rank, False, True) for who, acc_rank in itertools.product(uses, (3, None))]
    for who, acc_rank, view, sgd in cases:
        net, model, opt, acc = build(acc_rank, view, sgd)
        run(model, opt, who, list(enumerate(batches)))
        whole = [p.detach().clone() for p in net.parameters()]
        acc.remove()
        net, model, opt, acc = build(acc_rank, view, sgd)
        run(model, opt, who, list(enumerate(batches))[:saves[who]])
        buf = io.BytesIO()
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()}, buf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # that it drops the partial sums, as meant here
            acc.remove()
        del net, model, opt, acc
        net, model, opt, acc = build(acc_rank, view, sgd)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        acc.load_state_dict(saved["acc"])
        run(model, opt, who, list(enumerate(batches))[saves[who]:])
        acc.remove()
        out[f"{who}, rank={acc_rank}, gradient_as_bucket_view={view}{', SGD' if sgd else ''}"] = {
            "whole": whole, "resumed": [p.detach().clone() for p in net.parameters()]}
    return out


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
        ropt = Flora(ref.parameters(), **opts, **REF)
        racc = CompressedAccumulator(ref, rank=3, tau=tau, optimizer=ropt, seed=5, proj_dim=1, exact_last=exact_last)
        for i, (x, y) in enumerate(batches):
            (_loss(ref, x, y) / tau).backward()
            if (i + 1) % tau == 0 or i == len(batches) - 1:
                ropt.step()
                ropt.zero_grad()
        got = _full(model)
        plan = {r["name"]: r.get("proj_dim") for r in acc.plan()}
        local = dict(model.named_parameters())  # plan's buffer shape: this rank's rows, as held
        buffers = {r["name"]: [list(r["buffer_shape"]), list(local[r["name"]].to_local().shape)]
                   for r in acc.plan() if r["compressed"]}
        out[f"exact_last={exact_last}"] = {
            "diff": max((got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()),
            "plan": plan, "buffers": buffers}
        acc.remove()
        racc.remove()
    errors = {}
    for kw in (dict(proj_dim=0), dict(reduce=True)):
        model = _fsdp(_net())
        try:
            CompressedAccumulator(model, rank=3, tau=2, optimizer=Flora(model.parameters(), **OPTS), **kw)
            errors[str(kw)] = None
        except ValueError as e:
            errors[str(kw)] = str(e)
    out["errors"] = errors
    return out


def fsdp_damaged_shard_refused_everywhere(rank, world):
    """(Found by probes.) A checkpoint that one rank's checks refuse is refused on every
    rank, before any change, and the ranks' collectives stay in step: a.weight's row
    statistic non-finite in rank 1's shard only; the same entry of another dtype on rank 1
    only; a state dropped on rank 0 only. Before, the refusing rank alone raised; the
    other loaded, and the next step's collectives went out of step (gloo aborted), or the
    parameter's shards stepped with other counters."""
    model = _fsdp(_net())
    opt = Flora(model.parameters(), **OPTS)
    _steps(model, opt, _batches(2), rank, world)
    out = {}
    for case in ("nan", "dtype", "dropped", "swapped"):
        sd = copy.deepcopy(opt.state_dict())
        row = sd["state"][0]["exp_avg_sq_row"]
        local = row.to_local() if hasattr(row, "to_local") else row
        if case == "nan" and rank == 1:
            local[0] = float("nan")
        if case == "dtype" and rank == 1:
            sd["state"][0]["exp_avg_sq_row"] = row.to(torch.int32)
        if case == "dropped" and rank == 0:
            del sd["state"][2]
        if case == "swapped":  # as many entries on each rank, other ones (probe Z55: counted equal, it loaded)
            del sd["state"][1 + rank]
        before = {id(p): {k: (v.to_local() if hasattr(v, "to_local") else v).clone() if torch.is_tensor(v) else v
                          for k, v in st.items()} for p, st in opt.state.items()}
        try:
            opt.load_state_dict(sd)
            message = None
        except ValueError as e:
            message = str(e)
        unchanged = all(all(torch.equal((v.to_local() if hasattr(v, "to_local") else v), before[id(p)][k])
                            if torch.is_tensor(v) else v == before[id(p)][k] for k, v in st.items())
                        for p, st in opt.state.items())
        out[case] = {"message": message, "unchanged": unchanged}
    _steps(model, opt, _batches(1), rank, world)  # the ranks' collectives still agree
    out["finite"] = all(bool(torch.isfinite(v).all()) for v in _full(model).values())
    return out


def fsdp_accumulator_unfrozen(rank, world):
    """(Found by a probe.) A parameter unfrozen after the accumulator was built, under
    FSDP2 (the root and a submodule sharded): fused mode refuses it at the next forward
    and normal mode warns, as in one process; before, FSDP2 was not looked at and its
    gradient piled up in .grad, never stepped. Ordinary micro-batches with nothing
    unfrozen are not refused (the check runs before FSDP2 unshards)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    out = {}
    x, y = _batches(1)[0]
    n = x.shape[0] // world
    xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    for fused, on in ((True, "root"), (False, "root"), (True, "submodule"), (False, "submodule")):
        model = _net()
        if on == "root":
            fully_shard(model.a)
        fully_shard(model)
        frozen = model.b.weight if on == "root" else model.a.bias
        frozen.requires_grad_(False)
        # on a submodule inside the root's FSDP2 unit (a probe: the check saw nothing there)
        target, held = (model, model.parameters()) if on == "root" else (model.a, model.a.parameters())
        opt = Flora([p for p in held if p.requires_grad], **OPTS)
        acc = CompressedAccumulator(target, rank=3, tau=2, optimizer=opt, seed=5, fused=fused)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):  # nothing unfrozen: no refusal, no warning
                (_loss(model, xs, ys) / 2).backward()
            quiet = not any("not given to the accumulator" in str(w.message) for w in seen)
            frozen.requires_grad_(True)
            try:
                (_loss(model, xs, ys) / 2).backward()
                error = None
            except ValueError as e:
                error = str(e)
        out[f"fused={fused} {on}"] = {"quiet": quiet, "error": error,
                                 "warned": [str(w.message) for w in seen if "not given to the accumulator" in
                                            str(w.message)]}
        acc.remove()
    return out
