"""Momentum, rounding, the relative-step schedule and the projection cache at their edges
(probe Z77, mutation testing: each case failed on a one-line mutant that every other test
passed)."""

from __future__ import annotations

import math

import pytest
import torch

import flora
from flora.cache import ProjectionCache, cache_projections
from flora.momentum import complement_scale, compressed_step_
from flora.projection import make_projection, make_projections, projection_seed
from flora.rounding import AFTER_STEP, AFTER_TRANSFER, stochastic_bfloat16

from _configs import extended


def test_lr_zero_with_no_clip_is_no_step():
    """clip_threshold=inf and lr=0 make the output clip's bound inf * 0, NaN: no step, as
    lr=0 means (a mutant that tested ``bound < 0`` stepped 3.1 there)."""
    torch.manual_seed(0)
    a = make_projection("orthonormal", 0, 4, 8)
    out = compressed_step_("exact", torch.randn(4, 6), torch.randn(8, 6), a, 0, 0.9, 0.0, math.inf, isometric=True)
    assert torch.equal(out, torch.zeros_like(out))
    for foreach in (False, True):
        w = torch.nn.Parameter(torch.randn(16, 8))
        opt = flora.Flora([w], lr=1e-2, rank=2, beta1=0.9, momentum_form="exact", clip_threshold=math.inf,
                          foreach=foreach, scale_parameter=False)
        w.grad = torch.randn_like(w)
        opt.step()
        opt.param_groups[0]["lr"] = 0.0
        before = w.detach().clone()
        w.grad = torch.randn_like(w)
        opt.step()
        assert torch.equal(w.detach(), before), foreach


def test_the_scaled_weight_of_a_zero_projected_update_is_one():
    assert complement_scale(1.0, 0.0, 1.0) == 1.0


def test_a_subspace_form_with_a_gaussian_projection_is_refused_by_name():
    with pytest.raises(ValueError, match="momentum_form 'subspace' needs a projection with orthonormal rows"):
        compressed_step_("subspace", torch.zeros(2, 6), torch.randn(8, 6), torch.randn(2, 8), 0, 0.9, 1e-2, 1.0,
                         isometric=False)


def test_the_relative_step_schedule_reports_the_most_stepped_parameter_of_a_group():
    """b got a gradient on the first of 5 steps only: the group's next relative step is
    a's, the 6th (warmup_init: 1e-6 t), not b's 2nd."""
    a, b, c = (torch.nn.Parameter(torch.randn(4, 4)) for _ in range(3))
    opt = flora.Flora([{"params": [a, b], "warmup_init": True}, {"params": [c], "lr": 1e-4}], lr=None)
    sched = flora.RelativeStepSchedule(opt)
    for i in range(5):
        a.grad, c.grad = torch.randn_like(a), torch.randn_like(c)
        b.grad = torch.randn_like(b) if i == 0 else None
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [pytest.approx(6e-6), 1e-4]


def test_the_two_roundings_of_a_step_draw_independent_noise():
    """After the resample's transfer and after the step a tensor is rounded to bfloat16
    with the same step key: the two salts keep their noise apart (one salt for both
    passed every test)."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    s, t = stochastic_bfloat16(x, 7, AFTER_STEP), stochastic_bfloat16(x, 7, AFTER_TRANSFER)
    assert torch.equal(s, stochastic_bfloat16(x, 7, AFTER_STEP))
    differ = (s != t).float().mean().item()
    assert 0.2 < differ < 0.8, differ  # rounded up with one and down with the other


def _draw(i, count, rank, size):
    return make_projections("orthonormal", [projection_seed(0, i, count)], rank, size)[0]


def test_a_bucket_of_cached_and_new_projections_caches_each_under_its_own_index():
    """Parameter 0 cached alone, then the bucket {0, 1}: 1 is drawn and cached alone (read
    as a new stack, entry 0 got 1's projection and the next step a stack of one)."""
    g = {"projection": "orthonormal", "seed": 0, "rank": 2, "cache_projections": True}
    cache = ProjectionCache()
    cache_projections(cache, g, [0], 0, 8, "cpu", torch.float32, stacked=True)
    both = cache_projections(cache, g, [0, 1], 0, 8, "cpu", torch.float32, stacked=True)
    assert torch.equal(both[0], _draw(0, 0, 2, 8)) and torch.equal(both[1], _draw(1, 0, 2, 8))
    again = cache_projections(cache, g, [0, 1], 0, 8, "cpu", torch.float32, stacked=True)
    assert again.shape == (2, 2, 8) and torch.equal(again, both)


def test_the_cache_keeps_only_what_its_entries_need():
    """A member that moves on leaves its stack: the others keep copies of their slices
    (the stack is freed); turning caching off empties the cache at the next step."""
    g = {"projection": "orthonormal", "seed": 0, "rank": 4, "cache_projections": True}
    one = 4 * 256 * 4  # an r x d float32 projection
    cache = ProjectionCache()
    cache_projections(cache, g, [0], 0, 256, "cpu", torch.float32, stacked=True)
    cache_projections(cache, g, [0, 1, 2], 0, 256, "cpu", torch.float32, stacked=True)
    cache_projections(cache, g, [1], 1, 256, "cpu", torch.float32, stacked=True)
    assert cache.nbytes() == 3 * one
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(32, 16)) for _ in range(2)]
    opt = flora.Flora(ps, lr=1e-2, rank=4, beta1=0.9, foreach=True)
    for step in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        if step == 0:
            assert opt.projection_cache.nbytes() > 0
            opt.param_groups[0]["cache_projections"] = False
    assert len(opt.projection_cache) == 0 and opt.projection_cache.nbytes() == 0


