"""The ``"fixed"`` momentum form: ``D(M) + phi (u - D(C(u)))`` with a constant ``phi``
(``complement_weight``; None: ``flora.momentum.FIXED_COMPLEMENT_WEIGHT``).

Its identities with the other forms (``phi = 1 - beta1`` is ``"exact"``, ``phi = 1`` is
``"subspace"``), the one-pass step against the plain reference ``fixed_momentum_`` with
both clips, the option's validation (before anything changes), and checkpoints (a
bit-exact resume, ``weights_only``, a state saved before the option existed). Every
stepping path runs the form with a weight of its own through the tables of
``tests/_configs.py`` (tests/test_paths.py, test_grouped.py, test_compile.py,
dist_scenarios.py)."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from flora import Flora, flora_state_bytes, state_bytes
from flora.adafactor import clip_by_rms_
from flora.momentum import (FIXED_COMPLEMENT_WEIGHT, MOMENTUM_FORMS, SUBSPACE_FORMS, compressed_step_,
                            fixed_momentum_, fixed_weight)
from flora.projection import make_projection

from _configs import step_on_noise

BETA1 = 0.9
OPTS = dict(lr=1e-2, rank=3, beta1=BETA1, kappa=2, seed=5, scale_parameter=False)
SHAPES = [(12, 20), (12, 20), (20, 12), (20,)]  # a bucket of two, the other projected dim, a dense 1-D


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _run(steps=5, **kw):
    """``steps`` steps (kappa=2: resamples) of a fixed draw of gradients."""
    params = _params()
    opt = Flora(params, **{**OPTS, **kw})
    step_on_noise(opt, params, steps)
    return params, opt


def _assert_close_runs(a, b, *, rtol=1e-5):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        scale = y.detach().abs().max().item()
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=rtol * scale)
        for k, v in ob.state[y].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(oa.state[x][k], v, rtol=rtol, atol=rtol * v.abs().max().item() + 1e-30)
            else:
                assert oa.state[x][k] == v, k


def test_a_weight_alone_sets_the_default_form():
    """The default form is "floored": ``complement_weight=`` alone is its floor."""
    _assert_close_runs(_run(complement_weight=0.3), _run(momentum_form="floored", complement_weight=0.3), rtol=0)
    _assert_close_runs(_run(), _run(momentum_form="floored", complement_weight=FIXED_COMPLEMENT_WEIGHT), rtol=0)


def test_the_form_and_its_default_weight():
    assert "fixed" in MOMENTUM_FORMS and "fixed" in SUBSPACE_FORMS
    assert FIXED_COMPLEMENT_WEIGHT == 0.4 and fixed_weight(None) == 0.4 and fixed_weight(0.25) == 0.25
    assert Flora.__init__.__kwdefaults__["complement_weight"] is None
    assert Flora.__init__.__kwdefaults__["momentum_form"] == "floored"  # the default form since 2026-12-01


# ------------------------------------------------------------------ identities


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("projection", ["orthonormal", "coordinates"])
def test_weight_one_minus_beta1_is_exact(projection, foreach):
    _assert_close_runs(_run(momentum_form="fixed", complement_weight=1 - BETA1, projection=projection, foreach=foreach),
                       _run(momentum_form="exact", projection=projection, foreach=foreach))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("projection", ["orthonormal", "coordinates"])
def test_weight_one_is_subspace(projection, foreach):
    _assert_close_runs(_run(momentum_form="fixed", complement_weight=1.0, projection=projection, foreach=foreach),
                       _run(momentum_form="subspace", projection=projection, foreach=foreach))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_no_weight_is_the_module_default_and_the_weight_matters(foreach):
    """None steps exactly as FIXED_COMPLEMENT_WEIGHT; another weight steps otherwise."""
    default, explicit = _run(momentum_form="fixed", foreach=foreach), _run(
        momentum_form="fixed", complement_weight=FIXED_COMPLEMENT_WEIGHT, foreach=foreach)
    assert default[1].param_groups[0]["complement_weight"] is None
    for a, b in zip(default[0], explicit[0]):
        assert torch.equal(a, b)
    other = _run(momentum_form="fixed", complement_weight=0.25, foreach=foreach)
    assert not torch.equal(other[0][0], default[0][0])


def test_weight_zero_moves_inside_the_subspace_only():
    """phi = 0: the update is D(M), in the span of the projection's rows (dim 0: the
    columns of A^T), whatever the gradient outside it."""
    torch.manual_seed(0)
    a = make_projection("orthonormal", 3, 4, 12)
    c = torch.randn(4, 30)
    out = compressed_step_("fixed", c, torch.randn(12, 30), a, 0, BETA1, 1e-2, 1.0, isometric=True,
                           complement_weight=0.0)
    outside = out - a.T @ (a @ out)
    assert outside.abs().max().item() <= 1e-6 * out.abs().max().item()


# ------------------------------------------------------------------ one pass == reference


@pytest.mark.parametrize("phi", [None, 0.0, 0.25, 1.0])
@pytest.mark.parametrize("projection", ["orthonormal", "coordinates"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("lr", [1e-2, 10.0])  # 10.0: the post-decompression clip is inactive
def test_one_pass_step_equals_the_reference_with_both_clips(lr, dim, projection, phi):
    """``compressed_step_("fixed")`` == Adafactor's clip and lr, ``fixed_momentum_``,
    then the clip to RMS ``lr * clip_threshold``; a stack of three matrices (the grouped
    path's batched call) equals each matrix stepped alone."""
    torch.manual_seed(0)
    k, n, m, r = 3, 12, 30, 4
    d = (n, m)[dim]
    a = torch.stack([make_projection(projection, s, r, d) for s in range(k)])
    c0 = torch.randn(k, r, m) if dim == 0 else torch.randn(k, n, r)
    u = torch.randn(k, n, m) * 3
    weight = fixed_weight(phi)
    c_stack = c0.clone()
    got_stack = compressed_step_("fixed", c_stack, u.clone(), a, dim, BETA1, lr, 1.0, isometric=True,
                                 complement_weight=phi)
    for i in range(k):
        c1, c2 = c0[i].clone(), c0[i].clone()
        got = compressed_step_("fixed", c1, u[i].clone(), a[i], dim, BETA1, lr, 1.0, isometric=True,
                               complement_weight=phi)
        ref_u = clip_by_rms_(u[i].clone(), 1.0).mul_(lr)
        want = clip_by_rms_(fixed_momentum_(c2, ref_u, a[i], dim, BETA1, weight), lr)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale
        assert (c1 - c2).abs().max().item() <= 1e-5 * c2.abs().max().item()
        assert (got_stack[i] - got).abs().max().item() <= 1e-6 * scale
        assert (c_stack[i] - c1).abs().max().item() <= 1e-6 * c1.abs().max().item()


def test_reference_identities():
    """fixed_momentum_ with phi = 1 - beta is exact_momentum_'s update, with phi = 1
    subspace_momentum_'s (orthonormal rows)."""
    from flora.momentum import exact_momentum_, subspace_momentum_

    torch.manual_seed(0)
    a = make_projection("orthonormal", 1, 4, 12)
    u, c0 = torch.randn(12, 30), torch.randn(4, 30)
    for phi, plain in ((1 - BETA1, exact_momentum_), (1.0, subspace_momentum_)):
        c1, c2 = c0.clone(), c0.clone()
        torch.testing.assert_close(fixed_momentum_(c1, u.clone(), a, 0, BETA1, phi), plain(c2, u.clone(), a, 0, BETA1),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c1, c2)


# ------------------------------------------------------------------ validation

BAD = [
    (dict(momentum_form="fixed", complement_weight=1.5), ValueError,
     r"complement_weight must be a real number in \[0.0, 1.0\] or None, got 1.5"),
    (dict(momentum_form="fixed", complement_weight=-0.1), ValueError, r"complement_weight must be a real number"),
    (dict(momentum_form="fixed", complement_weight=float("nan")), ValueError, "complement_weight"),
    (dict(momentum_form="fixed", complement_weight=True), TypeError,
     r"complement_weight must be a real number in \[0.0, 1.0\] or None, got True \(bool\)"),
    (dict(momentum_form="fixed", complement_weight=torch.tensor(0.3)), TypeError, "complement_weight"),
    (dict(momentum_form="scaled", complement_weight=0.3), ValueError,
     r"complement_weight=0.3 is the weight of momentum_form='fixed' or 'floored' only; "
     r"got momentum_form='scaled' \(forms "
     r"'paper', 'exact', 'subspace', 'scaled', 'adaptive' set their own, and take complement_weight=None\)"),
    (dict(momentum_form="exact", projection="gaussian", complement_weight=0.1), ValueError,
     "momentum_form='exact'"),
    (dict(momentum_form="fixed", projection="gaussian"), ValueError,
     r"momentum_form='fixed' needs projection='orthonormal' or 'coordinates'.*got projection='gaussian'"),
]
BAD_IDS = ["above-1", "below-0", "nan", "bool", "tensor", "with-scaled", "with-exact", "gaussian"]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=BAD_IDS)
def test_bad_options_are_refused_by_the_constructor(kw, exc, match):
    with pytest.raises(exc, match=match):
        Flora(_params(), **{**OPTS, **kw})
    with pytest.raises(exc, match=match):  # in a parameter group of its own
        Flora([{"params": _params()[:1], **kw}, {"params": _params()[1:]}], **OPTS)


