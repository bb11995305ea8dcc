"""A compiled step (issue 18): ``torch.compile(opt.step)`` and ``Flora(compile=...)``.

- With a counting backend (``torch._dynamo.testing.CompileCounter``) and dynamo's
  counters: one graph break (the eager prelude), one graph, and nothing compiled after the
  first step across resamples (kappa=2), a scheduler writing a tensor lr every step and a
  non-finite gradient, on both paths.
- The compiled step equals the eager one to 1e-5 for every (form, projection) pair of
  ``MOMENTUM_CONFIGS`` on the grouped path (COVERING_PAIRS through ``aot_eager``: dynamo's
  graph, functionalised, run by eager kernels; the others through dynamo's capture; one
  optimizer with a parameter group per pair, so one trace), SINGLE_PAIRS on the
  single-tensor path, and with inductor on a few cases (bf16 with a relative step, a float
  lr changing every step, the kernel count; the default form in tests/test_paths.py's
  inductor row).
- A checkpoint of a compiled run holds plain step numbers, loads with
  ``weights_only=True`` into a compiled optimizer and steps on as the uninterrupted run.

The CUDA half (sync-debug mode) is in ``tests/test_cuda.py``.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from flora import Flora
from flora import functional as F

from _configs import MOMENTUM_CONFIGS, assert_same_state, extended, form_options

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounter  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

SHAPES = [(12, 20), (12, 20), (20, 12), (20,), (6, 4, 5)]
BASE = dict(lr=1e-2, rank=3, beta1=0.9, kappa=2, seed=5)
STEPS = 6  # two resamples (kappa=2)
BAD_STEP = 3  # a NaN in parameter 0's gradient


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    """Every test here counts compilations: each starts fresh (conftest.fresh_dynamo)."""
    yield


def _params(shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(params, step, bad=False):
    g = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
    if bad and step == BAD_STEP:
        out[0].view(-1)[3] = float("nan")
    return out


def _break_reasons() -> dict:
    """Dynamo's graph breaks, by reason, less the one torch's LR schedulers cause for
    every optimizer: a scheduler replaces ``opt.step`` by a wrapper of its own, defined in
    ``torch/optim/lr_scheduler.py``, a file dynamo does not trace (torch's AdamW breaks
    there too)."""
    return {k: v for k, v in counters["graph_break"].items() if "lr_scheduler.py" not in k}


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _run(opt, params, step_fn, steps=STEPS, bad=False, scheduler=None, after_first=None):
    for t in range(steps):
        for p, g in zip(params, _grads(params, t, bad)):
            p.grad = g
        step_fn()
        if scheduler is not None:
            scheduler.step()
        if t == 0 and after_first is not None:
            after_first()


# ------------------------------------------------------------------ graph breaks, recompiles


# The single-tensor path on two of the four cases (FLORA_TEST_ALL=1: all four).
@pytest.mark.parametrize("case,foreach", [
    *((c, True) for c in ("tensor-lr-scheduler", "float-lr-scheduler", "relative-step", "nonfinite")),
    ("tensor-lr-scheduler", False), ("nonfinite", False),
    extended("float-lr-scheduler", False), extended("relative-step", False)],
    ids=lambda v: {True: "grouped", False: "single"}.get(v, v) if isinstance(v, bool) else v)
def test_user_compile_one_break_no_recompile(case, foreach, form=("scaled", "orthonormal")):
    """torch.compile(opt.step): the prelude is the only graph break, the arithmetic one
    graph, compiled at the first step and never again: not at the resamples (steps 3, 5),
    not when a scheduler writes a new tensor lr every step, not for the relative step
    (its size comes from the device counter), not for a non-finite gradient."""
    params = _params()
    kw = dict(BASE, foreach=foreach, **form_options(*form))
    scheduler = None
    if case == "tensor-lr-scheduler":
        kw["lr"] = torch.tensor(1e-2)
    elif case == "relative-step":
        kw.update(lr=None, warmup_init=True, weight_decay=0.1)
    opt = Flora(params, **kw)
    if case.endswith("lr-scheduler"):  # a float lr too: the prelude hands the graph a device tensor
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    cnt = CompileCounter()
    step = torch.compile(opt.step, backend=cnt)
    seen = {}

    def after_first():
        seen.update(frames=cnt.frame_count, breaks=sum(_break_reasons().values()), graphs=_graphs())

    _run(opt, params, step, bad=case == "nonfinite", scheduler=scheduler, after_first=after_first)
    reasons = _break_reasons()
    # One distinct break (dynamo counts it twice while it compiles: it restarts the
    # analysis at the break)...
    assert len(reasons) == 1, reasons
    assert "_prelude_eager" in next(iter(reasons)) and "torch.compiler.disable" in next(iter(reasons))
    assert seen["frames"] == 1 and seen["graphs"] == 1  # ...and one graph
    assert cnt.frame_count == 1, "recompiled after the first step"
    assert sum(reasons.values()) == seen["breaks"] and _graphs() == 1
    assert opt.state[params[0]]["proj_count"] == 2 and opt.state[params[0]]["step"] == STEPS
    if case == "tensor-lr-scheduler":
        assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 / (1 + STEPS))
    if case == "nonfinite":
        assert int(opt.nonfinite_skips) == 1


@pytest.mark.parametrize("form", ["fixed", "floored"])
@pytest.mark.parametrize("foreach", [True, extended(False, id="single")], ids=["grouped", "single"])
@pytest.mark.parametrize("case", ["tensor-lr-scheduler", "nonfinite"])
def test_weighted_forms_one_break_no_recompile(case, foreach, form):
    """The "fixed" form (its complement weight a constant of the graph) and the "floored"
    form (its floor one): as above, one break, one graph, nothing compiled after the
    first step. On the grouped path (FLORA_TEST_ALL=1: the single-tensor one too, whose
    prelude the test above runs on the default form)."""
    test_user_compile_one_break_no_recompile(case, foreach, form=(form, "orthonormal"))


@pytest.mark.parametrize("backend,foreach", [("counter", True), extended("counter", False), ("aot_eager", True)],
                         ids=["counter-grouped", "counter-single", "aot_eager-grouped"])
def test_narrow_momentum_one_break_no_recompile(foreach, backend):
    """momentum_dtype="bfloat16" under torch.compile(opt.step): the widened copies are made
    by the prelude (fresh inputs each step, of one signature) and rounded back in the
    graph: one break, one graph, no recompile across the resamples; the same steps as
    eager (to float rounding: a fused kernel may round the float32 momentum differently
    by an ulp before it is rounded to bfloat16). Through AOTAutograd's functionalisation
    (aot_eager); inductor's kernels for the bfloat16 momentum are checked on the option
    path (tests/test_paths.py's inductor row: float32 parameters keep a bfloat16 momentum
    by default) and its rounding in tests/test_rounding.py: 21 s here on an empty
    inductor cache for this test."""
    kw = dict(BASE, foreach=foreach, momentum_dtype="bfloat16")
    params, ref_params = _params(), _params()
    opt, ref = Flora(params, **kw), Flora(ref_params, **kw)
    cnt = CompileCounter()
    step = torch.compile(opt.step, backend=cnt if backend == "counter" else backend)
    _run(opt, params, step)
    _run(ref, ref_params, ref.step)
    if backend == "counter":
        assert cnt.frame_count == 1 and _graphs() == 1
        assert len(_break_reasons()) == 1
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k in ("exp_avg_c", "exp_avg"):
            if k in ref.state[q]:
                assert opt.state[p][k].dtype == torch.bfloat16
                torch.testing.assert_close(opt.state[p][k].float(), ref.state[q][k].float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("form", [("scaled", "orthonormal"), ("fixed", "orthonormal"), ("floored", "orthonormal")],
                         ids=["scaled", "fixed", "floored"])
def test_compile_option_compiles_once_per_signature(monkeypatch, form):
    """Flora(compile=backend): one graph per shape signature of a bucket (here (12, 20) x 2,
    (20, 12), (20,), (6, 4, 5)), three for a bucket of compressed 2-D parameters on a CPU
    when staged (flora.compiled.staged_step; here every such bucket, with
    STAGED_MIN_BYTES 0), none after the first step, across
    resamples, a float lr that a scheduler changes every step (written into a device
    tensor), and a non-finite gradient; no graph break inside (fullgraph=True)."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    params = _params()
    cnt = CompileCounter()
    opt = Flora(params, **BASE, **form_options(*form), compile=cnt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    first = {}
    _run(opt, params, opt.step, bad=True, scheduler=scheduler, after_first=lambda: first.update(n=cnt.frame_count))
    # compressed 2-D: (12, 20) x 2, (20, 12), three stages each; (6, 4, 5) and (20,): one graph each
    assert first["n"] == 2 * 3 + 2 == cnt.frame_count
    assert not _break_reasons()
    assert int(opt.nonfinite_skips) == 1


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile"):
        Flora(_params(), **BASE, compile=3)
    # an unknown backend name: refused here, not by the first step's compile after the
    # step counters moved (found as a new user would)
    for name in ("no_such_backend", "True"):
        with pytest.raises(ValueError, match=rf"compile='{name}' is not a torch.compile backend; allowed: True, False, "
                                             r"'triton' or one of \[.*'inductor'"):
            Flora(_params(), **BASE, compile=name)


def test_compile_steps_cuda_eagerly_until_verified(monkeypatch):
    """Inductor's CUDA step is not verified equal to eager (it differed on an H200 with
    torch 2.11, tests/test_cuda.py): compile=True compiles the cores for CPU parameters,
    and for CUDA ones only with another backend or when forced (FLORA_COMPILE_CUDA=1)."""
    import flora.compiled as C

    monkeypatch.setattr(C, "CUDA_INDUCTOR", False)
    cases = [("inductor", "cpu"), ("inductor", "cuda"), ("inductor", "cuda:1"), ("aot_eager", "cuda"), (None, "cpu"),
             (None, "cuda")]
    assert [C.compiles_on(b, torch.device(d)) for b, d in cases] == [True, False, False, True, False, False]
    monkeypatch.setattr(C, "CUDA_INDUCTOR", True)
    assert C.compiles_on("inductor", torch.device("cuda"))


@pytest.mark.parametrize("fail_at", [0, extended(1), 2, 6])
def test_a_failed_compile_finishes_the_step_eagerly(monkeypatch, fail_at):
    """A backend that fails (inductor without a C++ compiler) at the first graph, at a
    staged bucket's second or third stage (after the first stage ran compiled), or at a
    later bucket: the step is finished by the eager cores, equal to the eager run, with
    one warning naming the core; before, the step raised with the counters moved and
    part of the parameters stepped."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    compiles = []

    def backend(gm, inputs):
        compiles.append(1)
        if len(compiles) == fail_at + 1:
            raise RuntimeError("no working C++ compiler")
        return gm.forward

    runs = []
    for compiled in (False, True):
        params = _params()
        opt = Flora(params, **BASE, compile=backend if compiled else False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(opt, params, opt.step, bad=True)
        failed = [str(w.message) for w in caught if "steps eagerly from now on" in str(w.message)]
        assert len(failed) == compiled, failed
        runs.append((params, opt))
    assert "BackendCompilerFailed" in failed[0] and "no working C++ compiler" in failed[0]
    _assert_equal_runs(runs[1][0], runs[0][0], runs[1][1], runs[0][1])
    assert int(runs[1][1].nonfinite_skips) == 1


# ------------------------------------------------------------------ compiled == eager


# Each form once and each projection at least once on the grouped path. AOTAutograd's
# functionalisation of one graph of all 16 pairs takes about 40 s on a 2-core CPU (dynamo's
# capture about 13 s), so the other nine pairs go through dynamo alone.
COVERING_PAIRS = [("paper", "gaussian"), ("exact", "orthonormal"), ("subspace", "coordinates"),
                  ("scaled", "orthonormal"), ("adaptive", "coordinates"), ("fixed", "orthonormal"),
                  ("floored", "coordinates")]
OTHER_PAIRS = [pair for pair in MOMENTUM_CONFIGS if pair not in COVERING_PAIRS]
# The single-tensor path's cores are the grouped path's arithmetic one tensor at a time:
# through AOTAutograd on the default pair (floored, orthonormal) and on a weight of the
# data on coordinates (all seven covering pairs took 51 s here).
SINGLE_PAIRS = [("floored", "orthonormal"), ("scaled", "coordinates")]


def _pair_groups(params_per_pair, extra, pairs=MOMENTUM_CONFIGS):
    return [dict(params=ps, **form_options(f, p), **extra) for ps, (f, p) in zip(params_per_pair, pairs)]


def _pair_params(pairs=MOMENTUM_CONFIGS):
    """For each (form, projection) pair: a bucket of two (12, 20) and a (20, 12) (the
    other projected dim). (1-D and 3-D parameters, which no form changes, are in the
    tests above and below.)"""
    shapes = [(12, 20), (12, 20), (20, 12)]
    g = torch.Generator().manual_seed(0)
    return [[nn.Parameter(torch.randn(s, generator=g)) for s in shapes] for _ in pairs]


def _assert_equal_runs(got_params, want_params, got_opt, want_opt, tol=1e-5):
    for a, b in zip(got_params, want_params):
        assert (a.detach() - b.detach()).abs().max().item() <= tol
        assert_same_state(got_opt, a, want_opt, b, rtol=1e-4, atol=1e-6)


def test_the_covering_pairs_cover_every_form_and_projection():
    assert set(COVERING_PAIRS) | set(SINGLE_PAIRS) <= set(MOMENTUM_CONFIGS)
    assert {f for f, _ in COVERING_PAIRS} == {f for f, _ in MOMENTUM_CONFIGS}
    assert {p for _, p in COVERING_PAIRS} == {p for _, p in MOMENTUM_CONFIGS}
    defaults = Flora.__init__.__kwdefaults__
    assert (defaults["momentum_form"], defaults["projection"]) in SINGLE_PAIRS  # (the comment above SINGLE_PAIRS)


@pytest.mark.parametrize("foreach,pairs,backend", [(True, COVERING_PAIRS, "aot_eager"), (True, OTHER_PAIRS, "dynamo"),
                                                   (False, SINGLE_PAIRS, "aot_eager")],
                         ids=["grouped", "grouped-other-pairs", "single"])
def test_compiled_equals_eager_for_every_form_and_projection(foreach, pairs, backend, how="user"):
    """Every pair of MOMENTUM_CONFIGS on the grouped path (a parameter group each), with
    weight decay and scale_parameter, 6 steps with two resamples and a non-finite
    gradient: the compiled step equals the eager one to 1e-5, weights and state.
    COVERING_PAIRS through dynamo's graph and AOTAutograd's functionalisation (aot_eager),
    the other pairs through dynamo's graph alone (a counting backend that runs it as
    captured); the single-tensor path on SINGLE_PAIRS through aot_eager. (``how="option"``,
    Flora(compile="aot_eager"), passes too: about 12 s here, one graph per bucket
    signature; the same cores, so not run by default.)"""
    extra = dict(scale_parameter=True, weight_decay=0.05)
    runs = []
    for compiled in (False, True):
        pp = _pair_params(pairs)
        flat = [p for ps in pp for p in ps]
        kw = dict(BASE, foreach=foreach)
        if compiled and how == "option":
            kw["compile"] = backend
        opt = Flora(_pair_groups(pp, extra, pairs), **kw)
        cnt = CompileCounter()
        step = opt.step
        if compiled and how == "user":
            step = torch.compile(opt.step, backend=cnt if backend == "dynamo" else backend)
        _run(opt, flat, step, bad=True)
        runs.append((flat, opt))
        if compiled and backend == "dynamo":
            assert cnt.frame_count == 1  # (the arithmetic was captured, not stepped eagerly)
    (want, want_opt), (got, got_opt) = runs
    _assert_equal_runs(got, want, got_opt, want_opt)
    assert int(got_opt.nonfinite_skips) == int(want_opt.nonfinite_skips) == 1


def test_staged_cpu_step_equals_eager_for_every_form_and_projection(monkeypatch):
    """Flora(compile=...) on a CPU steps a bucket of compressed 2-D parameters in three
    compiled stages around an eager copy and matmul into buffers of its own (flora.compiled.
    staged_step; coordinates keep the one-graph core): equal to the eager step to 1e-5,
    weights and state, with weight decay, resamples and a non-finite gradient.
    (STAGED_MIN_BYTES 0: every such bucket is staged.) Every form on orthonormal rows (a
    Gaussian matrix steps through the same stages, functional.staged); beside them, the two
    forms whose weights depend on the data on coordinates, which keep Flora(compile=...)'s
    one-graph core in the same step (tests/test_paths.py's compiled rows take exact, fixed
    and floored coordinates through that core; paper and subspace on coordinates go
    through the grouped user compile above)."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    pairs = [(f, p) for f, p in MOMENTUM_CONFIGS if p == "orthonormal" or f in ("scaled", "adaptive")]
    test_compiled_equals_eager_for_every_form_and_projection(True, pairs, "aot_eager", how="option")


