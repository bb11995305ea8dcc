"""flora.kernels (issue 18, item 3): the fused Adafactor kernels' PyTorch references
against HF Adafactor and Flora's eager step (CPU), and the Triton kernels against their
references (CUDA with triton; skipped elsewhere)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from flora import Flora, kernels
from flora.kernels import adafactor as fk

gpu = pytest.mark.skipif(not kernels.available(), reason="needs CUDA and triton")
STEPS = 5


def _beta2t(t: int) -> float:
    return 1.0 - math.pow(t, -0.8)


def _grads(shape, steps, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device) for _ in range(steps)]


def test_imports_without_triton_and_falls_back():
    assert kernels.HAVE_TRITON == (fk.triton is not None)
    g, row, col = torch.randn(6, 5), torch.rand(6), torch.rand(5)
    out = kernels.factored_normalize(g, row, col, 0.5, 1e-30)
    ref = kernels.factored_normalize_reference(g, row, col, 0.5, 1e-30)
    if not kernels.supported(g):  # a CPU tensor: the reference itself
        for a, b in zip(out, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_step_reference_equals_hf_adafactor(clip):
    """No first moment, no parameter scaling: the reference step is HF Adafactor's (with a
    clip_threshold other than 1 too: at 1, multiplying by it had passed for dividing)."""
    transformers = pytest.importorskip("transformers")
    p_hf = nn.Parameter(torch.randn(12, 7))
    p = p_hf.detach().clone()
    hf = transformers.optimization.Adafactor([p_hf], lr=1e-2, beta1=None, scale_parameter=False,
                                            relative_step=False, warmup_init=False, clip_threshold=clip)
    row, col = torch.zeros(12), torch.zeros(7)
    for t, g in enumerate(_grads((12, 7), STEPS), start=1):
        p_hf.grad = g
        hf.step()
        ok = kernels.factored_step_reference_(p, g, row, col, _beta2t(t), 1e-30, 1e-2, clip)
        assert bool(ok)
        torch.testing.assert_close(p, p_hf.detach(), rtol=1e-6, atol=1e-8)
    st = hf.state[p_hf]
    torch.testing.assert_close(row, st["exp_avg_sq_row"], rtol=1e-6, atol=0)
    torch.testing.assert_close(col, st["exp_avg_sq_col"], rtol=1e-6, atol=0)


def test_references_on_a_stack_equal_each_matrix():
    g = torch.randn(3, 9, 11)
    row, col = torch.rand(3, 9), torch.rand(3, 11)
    u, r, c, n = kernels.factored_normalize_reference(g, row, col, 0.3, 1e-30)
    for i in range(3):
        ui, ri, ci, ni = kernels.factored_normalize_reference(g[i], row[i], col[i], 0.3, 1e-30)
        torch.testing.assert_close(u[i], ui)
        torch.testing.assert_close(r[i], ri)
        torch.testing.assert_close(c[i], ci)
        torch.testing.assert_close(n[i], ni)


def test_step_reference_skips_a_non_finite_matrix():
    g = torch.randn(3, 8, 6)
    g[1, 2, 3] = float("nan")
    p, row, col = torch.randn(3, 8, 6), torch.rand(3, 8), torch.rand(3, 6)
    p0, row0, col0 = p.clone(), row.clone(), col.clone()
    ok = kernels.factored_step_reference_(p, g, row, col, 0.5, 1e-30, 1e-2)
    assert ok.tolist() == [True, False, True]
    assert torch.equal(p[1], p0[1]) and torch.equal(row[1], row0[1]) and torch.equal(col[1], col0[1])
    assert not torch.equal(p[0], p0[0]) and torch.isfinite(p).all()


def _flora_run(device, foreach, compile, steps=STEPS):
    g = torch.Generator().manual_seed(3)
    shapes = [(24, 16), (24, 16), (16, 40), (16,), (4, 3, 5)]
    params = [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compile="triton" without triton: the eager path, said once
        opt = Flora(params, lr=1e-2, rank=4, beta1=0.9, kappa=2, foreach=foreach, compile=compile)
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g).to(device)
            if t == 2 and i == 0:
                p.grad[0, 0] = float("inf")
        opt.step()
    return [p.detach().cpu() for p in params], opt


@pytest.mark.parametrize("foreach", [False, True])
def test_flora_triton_option_without_triton_is_the_eager_step(foreach):
    if kernels.available():
        pytest.skip("triton runs here: the GPU test compares")
    with pytest.warns(UserWarning, match="triton or CUDA is not available"):
        Flora([nn.Parameter(torch.randn(4, 4))], lr=1e-2, compile="triton")
    ref, _ = _flora_run("cpu", foreach, False)
    out, opt = _flora_run("cpu", foreach, "triton")
    assert opt._compile is None and opt._kernel == "triton"
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True, None])
def test_flora_triton_option_without_kernels_steps_as_eager_bit_for_bit(foreach):
    """Where the kernels do not run, compile="triton" is the eager step to the bit: with a
    transposed gradient and a clipped update, the kernels' reference norm (summed in the
    gradient's memory order) had differed from the eager row-major one in the last bits, and
    so from HF Adafactor (probe Z16: 11 seeds of 50)."""
    if kernels.available():
        pytest.skip("triton runs here: the GPU test compares")
    kw = dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.9, clip_threshold=0.1,
              factor_dims="last", foreach=foreach)

    def run(compile, rank, seed):
        torch.manual_seed(seed)
        p = nn.Parameter(torch.randn(9, 18))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = Flora([p], rank=rank, compile=compile, **kw)
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(5):
            p.grad = (torch.randn(18, 9, generator=g) * 3).t()  # a gradient in the other layout
            opt.step()
        return p.detach()

    for seed in range(12):
        for rank in (None, 4):
            assert torch.equal(run("triton", rank, seed), run(False, rank, seed)), (seed, rank)


# ------------------------------------------------------------------ CUDA (skipped here)

SHAPES = [(1, 1), (7, 300), (129, 257), (576, 576), (1536, 576), (3, 129, 257), (5, 64, 1)]


@gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_normalize_kernel_equals_reference(shape):
    g = torch.randn(shape, device="cuda")
    row = torch.rand(shape[:-1], device="cuda")
    col = torch.rand(shape[:-2] + shape[-1:], device="cuda")
    out = kernels.factored_normalize(g, row, col, 0.7, 1e-30)
    ref = kernels.factored_normalize_reference(g, row, col, 0.7, 1e-30)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_step_kernel_equals_reference(shape):
    g = torch.randn(shape, device="cuda")
    if len(shape) == 3:
        g[1, 0, 0] = float("nan")  # that matrix is skipped, the others step
    p = torch.randn(shape, device="cuda")
    row = torch.rand(shape[:-1], device="cuda")
    col = torch.rand(shape[:-2] + shape[-1:], device="cuda")
    p2, row2, col2 = p.clone(), row.clone(), col.clone()
    ok = kernels.factored_step_(p, g, row, col, 0.7, 1e-30, 1e-2)
    ok2 = kernels.factored_step_reference_(p2, g, row2, col2, 0.7, 1e-30, 1e-2)
    assert torch.equal(ok, ok2)
    torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(row, row2, rtol=1e-5, atol=0)
    torch.testing.assert_close(col, col2, rtol=1e-5, atol=0)


@gpu
@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_flora_triton_equals_eager(foreach):
    ref, _ = _flora_run("cuda", foreach, False)
    out, opt = _flora_run("cuda", foreach, "triton")
    assert opt._kernel == "triton"
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
