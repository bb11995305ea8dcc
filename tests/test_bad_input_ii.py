"""Bad input across the public API, found by a new-user audit: options edited between
fused steps, damaged checkpoints (Flora's and the accumulator's), the accumulator's
attributes, tensor and numpy values, and options whose nonsense values were accepted.
Each refusal names the option and comes before any change."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from flora import CompressedAccumulator, Flora
from flora.distributed import ProjectionState


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 12, generator=g), torch.randn(4, 5, generator=g)
    nn.functional.mse_loss(model(x), y).backward()


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _unchanged(model, opt, snap):
    params, sd = snap
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    now = opt.state_dict()
    assert [{k: v for k, v in g.items()} for g in now["param_groups"]] == sd["param_groups"]
    for pid, s in sd["state"].items():
        for k, v in s.items():
            w = now["state"][pid][k]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v, k


# ------------------------------------------------ options edited between fused steps


@pytest.mark.parametrize("key, value, words", [("lr", float("nan"), "lr must be"), ("beta1", 1.5, "beta1 must be"),
                                               ("momentum_form", "bogus", "momentum_form must be"),
                                               ("kappa", 0, "kappa must be")])
def test_step_parameter_refuses_an_edited_option_as_step_does(key, value, words):
    """Fused accumulation steps with step_parameter: an edit into param_groups had stepped
    (an lr of NaN made every weight NaN); refused now before any change."""
    model = _model()
    opt = Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    _backward(model)
    _backward(model, 2)  # a cycle: every parameter steps
    snap = _snapshot(model, opt)
    opt.param_groups[0][key] = value
    _backward(model, 3)
    with pytest.raises((ValueError, TypeError), match=words):
        _backward(model, 4)
    _unchanged(model, opt, snap[:1] + (snap[1] | {"param_groups": opt.state_dict()["param_groups"]},))
    assert acc.cycle == 1


# ------------------------------------------------ Flora.load_state_dict on damaged states


def _saved():
    model = _model()
    opt = Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    for s in range(2):
        _backward(model, s)
        opt.step()
        opt.zero_grad()
    return model, opt, copy.deepcopy(opt.state_dict())


DAMAGE = {
    "step of two values": (lambda sd: sd["state"][2].__setitem__("step", torch.tensor([1, 2])), "'step'"),
    "step None": (lambda sd: sd["state"][2].__setitem__("step", None), "'step'"),
    "step negative": (lambda sd: sd["state"][2].__setitem__("step", -5), "'step'"),
    "step fractional": (lambda sd: sd["state"][2].__setitem__("step", torch.tensor(3.7)), "'step'"),
    "step missing": (lambda sd: sd["state"][2].pop("step"), "'step'"),
    # counters the step cannot use, and a compressed momentum without its counters, had loaded
    # and then failed the next step: after other parameters' counters moved, or a bare
    # KeyError (probe Z61)
    "proj_count 2**64": (lambda sd: sd["state"][0].__setitem__("proj_count", 2 ** 64), r"'proj_count'.*below 2\*\*63"),
    "index 2**63": (lambda sd: sd["state"][0].__setitem__("index", 2 ** 63), r"'index'.*below 2\*\*63"),
    "step 2**63": (lambda sd: sd["state"][2].__setitem__("step", 2 ** 63), r"'step'.*below 2\*\*53"),
    # its float64 device counter stops at 2**53: the compiled bfloat16 rounding drifted (Z143)
    "step 2**53": (lambda sd: sd["state"][2].__setitem__("step", 2 ** 53), r"'step'.*below 2\*\*53"),
    "proj_count missing": (lambda sd: sd["state"][0].pop("proj_count"), r"without \['proj_count'\]"),
    "proj_age missing": (lambda sd: sd["state"][0].pop("proj_age"), r"without \['proj_age'\]"),
    "row missing": (lambda sd: sd["state"][0].pop("exp_avg_sq_row"), "lacks"),
    "integer row": (lambda sd: sd["state"][0].__setitem__("exp_avg_sq_row", torch.zeros(16, dtype=torch.int64)),
                    "floating-point"),
    "complex momentum": (lambda sd: sd["state"][0].__setitem__(
        "exp_avg_c", sd["state"][0]["exp_avg_c"].to(torch.complex64)), "floating-point"),
    "index a string": (lambda sd: sd["state"][0].__setitem__("index", "a"), "'index'"),
    "proj_dim a float": (lambda sd: sd["state"][0].__setitem__("proj_dim", 1.0), "'proj_dim'"),
    "unknown parameter id": (lambda sd: sd["state"].__setitem__(99, sd["state"][0]), "parameter id 99"),
    "state a list": (lambda sd: sd.__setitem__("state", list(sd["state"].values())), "must be a dict"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_flora_state_is_refused_before_any_change(name):
    """They had loaded (a missing step, an integer second moment that then truncated the
    statistics to 0), or raised half-way with the groups' lr and a state already replaced."""
    model, opt, saved = _saved()
    damaged = copy.deepcopy(saved)
    damaged["param_groups"][0]["lr"] = 0.5  # would be loaded first
    damage, words = DAMAGE[name]
    damage(damaged)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(damaged)
    _unchanged(model, opt, snap)


