"""CUDA: the same seeds give the same training as on the CPU (up to float rounding),
checkpoints move between devices, bf16 works. Skipped without a GPU."""

import io

import pytest
import torch
from torch import nn

from flora import Flora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(device, dtype=torch.float32, steps=8, opt_state=None):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s).to(device=device, dtype=dtype)) for s in [(48, 32), (32,), (6, 3, 3, 3)]]
    opt = Flora(params, lr=1e-2, rank=4, beta1=0.9, kappa=3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        opt.step()
    return params, opt


def test_cuda_matches_cpu():
    cpu, _ = _train("cpu")
    gpu, opt = _train("cuda")
    assert all(v.device.type == "cuda" for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    for a, b in zip(cpu, gpu):
        assert (a - b.cpu()).abs().max().item() < 1e-4


def test_cuda_bf16_trains_with_fp32_state():
    params, opt = _train("cuda", dtype=torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def test_checkpoint_from_cuda_loads_on_cpu():
    _, opt = _train("cuda", steps=4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True, map_location="cpu")
    params = [nn.Parameter(torch.zeros(s)) for s in [(48, 32), (32,), (6, 3, 3, 3)]]
    opt2 = Flora(params, lr=1e-2, rank=4, beta1=0.9, kappa=3)
    opt2.load_state_dict(sd)
    assert opt2.state[params[0]]["exp_avg_c"].device.type == "cpu"


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("kw", [dict(), dict(scale_parameter=True, weight_decay=0.1), dict(rank=None),
                                dict(momentum_form="exact", projection="gaussian", cache_projections=False),
                                dict(projection="coordinates")])
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
