"""Flora's class at its edges (probe Z75: one-line mutations of optimizer.py, checkpoint.py,
reports.py that no test had noticed, and one bug). Each case is a user's sequence where the
mutant answered otherwise: a skip count read twice, a group added with another optimizer's
keys, an SGD habit edited in, plan() after a state lookup, a parameter moved between groups
of other seeds, a frozen parameter's group edited, a damaged checkpoint."""

import copy
import warnings

import pytest
import torch
from torch import nn

from flora import Flora


def _nan(p):
    p.grad = torch.full(p.shape, float("nan"))


def test_a_skip_count_read_earlier_keeps_its_value():
    """nonfinite_skips is a copy: on one device it had been the live counter, so a count
    read after one skipped step read 2 after the next (the difference of two reads was 0)
    and an in-place edit of it reset the optimizer's count."""
    p = nn.Parameter(torch.randn(8, 8))
    opt = Flora([p], lr=1e-2)
    _nan(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
        before = opt.nonfinite_skips
        _nan(p)
        opt.step()
    after = opt.nonfinite_skips
    assert before.item() == 1 and after.item() == 2 and (after - before).item() == 1
    after.zero_()
    assert opt.nonfinite_skips.item() == 2


def test_a_group_added_with_another_optimizers_keys_is_warned_once():
    """add_param_group({"betas": ...}) warns at the add and not again at the steps (the
    mutant forgot it had warned and said it again at the first step)."""
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    opt = Flora([a], lr=1e-2)
    with pytest.warns(UserWarning, match="betas"):
        opt.add_param_group({"params": [b], "betas": (0.9, 0.999)})
    a.grad, b.grad = torch.randn(8, 8), torch.randn(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        opt.step()


def test_a_numeric_momentum_edited_into_a_group_is_refused_before_any_change():
    """``param_groups[0]["momentum"] = 0.9`` (an SGD habit) mid-run, with no other foreign
    key: refused at the next step, naming it, the parameter unchanged (the existing test
    also had ``betas`` in the group, which refused it by itself)."""
    a = nn.Parameter(torch.randn(8, 8))
    opt = Flora([a], lr=1e-2)
    a.grad = torch.randn(8, 8)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    before = a.detach().clone()
    with pytest.raises(ValueError, match="momentum=0.9"):
        opt.step()
    assert torch.equal(a, before)


def test_plan_and_summary_after_a_state_lookup_say_not_stepped():
    """``opt.state[p].get(...)`` makes an empty entry (a defaultdict): the parameter has not
    stepped, and plan()/summary() say so (the mutant took any entry for a step)."""
    a = nn.Parameter(torch.randn(64, 32))
    opt = Flora([a], rank=4, beta1=0.9, lr=1e-3)
    assert opt.state[a].get("step") is None
    assert [row["stepped"] for row in opt.plan()] == [False]
    assert "1 of them not stepped yet" in opt.summary().splitlines()[0]


def test_plan_reports_the_momentum_held_after_an_edit_of_its_dtype_or_of_beta1():
    """(Probe Z130.) plan() said a dense momentum's storage from the group's option, which
    an edit changes at once while the tensor is converted at the next step (a compressed
    one's it read from the tensor); after beta1 was edited to None it said the bias had
    no momentum while its state kept one (as HF Adafactor's does, unused). Now every row
    says what its state holds, and why a kept momentum is unused."""
    import flora

    torch.manual_seed(0)
    m = nn.Linear(32, 16)
    opt = Flora(m.parameters(), lr=1e-3, rank=4, beta1=0.9, momentum_dtype=None)
    m(torch.randn(4, 32)).sum().backward()
    opt.step()
    opt.param_groups[0]["momentum_dtype"] = "bfloat16"
    assert [r["momentum_dtype"] for r in opt.plan()] == ["float32", "float32"]  # not converted yet
    m(torch.randn(4, 32)).sum().backward()
    opt.step()
    assert [r["momentum_dtype"] for r in opt.plan()] == ["bfloat16", "bfloat16"]
    held = flora.state_bytes(opt)
    opt.param_groups[0]["beta1"] = None
    m(torch.randn(4, 32)).sum().backward()
    opt.step()
    rows = opt.plan()
    assert [(r["compressed"], r["momentum_dtype"]) for r in rows] == [(True, "bfloat16"), (False, "bfloat16")]
    assert all(r["reason"].startswith("beta1=None: its state keeps the momentum") for r in rows)
    assert flora.state_bytes(opt) == held
    assert opt.summary().count("unused") == 2


def test_summary_counts_not_stepped_among_trainable_tensors_only():
    """A frozen tensor is listed apart ("1 more frozen"), never as "not stepped yet"."""
    a = nn.Parameter(torch.randn(64, 32))
    frozen = nn.Parameter(torch.randn(64, 32), requires_grad=False)
    opt = Flora([a, frozen], lr=1e-2, rank=4, beta1=0.9)
    a.grad = torch.randn(64, 32)
    opt.step()
    first = opt.summary().splitlines()[0]
    assert "frozen" in first and "not stepped yet" not in first, first


def test_state_dict_drops_an_empty_entry_of_a_parameter_in_no_group():
    """A parameter taken out of the groups and then looked up in ``opt.state`` leaves an
    empty entry: state_dict() drops it and saves (the mutant kept it and refused, "have a
    state but are in no param group")."""
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    opt = Flora([a, b], lr=1e-2)
    a.grad = torch.randn(8, 8)
    opt.step()
    opt.param_groups[0]["params"] = [a]
    assert opt.state[b].get("step") is None
    opt.state_dict()
    assert b not in opt.state


def test_a_parameter_put_back_into_a_group_of_another_seed_is_refused():
    """A parameter taken out of its group (its state kept), a step without it, then put
    into a group of another seed: its momentum was made under the old seed's projections,
    so the step is refused, naming the seed (the mutant forgot its layout while it was out,
    and stepped that momentum under the new projections)."""
    a, b = nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(64, 32))
    opt = Flora([{"params": [a], "seed": 1}, {"params": [b], "seed": 2}], lr=1e-2, rank=4, beta1=0.9)
    a.grad, b.grad = torch.randn(64, 32), torch.randn(64, 32)
    opt.step()
    opt.param_groups[0]["params"] = []
    a.grad = None
    opt.step()
    opt.param_groups[1]["params"].append(a)
    a.grad = torch.randn(64, 32)
    with pytest.raises(ValueError, match="seed"):
        opt.step()


def test_a_frozen_parameters_group_edited_cannot_be_saved_or_copied():
    """A group holding only a frozen parameter with a state: its seed edited to 7 would
    save seed 7 beside a momentum made under seed 1 (a resume scrambles it); state_dict()
    and a deep copy refuse, naming the seed (the mutant checked trainable tensors only)."""
    a, f = nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(64, 32))
    opt = Flora([{"params": [a]}, {"params": [f]}], lr=1e-2, rank=4, beta1=0.9, seed=1)
    a.grad, f.grad = torch.randn(64, 32), torch.randn(64, 32)
    opt.step()
    f.requires_grad_(False)
    f.grad = None
    opt.param_groups[1]["seed"] = 7
    with pytest.raises(ValueError, match="seed=7"):
        opt.state_dict()
    with pytest.raises(ValueError, match="seed=7"):
        copy.deepcopy(opt)


def test_a_checkpoint_with_an_invalid_option_is_refused_before_any_change():
    """A damaged or hand-edited checkpoint (beta1=1.5) is refused at the load, naming
    beta1, and the optimizer keeps its groups and steps (the mutant loaded it, replacing
    them, and then every step failed)."""
    a = nn.Parameter(torch.randn(8, 8))
    opt = Flora([a], lr=1e-2, beta1=0.9)
    a.grad = torch.randn(8, 8)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["beta1"] = 1.5
    b = nn.Parameter(a.detach().clone())
    other = Flora([b], lr=1e-2, beta1=0.9)
    with pytest.raises(ValueError, match="beta1"):
        other.load_state_dict(sd)
    assert other.param_groups[0]["beta1"] == 0.9 and len(other.state) == 0
    b.grad = torch.randn(8, 8)
    other.step()
