"""A model and its optimizer changing during training: parameters moved between groups,
taken out of them, resized between backward() and step() (found by a new-user probe of
the optimizer's lifecycle, 2026-12-04). Each case is either stepped correctly or refused
before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flora

KW = dict(lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, kappa=3)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for p, st in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    for p, st in opt.state.items():
        for k, v in st.items():
            was = state[id(p)][k]
            assert torch.equal(v, was) if isinstance(v, torch.Tensor) else v == was, k


@pytest.mark.parametrize("how", ["add_param_group", "group_replaced"])
@pytest.mark.parametrize("option", [("seed", 123), ("projection", "coordinates")])
def test_a_parameter_moved_into_a_group_of_another_seed_or_projection_is_refused(how, option):
    """Its compressed momentum was made under the old group's projections: read under the
    new group's, it would be scrambled (the probe: a cosine of 0.11 between the next
    update with and without the move). An in-place edit of the group was refused; a move
    was not. Refused now, naming the option, before any change."""
    name, value = option
    model = _mlp()
    opt = flora.Flora(model.parameters(), **KW)
    _train(model, opt, 3)
    w = model[2].weight
    if how == "add_param_group":
        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not w]
        opt.add_param_group({"params": [w], name: value})
    else:
        opt.param_groups[0] = {**opt.param_groups[0], name: value}
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        _train(model, opt, 1, start=3)
    _assert_unchanged(model, opt, snap)


def test_a_parameter_moved_into_a_group_of_the_same_layout_steps_as_before():
    """Moving a parameter into a group of other lr (not of other projections) is fine: it
    steps as it would have with that lr in its old group."""
    runs = []
    for move in (False, True):
        model = _mlp()
        opt = flora.Flora(model.parameters(), **KW)
        _train(model, opt, 3)
        w = model[2].weight
        if move:
            opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not w]
            opt.add_param_group({"params": [w]})
        _train(model, opt, 4, start=3)
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-6)


def test_new_states_never_share_a_projection_index():
    """A new state took its position as its index, which a live state may hold (a
    parameter taken out of a group's list after its state began): two parameters then
    drew the same projections, and the grouped path failed with a KeyError in the
    projection cache after the resample counters had moved. A new state takes a free
    index now."""
    a, b, c = (nn.Parameter(torch.randn(32, 32) * 0.1) for _ in range(3))
    opt = flora.Flora([a, b, c], lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, kappa=2, foreach=True)

    def step(params, t):
        g = torch.Generator().manual_seed(t)
        for p in (a, b, c):
            p.grad = torch.randn(32, 32, generator=g) if any(p is q for q in params) else None
        opt.step()

    for t in range(2):
        step((a, b), t)
    opt.param_groups[0]["params"].remove(a)
    opt.state.pop(a)
    for t in range(2, 4):
        step((c,), t)  # c's state begins at position 1, b's index: 1 + 2 (two parameters in the groups)
    assert (opt.state[b]["index"], opt.state[c]["index"]) == (1, 3)
    for t in range(4, 8):  # two resamples, b and c in one bucket
        step((b, c), t)
    assert opt.state[b]["step"] == 6 and opt.state[c]["step"] == 6
    indices = [r["index"] for r in opt.plan()]
    assert len(set(indices)) == len(indices)


def test_a_gradient_of_another_shape_is_refused_before_any_change():
    """A parameter resized between backward() and its first step: the step failed half-way
    (every other parameter stepped, then a reshape error), and the next step's message
    said it was resized after its first step. Refused now, before any change."""
    model = _mlp()
    opt = flora.Flora(model.parameters(), **KW)
    _train(model, opt, 2)
    new = nn.Parameter(torch.randn(8, 6))
    opt.add_param_group({"params": [new]})
    g = torch.Generator().manual_seed(9)
    ((model(torch.randn(2, 16, generator=g))) ** 2).mean().backward()
    new.grad = torch.randn(8, 6)
    new.data = torch.randn(10, 6)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"shape \(10, 6\) has a gradient of shape \(8, 6\)"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert not opt.state.get(new)


@pytest.mark.parametrize("foreach, compile", [(False, None), (True, None), (None, None), (True, "aot_eager")])
def test_module_conversion_by_swapping_works_once_flora_has_stepped(foreach, compile):
    """Under torch.__future__.set_swap_module_params_on_conversion(True) (and for tensor-
    subclass parameters, always) model.to(...) and load_state_dict swap each parameter's
    contents with torch.utils.swap_tensors, which refuses a tensor that has a weak
    reference: Flora's step counters and step_parameter's map held one, so the model could
    not be converted once Flora had stepped (a probe). They hold none now; the run then
    steps as the same run converted in place."""
    def run(swap):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 4))
        opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9, kappa=2, foreach=foreach, compile=compile)
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(8, 12, generator=g) for _ in range(6)]
        before = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            for i, x in enumerate(xs):
                if i == 3:
                    model.to(torch.float64)
                    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
                model(x.to(next(model.parameters()).dtype)).square().mean().backward()
                opt.step()
                opt.zero_grad()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(before)
        return [p.detach().clone() for p in model.parameters()]

    swapped, in_place = run(True), run(False)
    assert all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(swapped, in_place))
