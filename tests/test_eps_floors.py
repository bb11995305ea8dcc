"""Adafactor's two floors, on inputs where they bind: ``eps1`` keeps a statistic of an
all-zero row or column of the gradient positive (else 0/0 in the normalisation), ``eps2``
floors ``scale_parameter``'s RMS of a parameter near zero (else a zero-initialised one,
LoRA's B or a head, never moves). Random gradients on random weights never reach either:
a mutation probe (Z67) dropped eps1 from the compressed path's statistics (eager and the
staged compiled step: every such step skipped as non-finite) and eps2 from the step size
(a zero parameter stayed zero), and no test failed."""

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

import flora.functional as F
from flora import Flora

SHAPES = [(8, 5), (3, 4, 5), (7,)]
CONFIGS = [dict(lr=1e-2, relative_step=False), dict(), dict(beta1=0.9, weight_decay=0.1)]


def _grad(shape, gen):
    """A gradient with an all-zero first row and second column (of the last two dims)."""
    g = torch.randn(shape, generator=gen)
    if g.dim() >= 2:
        g[..., 0, :] = 0
        g[..., :, 1] = 0
    return g


def _train(make_opt, steps=6):
    params = [nn.Parameter(torch.zeros(s)) for s in SHAPES]  # RMS 0 < eps2, and stays below
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = _grad(p.shape, gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_zero_parameters_and_zero_rows_equal_hf_adafactor(kw, foreach):
    """HF's ``max(eps2, RMS(p))`` and ``grad**2 + eps1``, uncompressed (the compressed
    path's statistics are checked against these below)."""
    ref, _ = _train(lambda ps: Adafactor(ps, **kw))
    got, opt = _train(lambda ps: Flora(ps, rank=None, foreach=foreach, factor_dims="last", **kw))
    assert int(opt.nonfinite_skips) == 0
    for a, b in zip(ref, got):
        assert a.abs().max() > 0  # the floor moved it
        tol = 0.0 if not foreach else 2e-6 * a.abs().max().item()
        assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("path", ["single", "grouped", "staged"])
def test_compressed_momentum_steps_on_zero_rows_with_the_dense_statistics(path, monkeypatch):
    """The compressed path squares the gradient fused with eps1 (``addcmul``), the staged
    compiled CPU step (STAGED_MIN_BYTES 0, every bucket staged) in its own stage: the
    statistics equal the dense-momentum run's, whose squares take HF's path, and nothing
    is skipped."""
    if path == "staged":
        monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    runs = []
    for rank in (None, 2):
        kw = dict(lr=1e-2, relative_step=False, beta1=0.9, rank=rank, foreach=path != "single")
        if path == "staged" and rank is not None:  # (the dense reference steps eagerly)
            kw["compile"] = "aot_eager"
        runs.append(_train(lambda ps, kw=kw: Flora(ps, **kw), steps=3))
    (dense, dense_opt), (got, opt) = runs
    assert int(opt.nonfinite_skips) == int(dense_opt.nonfinite_skips) == 0
    for p, q in zip(got, dense):
        assert p.abs().max() > 0
        a, b = opt.state[p], dense_opt.state[q]
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in b:
                torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0)
        if "exp_avg_sq_row" in b:
            assert (a["exp_avg_sq_row"][..., 0] > 0).all()  # the zero row's statistic: eps1
            assert (a["exp_avg_sq_col"][..., 1] > 0).all()