def test_counters_saved_as_tensors_load_as_integers():
    model, opt, saved = _saved()
    sd = copy.deepcopy(saved)
    for s in sd["state"].values():
        for k in ("step", "proj_count", "proj_age", "index"):
            if k in s:
                s[k] = torch.tensor(float(s[k]))
    opt.load_state_dict(sd)
    for s in opt.state.values():
        assert all(type(s[k]) is int for k in ("step", "proj_count", "proj_age", "index", "proj_dim") if k in s)
    torch.load(io.BytesIO(_bytes(opt.state_dict())), weights_only=True)


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------ the accumulator's state and attributes


def _acc_mid_cycle():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = CompressedAccumulator(model, rank=4, tau=3, optimizer=opt)
    _backward(model)
    return model, acc


ACC_DAMAGE = {
    "cycle missing": (lambda sd: sd.pop("cycle"), "lacks \\['cycle'\\]"),
    "cycle fractional": (lambda sd: sd.__setitem__("cycle", 2.7), "'cycle'"),
    "cycle negative": (lambda sd: sd.__setitem__("cycle", -1), "'cycle'"),
    "counts too long": (lambda sd: sd.__setitem__("counts", torch.cat([sd["counts"], sd["counts"][:1]])),
                        "counts for 4 parameters"),
    "counts fractional": (lambda sd: sd.__setitem__("counts", sd["counts"].float()), "integer tensor"),
    "exact_last a word": (lambda sd: sd.__setitem__("exact_last", "no"), "exact_last"),
    "driven a word": (lambda sd: sd.__setitem__("driven", "x"), "'driven'"),
    "compressed a list": (lambda sd: sd.__setitem__("compressed", []), "'compressed'"),
}


@pytest.mark.parametrize("name", list(ACC_DAMAGE))
def test_a_damaged_accumulator_state_is_refused_before_any_change(name):
    """A missing cycle had raised a bare KeyError after the open cycle's compressed sums were
    dropped (a micro-batch lost); counts of another length were accepted, then every
    backward raised IndexError."""
    model, acc = _acc_mid_cycle()
    sd = acc.state_dict()
    damaged = copy.deepcopy(sd)
    damage, words = ACC_DAMAGE[name]
    damage(damaged)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=words):
        acc.load_state_dict(damaged)
    assert acc.micro_step == 1
    again = acc.state_dict()
    assert torch.equal(again["counts"], sd["counts"]) and again["compressed"].keys() == sd["compressed"].keys()
    assert all(torch.equal(a, b) for a, b in zip(again["compressed"].values(), sd["compressed"].values()))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads) if g.stride() != (0, 0))


def test_the_accumulators_attributes_are_checked_or_fixed():
    """``acc.tau = 0`` had been taken (a cycle then never closed); options that decide how
    each parameter is summed are fixed; tau changes on a boundary only."""
    model, acc = _acc_mid_cycle()
    with pytest.raises(ValueError, match="tau must be a positive integer"):
        acc.tau = 0
    with pytest.raises(AttributeError, match="rank is fixed"):
        acc.rank = 2
    with pytest.raises(AttributeError, match="proj_dim is fixed"):
        acc.proj_dim = 0
    with pytest.raises(TypeError, match="exact_last must be"):
        acc.exact_last = "no"
    with pytest.raises(RuntimeError, match="on a cycle boundary only"):
        acc.tau = 2
    assert acc.tau == 3 and acc.micro_step == 1
    _backward(model, 2)
    _backward(model, 3)  # the third: the cycle closes
    assert acc.micro_step == 0 and acc.cycle == 1
    acc.tau = np.int64(2)  # on a boundary, and plain
    assert type(acc.tau) is int and acc.tau == 2
    _backward(model, 4)
    _backward(model, 5)
    assert acc.cycle == 2 and acc.micro_step == 0