@pytest.mark.parametrize("kw,exc,match", BAD, ids=BAD_IDS)
def test_bad_group_is_refused_before_any_change(kw, exc, match):
    """add_param_group refuses the group and leaves the optimizer as it was; the same
    options edited into a group are refused by step() before a parameter or state moves;
    a checkpoint whose groups hold them is refused by load_state_dict, the state unchanged."""
    params, opt = _run(steps=3, momentum_form="fixed", complement_weight=0.25)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(12, 20))], **kw})
    assert len(opt.param_groups) == 1
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups

    bad_sd = copy.deepcopy(sd)
    bad_sd["param_groups"][0].update(kw)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(bad_sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups

    before = [p.detach().clone() for p in params]
    opt.param_groups[0].update(kw)
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(exc, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    after = torch.optim.Optimizer.state_dict(opt)["state"]  # Flora's refuses a layout edit too
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(after[i][k], v) if isinstance(v, torch.Tensor) else after[i][k] == v


@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
def test_a_group_of_another_form_does_not_inherit_the_constructors_weight(how):
    """complement_weight given to the constructor is its weighted form's: a group that sets
    a form without a weight (and no weight) gets None, and steps as that form alone; a
    group that sets both is refused (test_bad_options_are_refused_by_the_constructor)."""
    params = _params()
    groups = [{"params": params[:2]}, {"params": params[2:], "momentum_form": "exact"}]
    kw = {**OPTS, "momentum_form": "fixed", "complement_weight": 0.25}
    if how == "constructor":
        opt = Flora(groups, **kw)
    else:
        opt = Flora(groups[:1], **kw)
        opt.add_param_group(groups[1])
    assert [(g["momentum_form"], g["complement_weight"]) for g in opt.param_groups] == [("fixed", 0.25),
                                                                                         ("exact", None)]
    step_on_noise(opt, params, 5)
    fixed, _ = _run(momentum_form="fixed", complement_weight=0.25)
    exact, _ = _run(momentum_form="exact")
    for i, p in enumerate(params):
        assert torch.equal(p, (fixed if i < 2 else exact)[i])


def test_groups_may_mix_weights_and_forms():
    """One group of the fixed form with a weight of its own beside a group of another
    form: each steps as an optimizer of its own options."""
    params = _params()
    opt = Flora([{"params": params[:2], "momentum_form": "fixed", "complement_weight": 0.25},
                 {"params": params[2:]}], **{**OPTS, "momentum_form": "scaled"})
    assert [g["complement_weight"] for g in opt.param_groups] == [0.25, None]
    assert [g["momentum_form"] for g in opt.param_groups] == ["fixed", "scaled"]
    step_on_noise(opt, params, 5)
    fixed, _ = _run(momentum_form="fixed", complement_weight=0.25)
    scaled, _ = _run(momentum_form="scaled")
    for i, p in enumerate(params):
        assert torch.equal(p, (fixed if i < 2 else scaled)[i])


def test_state_bytes_are_those_of_the_other_forms():
    (_, fixed), (_, scaled) = _run(momentum_form="fixed", complement_weight=0.25), _run(momentum_form="scaled")
    assert state_bytes(fixed) == state_bytes(scaled) == flora_state_bytes(
        SHAPES, rank=3, beta1=BETA1, momentum_form="fixed", complement_weight=0.25)


# ------------------------------------------------------------------ checkpoints


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 12), nn.Flatten(), nn.Linear(12 * 4, 20), nn.ReLU(), nn.Linear(20, 5))


