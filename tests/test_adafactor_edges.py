"""Adafactor's arithmetic and the fused kernel's CPU reference at their edges (probe Z83,
mutation testing: each case failed on a one-line mutant that every other test passed)."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from flora import Flora, kernels

_FIXED = dict(lr=1e-2, relative_step=False, scale_parameter=False)


@pytest.mark.parametrize("options", [dict(), _FIXED], ids=["relative-step", "fixed-lr"])
@pytest.mark.parametrize("foreach", [False, True])
def test_a_skipped_step_applies_no_weight_decay(options, foreach):
    """A non-finite gradient skips the step: the weights stay as they were, weight decay
    included (the single-tensor path's decay had passed every test unmasked)."""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt = Flora([p, q], rank=None, foreach=foreach, weight_decay=0.1, **options)
    p.grad, q.grad = torch.randn(4, 3), torch.randn(5)
    p.grad[0, 0], q.grad[1] = float("nan"), float("inf")
    before = p.detach().clone(), q.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(q.detach(), before[1])


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradients_on_a_vector_step_as_hf_adafactor(foreach):
    """eps1 keeps a 1-D tensor's second moment positive under zero gradients (without it,
    0/0 skipped the step and its weight decay: 2.9e-3 off HF's after three steps)."""
    options = dict(_FIXED, weight_decay=0.1)

    def run(make):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 4), (5,))]
        opt = make(ps)
        for t in range(3):
            for p in ps:
                p.grad = torch.zeros_like(p) if t < 2 else torch.randn(p.shape)
            opt.step()
        return ps

    hf = run(lambda ps: Adafactor(ps, **options))
    flora = run(lambda ps: Flora(ps, rank=None, foreach=foreach, factor_dims="last", **options))
    for a, b in zip(hf, flora):
        assert torch.equal(a, b)


def test_the_kernels_reference_refuses_a_column_statistic_that_overflows():
    """Rows and the norm finite, a column's sum of squares infinite (100 rows of 2.2e18):
    the step is refused and the state kept (an inf had been committed to the column)."""
    g = torch.zeros(100, 2)
    g[:, 0] = 2.236e18
    row, col, p = torch.ones(100), torch.ones(2), torch.zeros(100, 2)
    ok = kernels.factored_step_reference_(p, g, row, col, 0.5, 1e-30, 1e-2)
    assert not bool(ok) and torch.equal(col, torch.ones(2)) and torch.equal(p, torch.zeros(100, 2))


def test_the_kernels_reference_clips_each_matrix_of_a_stack_by_its_own_rms():
    torch.manual_seed(0)
    g = torch.randn(3, 8, 6) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    p = torch.randn(3, 8, 6)
    stacked = p.clone()
    kernels.factored_step_reference_(stacked, g, torch.zeros(3, 8), torch.zeros(3, 6), 0.0, 1e-30, 1e-2, 0.5)
    each = p.clone()
    for i in range(3):
        kernels.factored_step_reference_(each[i], g[i], torch.zeros(8), torch.zeros(6), 0.0, 1e-30, 1e-2, 0.5)
    assert torch.equal(stacked, each)


def test_the_kernels_entry_point_on_cpu_is_the_reference_with_its_clip():
    torch.manual_seed(0)
    g, p = torch.randn(8, 6), torch.randn(8, 6)
    got, want = p.clone(), p.clone()
    kernels.factored_step_(got, g, torch.zeros(8), torch.zeros(6), 0.0, 1e-30, 1e-2, 0.1)
    kernels.factored_step_reference_(want, g, torch.zeros(8), torch.zeros(6), 0.0, 1e-30, 1e-2, 0.1)
    assert torch.equal(got, want)
    unclipped = p.clone()
    kernels.factored_step_reference_(unclipped, g, torch.zeros(8), torch.zeros(6), 0.0, 1e-30, 1e-2)
    assert not torch.equal(got, unclipped)  # clip 0.1 binds here


@pytest.mark.parametrize("rank", [None, 2])
def test_float64_parameters_keep_momentum_in_the_dtype_asked_for(rank):
    """momentum_dtype="float32" on float64 parameters (the default keeps float64)."""
    for asked, want in (("float32", torch.float32), (None, torch.float64)):
        p = torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64))
        opt = Flora([p], rank=rank, lr=1e-2, beta1=0.9, momentum_dtype=asked)
        p.grad = torch.randn(8, 6, dtype=torch.float64)
        opt.step()
        momentum = [v for k, v in opt.state[p].items() if k in ("exp_avg", "exp_avg_c")]
        assert momentum and all(v.dtype == want for v in momentum), (asked, [v.dtype for v in momentum])
