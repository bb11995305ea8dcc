"""The set of parameters and groups changing mid-run, as fine-tuning does: groups replaced
or edited in place (step_parameter, hence fused accumulation, must follow), a branch
reached only by the cycle's last backward pass, a parameter moved into a group of
another rank, one taken out of the groups, one unfrozen after the accumulator was built.
Each case was found by a new-user probe (2026-12-04)."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from flora import CompressedAccumulator, Flora

SHAPES = ((24, 16), (16,), (24, 16), (8, 24))
KW = dict(rank=4, beta1=0.9, kappa=3, scale_parameter=False)


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in SHAPES]


def _grads(params, t):
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i))


def _run(edit, per_parameter: bool, foreach):
    """6 steps over two groups (lr 1e-2, 1e-4); ``edit`` changes the groups after step 3;
    stepped by step() or one step_parameter call per parameter."""
    params = _params()
    opt = Flora([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 1e-4}], foreach=foreach, **KW)
    for t in range(6):
        if t == 3:
            edit(opt)
        _grads(params, t)
        if per_parameter:
            for p in params:
                opt.step_parameter(p)
        else:
            opt.step()
    return params


def _replace_dict(opt):
    opt.param_groups[0] = {**opt.param_groups[0], "lr": 1e-3}


def _swap_in_place(opt):  # same list objects, same lengths: one parameter of each group exchanged
    a, b = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    a[0], b[0] = b[0], a[0]


def _replace_list(opt):
    opt.param_groups[1]["params"] = list(reversed(opt.param_groups[1]["params"]))


@pytest.mark.parametrize("edit", [_replace_dict, _swap_in_place, _replace_list])
@pytest.mark.parametrize("foreach", [None, False])
def test_step_parameter_follows_edited_groups(edit, foreach):
    """step_parameter equals step() after the groups were edited (before, it kept a
    replaced dict's lr: 3.4e-2 apart after 6 steps; a swapped parameter its old group's):
    to the bit on the single-tensor path; to float rounding on the grouped one, where
    step() stacks the two groups' (24, 16) tensors in one bucket (groups that differ in lr
    alone share buckets) and step_parameter steps each alone."""
    want, got = _run(edit, False, foreach), _run(edit, True, foreach)
    for a, b in zip(want, got):
        if foreach is False:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_fused_accumulation_follows_a_swap_between_groups():
    """Fused mode steps each parameter through step_parameter: after a parameter moved
    between groups it takes the new group's lr, as normal mode does."""
    def run(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        ws = [model[0].weight, model[2].weight]
        rest = [model[0].bias, model[2].bias]
        opt = Flora([{"params": [ws[0], rest[0]], "lr": 1e-2}, {"params": [ws[1], rest[1]], "lr": 1e-4}],
                    rank=2, beta1=0.9)
        acc = CompressedAccumulator(model, rank=2, tau=2, seed=0, optimizer=opt, fused=fused)
        gen = torch.Generator().manual_seed(1)
        for cycle in range(4):
            if cycle == 2:
                a, b = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
                a[1], b[1] = b[1], a[1]  # the biases exchanged in place
            for _ in range(2):
                model(torch.randn(3, 8, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        acc.remove()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
def test_a_branch_reached_only_by_the_last_backward_is_exact_under_exact_last(fused):
    """exact_last=True: the tau-th backward pass is the last of the cycle for every
    parameter, however few gradients it got before; a branch used only there steps on its
    gradient exactly (before: compressed, relative error 2.55 at rank 4 of 32). SGD with
    lr 1: the step moves the weight by the gradient it was given."""
    torch.manual_seed(0)
    trunk, head = nn.Linear(16, 32), nn.Linear(32, 32, bias=False)
    model = nn.ModuleDict(dict(trunk=trunk, head=head))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    acc = CompressedAccumulator(model, rank=4, tau=2, seed=0, optimizer=opt, exact_last=True, fused=fused)
    xs = [torch.randn(5, 16) for _ in range(2)]
    (trunk(xs[0]).pow(2).mean() / 2).backward()  # the head unused
    (head(torch.tanh(trunk(xs[1]))).pow(2).mean() / 2).backward()  # the cycle's last: the head's only gradient
    opt.step()
    opt.zero_grad()
    acc.remove()
    ref_head, ref_trunk = nn.Linear(32, 32, bias=False), nn.Linear(16, 32)
    ref_head.weight.data.copy_(start["head.weight"])
    ref_trunk.weight.data.copy_(start["trunk.weight"])
    ref_trunk.bias.data.copy_(start["trunk.bias"])
    (ref_head(torch.tanh(ref_trunk(xs[1]))).pow(2).mean() / 2).backward()
    torch.testing.assert_close(start["head.weight"] - head.weight.detach(), ref_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_a_parameter_moved_into_a_group_of_another_rank_is_named_as_moved():
    """After one step, a parameter swapped into a group of another rank is refused with the
    rank message (before: "it was reshaped after its first step"); nothing changes."""
    params = _params()
    opt = Flora([{"params": params[:2], "rank": 2}, {"params": params[2:], "rank": 4}], beta1=0.9, lr=1e-2)
    _grads(params, 0)
    opt.step()
    a, b = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    a[0], b[0] = b[0], a[0]
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params]
    _grads(params, 1)
    # params[2] (state made at rank 4) is checked first, now in the rank-2 group
    with pytest.raises(ValueError, match=r"rank=2 does not fit the compressed momentum of a parameter of shape "
                                         r"\(24, 16\) \(\(24, 4\), made with rank=4\)"):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, params))
    assert all(torch.equal(v, opt.state[p][k]) for p, st in zip(params, states) for k, v in st.items())


def test_state_dict_names_a_parameter_taken_out_of_the_groups():
    """torch's state_dict fails with a bare KeyError (an id) on a state whose parameter is
    in no group; Flora says what and how to fix it, and saves once its state is dropped."""
    params = _params()
    opt = Flora(params, lr=1e-2, **KW)
    _grads(params, 0)
    opt.step()
    opt.param_groups[0]["params"].pop(2)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) of shape \(24, 16\) have a state but are in no param "
                                         r"group .*opt\.state\.pop\(p\)"):
        opt.state_dict()
    opt.state.pop(params[2])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert len(torch.load(buf, weights_only=True)["state"]) == 3