# Compiled (2-3 s a case on 2 cores) on one case per tensor, each form and path among
# them; FLORA_TEST_ALL=1 compiles all twelve.
_COMPILED_KEPT = {("exact", True, "channels_last"), ("paper", False, "bfloat16"), ("paper", True, "float32")}


@pytest.mark.parametrize("form,foreach,compile,tensor", [
    (f, e, c, t) if not c or (f, e, t) in _COMPILED_KEPT else extended(f, e, c, t, id=f"{f}-{e}-{c}-{t}")
    for f in ("exact", "paper") for e in (False, True) for c in (False, "aot_eager")
    for t in ("float32", "bfloat16", "channels_last")])
def test_a_momentum_grown_past_float32_restarts_without_a_step(form, foreach, compile, tensor):
    """A Gaussian projection redrawn every step at beta1 = 0.99 grows the compressed
    momentum about sqrt(d / r) times a step (Flora warns of it). Once its squared norm
    overflowed (inf - inf: a NaN RMS) the clip after decompression was skipped and the
    weights moved by 1e25, then went NaN (probe Z118); zeroing that step alone still let an
    infinite momentum turn them NaN (0 * inf: review Z122). Now such a step is none, the
    momentum restarts from 0, and training goes on: every step at most lr * clip_threshold
    in RMS, the weights finite, steps taken again after the restart. On a float32 matrix,
    a bfloat16 one (its steps measured through bfloat16 weights: within 10% of the bound)
    and a channels_last 1x1 convolution kernel."""
    import warnings

    torch.manual_seed(0)
    w = torch.randn(256, 128) * 0.02
    if tensor == "bfloat16":
        w = w.to(torch.bfloat16)
    elif tensor == "channels_last":
        w = w.view(256, 128, 1, 1).contiguous(memory_format=torch.channels_last)
    p = torch.nn.Parameter(w)
    bound = 1e-3 * (1.1 if tensor == "bfloat16" else 1 + 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = flora.Flora([p], lr=1e-3, scale_parameter=False, rank=2, beta1=0.99, kappa=1, projection="gaussian",
                          momentum_form=form, foreach=foreach, compile=compile)
    big, moved, restarts = 0.0, [], 0
    for _ in range(70):
        p.grad = torch.randn_like(p)  # in p's dtype and memory layout
        before = p.detach().clone()
        opt.step()
        assert torch.isfinite(p).all()
        rms = (p.detach().double() - before.double()).square().mean().sqrt().item()
        assert rms <= bound, rms
        moved.append(rms > 0)
        c = opt.state[p]["exp_avg_c"].float()
        assert torch.isfinite(c).all()
        restarts += int(big > 1e12 and c.abs().max().item() < 1.0)  # |c| squared over float32: restarted
        big = c.abs().max().item()
    assert restarts >= 1  # the regime was reached and the momentum restarted
    assert moved[-5:] == [True] * 5  # and steps are taken again
