"""With compression off, Flora must equal transformers' Adafactor number for number."""

import pytest
import torch
from transformers.optimization import Adafactor

from flora import Flora

SHAPES = [(8, 5), (7,), (3, 4, 5), (64, 16), (1, 9)]

CONFIGS = [
    dict(),
    dict(beta1=0.9),
    dict(scale_parameter=False),
    dict(beta1=0.9, scale_parameter=False, weight_decay=0.05),
    dict(lr=1e-2, relative_step=False),
    dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1),
    dict(lr=3e-3, relative_step=False, scale_parameter=False, beta1=0.5, clip_threshold=0.5),
    dict(relative_step=True, warmup_init=True, beta1=0.9, weight_decay=0.01),
    dict(decay_rate=-0.5, eps=(1e-20, 1e-2)),
]


def _train(make_opt, dtype=torch.float32, steps=20):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params


# rank=None is plain Adafactor; so is a rank with beta1=None (no momentum to compress).
CASES = [(c, None) for c in CONFIGS] + [(c, 2) for c in CONFIGS if c.get("beta1") is None]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("kw,rank", CASES, ids=[f"{c}-rank{r}" for c, r in CASES])
def test_equals_hf_adafactor(kw, rank, foreach):
    """The single-tensor path follows HF operation for operation (equal here to 1e-6
    absolute); the grouped path stacks parameters, so its norms and its weight decay with
    a tensor lr round differently: a few float32 ulps of the weights."""
    ref = _train(lambda ps: Adafactor(ps, **kw))
    got = _train(lambda ps: Flora(ps, rank=rank, foreach=foreach, **kw))
    for a, b in zip(ref, got):
        tol = 1e-6 if not foreach else 2e-6 * a.abs().max().item()
        assert (a - b).abs().max().item() <= tol


def test_equals_hf_adafactor_bf16():
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9)
    ref = _train(lambda ps: Adafactor(ps, **kw), dtype=torch.bfloat16)
    for foreach in (False, True):
        got = _train(lambda ps: Flora(ps, foreach=foreach, **kw), dtype=torch.bfloat16)
        for a, b in zip(ref, got):
            assert torch.equal(a, b), foreach


def test_dense_when_rank_not_below_dim():
    """A 2-D tensor whose projected dim does not exceed the rank keeps dense momentum and
    so equals Adafactor."""
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9)
    ref = _train(lambda ps: Adafactor(ps, **kw))
    got = _train(lambda ps: Flora(ps, rank=64, **kw))  # every projected dim <= 64
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() <= 1e-6


def test_default_relative_step_follows_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    assert Flora([p]).param_groups[0]["relative_step"] is True
    assert Flora([p], lr=1e-3).param_groups[0]["relative_step"] is False