def test_normal_mode_warns_once_about_a_parameter_unfrozen_after_it_was_built():
    """Normal mode: a parameter unfrozen after the accumulator was built trains, but its
    gradients pile up uncompressed in .grad; said once at the next forward (fused mode
    refuses it, tests/test_fused_habits.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 4))
    model[0].weight.requires_grad_(False)
    acc = CompressedAccumulator(model, rank=2, tau=2, seed=0)
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # nothing unfrozen yet: silent
    model[0].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 trainable parameter\(s\) not given to the accumulator \(0\.weight; "
                                         r"unfrozen .* uncompressed in \.grad"):
        model(x).sum().backward()
    model[2].zero_grad()  # (the cycle closed: its estimate, left in .grad, would be warned of)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # once
    assert model[0].weight.grad.stride() == (8, 1)  # a full gradient: the memory the warning is about
    acc.remove()


def test_normal_mode_says_a_swapped_in_layer_outside_the_optimizer_does_not_train():
    """A layer swapped in after the optimizer and the accumulator were built (an untied
    resize_token_embeddings replaces the head) is in neither: the warning said it trains
    (a probe: it never moved, and its .grad grew at every backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = CompressedAccumulator(model, rank=2, tau=2, optimizer=opt, seed=0)
    model[2] = nn.Linear(24, 4)
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) not given to the accumulator .*2\.weight, "
                                         r"2\.bias are not in the optimizer either: they do not train"):
        model(torch.randn(3, 8)).sum().backward()
    acc.remove()


def test_remove_lets_the_optimizer_go():
    """acc.remove() drops its reference to the optimizer (a probe: a replaced optimizer and
    its state lived as long as the accumulator object)."""
    import gc
    import weakref

    for fused in (False, True):
        model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 4))
        opt = Flora(model.parameters(), lr=1e-2, rank=2, beta1=0.9)
        acc = CompressedAccumulator(model, rank=2, tau=2, optimizer=opt, fused=fused, seed=0)
        for _ in range(2):
            model(torch.randn(3, 8)).sum().backward()
        if not fused:
            opt.step()
            opt.zero_grad()
        ref = weakref.ref(opt)
        acc.remove()
        del opt
        gc.collect()
        assert ref() is None, fused
        assert acc.state_dict()["cycle"] == 1


