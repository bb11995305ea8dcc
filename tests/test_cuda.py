"""CUDA: the same seeds give the same training as on the CPU (up to float rounding),
checkpoints move between devices, bf16 works. Skipped without a GPU."""

import io

import pytest
import torch
from torch import nn

from flora import Flora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


SHAPES = [(48, 32), (32,), (6, 3, 3, 3)]
OPTS = dict(lr=1e-2, rank=4, beta1=0.9, kappa=3)


def _grads(steps):
    """The gradients of every step (the same stream on every device)."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]


def _step(params, opt, grads, device, dtype, rounded=False):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(dtype).to(device=device, dtype=p.dtype)
        opt.step()
        if rounded:  # a float32 copy of a bf16 run: its weights rounded as bf16 weights are
            with torch.no_grad():
                for p in params:
                    p.copy_(p.bfloat16().float())


def _train(device, dtype=torch.float32, steps=8, rounded=False):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s).to(dtype).to(device=device)) for s in SHAPES]
    if rounded:
        with torch.no_grad():
            for p in params:
                p.copy_(p.bfloat16().float())
    opt = Flora(params, **OPTS)
    _step(params, opt, _grads(steps), device, torch.bfloat16 if rounded else dtype, rounded)
    return params, opt


def test_cuda_matches_cpu():
    cpu, _ = _train("cpu")
    gpu, opt = _train("cuda")
    assert all(v.device.type == "cuda" for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    for a, b in zip(cpu, gpu):
        assert (a - b.cpu()).abs().max().item() < 1e-4


def test_cuda_bf16_trains_with_fp32_state():
    """bf16 weights on the GPU follow a float32 GPU run whose weights are rounded to bf16
    after every step (same start, bf16 gradients): bit for bit on the CPU; here within one
    bf16 rounding of each weight (2^-7 relative, should a GPU sum in another order) and
    in norm far below the movement; and they move (8 steps of about lr * RMS(p) = 1e-2)."""
    params, opt = _train("cuda", dtype=torch.bfloat16)
    ref, ref_opt = _train("cuda", rounded=True)
    start, _ = _train("cuda", dtype=torch.bfloat16, steps=0)
    # float32 state, the momentum in bfloat16 (the default "auto" with a rank), as for the float32 run
    def dtypes(o):
        return [{k: v.dtype for k, v in s.items() if isinstance(v, torch.Tensor)} for s in o.state.values()]

    assert dtypes(opt) == dtypes(ref_opt)
    assert {d for s in dtypes(opt) for k, d in s.items() if k.startswith("exp_avg_sq")} == {torch.float32}
    for p, q, p0 in zip(params, ref, start):
        assert p.dtype == torch.bfloat16
        moved = p.float() - p0.float()
        assert moved.abs().max() > 2e-2  # measured on the CPU: 0.025 to 0.048
        torch.testing.assert_close(p.float(), q.detach(), rtol=2**-7, atol=2**-20)
        assert (p.float() - q).norm() < 0.1 * moved.norm()


def test_checkpoint_from_cuda_loads_on_cpu():
    """4 steps on the GPU, the checkpoint and the weights loaded on the CPU, 4 more steps
    there: the 8-step run on one device, to float rounding (CPU and GPU agree to 1e-4)."""
    _, opt = _train("cuda", steps=4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True, map_location="cpu")
    params = [nn.Parameter(p.detach().cpu()) for p in opt.param_groups[0]["params"]]
    opt2 = Flora(params, **OPTS)
    opt2.load_state_dict(sd)
    assert opt2.state[params[0]]["exp_avg_c"].device.type == "cpu"
    _step(params, opt2, _grads(8)[4:], "cpu", torch.float32)  # a resample after step 6 included
    assert opt2.state[params[0]]["proj_count"] == 2
    for want in (_train("cpu")[0], _train("cuda")[0]):
        for a, b in zip(params, want):
            assert (a - b.cpu()).abs().max().item() < 1e-4


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("kw", [dict(), dict(scale_parameter=True, weight_decay=0.1), dict(rank=None),
                                dict(momentum_form="exact", projection="gaussian", cache_projections=False),
                                dict(projection="coordinates"), dict(momentum_form="scaled"),
                                dict(momentum_form="fixed", complement_weight=0.25), dict(momentum_form="floored"),
                                dict(momentum_dtype="bfloat16"), dict(rank=None, momentum_dtype="bfloat16")])
def test_cuda_step_never_syncs(kw, foreach):
    """torch.cuda.set_sync_debug_mode("error") around every step, resamples (kappa=2)
    included: nothing waits on the host (the issue-10 guarantee on a GPU)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(48, 32), (48, 32), (32,), (6, 3, 3, 3)]]
    opt = Flora(params, **{**dict(lr=1e-2, rank=4, beta1=0.9, kappa=2, scale_parameter=False), **kw},
                foreach=foreach)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in params)