def test_max_grad_norm_may_change_between_fused_cycles_and_is_checked():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True, max_grad_norm=1.0)
    acc.max_grad_norm = 0.5
    assert acc.max_grad_norm == 0.5
    for bad in (-1.0, 0.0):  # 0 had been one accepted edit away: it clips every gradient to zero (probe Z70)
        with pytest.raises(ValueError, match="max_grad_norm must be"):
            acc.max_grad_norm = bad
    assert acc.max_grad_norm == 0.5
    with pytest.raises(ValueError, match="max_grad_norm must be"):
        CompressedAccumulator(_model(), rank=4, tau=2, optimizer=opt, fused=True, max_grad_norm=0.0)


def test_an_aspect_ratio_limit_of_one_is_accepted():
    """``max_aspect_ratio=1.0`` (compress square tensors only) is the closed end of the
    range, for the optimizer and the accumulator alike (probe Z70: refusing it passed)."""
    model = _model()
    Flora(model.parameters(), lr=1e-3, rank=4, beta1=0.9, max_aspect_ratio=1.0)
    CompressedAccumulator(model, rank=4, tau=2, max_aspect_ratio=1.0).remove()


# ------------------------------------------------ values of the wrong kind


@pytest.mark.parametrize("lr", [torch.tensor(float("nan")), torch.tensor(-1.0), torch.tensor(float("inf"))])
def test_a_tensor_lr_is_range_checked_where_the_group_is_made(lr):
    model = _model()
    with pytest.raises(ValueError, match="lr must be a finite real number"):
        Flora(model.parameters(), lr=lr, rank=4, beta1=0.9)
    opt = Flora(list(model.parameters())[:2], lr=torch.tensor(1e-2), rank=4, beta1=0.9)
    with pytest.raises(ValueError, match="lr must be a finite real number"):
        opt.add_param_group({"params": list(model.parameters())[2:], "lr": lr})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("value", [1.0, torch.tensor(1), "1"])
def test_proj_dim_of_another_type_is_refused_everywhere(value):
    """1.0 == 1 had let a float (or a tensor) through, kept as given: the accumulator then
    could not reload its own state after the Trainer callback's JSON round trip."""
    model = _model()
    with pytest.raises(ValueError, match="proj_dim must be one of 'auto', 0, 1"):
        Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9, proj_dim=value)
    with pytest.raises(ValueError, match="proj_dim must be one of 'auto', 0, 1"):
        CompressedAccumulator(model, rank=4, tau=2, proj_dim=value)
    with pytest.raises(ValueError, match="proj_dim must be one of 'auto', 0, 1"):
        ProjectionState(4, proj_dim=value)


def test_numpy_numbers_leave_plain_checkpoints():
    """numpy integers given to the accumulator and ProjectionState, or edited into Flora's
    groups, had left numpy scalars in state_dict(): torch.load(weights_only=True) and the
    Trainer callback's JSON refused them."""
    model = _model()
    acc = CompressedAccumulator(model, rank=4, tau=2, proj_dim=np.int64(1))
    assert type(acc.proj_dim) is int
    torch.load(io.BytesIO(_bytes(acc.state_dict())), weights_only=True)
    acc.remove()
    state = ProjectionState(np.int64(8), seed=np.int64(3), proj_dim=np.int64(0), max_aspect_ratio=np.float64(4))
    assert all(type(v) is (float if k == "max_aspect_ratio" else int) for k, v in state.state_dict().items())
    opt = Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    opt.param_groups[0]["lr"], opt.param_groups[0]["kappa"] = np.float64(2e-3), np.int64(5)
    _backward(model)
    opt.step()
    assert type(opt.param_groups[0]["lr"]) is float and type(opt.param_groups[0]["kappa"]) is int
    torch.load(io.BytesIO(_bytes(opt.state_dict())), weights_only=True)
    # a scheduler writes after the step: LambdaLR with a lambda of numpy's cos (a probe)
    opt.param_groups[0]["lr"] = np.float64(1e-3)
    torch.load(io.BytesIO(_bytes(opt.state_dict())), weights_only=True)
    assert type(opt.param_groups[0]["lr"]) is float
    with pytest.raises(TypeError, match=r"state_dict\[.rank.\] must be a non-negative integer"):
        ProjectionState(8).load_state_dict({"rank": 8.9, "seed": 0, "projection": 0, "step": 1})