def test_a_group_added_after_load_state_dict_is_not_warned_of_torchs_own_default():
    """torch's __setstate__ adds differentiable=False to a loaded optimizer's defaults; a
    group added afterwards inherits it and was warned of as a foreign option."""
    params = _params()
    opt = Flora(params[:2], lr=1e-2, **KW)
    _grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    opt = Flora(params[:2], lr=1e-2, **KW)
    opt.load_state_dict(sd)
    opt.add_param_group({"params": params[2:]})
    _grads(params, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_state_dict_after_a_load_copy_or_pickle_equals_the_one_saved():
    """torch's __setstate__ adds differentiable=False to the defaults, which Flora had
    copied into every group: a loaded, copied or unpickled optimizer's state_dict had a
    key the saved one lacked (probe Z111)."""
    params = _params()
    opt = Flora(params, lr=1e-2, **KW)
    _grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    loaded = Flora(params, lr=1e-2, **KW)
    loaded.load_state_dict(sd)
    for other in (loaded, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        got = other.state_dict()
        assert got["param_groups"] == sd["param_groups"]
        assert other.defaults == opt.defaults
        assert all(torch.equal(got["state"][i][k], v) for i, s in sd["state"].items() for k, v in s.items()
                   if torch.is_tensor(v))


def test_a_mid_cycle_accumulator_state_of_another_rule_says_how_to_move_on():
    """A mid-cycle partial sum whose form this accumulator would not make (other options,
    or an older version's compression rule) is refused, saying to save at a cycle
    boundary to move across versions (a probe found the message read as damage)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 4))
    acc = CompressedAccumulator(model, rank=2, tau=2, seed=0)
    model(torch.randn(3, 8)).sum().backward()  # mid-cycle
    sd = acc.state_dict()
    acc.remove()
    model.zero_grad()
    i, buf = next(iter(sd["compressed"].items()))
    sd["compressed"][i] = buf.mT.contiguous()  # as the other dim projected (an older rule's form)
    other = CompressedAccumulator(model, rank=2, tau=2, seed=0)
    with pytest.raises(ValueError, match=r"has shape .* expected .*Save at a cycle boundary, after the step, to move "
                                         r"a run across versions"):
        other.load_state_dict(sd)
    other.remove()


def test_an_accumulator_state_saved_under_another_layout_is_said_at_load():
    """acc.state_dict() keeps each parameter's projected dimension: a resume under another
    layout (here max_aspect_ratio, which the saved options do not hold; an older version's
    rule likewise) continues under the new one, and says so. The same layout: silent."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 4))
    acc = CompressedAccumulator(model, rank=2, tau=2, seed=0)
    sd = acc.state_dict()  # at a cycle boundary
    rows = acc.plan()
    acc.remove()
    assert sd["dims"].tolist() == [r["proj_dim"] if r["compressed"] else -1 for r in rows]
    same = CompressedAccumulator(model, rank=2, tau=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)
    same.remove()
    other = CompressedAccumulator(model, rank=2, tau=2, seed=0, max_aspect_ratio=2.0)  # (40, 8), (4, 40): dense
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) were accumulated under another layout when saved "
                                         r"\('0.weight' \(proj_dim 1 saved, dense here\), '2.weight' \(proj_dim 0 "
                                         r"saved, dense here\)\)"):
        other.load_state_dict(sd)
    other.remove()


