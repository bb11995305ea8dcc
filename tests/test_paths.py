"""Every stepping path against the single-tensor reference, for a table of memory layouts,
dtypes, momentum forms and projections, and ranks (in the manner of torch's
``OptimizerInfo`` tests).

The paths: ``foreach=False`` (``single_tensor_step``, the reference), ``foreach=True``
(``grouped_step``, buckets of two), ``Flora.step_parameter`` (a bucket of one, on the
grouped path) and fused accumulation (``CompressedAccumulator(fused=True, tau=1)`` with
the default ``foreach=None``, which groups these small tensors on a CPU: one plain
micro-batch per cycle, so its step must be the reference step). FSDP2 is compared with
the same reference in ``tests/dist_scenarios.py``.

Each case builds two parameters of one layout (one bucket on the grouped path) and a 1-D
one, feeds every path the same gradients through ``backward()`` (so ``.grad`` takes the
parameter's layout, as in training) for 4 steps with ``kappa=2`` (a resample), and
compares the parameters' *movement*: the tolerance is a small fraction of it (plus two
units in the last place of the parameter's dtype, for half precision), and the movement
must be non-trivial. State tensors are compared too, with their dtype (float32 for half
and float32 parameters, float64 for float64 ones; the first moment in ``momentum_dtype``
(under the default "auto", bfloat16 in a group with a rank, for a float32 state), bfloat16 to
one unit in the last place). The reference itself is checked
against the same values laid out contiguously.

The table is a covering design, not a full product: every layout by every form and
projection on float32 (the six edge layouts, EDGE_LAYOUTS, on eight of them unless
FLORA_TEST_ALL=1); every dtype by a few layouts and forms; every rank case (below, at
and above the dims) by a few layouts and forms; a non-finite gradient on both
``foreach`` settings. Tensors of 3+ dims run under both ``factor_dims`` rules: the
default ``"largest"`` (every layout: for most of them a permuted view of the gradient)
and ``"last"`` (a few forms on each).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import pytest
import torch
from torch import nn

from flora import CompressedAccumulator, Flora

from _configs import MOMENTUM_CONFIGS, extended, form_options, run_all

STEPS = 4
BAD_STEP = 1  # not a resample step (kappa=2 resamples at the third step), so a skip leaves the state as it was
BAD = (0, 3)  # the parameters (of _params) whose gradient is made non-finite at BAD_STEP
BASE = dict(lr=1e-2, kappa=2, seed=3, scale_parameter=False)


# ------------------------------------------------------------------ the table

def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _cl3(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


# name -> (shape to draw, view of it: the parameter). The values are drawn contiguous in
# the parameter's dtype and then laid out, so every layout holds the same kind of values.
LAYOUTS = {
    "contiguous": ((12, 20), lambda t: t),
    "transposed": ((12, 20), lambda t: t.t()),  # (20, 12), strides (1, 20): torch.empty(m, n).t()
    "strided": ((12, 40), lambda t: t[:, ::2]),  # (12, 20), not dense
    "permuted-3d": ((5, 6, 4), lambda t: t.permute(1, 2, 0)),  # (6, 4, 5): no (6, 20) view
    "channels_last": ((16, 8, 3, 3), _cl),
    "channels_last_3d": ((8, 6, 2, 3, 3), _cl3),
    "empty": ((0, 6), lambda t: t),
    "empty-3d": ((4, 0, 3), lambda t: t),
    # factor_dims="largest" factors these over dims (0, 1) (a 1x1 kernel's trailing 1s
    # lead the view), over (0, 1) again (the first dim is the largest), and over the last
    # two (no permutation: the same arithmetic as "last")
    "conv1x1": ((24, 12, 1, 1), lambda t: t),
    "conv1x1-channels_last": ((24, 12, 1, 1), _cl),
    "first-largest-3d": ((40, 6, 5), lambda t: t),
    "last-largest-3d": ((5, 8, 9), lambda t: t),
}
# layouts of 3+ dims, which also run with factor_dims="last"
MULTI_DIM = [lay for lay, (shape, view) in LAYOUTS.items() if len(shape) >= 3]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

FORMS = {f"{f}-{p}": dict(rank=4, beta1=0.9, **form_options(f, p)) for f, p in MOMENTUM_CONFIGS}
CONFIGS = {
    **FORMS,
    "dense-momentum": dict(rank=None, beta1=0.9),
    "no-momentum": dict(rank=4, beta1=None),
    # RMS(p) (a foreach norm over the parameters) and weight decay read the parameters
    "scale_parameter+weight_decay": dict(rank=4, beta1=0.9, lr=0.2, scale_parameter=True, weight_decay=0.1),
    "tensor_lr+weight_decay": dict(rank=4, beta1=0.9, lr=torch.tensor(1e-2), weight_decay=0.1),
    # a one-element lr of another shape steps as its 0-dim value (a scheduler's (1, 1) buffer)
    "tensor_lr_1x1": dict(rank=4, beta1=0.9, lr=torch.tensor([[1e-2]]), weight_decay=0.1),
    # the first moment stored in bfloat16 (its arithmetic is not): compressed, and dense
    "bf16-momentum": dict(rank=4, beta1=0.9, momentum_dtype="bfloat16"),
    "bf16-dense-momentum": dict(rank=None, beta1=0.9, momentum_dtype=torch.bfloat16),
    # the compressed first moment in float32 (the default "auto" stores it in bfloat16)
    "fp32-momentum": dict(rank=4, beta1=0.9, momentum_dtype=None),
    # FSDP2's rule on one process (the columns where they compress): chosen before the step
    "proj_dim_sharded": dict(rank=4, beta1=0.9, proj_dim="sharded"),
    # no clipping (the README's clip_threshold=math.inf): rms / inf is 0, the clamp takes 1
    "clip_inf": dict(rank=4, beta1=0.9, clip_threshold=math.inf),
    # projections redrawn every step (the staged compiled step then keeps none between steps)
    "no_cache": dict(rank=4, beta1=0.9, cache_projections=False),
    # two groups that differ in lr alone (``split_lr``: the second group's; see _run), one
    # parameter of each bucket in each: a bucket steps with one lr per parameter
    "two_lrs": dict(rank=4, beta1=0.9, split_lr=2e-2),
    "two_lrs+scale_parameter+weight_decay": dict(rank=4, beta1=0.9, lr=0.2, split_lr=0.4, scale_parameter=True,
                                                 weight_decay=0.1),
    "two_tensor_lrs": dict(rank=4, beta1=0.9, lr=torch.tensor(1e-2), split_lr=torch.tensor(2e-2)),
    # two groups of equal options under a relative step (lr None, the constructor's
    # default): they share buckets, with no lr of their own
    "two_groups_relative_step": dict(rank=4, beta1=0.9, lr=None, split_lr="inherit"),
    # half-precision parameters that keep float32 gradients (p.grad_dtype; compiled cores
    # are handed aliases of them, the staged step looks its bucket up by its first parameter)
    "grad_fp32": dict(rank=4, beta1=0.9, grad_dtype=torch.float32),
    # float64 gradients of +-2.7e153: every statistic and a 12 x 20 matrix's row means are
    # finite, but the sum of its row and column statistics (32 x 7.3e306) is not; the
    # grouped finite check had summed them, and skipped every step
    "huge_grads": dict(rank=4, beta1=0.9, grad_scale=2.7e153),
}


def _min_max(shape):
    from flora.projection import matrix_shape

    return matrix_shape(shape)


# name -> (matrix shape (n, m) -> rank and proj_dim). "auto" projects the smaller dim d.
RANKS = {
    "rank<dims": lambda n, m: dict(rank=3),
    "rank=dim-1": lambda n, m: dict(rank=min(n, m) - 1),
    "rank=dim": lambda n, m: dict(rank=min(n, m)),  # dense: the projected dim must exceed the rank
    # the larger dim projected away, the rank above the other: an n x r momentum with r > n (or r x m, r > m)
    "dim<rank<dim": lambda n, m: dict(rank=min(n, m) + 1, proj_dim=0 if n > m else 1),
    "rank>dims": lambda n, m: dict(rank=max(n, m) + 1),
}

PATHS = ["grouped", "step_parameter", "fused"]


def _case(layout, dtype, config, rank=None, bad=None, factor=None):
    kw = dict(CONFIGS[config])
    if rank is not None:
        shape = LAYOUTS[layout][1](torch.empty(LAYOUTS[layout][0])).shape
        kw.update(RANKS[rank](*_min_max(shape)))
    if factor is not None:
        kw["factor_dims"] = factor
    name = "-".join(x for x in (layout, dtype, config, rank, bad and f"{bad}-grad", factor and f"factor_{factor}")
                    if x)
    return name, (layout, dtype, tuple(sorted(kw.items(), key=lambda kv: kv[0])), bad)


CASES = dict(
    # every layout by every form and projection (and the dense and option paths), float32
    [_case(lay, "fp32", c) for lay in LAYOUTS for c in CONFIGS
     if c not in ("clip_inf", "no_cache", "grad_fp32", "huge_grads")]
    + [_case(lay, "fp64", "huge_grads") for lay in ("contiguous", "transposed", "channels_last")]
    # float32 gradients of half-precision parameters
    + [_case(lay, dt, "grad_fp32") for dt in ("bf16", "fp16")
       for lay in ("contiguous", "transposed", "channels_last", "first-largest-3d")]
    # no clipping, no projection cache: options of the scalars and the prelude, not of the
    # layout, on a few rows
    + [_case(lay, dt, c) for lay, dt in (("contiguous", "fp32"), ("channels_last", "fp32"),
                                          ("first-largest-3d", "fp32"), ("transposed", "bf16"))
       for c in ("clip_inf", "no_cache")]
    # every dtype by a few layouts and forms
    + [_case(lay, dt, c) for dt in ("bf16", "fp16", "fp64")
       for lay in ("contiguous", "transposed", "channels_last", "first-largest-3d")
       for c in ("paper-gaussian", "exact-orthonormal", "subspace-coordinates", "scaled-orthonormal",
                 "fixed-orthonormal", "floored-coordinates", "dense-momentum", "no-momentum", "bf16-momentum",
                 "bf16-dense-momentum", "fp32-momentum", "two_lrs", "two_lrs+scale_parameter+weight_decay")]
    # HF's and torch's rule (the last two dims) on every layout of 3+ dims, and half precision
    + [_case(lay, "fp32", c, factor="last") for lay in MULTI_DIM
       for c in ("scaled-orthonormal", "fixed-coordinates", "paper-gaussian", "dense-momentum", "no-momentum",
                 "scale_parameter+weight_decay")]
    + [_case(lay, "bf16", "scaled-orthonormal", factor="last") for lay in ("channels_last", "first-largest-3d")]
    # ranks below, at and above the dims
    + [_case(lay, "fp32", c, rank=r) for r in RANKS for lay in ("contiguous", "transposed", "channels_last_3d")
       for c in ("scaled-orthonormal", "fixed-orthonormal", "paper-gaussian", "exact-coordinates")]
    # a non-finite gradient in one parameter of a bucket: skipped alike on every path
    + [_case(lay, "fp32", c, bad=b) for lay in ("contiguous", "channels_last", "first-largest-3d")
       for c in ("scaled-orthonormal", "fixed-orthonormal", "paper-gaussian", "dense-momentum", "no-momentum",
                 "bf16-momentum", "fp32-momentum")
       for b in ("nan", "inf")]
)


# The layouts past the first six (empty ones, 1x1 kernels, and the 3-D tensors that
# factor_dims="largest" factors without a permutation) step every form and option alike
# once viewed as the matrix they factor over: by default they run these few, and
# FLORA_TEST_ALL=1 runs the rest of their rows.
EDGE_LAYOUTS = ("empty", "empty-3d", "conv1x1", "conv1x1-channels_last", "first-largest-3d", "last-largest-3d")
EDGE_CONFIGS = ("scaled-orthonormal", "exact-coordinates", "paper-gaussian", "floored-orthonormal", "dense-momentum",
                "no-momentum", "scale_parameter+weight_decay", "two_lrs")
EXTENDED_CASES = {_case(lay, "fp32", c)[0] for lay in EDGE_LAYOUTS for c in CONFIGS
                  if c not in EDGE_CONFIGS} & set(CASES)


def _cases(table):
    """A table's cases for parametrize, the EXTENDED_CASES marked."""
    return [extended(v, id=k) if k in EXTENDED_CASES else v for k, v in table.items()]


