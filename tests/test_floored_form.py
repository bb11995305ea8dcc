"""The ``"floored"`` momentum form: ``"scaled"`` with its complement weight never below
``complement_weight`` (None: ``flora.momentum.FIXED_COMPLEMENT_WEIGHT``):
``phi = max(w, min(1, |M| / ((1 - beta1^t) |C(u)|)))``.

Its identities (floor 0 is ``"scaled"`` bit for bit, floor 1 ``"subspace"``), the
one-pass step against the plain reference ``floored_momentum_`` with both clips, where
the floor binds (noise) and where it does not (a constant gradient; the noiseless least
squares converges as with ``"scaled"``), validation and a bit-exact checkpoint resume.
Every stepping path runs the form with a floor of its own through the tables of
``tests/_configs.py``. Helpers are those of tests/test_fixed_form.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora import Flora
from flora.adafactor import clip_by_rms_
from flora.momentum import (FIXED_COMPLEMENT_WEIGHT, MOMENTUM_FORMS, SUBSPACE_FORMS, WEIGHTED_FORMS,
                            compressed_step_, floored_momentum_, scaled_momentum_)
from flora.projection import make_projection

from _configs import step_on_noise
from test_fixed_form import BETA1, OPTS, _assert_close_runs, _params, _run, resume_restores_the_weight
from test_flora import _regression_loss_ratio, one_thread  # noqa: F401 - one_thread: a fixture

PROJECTIONS = ["orthonormal", "coordinates"]


def test_the_form_and_its_default_floor():
    assert "floored" in MOMENTUM_FORMS and "floored" in SUBSPACE_FORMS and "floored" in WEIGHTED_FORMS
    assert Flora.__init__.__kwdefaults__["momentum_form"] == "floored"  # the default since 2026-12-01
    default = _run(momentum_form="floored")
    explicit = _run(momentum_form="floored", complement_weight=FIXED_COMPLEMENT_WEIGHT)
    assert default[1].param_groups[0]["complement_weight"] is None
    _assert_close_runs(default, explicit, rtol=0)


# ------------------------------------------------------------------ identities


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_floor_zero_is_scaled_bit_for_bit(projection, foreach):
    got = _run(momentum_form="floored", complement_weight=0.0, projection=projection, foreach=foreach)
    want = _run(momentum_form="scaled", projection=projection, foreach=foreach)
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    _assert_close_runs(got, want, rtol=0)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_floor_one_is_subspace(projection, foreach):
    _assert_close_runs(_run(momentum_form="floored", complement_weight=1.0, projection=projection, foreach=foreach),
                       _run(momentum_form="subspace", projection=projection, foreach=foreach))


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_on_noise_the_floor_binds(foreach):
    """Gradients of independent noise: the scaled weight falls to about
    sqrt((1 - beta1) / (1 + beta1)) = 0.23, under the floor 0.4, and the run leaves
    "scaled" by far more than rounding (and "fixed" 0.4 too: the first step's weight is 1)."""
    floored = _run(steps=8, momentum_form="floored", foreach=foreach)
    scaled = _run(steps=8, momentum_form="scaled", foreach=foreach)
    fixed = _run(steps=8, momentum_form="fixed", complement_weight=FIXED_COMPLEMENT_WEIGHT, foreach=foreach)
    start = _params()
    for f, s, x, p0 in zip(floored[0], scaled[0], fixed[0], start):
        if p0.dim() < 2:  # dense: every form alike
            assert torch.equal(f, s)
            continue
        moved = (f - p0).abs().max().item()
        assert (f - s).abs().max().item() > 1e-2 * moved
        assert (f - x).abs().max().item() > 1e-5 * moved


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_on_a_constant_gradient_the_floor_does_not_bind(projection, foreach):
    """A constant gradient (no resample): the momentum is (1 - beta1^t) C(u), the scaled
    weight 1, above any floor: the run is "scaled"'s bit for bit, and not "fixed"'s."""
    def run(**kw):
        params = _params()
        opt = Flora(params, **{**OPTS, "kappa": 100, "projection": projection, "foreach": foreach, **kw})
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
        for _ in range(6):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        return params

    floored, scaled = run(momentum_form="floored", complement_weight=0.9), run(momentum_form="scaled")
    fixed = run(momentum_form="fixed", complement_weight=0.9)
    for f, s, x in zip(floored, scaled, fixed):
        assert torch.equal(f, s)
        if f.dim() >= 2:
            assert not torch.equal(f, x)


def test_a_noiseless_least_squares_converges_as_with_scaled(one_thread):  # noqa: F811 - the fixture
    """The full-batch least squares of tests/test_flora.py at rank 8: "scaled" reaches
    5.2e-6 of the starting loss, "fixed" 0.4 only 1.6e-2; "floored" (floor 0.4) reaches
    "scaled"'s figure (measured 5.2e-6): its weight goes to 1 where gradients agree."""
    assert _regression_loss_ratio(8, momentum_form="floored") < 1e-4


# ------------------------------------------------------------------ one pass == reference


@pytest.mark.parametrize("phi", [None, 0.0, 0.3, 1.0])
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("lr", [1e-2, 10.0])  # 10.0: the post-decompression clip is inactive
def test_one_pass_step_equals_the_reference_with_both_clips(lr, dim, projection, phi):
    """``compressed_step_("floored")`` == Adafactor's clip and lr, ``floored_momentum_``,
    then the clip to RMS ``lr * clip_threshold``; a stack of three matrices (the grouped
    path's batched call) equals each matrix stepped alone. The momenta are sized so that
    the scaled weight is below the floor for some matrices and above it for others."""
    torch.manual_seed(0)
    k, n, m, r = 3, 12, 30, 4
    d, bias = (n, m)[dim], 0.5
    a = torch.stack([make_projection(projection, s, r, d) for s in range(k)])
    c0 = torch.randn(k, r, m) if dim == 0 else torch.randn(k, n, r)
    c0 *= torch.tensor([0.0, 0.3, 30.0]).view(k, 1, 1) * lr / (n * m) ** 0.5  # small, middling, large momenta
    u = torch.randn(k, n, m) * 3
    floor = FIXED_COMPLEMENT_WEIGHT if phi is None else phi
    c_stack = c0.clone()
    got_stack = compressed_step_("floored", c_stack, u.clone(), a, dim, BETA1, lr, 1.0, isometric=True,
                                 bias_correction=bias, complement_weight=phi)
    bound = []
    for i in range(k):
        c1, c2, c3 = c0[i].clone(), c0[i].clone(), c0[i].clone()
        got = compressed_step_("floored", c1, u[i].clone(), a[i], dim, BETA1, lr, 1.0, isometric=True,
                               bias_correction=bias, complement_weight=phi)
        ref_u = clip_by_rms_(u[i].clone(), 1.0).mul_(lr)
        want = clip_by_rms_(floored_momentum_(c2, ref_u.clone(), a[i], dim, BETA1, bias, floor), lr)
        scaled = clip_by_rms_(scaled_momentum_(c3, ref_u.clone(), a[i], dim, BETA1, bias), lr)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale
        assert (c1 - c2).abs().max().item() <= 1e-5 * c2.abs().max().item()
        assert (got_stack[i] - got).abs().max().item() <= 1e-6 * scale
        assert (c_stack[i] - c1).abs().max().item() <= 1e-6 * c1.abs().max().item()
        bound.append((want - scaled).abs().max().item() > 1e-3 * scale)
    if 0.0 < floor < 1.0:  # the floor binds for the small momentum, not for the large one
        assert bound[0] and not bound[2]


def test_reference_identities():
    """floored_momentum_ with floor 0 is scaled_momentum_ exactly; with a floor above the
    scaled weight, the update is the fixed form's at that weight."""
    from flora.momentum import fixed_momentum_

    torch.manual_seed(0)
    a = make_projection("orthonormal", 1, 4, 12)
    u, c0 = torch.randn(12, 30), torch.zeros(4, 30)  # the scaled weight: (1 - beta) / bias = 0.2
    c1, c2, c3, c4 = (c0.clone() for _ in range(4))
    assert torch.equal(floored_momentum_(c1, u.clone(), a, 0, BETA1, 0.5, 0.0),
                       scaled_momentum_(c2, u.clone(), a, 0, BETA1, 0.5))
    torch.testing.assert_close(floored_momentum_(c3, u.clone(), a, 0, BETA1, 0.5, 0.7),
                               fixed_momentum_(c4, u.clone(), a, 0, BETA1, 0.7))
    torch.testing.assert_close(c3, c4)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kw,exc,match", [
    (dict(complement_weight=1.5), ValueError, r"complement_weight must be a real number in \[0.0, 1.0\] or None"),
    (dict(complement_weight=-0.1), ValueError, r"complement_weight must be a real number"),
    (dict(complement_weight=True), TypeError, r"complement_weight must be a real number"),
    (dict(projection="gaussian"), ValueError, r"momentum_form='floored' needs projection='orthonormal'"),
], ids=["above-1", "below-0", "bool", "gaussian"])
def test_bad_floors_are_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        Flora(_params(), **{**OPTS, "momentum_form": "floored", **kw})
    params, opt = _run(steps=2, momentum_form="floored", complement_weight=0.3)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(12, 20))], "momentum_form": "floored", **kw})
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_a_floor_is_accepted_and_another_form_names_it():
    opt = Flora(_params(), **{**OPTS, "momentum_form": "floored", "complement_weight": 0.3})
    assert (opt.param_groups[0]["momentum_form"], opt.param_groups[0]["complement_weight"]) == ("floored", 0.3)
    with pytest.raises(ValueError, match="the weight of momentum_form='fixed' or 'floored' only"):
        Flora(_params(), **{**OPTS, "momentum_form": "scaled", "complement_weight": 0.3})


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_checkpoint_resumes_bit_exactly_and_restores_the_floor(foreach):
    """Saved with floor 0.3 and read back with weights_only=True into a Flora of the
    default form: the floored form and its floor come back, and training resumes bit for bit."""
    resume_restores_the_weight("floored", "fixed", foreach)


def test_groups_may_mix_floors_and_forms():
    """A floored group beside a fixed one: each steps as an optimizer of its own options."""
    params = _params()
    opt = Flora([{"params": params[:2], "momentum_form": "floored", "complement_weight": 0.3},
                 {"params": params[2:], "momentum_form": "fixed", "complement_weight": 0.25}], **OPTS)
    step_on_noise(opt, params, 5)
    floored, _ = _run(momentum_form="floored", complement_weight=0.3)
    fixed, _ = _run(momentum_form="fixed", complement_weight=0.25)
    for i, p in enumerate(params):
        assert torch.equal(p, (floored if i < 2 else fixed)[i])
