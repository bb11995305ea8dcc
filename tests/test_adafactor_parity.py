"""With compression off, Flora must equal transformers' Adafactor number for number: with
factor_dims="last" (HF's rule) on every shape, and with the default "largest" on a
parameter HF steps with the two largest dims moved last."""

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


def _train(make_opt, dtype=torch.float32, steps=20, shapes=SHAPES):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
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
    """The single-tensor path follows HF operation for operation: bit-equal (its weight
    decay with a tensor lr, scale_parameter's, had rounded -wd * lr in another order: 1 ulp,
    found by a new-user probe); the grouped path stacks parameters, so its norms round
    differently: a few float32 ulps of the weights."""
    ref = _train(lambda ps: Adafactor(ps, **kw))
    got = _train(lambda ps: Flora(ps, rank=rank, foreach=foreach, factor_dims="last", **kw))
    for a, b in zip(ref, got):
        tol = 0.0 if not foreach else 2e-6 * a.abs().max().item()
        assert (a - b).abs().max().item() <= tol


# factor_dims="largest" (the default) on shapes where it is not "last": conv kernels, a
# 1x1 kernel, a 3-D tensor whose first dim is the largest, a tie (dims 0 and 2)
LARGEST_SHAPES = [(16, 8, 3, 3), (24, 12, 1, 1), (40, 6, 5), (8, 3, 3)]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("kw", CONFIGS, ids=str)
def test_largest_dims_equal_hf_adafactor_on_the_permuted_parameter(kw, foreach):
    """Flora(rank=None, factor_dims="largest") on a parameter equals HF Adafactor stepping
    a parameter that holds the same weights (and gradients) with the two largest dims
    moved last, contiguous, with the hyperparameters of test_equals_hf_adafactor and to
    its tolerance: the weights to 1e-6 absolute on the single-tensor path (measured: at
    most 2 float32 ulps; Flora reduces the permuted view of the conv kernels in another
    memory order than HF its contiguous copy, so a bitwise equality would need that
    copy), the row and column statistics, of HF's shapes, to 1e-6 relative."""
    from flora.adafactor import factored_dims

    dims = [factored_dims(s, "largest") for s in LARGEST_SHAPES]
    assert all(d != (len(s) - 2, len(s) - 1) for s, d in zip(LARGEST_SHAPES, dims))
    moved = [tuple(s[i] for i in range(len(s)) if i not in d) + (s[d[0]], s[d[1]]) for s, d in zip(LARGEST_SHAPES, dims)]

    torch.manual_seed(0)
    start = [torch.randn(s) for s in LARGEST_SHAPES]
    mine = [torch.nn.Parameter(x.clone()) for x in start]
    theirs = [torch.nn.Parameter(x.movedim(d, (-2, -1)).contiguous()) for x, d in zip(start, dims)]
    opt = Flora(mine, rank=None, foreach=foreach, factor_dims="largest", **kw)
    ref = Adafactor(theirs, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p, q, d in zip(mine, theirs, dims):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.movedim(d, (-2, -1)).contiguous()
        opt.step()
        ref.step()
    for p, q, d, m in zip(mine, theirs, dims, moved):
        got = p.detach().movedim(d, (-2, -1))
        assert got.shape == q.shape == m
        tol = 1e-6 if not foreach else 2e-6 * q.abs().max().item()
        assert (got - q.detach()).abs().max().item() <= tol
        for k in ("exp_avg_sq_row", "exp_avg_sq_col"):
            a, b = opt.state[p][k], ref.state[q][k]
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_equals_hf_adafactor_bf16():
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9)
    ref = _train(lambda ps: Adafactor(ps, **kw), dtype=torch.bfloat16)
    for foreach in (False, True):
        got = _train(lambda ps: Flora(ps, foreach=foreach, factor_dims="last", **kw), dtype=torch.bfloat16)
        for a, b in zip(ref, got):
            assert torch.equal(a, b), foreach


def test_dense_when_rank_not_below_dim():
    """A 2-D tensor whose projected dim does not exceed the rank keeps dense momentum and
    so equals Adafactor, the momentum in float32 (with a rank, the default "auto" stores it
    in bfloat16)."""
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9)
    ref = _train(lambda ps: Adafactor(ps, **kw))
    # every projected dim <= 64
    got = _train(lambda ps: Flora(ps, rank=64, factor_dims="last", momentum_dtype=None, **kw))
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() <= 1e-6


def test_default_relative_step_follows_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    assert Flora([p]).param_groups[0]["relative_step"] is True
    assert Flora([p], lr=1e-3).param_groups[0]["relative_step"] is False