@pytest.mark.parametrize("staged_min", [0, None], ids=["staged", "one-graph"])
def test_staged_step_with_a_new_lr_tensor_each_step(monkeypatch, staged_min):
    """A 0-dim lr tensor replaced by a new one every step (handed to the compiled core as
    a 1-element view, kept in a small memo): no recompilation, and equal to eager."""
    if staged_min is not None:
        monkeypatch.setattr(F, "STAGED_MIN_BYTES", staged_min)
    runs = []
    for compiled in (False, True):
        params = _params()
        cnt = CompileCounter()
        opt = Flora(params, **dict(BASE, lr=torch.tensor(1e-2)), compile=cnt if compiled else False)
        for t in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = torch.tensor(1e-2 / (1 + t), dtype=torch.float64)
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
            opt.step()
            if t == 0:
                n = cnt.frame_count
        if compiled:
            assert cnt.frame_count == n
            assert len(opt._lr_views) <= 64
        runs.append((params, opt))
    _assert_equal_runs(runs[1][0], runs[0][0], runs[1][1], runs[0][1])


@pytest.mark.parametrize("kw", [dict(lr=None), extended(dict(lr=None, warmup_init=True)), extended(dict(beta1=None)),
                                extended(dict(rank=None)), dict(lr=torch.tensor(3e-3), weight_decay=0.1)],
                         ids=["relative_step", "warmup_init", "no-momentum", "dense-momentum", "tensor-lr"])