def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 50, (8, 4), generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


CKPT = dict(lr=1e-2, rank=3, beta1=BETA1, kappa=3, seed=5)


def _through_weights_only(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def resume_restores_the_weight(form: str, into: str, foreach: bool) -> None:
    """A run of ``form`` with complement_weight 0.3 saved mid-way through a kappa window,
    read back with weights_only=True and loaded into a Flora built with the form ``into``:
    the groups take the checkpoint's form and weight (a warning names both changes), and
    training resumes bit for bit as the run that never stopped. (Also tests/test_floored_form.py's.)"""
    kw = dict(CKPT, foreach=foreach)
    batches = _batches(8)
    ref = _net()
    _train(ref, Flora(ref.parameters(), momentum_form=form, complement_weight=0.3, **kw), batches)
    model = _net()
    opt = Flora(model.parameters(), momentum_form=form, complement_weight=0.3, **kw)
    _train(model, opt, batches[:4])
    ckpt = _through_weights_only({"model": model.state_dict(), "opt": opt.state_dict()})
    assert [(g["momentum_form"], g["complement_weight"]) for g in ckpt["opt"]["param_groups"]] == [(form, 0.3)]
    model2 = _net()
    opt2 = Flora(model2.parameters(), momentum_form=into, **kw)
    model2.load_state_dict(ckpt["model"])
    with pytest.warns(UserWarning, match=rf"momentum_form: '{into}' -> '{form}'.*complement_weight: None -> 0.3"):
        opt2.load_state_dict(ckpt["opt"])
    assert (opt2.param_groups[0]["momentum_form"], opt2.param_groups[0]["complement_weight"]) == (form, 0.3)
    _train(model2, opt2, batches[4:])
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_checkpoint_resumes_bit_exactly_and_restores_the_weight(foreach):
    """Saved with complement_weight 0.3 and loaded into a Flora of the "scaled" form:
    :func:`resume_restores_the_weight`."""
    resume_restores_the_weight("fixed", "scaled", foreach)


def test_checkpoint_without_the_option_loads_with_none():
    """A state saved before complement_weight existed (its groups lack the key) loads with
    None, silently into a Flora of the same options, and resumes bit for bit."""
    batches = _batches(8)
    ref = _net()
    _train(ref, Flora(ref.parameters(), **CKPT), batches)
    model = _net()
    opt = Flora(model.parameters(), **CKPT)
    _train(model, opt, batches[:4])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["complement_weight"]  # as saved before the option existed
    ckpt = _through_weights_only({"model": model.state_dict(), "opt": sd})
    model2 = _net()
    opt2 = Flora(model2.parameters(), **CKPT)
    model2.load_state_dict(ckpt["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(ckpt["opt"])
    assert "complement_weight" in opt2.param_groups[0] and opt2.param_groups[0]["complement_weight"] is None
    _train(model2, opt2, batches[4:])
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_without_the_option_into_a_fixed_optimizer():
    """Loaded into a Flora built with the fixed form and a weight, an old state's groups
    take the saved form and None (a warning names the change): the loaded options win.
    (A state saved before 2026-12-01 with the then default form "scaled".)"""
    model = _net()
    opt = Flora(model.parameters(), momentum_form="scaled", **CKPT)
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["complement_weight"]
    opt2 = Flora(_net().parameters(), momentum_form="fixed", complement_weight=0.3, **CKPT)
    with pytest.warns(UserWarning, match="complement_weight: 0.3 -> None"):
        opt2.load_state_dict(sd)
    assert (opt2.param_groups[0]["momentum_form"], opt2.param_groups[0]["complement_weight"]) == ("scaled", None)


def test_old_pickle_gets_none():
    """An optimizer pickled before the option existed (no complement_weight in its groups
    or defaults) unpickles with None in both, steps, and takes new groups."""
    params, opt = _run(steps=2)
    for g in opt.param_groups:
        del g["complement_weight"]
    del opt.defaults["complement_weight"]
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2.param_groups[0]["complement_weight"] is None and opt2.defaults["complement_weight"] is None
    for p in opt2.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt2.step()
    opt2.add_param_group({"params": [nn.Parameter(torch.randn(6, 8))], "momentum_form": "fixed",
                          "complement_weight": 0.5})
    assert opt2.param_groups[-1]["complement_weight"] == 0.5


def test_deepcopy_and_pickle_keep_the_weight():
    params, opt = _run(steps=2, momentum_form="fixed", complement_weight=0.25)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.param_groups[0]["complement_weight"] == 0.25 and other.defaults["complement_weight"] == 0.25