def test_a_proj_dim_worded_otherwise_loads_where_each_tensor_projects_the_same_dim():
    """A state saved with proj_dim='auto' where 'auto' projected every matrix's dim 1 (as
    FSDP2's 'auto' does: a probe, Z62, saved there and resumed in one process with
    proj_dim=1, as the docs advise) was refused for the option's words. It loads and
    continues the run bit for bit; where a tensor's dim differs it is refused as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 60))  # (40, 8), (60, 40): 'auto' is 1
    twin = copy.deepcopy(model)
    x = torch.randn(3, 8)
    saved = CompressedAccumulator(model, rank=2, tau=2, seed=0)
    model(x).square().mean().backward()  # mid-cycle
    sd = saved.state_dict()
    assert sd["proj_dim"] == "auto" and sd["dims"].tolist() == [1, -1, 1, -1]
    model(2 * x).square().mean().backward()
    resumed = CompressedAccumulator(twin, rank=2, tau=2, seed=0, proj_dim=1)
    resumed.load_state_dict(sd)
    twin(2 * x).square().mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
    resumed.remove()
    wide = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 4))  # (4, 40): 'auto' projects its dim 0
    acc = CompressedAccumulator(wide, rank=2, tau=2, seed=0)
    sd = acc.state_dict()
    acc.remove()
    with pytest.raises(ValueError, match="state_dict has proj_dim='auto' but this accumulator has proj_dim=1"):
        CompressedAccumulator(wide, rank=2, tau=2, seed=0, proj_dim=1).load_state_dict(sd)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_state_dropped_and_begun_again_is_checked_at_its_next_step(foreach):
    """The 'checked at this shape' memo outlived opt.state.pop(p): a parameter whose state
    began again at another shape and was then reshaped back to the old one skipped the
    resize check, and the step failed in the middle (torch's size mismatch, the other
    parameter's counter moved). Refused before any change, as without the old memo."""
    torch.manual_seed(0)
    a, other = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(4, 4))
    opt = Flora([a, other], lr=1e-2, scale_parameter=False, rank=2, beta1=0.9, foreach=foreach)
    for _ in range(2):
        a.grad, other.grad = torch.randn_like(a), torch.randn_like(other)
        opt.step()
    opt.state.pop(a)
    a.data = torch.randn(6, 8)
    a.grad, other.grad = torch.randn_like(a), None
    opt.step()
    a.data = torch.randn(8, 6)
    a.grad, other.grad = torch.randn_like(a), torch.randn_like(other)
    before = other.detach().clone()
    with pytest.raises(ValueError, match=r"shape \(8, 6\) has a state made for another shape"):
        opt.step()
    assert opt.state[other]["step"] == 2 and torch.equal(other, before)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "load_state_dict"])
@pytest.mark.parametrize("edit", ["seed", "projection", "moved"])
def test_layout_edits_are_refused_after_a_copy_or_a_load(how, edit):
    """An in-place edit of seed or projection after copy.deepcopy or pickle of a Flora
    stepped silently (refused on the original and after load_state_dict: a copy started
    with no record of its layouts), and a parameter moved into a group of another seed
    after load_state_dict stepped too (refused without the load): the update then read
    the momentum under other projections (cosine 0.06 to the right one, 'paper' form)."""
    import pickle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = Flora(model.parameters(), lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, kappa=3)

    def step():
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()

    for _ in range(3):
        step()
    if how == "deepcopy":
        model, opt = copy.deepcopy((model, opt))
    elif how == "pickle":
        model, opt = pickle.loads(pickle.dumps((model, opt)))
    else:
        sd = opt.state_dict()
        opt = Flora(model.parameters(), lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, kappa=3)
        opt.load_state_dict(sd)
    if edit == "moved":
        w = opt.param_groups[0]["params"].pop(0)
        opt.add_param_group({"params": [w], "seed": 123})
        said = r"seed=123 in the group of the parameter .*made under seed=0 \(the group's seed edited, or the parameter moved"
    else:
        opt.param_groups[0][edit] = 123 if edit == "seed" else "coordinates"
        said = rf"{edit}=.* in the group of the parameter .*made under {edit}=.* since its last step"
    with pytest.raises(ValueError, match=said):
        step()