def test_compiled_equals_eager_other_options(kw):
    """Relative step sizes (from the device counter), no momentum, dense momentum, a
    tensor lr with weight decay: compiled (user's torch.compile, aot_eager) == eager.
    (No momentum and dense momentum run through Flora(compile=...) in tests/test_paths.py's
    compiled table; under the user's compile with FLORA_TEST_ALL=1, as warmup_init does.)"""
    runs = []
    for compiled in (False, True):
        params = _params()
        args = dict(BASE, **kw)
        if isinstance(args["lr"], torch.Tensor):
            args["lr"] = args["lr"].clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "a rank is set but no tensor keeps compressed momentum"
            opt = Flora(params, **args)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        _run(opt, params, step)
        runs.append((params, opt))
    _assert_equal_runs(runs[1][0], runs[0][0], runs[1][1], runs[0][1])


@pytest.mark.extended  # (tests/test_paths.py's inductor row compiles the same kinds of bucket)
def test_inductor_equals_eager():
    """Flora(compile=True): inductor's kernels (C++ on a CPU) equal the eager step to 1e-5,
    default form, resamples, scale_parameter and weight decay. A few seconds of
    compilation per shape (two shapes here). Two 1-D parameters of one shape (two biases
    of a width: a bucket with dense momentum and weight decay) made inductor's C++ code
    generation fail (KeyError 'buf10') on an in-place add into a torch.where's output,
    found by a review; the core adds out of place now. (The single-tensor path's compiled
    core runs inductor in tests/test_paths.py's test_compiled_single_tensor_core_on_a_conv_kernel.)"""
    shapes = [(24, 40), (24, 40), (40,), (40,)]
    kw = dict(BASE, scale_parameter=True, weight_decay=0.05)
    runs = []
    for compiled in (False, True):
        params = _params(shapes)
        opt = Flora(params, **kw, compile=compiled)
        _run(opt, params, opt.step, bad=True)
        runs.append((params, opt))
    _assert_equal_runs(runs[1][0], runs[0][0], runs[1][1], runs[0][1])