def test_an_eps_edited_in_numpy_numbers_or_tensors_is_checked_again():
    """(Probe Z129.) An eps pair edited into a group in numpy numbers stayed numpy (the
    other options were made Python's), so that state_dict() failed torch.load(
    weights_only=True); an edit equal to the value before (numpy's, or tensors holding
    the same numbers) was not checked again; an array failed inside the step's checks
    with numpy's own message."""
    model = _model()
    opt = Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9, eps=(1e-30, 2e-3))
    _backward(model)
    opt.step()
    opt.param_groups[0]["eps"] = (np.float64(1e-30), np.float64(2e-3))  # equal to the value before
    _backward(model)
    opt.step()
    assert [type(e) for e in opt.param_groups[0]["eps"]] == [float, float]
    torch.load(io.BytesIO(_bytes(opt.state_dict())), weights_only=True)
    for bad in [(torch.tensor(1e-30), torch.tensor(2e-3)), np.array([1e-30, 2e-3])]:
        opt.param_groups[0]["eps"] = bad
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(TypeError, match=r"eps(\[0\])? must be a (pair \(eps1, eps2\) of numbers|finite real)"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kw, words", [
    ({"eps": (0.0, 1e-3)}, r"eps\[0\] must be a finite real number in \(0.0"),
    ({"eps": (1e-30, 0.0)}, r"eps\[1\] must be a finite real number in \(0.0, inf\), got 0.0 with scale_parameter=True "
                            r"\(.*\); 0 is allowed with scale_parameter=False"),
    # rounds to 0 in the float32 state: the same frozen tensor (probe Z143)
    ({"eps": (1e-46, 1e-3)}, r"eps\[0\] must be above 2\*\*-150 \(about 7e-46: a smaller one rounds to 0"),
    ({"eps": (2.0 ** -150, 1e-3)}, r"eps\[0\] must be above 2\*\*-150"),
    # a non-bool scale_parameter is named before the eps[1] its value would bound (a review)
    ({"eps": (1e-30, 0.0), "scale_parameter": "no"}, "scale_parameter must be True or False, got 'no'"),
    ({"foreach": 1}, "foreach must be True, False or None"),
    ({"relative_step": "no"}, "relative_step must be True or False, got 'no'"),
    ({"scale_parameter": 0}, "scale_parameter must be True or False, got 0"),
    ({"cache_projections": "yes"}, "cache_projections must be True or False"),
    ({"decay_rate": float("-inf")}, "decay_rate must be a finite real number"),
])
def test_values_that_silently_froze_or_misread_are_refused(kw, words):
    """eps1 = 0 divided a zero gradient row by 0: every step of that tensor skipped; eps2 =
    0 under scale_parameter left a zero-initialised weight (LoRA's B) at 0 for good;
    foreach=1 was kept as given; decay_rate=-inf froze the second moment after step 1."""
    with pytest.raises((ValueError, TypeError), match=words):
        Flora(_model().parameters(), lr=1e-2, **kw)


def test_eps2_of_zero_is_allowed_without_scale_parameter():
    Flora(_model().parameters(), lr=1e-2, eps=(1e-30, 0.0), scale_parameter=False)


def test_the_least_eps1_a_float32_state_holds_steps_a_zero_row():
    """float32's least positive number (1.4e-45; 1e-45 rounds to it) keeps a zero gradient
    row finite: the tensor steps, as at the default 1e-30 (below it, refused above), where
    the other rows' squares are small enough that the zero row's share, eps[0] over their
    mean, does not underflow (gradients of 1e-3 here: about 1e-39)."""
    g = torch.Generator().manual_seed(0)
    for eps1 in (1e-45, 2.0 ** -149):
        w = torch.nn.Parameter(torch.randn(6, 5, generator=g))
        before = w.detach().clone()
        opt = Flora([w], lr=1e-2, eps=(eps1, 1e-3))
        w.grad = torch.randn(6, 5, generator=g) * 1e-3
        w.grad[2] = 0
        opt.step()
        assert int(opt.nonfinite_skips) == 0 and not torch.equal(w, before) and torch.isfinite(w).all()


def test_compile_in_a_parameter_group_is_refused():
    """It applies to the whole optimizer; in a group it had been kept and ignored. The
    message names the way through a wrapper that writes its keyword arguments into every
    group (torch's ZeroRedundancyOptimizer: probe Z131)."""
    a, b = _model(), _model()
    with pytest.raises(ValueError, match=r"compile applies to the whole optimizer.*"
                                         r"optimizer_class=functools.partial\(flora.Flora, compile=...\)"):
        Flora([{"params": a.parameters()}, {"params": b.parameters(), "compile": True}], lr=1e-2)
    opt = Flora(a.parameters(), lr=1e-2)
    opt.param_groups[0]["compile"] = True
    _backward(a)
    with pytest.raises(ValueError, match="compile applies to the whole optimizer"):
        opt.step()


