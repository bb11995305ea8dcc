"""Places that read the same option or state twice agree (found by a review, probe Z50):
a copy keeps what the original was told, a report reads names as the step does, a load
refuses what the step would, and two spellings of one option are not resolved two ways."""

import copy
import pickle
import warnings

import pytest
import torch

from flora import Flora
from flora.agreement import _encode


def _params():
    torch.manual_seed(0)
    return torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_keeps_an_explicit_relative_step_for_groups_added_later(how):
    """relative_step=False given to the constructor holds for every group: a group added
    without an lr is refused. A copy had forgotten it, and ran such a group at Adafactor's
    relative step."""
    w, b = _params()
    opt = Flora([w], lr=1e-3, relative_step=False)
    with pytest.raises(ValueError, match="relative_step=False"):
        opt.add_param_group({"params": [b], "lr": None})
    dup = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    extra = torch.nn.Parameter(torch.randn(6))
    with pytest.raises(ValueError, match="relative_step=False"):
        dup.add_param_group({"params": [extra], "lr": None})
    # left to its default, each group's follows its lr, in a copy as in the original
    free = copy.deepcopy(Flora([torch.nn.Parameter(torch.randn(3))], lr=1e-3))
    free.add_param_group({"params": [extra], "lr": None})
    assert free.param_groups[1]["relative_step"] is True


def test_plan_names_parameters_as_the_step_does_after_a_list_edited_in_place():
    """A group's list edited in place (the step takes it) leaves param_names of another
    length: plan() raised IndexError on an appended parameter and named the others wrongly
    after a pop. It now names none, as the step's messages do."""
    w, b = _params()
    opt = Flora([{"params": [w, b], "param_names": ["weight", "bias"]}], lr=1e-3)
    assert [r["name"] for r in opt.plan()] == ["weight", "bias"]
    extra = torch.nn.Parameter(torch.randn(5, 5))
    opt.param_groups[0]["params"].append(extra)
    assert [r["name"] for r in opt.plan()] == [None, None, None]
    assert "(5, 5)" in opt.summary()
    opt = Flora([{"params": [w, b], "param_names": ["weight", "bias"]}], lr=1e-3)
    opt.param_groups[0]["params"].pop(0)
    assert [(r["name"], r["shape"]) for r in opt.plan()] == [(None, (6,))]


def test_a_matrix_with_an_unfactored_second_moment_is_refused_at_load_before_any_change():
    """Flora (as HF Adafactor) keeps a matrix's second moment factored. A checkpoint with an
    unfactored exp_avg_sq for a matrix had loaded, and the next step then refused it as
    "reshaped after its first step", which it was not."""
    w, b = _params()
    opt = Flora([w, b], lr=1e-3)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][0]
    st["exp_avg_sq"] = torch.ones(8, 6)
    del st["exp_avg_sq_row"], st["exp_avg_sq_col"]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"unfactored second moment \('exp_avg_sq' of shape \(8, 6\)\)"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for k, v in before["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][0][k])), k
    # a vector's unfactored second moment is its own: loads
    ok = copy.deepcopy(before)
    opt.load_state_dict(ok)


def test_momentum_and_momentum_form_given_together_must_agree():
    """momentum= is momentum_form's old name. Given both, the constructor had kept one and
    add_param_group the other (leaving a stray 'momentum' key in the group)."""
    w, b = _params()
    with pytest.raises(ValueError, match="momentum='paper' and momentum_form='exact'"):
        Flora([w], lr=1e-3, momentum="paper", momentum_form="exact")
    # the default's value written out is given, not the default (a probe: momentum= won over it)
    with pytest.raises(ValueError, match="momentum='exact' and momentum_form='floored'"):
        Flora([w], lr=1e-3, momentum="exact", momentum_form="floored")
    with pytest.raises(ValueError, match="momentum='exact' and momentum_form='floored'"):
        Flora([w], lr=1e-3, momentum="exact", momentum_form="".join(["floo", "red"]))
    with pytest.warns(FutureWarning):  # the default left alone: momentum= sets it
        assert Flora([w], lr=1e-3, momentum="subspace").defaults["momentum_form"] == "subspace"
    assert Flora([w], lr=1e-3).defaults["momentum_form"] == "floored"
    with pytest.warns(FutureWarning):
        assert Flora([w], lr=1e-3, momentum="exact", momentum_form="exact").defaults["momentum_form"] == "exact"
    opt = Flora([w], lr=1e-3)
    with pytest.raises(ValueError, match="'momentum' is the old name of 'momentum_form'"):
        opt.add_param_group({"params": [b], "momentum": "paper", "momentum_form": "exact"})
    assert len(opt.param_groups) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        opt.add_param_group({"params": [b], "momentum": "exact", "momentum_form": "exact"})
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "momentum": "subspace"})
    assert "momentum" not in opt.param_groups[1] and opt.param_groups[1]["momentum_form"] == "exact"
    assert "momentum" not in opt.param_groups[2] and opt.param_groups[2]["momentum_form"] == "subspace"