def test_a_removed_parameter_is_let_go_and_swapped_states_do_not_pile_up():
    """step_parameter's lookup map held removed parameters (and their .grad) alive until
    its next call, for ever with step() alone; under compile, states swapped between
    parameters (adapters: opt.state[new] = a copy; opt.state.pop(old)) left their stacks
    behind, one state's worth a swap (0.66 MB -> 39 MB in 60 swaps)."""
    import gc
    import weakref

    big = nn.Parameter(torch.randn(256, 256))
    keep = nn.Parameter(torch.randn(8, 8))
    opt = Flora([keep, big], lr=1e-2)
    keep.grad, big.grad = torch.randn_like(keep), torch.randn_like(big)
    opt.step_parameter(big)
    ref = weakref.ref(big)
    opt.param_groups[0]["params"] = [keep]
    opt.state.pop(big)
    del big
    gc.collect()
    assert ref() is None
    opt = Flora([nn.Parameter(torch.randn(16, 64)) for _ in range(4)], lr=1e-2, rank=4, beta1=0.9,
                compile="aot_eager")
    for swap in range(6):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn_like(p)
        opt.step()
        old = list(opt.param_groups[0]["params"])
        new = [nn.Parameter(p.detach().clone()) for p in old]
        for o, n in zip(old, new):
            opt.state[n] = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[o].items()}
            opt.state.pop(o)
        opt.param_groups[0]["params"] = new
        if swap:
            assert len(opt._stacks) <= 3, len(opt._stacks)


def test_a_group_dict_at_a_removed_groups_id_is_not_taken_for_it():
    """A group removed and another group's dict replaced (a routine lr edit as a new
    dict): CPython gives the new dict the removed one's id, and its options were read as
    edits of the removed group's (seed 5 -> 0) and refused. Steps now, as when the ids
    differ."""
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16, 8))
    opt = Flora([{"params": [p]}, {"params": [q], "seed": 5}], lr=1e-2, rank=2, beta1=0.9, scale_parameter=False)
    for _ in range(2):
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    dead = id(opt.param_groups[1])
    opt.state.pop(q)
    del opt.param_groups[1]
    opt.param_groups[0] = {**opt.param_groups[0], "lr": 1e-3}
    if id(opt.param_groups[0]) != dead:
        pytest.skip("the new dict did not get the removed one's id here")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["seed"] = 7  # an edit of its own is still refused
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"seed=7 in the group of the parameter .*made under seed=0 "):
        opt.step()