# ------------------------------------------------------------------ running a path


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add their synchronisation, which on a
    loaded 2-core machine made a 4-step run take 0.1-1 s instead of 4 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(layout, dtype, contiguous=False):
    shape, view = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):  # small values (|p| <= 0.05), so that a unit in the last place is far below a step
        t = view((torch.rand(shape, generator=g) * 0.1 - 0.05).to(dtype))
        out.append(t.contiguous() if contiguous else t)
    # three vectors: a bucket of several (Flora(compile=True) steps a CPU bucket of vectors
    # on stacks, functional.stacked_io; inductor failed on such a graph from two of 16),
    # the last one strided (a view of every other element)
    out += [(torch.rand(20, generator=g) * 0.1 - 0.05).to(dtype) for _ in range(2)]
    v = (torch.rand(40, generator=g) * 0.1 - 0.05).to(dtype)[::2]
    out.append(v.contiguous() if contiguous else v)
    return [nn.Parameter(t) for t in out]


def _grads(params, step, bad, scale=None):
    """A fixed direction plus noise, so that momentum builds up and the parameters move
    about ``lr`` a step; given a ``scale``, only its signs, times ``scale``."""
    g0, g = torch.Generator().manual_seed(99), torch.Generator().manual_seed(100 + step)
    out = [(torch.randn(p.shape, generator=g0) + 0.5 * torch.randn(p.shape, generator=g)).to(p.dtype)
           for p in params]
    if scale is not None:
        out = [x.sign() * scale for x in out]
    if bad is not None and step == BAD_STEP:
        for i in BAD:  # a matrix of the bucket of two, and the middle vector of three
            if out[i].numel():
                out[i].view(-1)[out[i].numel() // 2] = float(bad)
    return out


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()} for p in params])