def _hf_halfway(kw, shapes):
    """HF Adafactor's 8-step run (``_train``'s gradients), and the same run stopped after 4:
    its parameters, optimizer and ``steps(opt, n)`` to go on with the same gradient stream."""
    want = _train(lambda ps: Adafactor(ps, **kw), steps=8, shapes=shapes)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    hf = Adafactor(params, **kw)
    gen = torch.Generator().manual_seed(1)

    def steps(opt, n):
        for _ in range(n):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    steps(hf, 4)
    return want, params, hf, steps


@pytest.mark.parametrize("factor_dims", ["last", "largest"])
def test_a_transformers_adafactor_state_resumes_in_flora(factor_dims, tmp_path):
    """A run of transformers' Adafactor saved mid-training (its state_dict, through
    torch.load(weights_only=True)) resumes in Flora(rank=None) with the same arguments
    and equals HF's uninterrupted run to the bit; under the default factor_dims its
    factored states keep HF's rule ("last", as a Flora state saved before the option), with
    the usual warning. It had been refused as "a different optimizer (such as AdamW)"
    (found by a new-user probe). A compressing Flora is refused, naming the source and rank=None."""
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1)
    shapes = [(8, 5), (7,), (16, 8, 3, 3), (64, 16)]
    want, params, hf, steps = _hf_halfway(kw, shapes)
    torch.save(hf.state_dict(), tmp_path / "hf.pt")
    saved = torch.load(tmp_path / "hf.pt", weights_only=True)
    with pytest.raises(ValueError, match="saved by transformers' Adafactor .*build Flora with rank=None"):
        Flora(params, rank=8, foreach=False, factor_dims=factor_dims, **kw).load_state_dict(saved)
    opt = Flora(params, rank=None, foreach=False, factor_dims=factor_dims, **kw)
    if factor_dims == "last":
        opt.load_state_dict(saved)
    else:
        with pytest.warns(UserWarning, match="factor_dims: 'largest' -> 'last'"):
            opt.load_state_dict(saved)
    steps(opt, 4)
    for a, b in zip(want, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
@pytest.mark.parametrize("kw", [dict(lr=1e-2, relative_step=False, scale_parameter=False), dict(beta1=0.9)], ids=str)
def test_equals_hf_adafactor_on_gradients_in_other_layouts(layout, kw):
    """A gradient that is a transposed view or channels_last (a conv model after
    model.to(memory_format=torch.channels_last)): the single-tensor path still equals HF
    bit for bit. Its update kept the gradient's layout, and the clipping norm summed in
    that order differed by up to 48 ulp (a differential fuzz found it)."""
    shape = (5, 7) if layout == "transposed" else (3, 2, 3, 3)
    for seed in range(20):
        torch.manual_seed(seed)
        x = torch.randn(shape)
        a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
        hf, fl = Adafactor([a], **kw), Flora([b], rank=None, foreach=False, factor_dims="last", **kw)
        for _ in range(3):
            if layout == "transposed":
                g = torch.randn(shape[::-1]).t()
            else:
                g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
            a.grad, b.grad = g.clone(memory_format=torch.preserve_format), g.clone(memory_format=torch.preserve_format)
            hf.step()
            fl.step()
        assert torch.equal(a, b), seed


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_a_transformers_adafactor_state_with_empty_parameters_resumes_in_flora(foreach):
    """HF's factored statistics of an empty parameter are means over no elements: NaN. They
    step nothing, so the state loads and the run goes on as HF's uninterrupted one (it had
    been refused as a damaged checkpoint; found by a new-user probe). The parameters that
    are not empty are compared as in the test above."""
    kw = dict(lr=1e-2, relative_step=False, beta1=0.9, scale_parameter=False)
    shapes = [(8, 5), (0, 16), (16, 0), (4, 0, 32), (0,), (7,)]
    want, params, hf, steps = _hf_halfway(kw, shapes)
    saved = hf.state_dict()
    assert torch.isnan(saved["state"][1]["exp_avg_sq_col"]).all()  # what the load had refused
    opt = Flora(params, rank=None, foreach=foreach, factor_dims="last", **kw)
    opt.load_state_dict(saved)
    steps(opt, 4)
    for a, b in zip(want, params):
        assert a.shape == b.shape
        if a.numel():
            tol = 0.0 if not foreach else 2e-6 * a.abs().max().item()
            assert (a - b).abs().max().item() <= tol
    assert all(torch.isfinite(opt.state[p]["exp_avg"]).all() for p in params if p.numel())