def test_step_parameter_checks_a_zero_relative_lr_for_every_parameter():
    """relative_step with lr 0 (transformers' AdafactorSchedule's first value): step()
    refuses it; step_parameter checked it for the first parameter only (a zero gradient,
    no state: taken as torch.distributed.checkpoint's state creation) and then stepped the
    others by 0."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8, 16))
    opt = Flora([a, b], lr=None, rank=2, beta1=0.9)
    opt.param_groups[0]["lr"] = 0
    a.grad, b.grad = torch.zeros_like(a), torch.randn_like(b)
    opt.step_parameter(a)
    with pytest.raises(ValueError, match="lr=0 in a parameter group with relative_step=True"):
        opt.step_parameter(b)
    assert "step" not in opt.state[b]


def test_new_states_at_taken_positions_get_the_same_index_in_any_stepping_order():
    """The list [a..e] becomes [c, d, e, a, b] after a, b, c stepped: d and e begin at
    positions 1 and 2, which b and c hold. Their indices were "one past the largest" in the
    order they were made: group order for step(), call order for step_parameter() (and
    backward order for fused accumulation), so d and e swapped projections between the
    two (a probe: a whole step of difference). Now position + N, the same either way."""
    def make():
        g = torch.Generator().manual_seed(0)
        return [nn.Parameter(torch.randn(8, 6, generator=g) * 0.1) for _ in range(5)]

    def run(order):
        a, b, c, d, e = ps = make()
        opt = Flora(ps, lr=1e-2, rank=2, beta1=0.9, scale_parameter=False, foreach=True)
        g = torch.Generator().manual_seed(100)
        for p in (a, b, c):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()
        opt.param_groups[0]["params"][:] = [c, d, e, a, b]
        for p in (d, e):
            p.grad = torch.randn(p.shape, generator=g)
        if order == "step":
            opt.step()
        else:
            for p in (e, d):  # backward order: the later layer first
                opt.step_parameter(p)
        return ps, opt

    (ps1, o1), (ps2, o2) = run("step"), run("step_parameter")
    assert [o1.state[p]["index"] for p in ps1] == [o2.state[p]["index"] for p in ps2] == [0, 1, 2, 6, 7]
    for p1, p2 in zip(ps1, ps2):
        assert torch.equal(p1, p2)


def test_step_parameter_finds_a_stepped_parameter_without_walking_the_groups():
    """A parameter with a state is found where the map points: step_parameter does not walk
    every group at every call (fused accumulation calls it once per parameter a cycle, so
    with one group per parameter that was O(parameters x groups): 5.4 s a pass over 3,000
    one-parameter groups, a probe). A new parameter added to an earlier group afterwards
    still gets the index step() gives it."""

    class Counting(list):
        iterations = 0

        def __iter__(self):
            Counting.iterations += 1
            return super().__iter__()

    params = _params()
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    a = Flora([{"params": [p]} for p in params], lr=1e-2, **KW)
    b = Flora([{"params": [p]} for p in twins], lr=1e-2, **KW)
    for t in range(2):
        _grads(params, t)
        _grads(twins, t)
        for p in params:
            a.step_parameter(p)
        b.step()
        if t == 0:
            a.param_groups = Counting(a.param_groups)
    assert Counting.iterations == 0
    late = nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(9)))
    a.param_groups[0]["params"].append(late)
    late_b = nn.Parameter(late.detach().clone())
    b.param_groups[0]["params"].append(late_b)
    late.grad = torch.randn(24, 16, generator=torch.Generator().manual_seed(10))
    late_b.grad = late.grad.clone()
    a.step_parameter(late)
    for p in b.param_groups[1:]:
        p["params"][0].grad = None
    b.step()
    # position 1, held by the second parameter's state: 1 + 5 (the parameters in the groups)
    assert a.state[late]["index"] == b.state[late_b]["index"] == 6
    torch.testing.assert_close(late, late_b, rtol=0, atol=0)


def test_step_parameter_after_a_group_is_deleted_drops_its_records():
    """The direct lookup (above) rebuilds the map when a group was added or removed, so the
    records of a deleted group's parameter go at the next step_parameter (a review: they
    stayed until a step())."""
    params = _params()
    opt = Flora([{"params": [p]} for p in params], lr=1e-2, **KW)
    _grads(params, 0)
    for p in params:
        opt.step_parameter(p)
    del opt.param_groups[3]
    opt.state.pop(params[3])
    for p in params[:3]:
        opt.step_parameter(p)
    assert len(opt._device_steps) == 3 and len(opt._stepped_under) == 3


def test_a_first_step_with_no_gradient_at_all_warns_once():
    """A model whose parameters were replaced after Flora was built (fully_shard does this)
    trains nothing: every step finds no gradient. Said at the first such step, once; a
    step with no gradient after the optimizer has stepped (a frozen phase) says nothing."""
    model = nn.Linear(8, 4)
    opt = Flora(model.parameters(), lr=1e-2, **KW)
    model.weight = nn.Parameter(model.weight.detach().clone())  # as a wrapper's re-registration
    model.bias = nn.Parameter(model.bias.detach().clone())
    before = model.weight.detach().clone()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
    said = [str(w.message) for w in seen if "has a gradient" in str(w.message)]
    assert len(said) == 1 and "none of its 2 parameters" in said[0] and "build Flora" in said[0], said
    assert torch.equal(model.weight, before)

    model = nn.Linear(8, 4)
    opt = Flora(model.parameters(), lr=1e-2, **KW)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # stepped before: no gradient this time is a choice, not a wiring fault


def test_a_first_step_with_every_parameter_frozen_says_so():
    """Flora built before peft's get_peft_model: the base weights it holds are frozen and the
    adapters it does not hold train. The warning had blamed replaced parameters (FSDP, a
    module swapped), not the freezing (a new-user probe, Z60); it now says frozen and how
    to build Flora from the trainable parameters."""
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = Flora(model.parameters(), lr=1e-2, **KW)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    said = [str(w.message) for w in seen if "Flora.step()" in str(w.message)]
    assert len(said) == 1 and "all 4 of its parameters are frozen" in said[0] and "get_peft_model" in said[0], said