def _run(path, layout, dtype, kw, bad=None, *, contiguous=False, history=False, backend=True):
    """Steps ``STEPS`` times on ``path`` ("single": foreach=False, the reference; the
    compiled paths: Flora(compile=backend)). Returns the initial and final parameters, the
    optimizer, and (``history``) a snapshot of parameters and states after each step."""
    params = _params(layout, dtype, contiguous)
    for p in params:
        if "grad_dtype" in kw:
            p.grad_dtype = kw["grad_dtype"]
    initial = [p.detach().clone() for p in params]
    foreach = {"single": False, "grouped": True, "step_parameter": True, "fused": None, "compiled": True,
               "staged": True, "compiled_single": False}[path]
    compiled = {"compile": backend} if path in ("compiled", "staged", "compiled_single") else {}
    kw = dict(kw)
    kw.pop("grad_dtype", None)  # (set on the parameters above)
    grad_scale = kw.pop("grad_scale", None)
    split_lr = kw.pop("split_lr", None)
    # split_lr: the second matrix and the second vector in a group of that lr, the others
    # in the first (so each bucket holds parameters of both groups)
    # ("inherit": a second group of the constructor's lr)
    second = {} if isinstance(split_lr, str) and split_lr == "inherit" else {"lr": split_lr}
    given = params if split_lr is None else [{"params": [params[i] for i in (0, 2, 4)]},
                                             {"params": [params[1], params[3]], **second}]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Flora: a rank is set but no tensor")
        opt = Flora(given, foreach=foreach, **{**BASE, **kw}, **compiled)
    acc = CompressedAccumulator(params, rank=2, tau=1, optimizer=opt, fused=True) if path == "fused" else None
    snaps = []
    try:
        for step in range(STEPS):
            grads = _grads(params, step, bad, grad_scale)
            sum((p * g).sum() for p, g in zip(params, grads)).backward()  # .grad == g, in p's layout
            if path in ("single", "grouped", "compiled", "staged", "compiled_single"):
                opt.step()
            elif path == "step_parameter":
                for p in reversed(params):
                    opt.step_parameter(p)
            opt.zero_grad()
            if history:
                snaps.append(_snapshot(params, opt))
    finally:
        if acc is not None:
            acc.remove()
    return initial, params, opt, snaps