def test_cuda_grouped_equals_single_tensor():
    def run(foreach):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(48, 32), (48, 32), (32,), (6, 3, 3, 3)]]
        opt = Flora(params, lr=1e-2, rank=4, beta1=0.9, kappa=2, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        return params

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lrs", [(1e-2, 3e-3), ("cuda tensor", 3e-3)], ids=["floats", "mixed"])
def test_cuda_groups_of_other_lrs_step_together_without_syncs_and_right(lrs):
    """Groups differing in lr alone share buckets, one lr per parameter stacked on the
    device (tests/test_grouped.py checks the CPU): no host sync, and equal to the
    single-tensor step."""
    def run(foreach, debug):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in [(48, 32), (48, 32), (32,), (32,)]]
        first = torch.tensor(1e-2, device="cuda") if lrs[0] == "cuda tensor" else lrs[0]
        opt = Flora([{"params": params[0::2], "lr": first}, {"params": params[1::2], "lr": lrs[1]}], lr=1e-2,
                    rank=4, beta1=0.9, kappa=2, scale_parameter=True, weight_decay=0.1, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if debug else "default")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return params

    for a, b in zip(run(False, False), run(True, True)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ compiled steps (issue 18)


_UNVERIFIED = pytest.mark.xfail(strict=False, reason=(
    "inductor's CUDA step differed from eager on an H200 (torch 2.11.0+cu130, Triton 3.6, 2026-12-04): "
    "the (32,) and (6, 3, 3, 3) parameters by up to 9.3e-4 after 7 steps; single: Triton's compiler failed"))


@pytest.mark.parametrize("how", ["option", pytest.param("option-forced", marks=_UNVERIFIED),
                                 pytest.param("user", marks=_UNVERIFIED)])
@pytest.mark.parametrize("foreach", [None, False], ids=["grouped", "single"])
def test_cuda_compiled_step_never_syncs_and_equals_eager(foreach, how, monkeypatch):
    """Flora(compile=True) and torch.compile(opt.step) on the GPU (inductor, Triton): after
    two warm-up steps (compilation), steps with resamples (kappa=2), a scheduler writing a
    tensor lr and a non-finite gradient run under set_sync_debug_mode("error"), compile
    nothing new, and equal the eager GPU step to 1e-5. ``option``: compile=True steps CUDA
    eagerly, with a warning (flora.compiled.CUDA_INDUCTOR); ``option-forced``: compiled
    anyway (FLORA_COMPILE_CUDA=1), the check a newer torch has to pass before the gate goes."""
    import flora.compiled as C
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(C, "CUDA_INDUCTOR", how == "option-forced")
    shapes = [(48, 32), (48, 32), (32,), (6, 3, 3, 3)]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = Flora(params, lr=torch.tensor(1e-2, device="cuda"), rank=4, beta1=0.9, kappa=2, foreach=foreach,
                    weight_decay=0.1, compile=compiled and how != "user")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        step = torch.compile(opt.step) if compiled and how == "user" else opt.step
        gen = torch.Generator().manual_seed(1)
        start = counters["stats"]["unique_graphs"]
        for t in range(7):
            for i, p in enumerate(params):
                g = torch.randn(p.shape, generator=gen)
                if t == 4 and i == 0:
                    g.view(-1)[0] = float("nan")
                p.grad = g.cuda()
            if compiled and t == 2:
                graphs = counters["stats"]["unique_graphs"]
            torch.cuda.synchronize()
            if compiled and t >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                if compiled and how == "option" and t == 0:
                    with pytest.warns(UserWarning, match="CUDA parameters step eagerly"):
                        step()
                else:
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            sched.step()
        if compiled:
            assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warm-up
        if compiled and how == "option":
            assert graphs == start  # stepped eagerly
        runs.append((params, opt))
    (want, _), (got, opt) = runs
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-5
    assert int(opt.nonfinite_skips) == 1


@pytest.mark.parametrize("fused", [False, True])
def test_accumulator_follows_a_model_moved_to_the_gpu_mid_cycle(fused):
    """model.to("cuda") between two micro-batches of a cycle: the partial sums and the
    cycle's projections follow the parameters (probe Z53: they had stayed on the CPU, and
    the next micro-batch mixed devices). Equal to the same cycle run on the CPU, to float
    rounding (the projections are drawn on the CPU either way)."""
    from flora import CompressedAccumulator

    def run(move):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        acc = CompressedAccumulator(m, rank=4, tau=2, optimizer=opt, fused=fused)
        x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
        m(x[0]).square().mean().backward()
        if move:
            m.to("cuda")
        m(x[1].to(next(m.parameters()).device)).square().mean().backward()
        if not fused:
            opt.step()
        acc.remove()
        return [p.detach().cpu() for p in m.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