def test_user_compile_inductor_with_a_float_lr_changing_every_step():
    """torch.compile(opt.step) with inductor and a float lr written every step
    (scale_parameter=False, as the README suggests): the compressed matrices moved 1.4-2.8x
    too far from the third step (a new-user probe). Inductor (torch 2.13) kept a stale
    value of the dynamic float in ``bound / x.clamp(min=bound)``; the prelude hands the
    graph the lr as a device tensor now, as Flora(compile=True) does. Equal to eager to
    1e-5 at every step."""
    shapes = [(24, 40), (40,)]
    runs = []
    for compiled in (False, True):
        dynamo.reset()
        params = _params(shapes)
        opt = Flora(params, **dict(BASE, lr=1e-3, scale_parameter=False, momentum_dtype=None))
        step = torch.compile(opt.step) if compiled else opt.step
        traj = []
        for t in range(5):
            opt.param_groups[0]["lr"] = 1e-3 * (t + 1)
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
            step()
            traj.append([p.detach().clone() for p in params])
        runs.append(traj)
    for t, (want, got) in enumerate(zip(*runs)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {t}: {m}")


def test_inductor_bf16_relative_step():
    """bf16 parameters (stepped in float32, rounded back) and a relative step, inductor:
    within one bf16 rounding of the eager step."""
    shapes = [(24, 40), (24, 40)]
    runs = []
    for compiled in (False, True):
        params = _params(shapes, torch.bfloat16)
        opt = Flora(params, **dict(BASE, lr=None), compile=compiled)
        _run(opt, params, opt.step)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("staged_min,dtype", [(0, torch.bfloat16), (None, torch.float32),
                                              extended(0, torch.float32), extended(None, torch.bfloat16)],
                         ids=["staged-bf16", "one-graph-float32", "staged-float32", "one-graph-bf16"])
def test_parameter_norms_come_from_one_eager_call(monkeypatch, staged_min, dtype):
    """Flora(compile=...) scaling its step by the parameters' RMS: their norms come from one
    ``_foreach_norm`` for the whole step, ahead of the graphs (flora.functional.
    param_norms; inside a graph each is a reduction of its own, which inductor generates
    and compiles one by one), over every parameter of every bucket and no norm of a
    parameter inside a graph; the step equals eager (bf16: to one rounding). The graphs
    run as dynamo captured them (a counting backend: their norms would show as
    ``linalg_vector_norm`` of a parameter's shape outside ``_foreach_norm``)."""
    from torch.profiler import ProfilerActivity, profile

    if staged_min is not None:
        monkeypatch.setattr(F, "STAGED_MIN_BYTES", staged_min)
    kw = dict(BASE, scale_parameter=True, weight_decay=0.05)
    runs, cnt = [], CompileCounter()
    for compiled in (False, cnt):
        params = _params(dtype=dtype)
        opt = Flora(params, **kw, compile=compiled)
        _run(opt, params, opt.step, steps=3)
        runs.append((params, opt))
    assert cnt.frame_count  # (the step was compiled, not stepped eagerly)
    params, opt = runs[1]
    for p, g in zip(params, _grads(params, 3)):
        p.grad = g
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        opt.step()
    for p, g in zip(runs[0][0], _grads(runs[0][0], 3)):  # the eager run's fourth step
        p.grad = g
    runs[0][1].step()
    calls = [e for e in prof.events() if e.name == "aten::_foreach_norm"
             and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    assert len(calls) == 1
    norms = [e for e in prof.events() if e.name == "aten::linalg_vector_norm"]
    inside = sorted(tuple(e.input_shapes[0]) for e in norms if e.cpu_parent.name == "aten::_foreach_norm")
    assert inside == sorted(tuple(p.shape) for p in params)
    outside = [tuple(e.input_shapes[0]) for e in norms if e.cpu_parent.name != "aten::_foreach_norm"]
    assert outside and not set(outside) & {tuple(p.shape) for p in params}  # the updates' norms only
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(b.float(), a.float(), **tol)


def test_parameter_norms_one_call_per_state_dtype():
    """float32 and float64 parameters in one compiled optimizer: one ``_foreach_norm`` for
    each state dtype, each norm in its parameter's dtype; the steps equal eager's."""
    from torch.profiler import ProfilerActivity, profile

    def make():
        params = _params([(12, 20), (12, 20)]) + _params([(12, 20), (20,)], torch.float64)
        return params

    runs = []
    for compiled in (False, "aot_eager"):
        params = make()
        opt = Flora(params, **dict(BASE, scale_parameter=True), compile=compiled)
        _run(opt, params, opt.step, steps=2)
        runs.append((params, opt))
    params, opt = runs[1]
    plan = opt._prelude_eager()
    norms = F.param_norms(plan)
    got = {id(p): n for w, ns in zip(plan, norms) for p, n in zip(w.params, ns)}
    for p in params:
        assert got[id(p)].dtype == p.dtype
        torch.testing.assert_close(got[id(p)], torch.linalg.vector_norm(p.detach()), rtol=1e-6, atol=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        F.param_norms(plan)
    assert sum(e.name == "aten::_foreach_norm" for e in prof.events()) == 2
    for p, q in zip(*[r[0] for r in runs]):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_a_stack_of_vectors_without_norms_computes_its_own(monkeypatch):
    """grouped_core on stacks (the compiled CPU bucket of vectors) handed no parameter
    norms computes them from the stack (functional._param_rms): with param_norms made to
    hand none, the compiled step of three vectors with scale_parameter=True equals the
    eager reference to 1e-5. (Flora always hands the norms, so only this reaches that
    branch.)"""
    shapes = [(20,), (20,), (20,)]
    kw = dict(BASE, scale_parameter=True)
    ref = _params(shapes)
    opt = Flora(ref, **kw, foreach=False)
    _run(opt, ref, opt.step)
    calls = []
    norms = F.param_norms
    monkeypatch.setattr(F, "param_norms", lambda plan: calls.append(norms(plan)) or [None] * len(plan))
    got = _params(shapes)
    opt = Flora(got, **kw, compile="aot_eager")
    _run(opt, got, opt.step)
    assert all(F.stacked_io(p) for p in got)  # the stacked path ran
    assert calls and all(n is not None for n in calls[0])  # it would have been handed norms
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_with_device_counters():
    """Three compiled steps, a checkpoint (plain step numbers; weights_only=True), a new
    compiled optimizer loads it and steps three more: the uninterrupted six-step run,
    compiled bit for bit, and eager to 1e-5. The relative step size and the bias correction come
    from the device counters, so a counter not restored from the checkpoint would show."""
    kw = dict(BASE, lr=None, momentum_form="scaled", projection="orthonormal")

    def run(compiled, steps, params=None, opt=None):
        params = params or _params()
        opt = opt or Flora(params, **kw, compile="aot_eager" if compiled else False)
        for t in steps:
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
            opt.step()
        return params, opt

    params, opt = run(True, range(3))
    sd = opt.state_dict()
    assert all(type(s["step"]) is int and s["step"] == 3 for s in sd["state"].values())
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params], "opt": sd}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [nn.Parameter(t) for t in ckpt["model"]]
    opt2 = Flora(resumed, **kw, compile="aot_eager")
    opt2.load_state_dict(ckpt["opt"])
    run(True, range(3, 6), resumed, opt2)
    # bit for bit the uninterrupted compiled run: load_state_dict keeps compile= (it once
    # reset it, and the resumed steps ran eagerly, 3e-8 off); the eager run to 1e-5
    compiled_run, eager_run = run(True, range(6))[0], run(False, range(6))[0]
    for a, b, c in zip(resumed, compiled_run, eager_run):
        assert torch.equal(a.detach(), b.detach())
        assert (a.detach() - c.detach()).abs().max().item() <= 1e-5
    assert opt2.state[resumed[0]]["step"] == 6 and opt2.state[resumed[0]]["proj_count"] == 2


def test_checkpoint_with_tensor_counters_loads():
    """A state whose counters are tensors (torch's own optimizers save them so) loads; the
    counters become numbers again."""
    params = _params()
    opt = Flora(params, **BASE)
    _run(opt, params, opt.step, steps=2)
    sd = opt.state_dict()
    for s in sd["state"].values():
        s["step"] = torch.tensor(float(s["step"]))
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Flora(params2, **BASE, compile="aot_eager")
    opt2.load_state_dict(sd)
    assert all(type(s["step"]) is int and s["step"] == 2 for s in opt2.state.values())
    opt.step()
    for p, q in zip(params2, params):
        p.grad = q.grad.clone()
    opt2.step()
    for a, b in zip(params2, params):
        assert (a.detach() - b.detach()).abs().max().item() <= 1e-5


def test_a_counter_edited_on_the_host_is_followed():
    """The device counter mirrors state["step"]: an edit of the integer (a reset, a state
    set by hand) reaches the compiled step (a relative step size depends on it)."""
    runs = []
    for edit in (False, True):
        params = _params([(12, 20)])
        opt = Flora(params, **dict(BASE, lr=None), compile="aot_eager")
        _run(opt, params, opt.step, steps=3)
        if edit:
            opt.state[params[0]]["step"] = 0
        _run(opt, params, opt.step, steps=1)
        runs.append(params[0].detach().clone())
    fresh = _params([(12, 20)])
    opt = Flora(fresh, **dict(BASE, lr=None))
    _run(opt, fresh, opt.step, steps=3)
    opt.state[fresh[0]]["step"] = 0
    _run(opt, fresh, opt.step, steps=1)
    assert (runs[1] - fresh[0].detach()).abs().max() <= 1e-6
    assert (runs[1] - runs[0]).abs().max() > 1e-4  # the edit mattered


@pytest.mark.parametrize("foreach", [False, True])
def test_counts_past_2_to_the_24_reach_the_compiled_step(foreach):
    """The device counters of float32 and bfloat16 parameters were float32, which stops at
    2**24 (2**24 + 1 rounds back): past it the compiled step's relative step and the key of
    its stochastic rounding froze, and a bfloat16 momentum lost a third of its value over
    2,000 steps (a probe). Eager reads the host's integer: the two must agree there."""
    start = 2 ** 24 - 2
    runs = []
    for compile in (False, "aot_eager"):
        params = _params([(12, 20), (16, 24)])
        opt = Flora(params, lr=None, rank=4, beta1=0.9, kappa=10 ** 9, momentum_dtype=torch.bfloat16,
                    foreach=foreach, compile=compile)
        _run(opt, params, opt.step, steps=1)
        for p in params:
            opt.state[p]["step"] = start
        _run(opt, params, opt.step, steps=6)  # through 2**24 - 1 ... 2**24 + 4
        if compile:
            assert [float(opt._device_steps.get(p)) for p in params] == [float(start + 6)] * 2
        runs.append([(p.detach().clone(), opt.state[p]["exp_avg_c"].clone()) for p in params])
    for (p0, m0), (p1, m1) in zip(*runs):
        assert torch.equal(m0, m1)  # the same rounding keys: the same bfloat16 bits
        assert (p0 - p1).abs().max() <= 1e-6


def test_readme_signature_names_every_constructor_argument():
    """The README's ``flora.Flora(...)`` signature lists every argument with its default
    (``compile=False`` included), but the deprecated ``momentum`` and the refused ``betas``."""
    import ast
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sig = re.search(r"`flora\.Flora\((.*?)\)` is a", text, flags=re.S).group(1)
    call = ast.parse("f(" + sig.replace("params,", "").replace("*,", "") + ")", mode="eval").body
    documented = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    expected = {name: par.default for name, par in inspect.signature(Flora.__init__).parameters.items()
                if name not in ("self", "params", "momentum", "betas")}
    assert documented == expected


@pytest.mark.parametrize("n,sizes", [(5, [5]), (30, [30]), (31, [16, 15]), (59, [30, 29]), (60, [30, 30]),
                                     (61, [30, 30, 1]), (62, [30, 30, 2]), (89, [30, 30, 29]),
                                     (80, [30, 30, 20]), (32, [16, 16]), (91, [30, 30, 30, 1])])
def test_a_shapes_buckets_take_as_few_graphs_as_can_be(n, sizes):
    """Flora(compile=...) splits a shape's n parameters into ceil(n / 30) buckets of two
    sizes at most (a graph each), with as few parameters in those graphs as can be: 61 as
    30, 30 and 1 (graphs of 31 parameters) rather than 20, 20 and 21 (41)."""
    parts = F.split_for_graphs(list(range(n)), 30)
    assert [len(p) for p in parts] == sizes
    assert sum(parts, []) == list(range(n))  # in order, each once
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.zeros(3, 2)
    got = list(F.buckets([(p, {"step": 0}, i) for i in range(n)], max_count=F.COMPILED_BUCKET_MAX))
    assert [len(b) for b in got] == sizes
    # CPU vectors step on stacks (functional.stacked_io): one bucket, one graph without
    # a loop per parameter
    v = torch.nn.Parameter(torch.zeros(3))
    v.grad = torch.zeros(3)
    assert [len(b) for b in F.buckets([(v, {"step": 0}, i) for i in range(n)], max_count=F.COMPILED_BUCKET_MAX)] == [n]
    # of at most STACKED_IO_BUCKET_NUMEL elements a stack
    w = torch.nn.Parameter(torch.zeros(F.STACKED_IO_MAX_NUMEL))
    w.grad = torch.zeros_like(w)
    per = F.STACKED_IO_BUCKET_NUMEL // F.STACKED_IO_MAX_NUMEL  # 64
    assert [len(b) for b in F.buckets([(w, {"step": 0}, i) for i in range(n)], max_count=F.COMPILED_BUCKET_MAX)] \
        == [per] * (n // per) + ([n % per] if n % per else [])


@pytest.mark.parametrize("staged_min", [0, None], ids=["staged", "one-graph"])
def test_the_operations_a_compiled_bucket_dispatches(monkeypatch, staged_min):
    """Inductor, a bucket of two compressed matrices: the operations a step dispatches
    (kernels recorded with ``cpp.enable_kernel_profile``; issue 18's goal is at most 50 on
    SmolLM2's shapes). The parameter norms (one call for the step), then, staged, the
    gradients' copy and the three stages around their two matmuls, each stage one
    kernel: a stage that returned a value computed after its closing matmul would add a
    kernel (the 53 -> 48 fix of the sixth pass). One-graph: its three kernels around the
    same matmuls."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    if staged_min is not None:
        monkeypatch.setattr(F, "STAGED_MIN_BYTES", staged_min)
    params = _params([(24, 40), (24, 40)])
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        opt = Flora(params, **dict(BASE, kappa=100, scale_parameter=True), compile=True)
        _run(opt, params, opt.step, steps=2)
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()

    def top(e):
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") or "cpp_fused" in parent.name:
                return False
            parent = parent.cpu_parent
        return True

    ops = ["kernel" if "cpp_fused" in e.name else e.name for e in prof.events()
           if (e.name.startswith("aten::") or "cpp_fused" in e.name) and top(e)]
    middle = ["kernel", "aten::bmm", "kernel", "aten::bmm", "kernel"]
    if staged_min == 0:
        assert ops == ["aten::_foreach_norm", "aten::_foreach_copy_"] + middle
    else:
        assert ops == ["aten::_foreach_norm"] + middle


@pytest.mark.parametrize("scheduled", ["lr", extended("weight_decay"), "beta1"])
def test_a_schedule_of_a_graph_constant_warns_once(scheduled):
    """Flora(compile=...) takes beta1, weight_decay, ... as constants of its graphs (lr is a
    tensor): a schedule of one compiled new graphs at every step, 15-21 s a step on a small
    MLP with inductor and no limit, silently (a new-user probe). It warns once now; an lr
    schedule compiles nothing new and does not warn."""
    params = _params([(12, 20), (20,)])
    # (dynamo alone, without AOTAutograd: the warning is Flora's, whatever the backend)
    opt = Flora(params, **dict(BASE, weight_decay=0.01), compile=CompileCounter())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(6):
            opt.param_groups[0][scheduled] = {"lr": 1e-2, "weight_decay": 0.01, "beta1": 0.9}[scheduled] / (1 + t)
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
            opt.step()
    said = [w for w in caught if "compiles new ones" in str(w.message)]
    if scheduled == "lr":
        assert not said
    else:
        assert len(said) == 1 and f"group 0's {scheduled} changed at 3 steps" in str(said[0].message)


def test_the_recompile_warning_names_every_option_that_changed():
    """Three one-off edits of three graph constants (beta1, weight_decay, clip_threshold):
    the warning named only the last step's, as if it alone had changed three times (a
    probe); it names all three now. relative_step and the momentum's form count too."""
    params = _params([(12, 20), (20,)])
    opt = Flora(params, **BASE, compile="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, (key, value) in enumerate([(None, None), ("beta1", 0.8), ("weight_decay", 0.01),
                                           ("clip_threshold", 2.0)]):
            if key is not None:
                opt.param_groups[0][key] = value
            for p, g in zip(params, _grads(params, t)):
                p.grad = g
            opt.step()
    said = [str(w.message) for w in caught if "compiles new ones" in str(w.message)]
    assert len(said) == 1 and "group 0's beta1, weight_decay, clip_threshold changed at 3 steps" in said[0]
    from flora.optimizer import _GRAPH_CONSTANTS
    assert {"relative_step", "momentum_form", "projection", "momentum_dtype"} <= set(_GRAPH_CONSTANTS)