@functools.lru_cache(maxsize=None)
def _reference(layout, dtype, kw, bad):
    return _run("single", layout, DTYPES[dtype], dict(kw), bad)


# ------------------------------------------------------------------ comparing

RTOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# Half-precision parameters are rounded at every step: where the paths' float32 updates
# differ by rounding, a parameter may land one unit in the last place apart.
ULPS = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 2, torch.float16: 2}


# A momentum kept in bfloat16 (the default "auto" with a rank): where two paths' float32
# momenta differ by rounding, an element may be stored one bfloat16 unit apart (2**-8
# relative), and that element's later steps differ by a part of its momentum's share of
# them (2.5e-4 of the largest movement, measured on an avx2 CPU, where 1e-4 failed on one
# element of 288 after a resample). Such elements may exceed the float32 tolerance, within
# this fraction of the largest movement, if they are few (a path's defect moves many).
BF16_FLIP = 2.0 ** -7
BF16_FLIP_SHARE = 0.02


def _bf16_momentum(opt) -> bool:
    group = opt.param_groups[0]
    narrow = group["momentum_dtype"]
    if narrow == "auto":
        return group["rank"] is not None and group["beta1"] is not None
    return narrow == "bfloat16" and group["beta1"] is not None


def _assert_same_movement(p0, ref, got, what, *, same_strides=True, bf16_momentum=False):
    """``got - p0`` equals ``ref - p0`` to a tolerance far below the movement itself
    (``bf16_momentum``: but for a few elements whose momentum rounded apart, BF16_FLIP)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    assert not same_strides or got.stride() == ref.stride(), f"{what}: the step changed the parameter's layout"
    if ref.numel() == 0:
        return
    d_ref = ref.double() - p0.double()
    d_got = got.double() - p0.double()
    scale = d_ref.abs().max().item()
    assert scale > 2e-3, f"{what}: the reference hardly moved ({scale:.3g}): the comparison would prove nothing"
    tol = RTOL[ref.dtype] * scale + ULPS[ref.dtype] * torch.finfo(ref.dtype).eps * ref.double().abs()
    assert tol.max().item() < scale / 5, what
    err = (d_got - d_ref).abs()
    worst = (err - tol).argmax()
    over = err > tol
    if bf16_momentum and over.any():
        few = int(over.sum()) <= max(1, int(BF16_FLIP_SHARE * err.numel()))
        if few and (err <= BF16_FLIP * scale).all():
            return
    assert not over.any(), (f"{what}: moved by {d_got.reshape(-1)[worst].item():.6g} where the reference moved "
                            f"{d_ref.reshape(-1)[worst].item():.6g} (largest movement {scale:.3g}; "
                            f"{int(over.sum())} of {err.numel()} elements off)")


def _assert_same_state(ref_opt, ref_p, opt, p, what):
    sr, sg = ref_opt.state[ref_p], opt.state[p]
    assert sr.keys() == sg.keys(), what
    state_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    group = opt.param_groups[0]
    narrow = group["momentum_dtype"]  # a name, "auto", or None: the state dtype
    if narrow == "auto":  # bfloat16 in a group with a rank, for a float32 state
        narrow = "bfloat16" if group["rank"] is not None and state_dtype == torch.float32 else None
    narrow = {} if narrow is None else {"exp_avg": narrow, "exp_avg_c": narrow}
    for k, v in sr.items():
        if not isinstance(v, torch.Tensor):
            assert sg[k] == v, f"{what}: {k}"
            continue
        want_dtype = getattr(torch, narrow[k]) if k in narrow else state_dtype
        assert v.dtype == want_dtype and sg[k].dtype == want_dtype, f"{what}: {k} is {sg[k].dtype}"
        scale = v.abs().max().item() if v.numel() else 0.0
        rtol = 1e-10 if want_dtype == torch.float64 else 1e-4
        if want_dtype == torch.bfloat16:
            # where two paths' float32 momenta differ by rounding, their bfloat16 values may
            # round apart: one unit in the last place (2**-7 relative at most)
            rtol = 2.0 ** -7
        torch.testing.assert_close(sg[k], v, rtol=rtol, atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {k}: {m}")


def _compare(ref_run, got_run, name):
    p0s, refs, ref_opt, _ = ref_run
    _, gots, opt, _ = got_run
    for i, (p0, ref, got) in enumerate(zip(p0s, refs, gots)):
        what = f"{name}, parameter {i} {tuple(ref.shape)}"
        _assert_same_movement(p0, ref.detach(), got.detach(), what, bf16_momentum=_bf16_momentum(opt))
        _assert_same_state(ref_opt, ref, opt, got, what)
    assert int(opt.nonfinite_skips) == int(ref_opt.nonfinite_skips)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", _cases(CASES), ids=list(CASES))
def test_path_equals_single_tensor_reference(case, path):
    layout, dtype, kw, bad = case
    ref = _reference(layout, dtype, kw, bad)
    got = _run(path, layout, DTYPES[dtype], dict(kw), bad)
    _compare(ref, got, f"{path} against foreach=False")
    if bad is not None:
        assert int(got[2].nonfinite_skips) == len(BAD)


# A bfloat16 momentum above flora.rounding.CHUNK elements is rounded in pieces eagerly
# (straight into the state on the single-tensor path): with pieces of 7 elements, smaller
# than every momentum here and prime to every row, each path on every layout and dtype
# equals the reference rounded whole.
CHUNKED_CASES = dict(_case(lay, dt, c) for lay in LAYOUTS for dt in ("fp32", "bf16", "fp64")
                     for c in ("bf16-momentum", "bf16-dense-momentum"))
# The 3-D empty layout, the 1x1 kernels and the 3-D tensors factored without a permutation
# round as the layouts above them do (an empty, permuted or contiguous momentum):
# FLORA_TEST_ALL=1 runs them.
CHUNKED_EXTENDED = ("empty-3d", "conv1x1", "conv1x1-channels_last", "first-largest-3d", "last-largest-3d")


@pytest.mark.parametrize("path", ["single", *PATHS])
@pytest.mark.parametrize("case", [extended(v, id=k) if v[0] in CHUNKED_EXTENDED else v
                                  for k, v in CHUNKED_CASES.items()], ids=list(CHUNKED_CASES))
def test_rounding_in_pieces_equals_the_reference_rounded_whole(case, path, monkeypatch):
    import flora.rounding as R

    layout, dtype, kw, bad = case
    ref = _reference(layout, dtype, kw, bad)
    monkeypatch.setattr(R, "CHUNK", 7)
    _compare(ref, _run(path, layout, DTYPES[dtype], dict(kw), bad), f"{path}, rounded in pieces, against whole")


# Flora(compile=True): the one-graph compiled core ("compiled") and, with every compressed
# bucket staged ("staged": STAGED_MIN_BYTES 0; by default only buckets of 32 MiB or more
# are; 2-D parameters only), the three compiled stages around an eager copy and matmul. Compiling costs seconds a case,
# so a covering subset: every layout on float32 in two forms, and the other dtypes on two
# layouts.
COMPILED_CASES = dict(
    [_case(lay, "fp32", c) for lay in LAYOUTS if not lay.startswith(("empty", "conv1x1", "first-", "last-"))
     for c in ("scaled-orthonormal", "exact-coordinates")]
    # factored over the largest dims (the default; permuted views on the 3+-D layouts above
    # too) and over the last two
    + [_case("first-largest-3d", "fp32", "scaled-orthonormal"),
       _case("channels_last", "fp32", "scaled-orthonormal", factor="last")]
    + [_case(lay, dt, "scaled-orthonormal") for dt in ("bf16", "fp16") for lay in ("contiguous", "channels_last")]
    + [_case(lay, "bf16", "grad_fp32") for lay in ("contiguous", "channels_last")]
    + [_case(lay, "fp64", "huge_grads") for lay in ("contiguous", "channels_last")]
    # float64 (issue 18: its compiled counters once lost their increments) on every layout
    # the fp32 rows use, and on a permuted 1x1 kernel
    + [_case(lay, "fp64", "scaled-orthonormal") for lay in LAYOUTS
       if not lay.startswith(("empty", "conv1x1", "first-", "last-")) or lay == "conv1x1-channels_last"]
    + [_case("channels_last", "fp32", c) for c in ("paper-gaussian", "subspace-orthonormal", "no-momentum")]
    + [_case(lay, "fp32", "tensor_lr_1x1") for lay in ("contiguous", "channels_last")]
    # groups that differ in lr alone, a vector of lrs in each bucket
    + [_case(lay, dt, c) for lay, dt in (("contiguous", "fp32"), ("channels_last", "fp32"), ("transposed", "bf16"),
                                          ("channels_last", "fp64"))
       for c in ("two_lrs", "two_lrs+scale_parameter+weight_decay", "two_tensor_lrs", "two_groups_relative_step")]
    + [_case(lay, "fp32", c) for lay in ("contiguous", "channels_last") for c in ("clip_inf", "no_cache")]
    # the "fixed" form (its complement weight a constant of the graph) on a few rows of each kind
    + [_case("channels_last", "fp32", "fixed-orthonormal"), _case("transposed", "fp32", "fixed-coordinates"),
       _case("first-largest-3d", "fp32", "fixed-orthonormal"), _case("contiguous", "bf16", "fixed-orthonormal"),
       _case("channels_last", "fp64", "fixed-orthonormal")]
    # the "floored" form (its floor a constant of the graph, clamping a device weight)
    + [_case("channels_last", "fp32", "floored-orthonormal"), _case("transposed", "fp32", "floored-coordinates"),
       _case("contiguous", "bf16", "floored-orthonormal")]
    # the step scaled by the parameters' RMS, their norms from one eager _foreach_norm
    # ahead of the graphs (functional.param_norms), with weight decay
    + [_case(lay, dt, "scale_parameter+weight_decay") for lay, dt in (
        ("contiguous", "fp32"), ("transposed", "fp32"), ("strided", "fp32"), ("permuted-3d", "fp32"),
        ("channels_last", "fp32"), ("channels_last_3d", "fp32"), ("contiguous", "bf16"), ("channels_last", "fp16"),
        ("channels_last", "fp64"))]
    # a first moment stored in bfloat16 (widened and rounded inside the graphs), or in
    # float32 ("bf16-momentum" on float32 parameters is the default, "auto": run above)
    + [_case(lay, dt, c) for lay, dt in (("contiguous", "fp32"), ("channels_last", "fp32"), ("transposed", "bf16"),
                                          ("channels_last", "fp64"))
       for c in ("bf16-momentum", "bf16-dense-momentum", "fp32-momentum") if c != "bf16-momentum" or dt != "fp32"]
    # a non-finite gradient in a matrix of one bucket and a vector of another (a stack),
    # the first with the default form, the parameters' RMS and weight decay (the inductor
    # row below)
    + [_case("contiguous", "fp32", "scale_parameter+weight_decay", bad="nan"),
       _case("channels_last", "fp32", "fp32-momentum", bad="inf")]
)


# The rows run by default: every layout on float32 (scaled, orthonormal), each dtype,
# each form the table holds but subspace, and each option and momentum storage on a row
# (many of them also staged) but clip_inf (tests/test_flora.py compiles an infinite clip
# threshold on the one-graph core). These rows of the table repeat an option on one more
# layout or dtype; FLORA_TEST_COMPILED=all (or FLORA_TEST_ALL=1) runs them too. A fresh
# 2-core machine spends most of the suite compiling.
COMPILED_SPARE = {
    *(f"{lay}-fp64-scaled-orthonormal" for lay in ("transposed", "strided", "permuted-3d", "channels_last",
                                                   "channels_last_3d")),
    "channels_last-fp16-scaled-orthonormal",
    "channels_last-bf16-grad_fp32", "channels_last-fp64-huge_grads", "channels_last-fp32-tensor_lr_1x1",
    *(f"channels_last-fp32-{c}" for c in ("two_lrs", "two_lrs+scale_parameter+weight_decay", "two_tensor_lrs",
                                          "two_groups_relative_step", "clip_inf", "no_cache",
                                          "scale_parameter+weight_decay", "bf16-dense-momentum", "fp32-momentum")),
    *(f"transposed-bf16-{c}" for c in ("two_lrs", "two_lrs+scale_parameter+weight_decay", "two_tensor_lrs",
                                       "bf16-dense-momentum", "fp32-momentum")),
    *(f"channels_last-fp64-{c}" for c in ("two_lrs", "two_lrs+scale_parameter+weight_decay", "two_tensor_lrs",
                                          "two_groups_relative_step", "fixed-orthonormal",
                                          "scale_parameter+weight_decay", "bf16-dense-momentum", "fp32-momentum")),
    "contiguous-fp32-two_groups_relative_step",
    *(f"contiguous-bf16-{c}" for c in ("fixed-orthonormal", "floored-orthonormal")),
    "channels_last-fp16-scale_parameter+weight_decay",
    *(f"{lay}-fp32-scale_parameter+weight_decay" for lay in ("transposed", "strided", "permuted-3d",
                                                             "channels_last_3d")),
    "first-largest-3d-fp32-fixed-orthonormal",
    # tests/test_flora.py compiles an infinite clip threshold
    "contiguous-fp32-clip_inf",
    # subspace: under the user's compile on the grouped path, and staged by Flora(compile=...)
    # (tests/test_compile.py); its arithmetic is the other forms' with a weight of 1
    "channels_last-fp32-subspace-orthonormal",
    # coordinates gather the same rows on every layout (exact on channels_last, fixed and
    # floored on transposed run by default); scaled-orthonormal keeps all six
    *(f"{lay}-fp32-exact-coordinates" for lay in ("contiguous", "transposed", "strided", "permuted-3d",
                                                  "channels_last_3d")),
}
# Rows whose staged path alone is spare: their one-graph case runs by default, and other
# default cases stage the same thing: a 1x1 lr tensor as two_tensor_lrs' 0-dim ones (the
# prelude views each as one element); scaled parameters with weight decay, and two lrs,
# as the two rows of each; bfloat16 momentum on bfloat16 parameters as contiguous-bf16
# ("auto" keeps bfloat16 momentum there too); float32 gradients of bfloat16 parameters in
# tests/test_param_kinds.py; bfloat16 parameters with weight decay in
# tests/test_compile.py's parameter-norm test.
STAGED_SPARE = {
    "contiguous-fp32-tensor_lr_1x1", "contiguous-fp32-two_lrs+scale_parameter+weight_decay",
    "transposed-bf16-bf16-momentum", "contiguous-bf16-grad_fp32", "contiguous-bf16-scale_parameter+weight_decay",
}


def _all_compiled_rows() -> bool:
    return os.environ.get("FLORA_TEST_COMPILED", "") == "all" or run_all()


# Inductor generates and compiles C++ for each case, 10-30 s a case on a cold cache (a
# fresh CI machine's), against 1-3 s for the other rows. Every row runs Flora's compiled
# code through dynamo and AOTAutograd's passes (backend "aot_eager"), where Flora's
# compiled-step bugs were; inductor's code generation runs on this row (float32, the
# default form and first moment's storage, the parameters' RMS, weight decay and a
# non-finite gradient, its one-graph and staged paths; its three vectors of one width
# are a bucket with dense momentum and weight decay, as in tests/test_compile.py's
# test_inductor_equals_eager, whose C++ generation once failed), and on every row
# with FLORA_TEST_INDUCTOR=all (coordinates, float16, float64 and a bfloat16 first moment
# among them). tests/test_compile.py runs inductor on bfloat16 parameters with a relative
# step, a float lr changing every step, and counts its kernels;
# tests/test_rounding.py compiles the bfloat16 rounding with it; the single-tensor core
# below runs it on a channels_last kernel.
INDUCTOR_ROWS = ["contiguous-fp32-scale_parameter+weight_decay-nan-grad"]


def _compiled_backend(key: str):
    every = os.environ.get("FLORA_TEST_INDUCTOR", "") == "all"
    return True if every or key in INDUCTOR_ROWS else "aot_eager"


def _stages(key: str) -> bool:
    """Whether this row's matrices step in stages when every bucket that can is staged
    (functional.staged: 2-D, factored over both dims, compressed momentum, a matrix
    projection); on the other rows the "staged" path is the "compiled" one, not run twice.
    The compiled rows check this against functional.staged itself."""
    layout, _, kw, _ = COMPILED_CASES[key]
    kw = dict(kw)
    return (len(LAYOUTS[layout][0]) == 2 and "factor_dims" not in kw and kw.get("rank") is not None
            and kw.get("beta1") is not None and kw.get("projection", "orthonormal") != "coordinates")


@pytest.mark.slow
@pytest.mark.parametrize("key,path", [(k, p) for k in COMPILED_CASES for p in ("compiled", "staged")
                                      if (p == "compiled" or _stages(k))
                                      and (_all_compiled_rows() or not (k in COMPILED_SPARE
                                                                        or p == "staged" and k in STAGED_SPARE))])
def test_compiled_path_equals_single_tensor_reference(key, path, monkeypatch):
    import flora.functional as F

    if path == "staged":
        monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    staged, would_stage = [], []

    def recording(work, original=F.staged):
        minimum = F.STAGED_MIN_BYTES
        F.STAGED_MIN_BYTES = 0
        try:
            would_stage.append(original(work))
        finally:
            F.STAGED_MIN_BYTES = minimum
        staged.append(original(work))
        return staged[-1]

    monkeypatch.setattr(F, "staged", recording)
    layout, dtype, kw, bad = COMPILED_CASES[key]
    backend = _compiled_backend(key)
    ref = _reference(layout, dtype, kw, bad)
    with warnings.catch_warnings(record=True) as caught:  # (a failed compile steps eagerly, with a warning)
        warnings.simplefilter("always")
        got = _run(path, layout, DTYPES[dtype], dict(kw), bad, backend=backend)
    _compare(ref, got, f"Flora(compile={backend!r}), {path}, against foreach=False")
    assert not [str(w.message) for w in caught if "steps eagerly from now on" in str(w.message)]
    import flora.compiled as C  # (a core that failed in an earlier test steps eagerly without a word)

    name = "inductor" if backend is True else backend
    assert not [key for key, fn in C._compiled.items() if key[1] == name and fn.failed]
    assert staged, "no compiled bucket"  # (functional.staged is asked of compiled buckets only)
    assert any(would_stage) == _stages(key), "the table's rule for staged rows disagrees with functional.staged"
    assert any(staged) == (path == "staged"), staged


def test_the_inductor_rows_are_rows_of_the_table():
    assert set(INDUCTOR_ROWS) | COMPILED_SPARE | STAGED_SPARE <= set(COMPILED_CASES)
    assert not set(INDUCTOR_ROWS) & (COMPILED_SPARE | STAGED_SPARE)
    assert not COMPILED_SPARE & STAGED_SPARE and all(_stages(k) for k in STAGED_SPARE)


@pytest.mark.slow
@pytest.mark.parametrize("factor", ["largest", "last"])
def test_compiled_single_tensor_core_on_a_conv_kernel(factor):
    """Flora(compile=True, foreach=False): the compiled single-tensor core (the table's
    compiled rows step on the grouped path) on a channels_last conv kernel, factored over
    its two largest dims (a permuted view; inductor) and over its last two (aot_eager, as
    the table's rows off INDUCTOR_ROWS)."""
    key, case = _case("channels_last", "fp32", "scaled-orthonormal", factor=None if factor == "largest" else factor)
    layout, dtype, kw, bad = case
    backend = True if factor == "largest" else _compiled_backend(key)  # (as the table's rows)
    _compare(_reference(layout, dtype, kw, bad),
             _run("compiled_single", layout, DTYPES[dtype], dict(kw), bad, backend=backend),
             f"Flora(compile={backend!r}, foreach=False), factor_dims={factor!r}, against foreach=False")


@pytest.mark.parametrize("foreach", [True, False], ids=["grouped", "single"])
def test_compiled_float64_steps_as_eager(foreach):
    """Issue 18: Flora(compile=...) on float64 CPU parameters, the table's float64 case (a
    bucket of three vectors beside one of two compressed matrices) and a 0-dim one. The
    device step counters were 0-dim float64 CPU tensors, which dynamo gives a symbolic
    ``.item()``; AOTAutograd's scalar pass specialised it and restarted the trace, and the
    restarted trace dropped ``steps[0].add_(1)`` (an in-place op whose result is unused)
    from the graph of every bucket of one: the count stayed 0, ``beta2_t = 1 - 0^-0.8``
    was -inf and the parameter was skipped as non-finite at every step (a 0-dim float64
    parameter lost its own in-place updates the same way). aot_eager runs the AOTAutograd
    passes that inductor runs, without its code generation (the table's compiled rows run
    float64 through inductor). Equal to the eager step, no skip, every counter advanced."""
    runs = []
    for compile in (False, "aot_eager"):
        params = _params("contiguous", torch.float64) + [nn.Parameter(torch.tensor(0.03, dtype=torch.float64))]
        initial = [p.detach().clone() for p in params]
        opt = Flora(params, foreach=foreach, compile=compile, **{**BASE, **CONFIGS["scaled-orthonormal"]})
        for step in range(STEPS):
            sum((p * g).sum() for p, g in zip(params, _grads(params, step, None))).backward()
            opt.step()
            opt.zero_grad()
        runs.append((initial, params, opt, None))
    opt = runs[1][2]
    assert int(opt.nonfinite_skips) == 0
    assert [float(opt._device_steps.get(p)) for p in runs[1][1]] == [STEPS] * len(params)
    _compare(runs[0], runs[1], f"Flora(compile='aot_eager', foreach={foreach}), float64, against eager")


LAYOUT_CASES = {k: v for k, v in CASES.items() if v[0] != "contiguous" and v[3] is None}


@pytest.mark.parametrize("case", _cases(LAYOUT_CASES), ids=list(LAYOUT_CASES))
def test_reference_ignores_the_layout(case):
    """The reference on a non-contiguous parameter moves it as it moves the same values
    laid out contiguously (so every path, being equal to the reference, does too)."""
    layout, dtype, kw, bad = case
    p0s, refs, _, _ = _reference(layout, dtype, kw, bad)
    _, flats, _, _ = _run("single", layout, DTYPES[dtype], dict(kw), bad, contiguous=True)
    for i, (p0, ref, flat) in enumerate(zip(p0s, refs, flats)):
        assert flat.is_contiguous()
        _assert_same_movement(p0, ref.detach(), flat.detach(), f"{layout} against contiguous, parameter {i}",
                              same_strides=False)


# ------------------------------------------------------------------ non-finite gradients

SKIP_CONFIGS = ["scaled-orthonormal", "fixed-orthonormal", "floored-orthonormal", "paper-gaussian", "dense-momentum",
                "no-momentum"]


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("config", SKIP_CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "first-largest-3d"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_nonfinite_gradient_is_skipped(foreach, layout, config, bad):
    """A non-finite gradient in one parameter of a bucket leaves that parameter and its
    state exactly as they were (its step counter advances), and the other parameters of
    the bucket step as they would without it; one skip is counted."""
    kw = tuple(sorted(CONFIGS[config].items()))
    path = "grouped" if foreach else "single"
    _, _, opt, hist = _run(path, layout, torch.float32, dict(kw), bad, history=True)
    _, _, _, clean = _run(path, layout, torch.float32, dict(kw), None, history=True)
    (p_before, s_before), (p_after, s_after) = hist[BAD_STEP - 1], hist[BAD_STEP]
    for b in BAD:
        assert torch.equal(p_after[b], p_before[b])
        assert s_after[b]["step"] == s_before[b]["step"] + 1
        for k, v in s_before[b].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(s_after[b][k], v), k
    for i in (1, 2, 4):  # the buckets' other parameters stepped as they would have without the bad ones
        assert not torch.equal(p_after[i], p_before[i])
        torch.testing.assert_close(p_after[i], clean[BAD_STEP][0][i], rtol=1e-6, atol=1e-9)
    assert int(opt.nonfinite_skips) == len(BAD)


def test_float64_parameters_with_a_float32_lr_tensor_step_alike_on_both_paths():
    """The single-tensor path rounded lr * -weight_decay in the lr tensor's float32, the
    grouped path multiplied in float64: 8.8e-10 of the movement apart, above the table's
    float64 tolerance (a probe). Now both in the wider dtype."""
    out = []
    for foreach in (False, True):
        g = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(7, 6, generator=g, dtype=torch.float64) * 0.1) for _ in range(2)]
        p0 = [p.detach().clone() for p in ps]
        opt = Flora(ps, lr=torch.tensor(0.03, dtype=torch.float32), weight_decay=0.1, scale_parameter=False,
                    foreach=foreach)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        out.append((ps, p0))
    (a, p0), (b, _) = out
    moved = max((x - y).abs().max().item() for x, y in zip(a, p0))
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= 1e-14 * moved