def test_processes_giving_an_option_as_int_and_as_equal_float_agree():
    """The distributed agreement check compares options by an encoding: 2 and 2.0 (a
    max_aspect_ratio read from a config on one process, typed on another) behave alike and
    must not be reported as a disagreement; 2 and 2.5 must."""
    assert _encode(2) == _encode(2.0) and _encode(0) == _encode(0.0)
    assert _encode(2.0) != _encode(2.5) and _encode(float("inf")) != _encode(float("nan"))
    assert _encode(True) != _encode(2.0) and _encode(None) != _encode(1.0)
    # strings by the whole string, and None apart from 0 (probe Z71: only the first 8
    # characters were compared, and a None/0.0 pair had passed on a mutant)
    assert _encode("orthonormal") != _encode("orthonormal2") and _encode("auto") == _encode("auto")
    assert _encode(None) != _encode(0.0) and _encode(None) != _encode(0)
    # values whose 64 bits agree but whose kinds differ (a probe: None and -1, -1 and
    # 2**64 - 1, 0 and 2**64 had passed as equal)
    for x, y in [(None, -1), (-1, 2**64 - 1), (0, 2**64), (None, 2**64 - 1), (-(2**63), 2**63), (-1.0, 2**64 - 1)]:
        assert _encode(x) != _encode(y), (x, y)
    assert _encode(-1) == _encode(-1.0) and _encode(True) == _encode(1) and _encode(2**64 - 1) == _encode(2**64 - 1)


def test_an_optimizer_unpickled_where_no_flora_was_built_compiles_its_step(tmp_path):
    """torch.compile(opt.step) traces around Flora's eager prelude, which is marked for
    dynamo when a Flora is built. An optimizer unpickled in a fresh process (a copy sent
    to a worker, torch.save of the whole object) had never marked it: dynamo failed inside
    the prelude with a bare IndexError (probe Z51)."""
    import os
    import subprocess
    import sys

    import flora
    w, _ = _params()
    opt = Flora([w], lr=1e-2, rank=2, beta1=0.9)
    path = tmp_path / "opt.pkl"
    path.write_bytes(pickle.dumps(opt))
    w.grad = torch.ones_like(w)
    opt.step()
    want = w.detach().clone()
    code = ("import pickle, sys, torch; opt = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "p = opt.param_groups[0]['params'][0]; p.grad = torch.ones_like(p); "
            "torch.compile(opt.step, backend='eager')(); torch.save(p.detach(), sys.argv[2])")
    src = os.path.dirname(os.path.dirname(flora.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "w.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "w.pt"), want)


def test_state_dict_pre_hooks_run_before_floras_own_checks_once():
    """torch's contract: a state_dict pre-hook runs before state_dict does anything. Flora
    had run its clean-up first, so a numpy lr a hook wrote reached the checkpoint (which
    torch.load(weights_only=True) then refused), and a hook could not drop the state of a
    parameter taken out of its group before Flora refused it (probe Z51)."""
    import io

    import numpy as np
    w, b = _params()
    opt = Flora([w, b], lr=1e-3)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    calls = []

    def hook(o):
        calls.append(1)
        o.param_groups[0]["lr"] = np.float64(5e-3)

    handle = opt.register_state_dict_pre_hook(hook)
    sd = opt.state_dict()
    assert calls == [1] and type(sd["param_groups"][0]["lr"]) is float
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["lr"] == 5e-3
    handle.remove()
    opt.state_dict()
    assert calls == [1]  # removed: not run again
    opt.param_groups[0]["params"][:] = [w]
    opt.register_state_dict_pre_hook(lambda o: o.state.pop(b))  # AdamW takes this; so does Flora now
    assert len(opt.state_dict()["state"]) == 1


def test_auto_takes_a_saved_side_that_compresses_when_an_option_is_edited():
    """proj_dim="auto" keeps a loaded state's side (FSDP2's "auto" projects the columns, one
    process's the smaller side). An edit of a layout option that changes no parameter's form
    (max_aspect_ratio None -> 1000) had been refused, as the side "auto" would not pick here
    (probe Z57); one that makes the matrix dense is still refused."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 64))
    saved = Flora([w], lr=1e-3, rank=4, beta1=0.9, proj_dim=1)
    w.grad = torch.randn_like(w)
    saved.step()
    sd = saved.state_dict()
    sd["param_groups"][0]["proj_dim"] = "auto"  # as FSDP2's "auto" saves it: the columns
    opt = Flora([w], lr=1e-3, rank=4, beta1=0.9)  # proj_dim="auto": the rows here
    opt.load_state_dict(sd)
    opt.step()
    assert opt.state[w]["proj_dim"] == 1
    opt.param_groups[0]["max_aspect_ratio"] = 1000.0
    opt.step()  # taken
    opt.param_groups[0]["max_aspect_ratio"] = 2.0
    with pytest.raises(ValueError, match=r"max_aspect_ratio=2.0 do not fit the compressed momentum"):
        opt.step()