def test_user_compile_fullgraph_is_refused_naming_the_prelude():
    """torch.compile(opt.step, fullgraph=True) stops at the eager prelude, the one intended
    graph break; dynamo's hint had been "Remove the torch.compiler.disable call" (a probe).
    The prelude's disable now carries the reason: what to do instead."""
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = Flora([p], lr=torch.tensor(1e-2), rank=2, beta1=0.9)
    p.grad = torch.randn(8, 6)
    with pytest.raises(Exception, match=r"(?s)one intended graph break.*without fullgraph=True.*compile=True"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    torch._dynamo.reset()


def test_many_backend_objects_are_said_once(monkeypatch):
    """(A probe.) Every backend object compiles Flora's cores anew and keeps its graphs for
    the process's life (about 3 MB an optimizer with a new lambda each): said once, at the
    BACKENDS_WARN-th object; a backend's name, or one object reused, never counts."""
    import flora.compiled as C

    monkeypatch.setattr(C, "_backends_seen", set())
    monkeypatch.setattr(C, "_backends_kept", [])
    monkeypatch.setattr(C, "BACKENDS_WARN", 3)
    params = [nn.Parameter(torch.randn(6, 5))]
    reused = lambda gm, example: gm.forward  # noqa: E731
    said = []
    for i in range(5):
        backend = reused if i < 2 else (lambda gm, example: gm.forward)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt = Flora(params, lr=1e-2, rank=2, beta1=0.9, compile=backend if i != 1 else "aot_eager")
        params[0].grad = torch.randn(6, 5)
        opt.step()
        hits = [w for w in seen if "backend object this process compiles" in str(w.message)]
        said.append(len(hits))
        assert all(w.filename == __file__ for w in hits)  # the caller's line
    assert said == [0, 0, 0, 1, 0]  # objects: one, a name, new (2nd), new (3rd: said), new


def test_many_distinct_shapes_are_said_at_construction():
    """(A probe.) compile set on a model of hundreds of distinct shapes (a recommender's
    tables): the first step compiles a graph for each (200 shapes: 64 s with aot_eager, then
    a slower step than eager). Said once at construction, with the count; a model of few
    shapes, or compile=False, is not."""
    from flora.reports import SIGNATURES_WARN

    many = [nn.Parameter(torch.randn(3 + i, 4)) for i in range(SIGNATURES_WARN + 1)]
    few = [nn.Parameter(torch.randn(8, 4)) for _ in range(SIGNATURES_WARN + 1)]
    for params, compile, said in ((many, "aot_eager", 1), (many, False, 0), (few, "aot_eager", 0)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            Flora(params, lr=1e-2, compile=compile)
        got = [str(w.message) for w in seen if "distinct parameter shapes" in str(w.message)]
        assert len(got) == said, (compile, got)
        if said:
            assert f"{SIGNATURES_WARN + 1} distinct parameter shapes" in got[0]


def test_a_staged_bucket_steps_after_its_group_list_is_reordered_in_place(monkeypatch):
    """Two parameters of a staged bucket swapped within their group's list (same list, same
    length; the README allows it): the compiled step looked the first up in a stale map
    and raised a TypeError after the prelude had moved the counters, at every later step
    (a probe). Now it equals the eager step with the same swap."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    torch.manual_seed(0)
    init = [torch.randn(12, 20) * 0.02 for _ in range(2)]
    grads = [[torch.randn(12, 20) for _ in range(2)] for _ in range(3)]
    out = []
    for compile in (None, "aot_eager"):
        ps = [nn.Parameter(t.clone()) for t in init]
        opt = Flora(ps, lr=1e-2, rank=4, beta1=0.9, compile=compile)
        for i, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            if i == 0:
                lst = opt.param_groups[0]["params"]
                lst[0], lst[1] = lst[1], lst[0]
        assert [int(opt.state[p]["step"]) for p in ps] == [3, 3]
        out.append([p.detach().clone() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_groups_of_equal_options_share_compiled_buckets_as_their_lrs_part():
    """compile set, a group per parameter: groups of equal options step in shared buckets
    (their stacked state), and when a scheduler parts their lrs (every other group halved
    from the third step) the buckets split and the step still equals the eager one."""
    def run(compile):
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in [(12, 20)] * 3 + [(20,)] * 2]
        opt = Flora([{"params": [p]} for p in params], **BASE, compile=compile)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s, odd=i % 2: 0.5 if odd and s >= 2 else 1.0 for i in range(len(params))])
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step()
        return params

    for a, b in zip(run(False), run("aot_eager")):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