def test_wrong_objects_are_named():
    import flora

    model = _model()
    with pytest.raises(TypeError, match="state_bytes takes an optimizer"):
        flora.state_bytes(model)
    with pytest.raises(TypeError, match="exclude must be parameter names or tensors"):
        CompressedAccumulator(model, rank=4, tau=2, exclude=5)
    with pytest.raises(TypeError, match="RelativeStepSchedule takes a Flora optimizer"):
        flora.RelativeStepSchedule("x")
    with pytest.raises(TypeError, match="warmup_init must be True or False"):
        Flora(model.parameters(), lr=1e-2, warmup_init="yes")


def test_nothing_compressed_warning_names_the_callers_line():
    """The "a rank is set but no tensor keeps compressed momentum" warning pointed one frame
    too far up (the caller's caller; 'sys:1' at module level; found by a new-user probe)."""
    import warnings

    import flora

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        flora.Flora([torch.nn.Parameter(torch.randn(4, 4))], lr=1e-3, rank=32)
    ours = [w for w in seen if "no tensor keeps compressed momentum" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__, (ours[0].filename, ours[0].lineno)


def _loaded_with_other_options():
    import flora

    p = torch.nn.Parameter(torch.randn(8, 8))
    src = flora.Flora([p], lr=1e-3, rank=2, beta1=0.9)
    p.grad = torch.ones(8, 8)
    src.step()
    flora.Flora([p], lr=1e-3, rank=2, beta1=0.9, kappa=7).load_state_dict(src.state_dict())


def _foreign_key_edited_in():
    import flora

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = flora.Flora([p], lr=1e-3, rank=2, beta1=0.9)
    opt.param_groups[0]["amsgrad"] = True
    p.grad = torch.ones(8, 8)
    opt.step()


def _shared_lr_tensor():
    import flora

    lr = torch.tensor(1e-3)
    flora.Flora([{"params": [torch.nn.Parameter(torch.randn(4))], "lr": lr},
                 {"params": [torch.nn.Parameter(torch.randn(4))], "lr": lr}], lr=1e-3)


def _group_with_betas():
    import flora

    flora.Flora([{"params": [torch.nn.Parameter(torch.randn(4))], "betas": (0.9, 0.99)}], lr=1e-3)


def _empty_group():
    import flora

    flora.Flora([{"params": [torch.nn.Parameter(torch.randn(4))]}, {"params": [], "lr": 1e-4}], lr=1e-3)


@pytest.mark.parametrize("make,words", [
    (_loaded_with_other_options, "change the algorithm"),
    (_foreign_key_edited_in, "'amsgrad'"),
    (_shared_lr_tensor, "is the tensor of group 0"),
    (_group_with_betas, "'betas'"),
    (_empty_group, "a parameter group with no parameters"),
], ids=["load", "foreign-key-at-step", "shared-lr", "betas-at-construction", "empty-group"])
def test_warnings_name_the_users_line(make, words):
    """These pointed inside flora (optimizer.py, checkpoint.py) or torch (add_param_group,
    dynamo's eval_frame): a fixed stacklevel is one or two frames short on some paths (probe
    Z10). Every warning now goes to the first frame outside flora and torch."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make()
    ours = [w for w in seen if words in str(w.message)]
    assert ours and all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


@pytest.mark.parametrize("path", ["single", "grouped", "step_parameter"])
def test_an_expanded_parameter_is_refused_before_any_change(path):
    """A zero-stride (expanded) parameter failed half-way through step() with torch's
    'more than one element of the written-to tensor refers to a single memory location',
    after the other parameter had moved and its own statistics were written (a retry
    stepped everything twice). Refused first, naming it; an expanded size-1 dim that
    shares nothing steps."""
    ok = nn.Parameter(torch.full((4, 5), 0.05))
    bad = nn.Parameter(torch.full((1, 5), 0.05).expand(4, 5))
    fine = nn.Parameter(torch.full((5, 1), 0.05).as_strided((5, 1), (1, 0)))  # stride 0 on a dim of one: no sharing
    assert fine.stride() == (1, 0)
    opt = Flora([ok, bad, fine], lr=1e-2, rank=2, beta1=0.9, foreach=path != "single")
    for p in (ok, bad, fine):
        p.grad = torch.randn(p.shape)
    before = ok.detach().clone()
    with pytest.raises(ValueError, match=r"shape \(4, 5\) is a view whose elements share memory \(strides \(0, 1\)"):
        if path == "step_parameter":
            opt.step_parameter(bad)
        else:
            opt.step()
    assert torch.equal(ok, before) and len(opt.state) == 0
    bad.grad = None
    opt.step()
    assert not torch.equal(ok, before)


@pytest.mark.parametrize("path", ["single", "grouped", "step_parameter"])
def test_a_gradient_of_another_dtype_than_its_parameter_is_refused_before_any_change(path):
    """p.data = p.data.double() after backward leaves a float32 .grad on a float64
    parameter (torch refuses p.grad = g of another dtype, not this route): with a rank the
    step failed in a matmul after the state was made from the gradient's dtype and the other
    parameter had moved. Refused first, naming both dtypes."""
    a, b = nn.Parameter(torch.randn(12, 20)), nn.Parameter(torch.randn(12, 20))
    opt = Flora([a, b], lr=1e-2, rank=4, beta1=0.9, foreach=path != "single")
    a.grad, b.grad = torch.randn(12, 20), torch.randn(12, 20)
    b.data = b.data.double()
    before = a.detach().clone()
    with pytest.raises(TypeError, match=r"dtype torch.float64 \(shape \(12, 20\)\) has a gradient of dtype "
                                        r"torch.float32"):
        if path == "step_parameter":
            opt.step_parameter(b)
        else:
            opt.step()
    assert torch.equal(a, before) and len(opt.state) == 0


def test_parameters_sharing_memory_are_refused_and_disjoint_views_of_one_buffer_are_not():
    """b.data = a.data (two Parameters, one memory) was stepped twice a step, its result
    depending on the path (0.41% of the movement between single and grouped with
    scale_parameter and weight decay): refused at construction and add_param_group, as one
    parameter listed twice is. Disjoint views of one buffer (FSDP1's, apex's flat
    buffers; column splits of one matrix) are not."""
    a = nn.Parameter(torch.randn(12, 20))
    b = nn.Parameter(torch.empty(0))
    b.data = a.data
    with pytest.raises(ValueError, match=r"two parameters share memory \(shapes \(12, 20\) and \(12, 20\)"):
        Flora([a, b], lr=1e-2)
    # the same memory in another shape, or transposed, is a tie too (a review)
    for view in (a.data.t(), a.data.reshape(240)):
        c = nn.Parameter(torch.empty(0))
        c.data = view
        with pytest.raises(ValueError, match=r"share memory .*tied by b.data = a.data.*tie_weights\(\)"):
            Flora([a, c], lr=1e-2)
    opt = Flora([a], lr=1e-2)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    flat = torch.zeros(12 * 20 + 20)
    w, v = nn.Parameter(torch.empty(0)), nn.Parameter(torch.empty(0))
    w.data, v.data = flat[:240].view(12, 20), flat[240:]
    big = torch.randn(12, 40)
    left, right = nn.Parameter(torch.empty(0)), nn.Parameter(torch.empty(0))
    left.data, right.data = big[:, :20], big[:, 20:]  # interleaved rows, no shared element
    over = nn.Parameter(torch.empty(0))
    over.data = flat[230:250]  # overlaps w's last row and v's start
    Flora([w, v, left, right], lr=1e-2)
    # the advice for tied weights does not fit views that overlap in part (a probe)
    with pytest.raises(ValueError, match=r"share memory .*overlapping views of one buffer.*Make the views disjoint") \
            as refusal:
        Flora([w, v, over], lr=1e-2)
    assert "tie_weights" not in str(refusal.value)
    # decided by the elements, not the spans: overlapping column blocks (columns 2-3 in
    # both, neither contiguous) are refused; a column block and a piece of one row of the
    # other columns (one contiguous, nothing shared) are taken
    grid = torch.randn(8, 6)
    cols = [nn.Parameter(torch.empty(0)) for _ in range(4)]
    cols[0].data, cols[1].data, cols[2].data, cols[3].data = grid[:, :4], grid[:, 2:], grid[:, :3], grid[1, 3:]
    with pytest.raises(ValueError, match="share memory"):
        Flora(cols[:2], lr=1e-2)
    Flora(cols[2:], lr=1e-2)


@pytest.mark.parametrize("layout", ["rows", "transposed", "channels_last"])
def test_large_overlapping_parameters_that_fill_their_spans_are_refused(layout):
    """Parameters above SHARED_CHECK_MAX elements are not compared element by element;
    before, two such overlapping by a shifted view (``b.data = flat[100:100 + n]``) were
    taken and stepped twice. Each fills its span (row- or column-major, channels_last),
    so overlapping spans share elements: refused. Adjacent ones are taken."""
    from flora.options import SHARED_CHECK_MAX

    shape = (4, 8, 48, 48) if layout == "channels_last" else (300, 300)
    n = math.prod(shape)
    assert n > SHARED_CHECK_MAX
    flat = torch.zeros(2 * n + 100)

    def view(start):
        t = flat[start:start + n]
        if layout == "transposed":
            return t.view(shape[::-1]).mT
        if layout == "channels_last":
            return t.view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2)
        return t.view(shape)

    a, b, c = (nn.Parameter(torch.empty(0)) for _ in range(3))
    a.data, b.data, c.data = view(0), view(100), view(n)
    with pytest.raises(ValueError, match="share memory"):
        Flora([a, b], lr=1e-2)
    Flora([a, c], lr=1e-2)


def test_large_column_blocks_of_one_matrix_are_decided_exactly():
    """Column blocks of one matrix above SHARED_CHECK_MAX elements were taken unchecked
    (too large to compare element by element): two overlapping by one column stepped it
    twice. Blocks of one matrix's rows are decided by arithmetic now, at any size;
    adjacent ones are taken, and a random table of small blocks agrees with comparing
    their elements."""
    from flora.options import SHARED_CHECK_MAX, _offsets, _row_blocks

    big = torch.zeros(1000, 1000)
    assert big[:, :400].numel() > SHARED_CHECK_MAX
    a, b, c = (nn.Parameter(torch.empty(0)) for _ in range(3))
    a.data, b.data, c.data = big[:, :400], big[:, 399:], big[:, 400:]
    with pytest.raises(ValueError, match="share memory"):
        Flora([a, b], lr=1e-2)
    Flora([a, c], lr=1e-2)
    rng = np.random.default_rng(0)
    flat = torch.zeros(400)
    decided = 0
    for _ in range(3000):
        stride = int(rng.integers(1, 13))
        views = []
        for _ in range(2):
            h, w = int(rng.integers(1, 7)), int(rng.integers(1, stride + 1))
            views.append(flat.as_strided((h, w), (stride, 1), int(rng.integers(0, 400 - (h - 1) * stride - w + 1))))
        got = _row_blocks(*views)
        if got is not None:
            decided += 1
            assert got == bool(torch.isin(_offsets(views[0]), _offsets(views[1])).any())
    assert decided > 1000


def test_memory_is_checked_once_for_all_groups_at_construction(monkeypatch):
    """(A probe.) Each group was checked against every earlier one as torch added it:
    quadratic in the groups (4,000 groups of one table each: 49 s). Construction checks
    all groups together, once; a parameter of a later group sharing an earlier group's
    memory is still refused there, and add_param_group still checks against every group."""
    import flora.optimizer as O

    calls = []
    real = O._refuse_shared_memory
    monkeypatch.setattr(O, "_refuse_shared_memory", lambda *a, **k: calls.append(a) or real(*a, **k))
    groups = [{"params": [nn.Parameter(torch.randn(4, 3))]} for _ in range(50)]
    opt = Flora(groups, lr=1e-2)
    assert len(calls) == 1 and len(calls[0][0]) == 50
    a = nn.Parameter(torch.randn(6, 5))
    b = nn.Parameter(torch.empty(0))
    b.data = a.data[2:]
    with pytest.raises(ValueError, match="share memory"):
        Flora([{"params": [a]}, {"params": [nn.Parameter(torch.randn(2))]}, {"params": [b], "lr": 1e-3}], lr=1e-2)
    opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 51


def test_tied_weights_loaded_with_assign_are_refused_until_tied_again():
    """load_state_dict(sd, assign=True) of a tied checkpoint makes a Parameter per key over
    one memory (a probe): refused, the message naming that cause and tie_weights(), which
    ties them as one Parameter again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(LlamaForCausalLM(cfg).state_dict(), assign=True, strict=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"share memory .*load_state_dict\(\.\.\., assign=True\).*tie_weights\(\)"):
        Flora(model.parameters(), lr=1e-2)
    model.tie_weights()
    Flora(model.parameters(), lr=1e-2)


def test_a_complex_parameter_or_gradient_is_refused_naming_it():
    """The refusals said "complex parameters" without which (a probe): named pairs give the
    name; both give the dtype and shape. Nothing stepped."""
    good = nn.Parameter(torch.randn(4, 3))
    z = nn.Parameter(torch.randn(5, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"complex parameters \(got parameter 'bad\.z' of dtype torch\.complex64, "
                                        r"shape \(5, 2\)\)"):
        Flora([("good", good), ("bad.z", z)], lr=1e-2)
    with pytest.raises(TypeError, match=r"shape \(5, 2\)"):
        Flora({good, z}, lr=1e-2)  # a set: torch refuses it itself, after this check
    p = nn.Parameter(torch.randn(4, 3))
    opt = Flora([good, p], lr=1e-2)
    good.grad = torch.randn(4, 3)
    p.data = torch.randn(4, 3, dtype=torch.complex64)
    p.grad = torch.randn(4, 3, dtype=torch.complex64)
    before = good.detach().clone()
    with pytest.raises(TypeError, match=r"complex gradients \(got one of dtype torch\.complex64 for a parameter "
                                        r"of shape \(4, 3\), dtype torch\.complex64\)"):
        opt.step()
    assert torch.equal(good, before) and not opt.state[good]


def test_a_float8_parameter_with_a_gradient_is_refused_before_any_state():
    """float8 passed the floating-point checks and failed inside the arithmetic ("norm_cpu"
    not implemented, no name), after every parameter's state had been made: a retry stepped
    with counts one ahead (a new-user probe). Now refused first, naming it and the dtypes;
    frozen, it is carried along untouched."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    good = nn.Parameter(torch.randn(12, 10))
    f8 = nn.Parameter(torch.randn(4, 4).to(torch.float8_e4m3fn), requires_grad=False)
    opt = Flora([("w", good), ("f8", f8)], lr=1e-2, beta1=0.9, rank=4)
    before = good.detach().clone()
    good.grad, f8.grad = torch.randn(12, 10), torch.randn(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"Flora steps parameters of dtype torch\.float16, torch\.bfloat16, "
                                        r"torch\.float32, torch\.float64; got parameter 'f8' of dtype "
                                        r"torch\.float8_e4m3fn \(shape \(4, 4\)\)"):
        opt.step()
    assert torch.equal(good, before) and not opt.state[good] and not opt.state[f8]
    f8.grad = None
    opt.step()
    assert opt.state[good]["step"] == 1 and not opt.state[f8]


def test_a_float8_parameter_is_refused_by_step_parameter_and_the_accumulator():
    """The float8 refusal above on the other ways in (a review): step_parameter after
    another parameter of its group had passed the group's cached check and made the state
    before failing; fused accumulation failed inside backward after the parameters before
    it had stepped; a compressed one failed in compress(). Each is refused naming it, with
    nothing changed; excluded (summed densely by autograd) it is accepted."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 12)
            self.f8 = nn.Parameter(torch.ones(16, 16).to(torch.float8_e4m3fn))

        def forward(self, x):
            return self.lin(x * self.f8.float().mean()).sum()

    m = M()
    opt = Flora(list(m.named_parameters()), lr=1e-2, beta1=0.9, rank=4)
    m.lin.weight.grad, m.lin.bias.grad = torch.randn(12, 10), torch.randn(12)
    m.f8.grad = torch.randn(16, 16).to(torch.float8_e4m3fn)
    opt.step_parameter(m.lin.weight)
    with pytest.raises(TypeError, match=r"got parameter 'f8' of dtype torch\.float8_e4m3fn"):
        opt.step_parameter(m.f8)
    assert not opt.state[m.f8]
    with pytest.raises(TypeError, match=r"fused=True: parameter\(s\) 'f8' \(torch\.float8_e4m3fn\)"):
        CompressedAccumulator(m, rank=4, tau=1, optimizer=Flora(m.parameters(), lr=1e-2, rank=4), fused=True,
                              exclude=["f8"])
    with pytest.raises(TypeError, match=r"parameter 'f8' is torch\.float8_e4m3fn: .*exclude=\['f8'\]"):
        CompressedAccumulator(m, rank=4, tau=2)
    CompressedAccumulator(m, rank=4, tau=2, exclude=["f8"])


@pytest.mark.parametrize("scale_parameter", [True, False])
def test_a_negative_eps2_is_not_told_that_0_is_allowed(scale_parameter):
    """The scale_parameter note belongs to eps[1] = 0 alone (mutation probe Z147)."""
    with pytest.raises(ValueError, match=r"eps\[1\] must be a finite real number") as e:
        Flora(_model().parameters(), lr=1e-3, eps=(1e-30, -1e-3), scale_parameter=scale_parameter)
    assert "scale_parameter" not in str(e.value)


def test_a_step_just_below_2_53_loads():
    """The bound is 2**53 itself (mutation probe Z147: 2**53 - 1 refused survived)."""
    model, opt, saved = _saved()
    sd = copy.deepcopy(saved)
    for s in sd["state"].values():
        s["step"] = 2 ** 53 - 1
    opt.load_state_dict(sd)
    assert all(s["step"] == 2 ** 53 - 1 for s in opt.state.values())
