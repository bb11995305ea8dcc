"""Edits users make to a model or an optimizer between steps (probe Z36, 2026-12-05): a
parameter resized under fused accumulation, a parameter put into two groups' lists, a
checkpoint of other parameters, and refusals that name the parameter."""

import warnings

import pytest
import torch
from torch import nn

from flora import CompressedAccumulator, Flora

from _configs import extended

PATHS = [dict(foreach=False), dict(foreach=True), dict(compile="aot_eager")]
PATH_IDS = ["single", "grouped", "compiled"]
# The refusals below come from the eager prelude, before any graph: compiling (8-18 s a
# test on 2 cores) adds a path only FLORA_TEST_ALL=1 runs for the two slowest.
CHEAP_PATHS = [*PATHS[:2], extended(PATHS[2], id="compiled")]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 8))


def _cycle(model, opt, c, width=16, tau=2):
    for k in range(tau):
        g = torch.Generator().manual_seed(10 * c + k)
        x, y = torch.randn(8, width, generator=g), torch.randn(8, 8, generator=g)
        (nn.functional.mse_loss(model(x), y) / tau).backward()
    opt.step()
    opt.zero_grad()


def _refused_resize_under_fused(make, refusal):
    """Two fused cycles, then the first layer's weight widened by 4 columns: the next
    cycle is refused with ``refusal`` before anything moves; with the weight's state
    dropped, training goes on (and moves the weight)."""
    model = _mlp()
    opt = make(model)
    CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    for c in range(2):
        _cycle(model, opt, c)
    w = model[0].weight
    w.data = torch.cat([w.data, torch.zeros(32, 4)], 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=refusal.format(name=type(opt).__name__)):
        _cycle(model, opt, 2, width=20)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    opt.state.pop(w)
    model.zero_grad()
    for c in (3, 4):
        _cycle(model, opt, c, width=20)
    assert not torch.equal(w.detach()[:, :16], before["0.weight"][:, :16])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("named", [True, False], ids=["named_parameters", "parameters"])
@pytest.mark.parametrize("path", CHEAP_PATHS, ids=PATH_IDS)
def test_fused_accumulation_refuses_a_resized_parameter_before_the_cycle_steps_anything(path, named):
    """A parameter resized between cycles (``p.data = ...``, resize_token_embeddings) was
    refused only when its own gradient arrived, after the parameters whose gradients came
    first had stepped (5 of 6 here); ``check_options``, which fused mode calls before a
    cycle's first step, now checks sizes as ``step()`` does. The message names the
    parameter, and dropping its state lets training go on. Flora built from
    ``model.parameters()`` (no names in its groups) has the accumulator's names: its
    message named the shape alone (a probe, Z120)."""
    _refused_resize_under_fused(
        lambda m: Flora(m.named_parameters() if named else m.parameters(), lr=1e-2, scale_parameter=False, rank=4,
                        beta1=0.9, **path),
        r"parameter '0.weight', of shape \(32, 20\) \(640 values\) has a state made for 512 values: it was resized "
        r"after its first step")


OTHER_OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "adamw-single": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False),
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2),
}


@pytest.mark.parametrize("make", OTHER_OPTIMIZERS.values(), ids=OTHER_OPTIMIZERS.keys())
def test_fused_accumulation_with_another_optimizer_refuses_a_resized_parameter_before_any_step(make):
    """The same with torch's optimizers (session 38): the resized parameter's step failed
    with torch's size error after the parameters whose gradients came first had stepped
    (AdamW: every parameter moved, the resized one by its weight decay)."""
    _refused_resize_under_fused(make, r"parameter '0.weight' has shape \(32, 20\), but {name} holds a state made for "
                                      r"shape \(32, 16\): it was resized after its last step")


@pytest.mark.parametrize("case", ["state resized too", "frozen"])
def test_fused_accumulation_takes_a_resize_whose_state_fits_or_that_will_not_step(case):
    """(Review.) The refusal above looked at the parameter's shape alone: a state the user
    resized with the parameter (or loaded for the new shape) was refused, and so was a
    frozen parameter, which no step reaches."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    for c in range(2):
        _cycle(model, opt, c)
    w = model[0].weight
    w.data = torch.cat([w.data, torch.zeros(32, 4)], 1)
    if case == "frozen":
        w.requires_grad_(False)
    else:
        for k in ("exp_avg", "exp_avg_sq"):
            opt.state[w][k] = torch.cat([opt.state[w][k], torch.zeros(32, 4)], 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _cycle(model, opt, 2, width=20)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    others = {"0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert moved == (others if case == "frozen" else others | {"0.weight"})


def test_fused_accumulation_takes_a_resize_where_the_state_fits_any_shape():
    """An optimizer whose state for the parameter fits any shape (plain SGD keeps none)
    is not refused: the resized parameter steps."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    _cycle(model, opt, 0)
    w = model[0].weight
    w.data = torch.cat([w.data, torch.zeros(32, 4)], 1)
    before = w.detach().clone()
    _cycle(model, opt, 1, width=20)
    assert not torch.equal(w.detach(), before)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_parameter_put_in_two_groups_lists_is_refused_by_name(path):
    """``add_param_group`` refuses a parameter already held; appended to a group's list in
    place, it was stepped twice a step on two paths and once (with a counter for two) on
    the compiled one, silently (a probe). Now refused before any change, naming it."""
    model = _mlp()
    groups = [{"params": list(model[0].parameters()), "param_names": ["0.weight", "0.bias"]},
              {"params": list(model[2].parameters()) + list(model[4].parameters()),
               "param_names": ["2.weight", "2.bias", "4.weight", "4.bias"]}]
    opt = Flora(groups, lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, **path)
    _cycle(model, opt, 0, tau=1)
    opt.param_groups[1]["params"].append(model[0].weight)
    opt.param_groups[1]["param_names"].append("0.weight")
    model(torch.randn(4, 16)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"parameter '0.weight' \(shape \(32, 16\)\) is in parameter group 0 and in "
                                         r"group 1 of this optimizer: it would be stepped twice a step"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.param_groups[1]["params"].pop()
    opt.param_groups[1]["param_names"].pop()
    opt.step()  # checked again once the list changes
    opt.param_groups[0]["params"].append(model[0].bias)
    with pytest.raises(ValueError, match=r"a parameter of shape \(32,\) is twice in parameter group 0"):
        opt.step()
    opt.param_groups[0]["params"].pop()
    opt.step()
    # an item swapped in place, the list's length unchanged (it had gone unseen: stepped twice)
    swapped = opt.param_groups[1]["params"][3]
    opt.param_groups[1]["params"][3] = model[0].bias
    with pytest.raises(ValueError, match=r"is in parameter group 0 and in group 1 of this optimizer"):
        opt.step()
    opt.param_groups[1]["params"][3] = swapped
    opt.step()


def _named_opt(layers, **kw):
    named = [(f"{k}.{n}", p) for k, layer in layers.items() for n, p in layer.named_parameters()]
    return Flora(named, lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, **kw)


def _train(opt, layers, steps=2):
    for i in range(steps):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(i))
        sum(layer(x).square().mean() for layer in layers.values()).backward()
        opt.step()
        opt.zero_grad()


def test_a_checkpoint_of_other_parameters_is_refused_or_said_and_the_live_names_stay():
    """Phase 1 trained layers a and b; phase 2's optimizer holds b and c (same shapes). Its
    load put a's state into b and b's into c silently (AdamW does the same), and the saved
    names replaced the live ones, so plan() and summary() named a. Now a name held at
    another position is refused; names that differ otherwise (a renamed model) load in
    order with a warning (not under a wrapper's prefix: below), and the optimizer keeps the
    names of the tensors it holds."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
    first = _named_opt({"a": a, "b": b})
    _train(first, {"a": a, "b": b})
    second = _named_opt({"b": b, "c": c})
    with pytest.raises(ValueError, match=r"state_dict lists 'b.weight' at position 2 of group 0, where this optimizer "
                                         r"has it at position 0: each state would load into another parameter"):
        second.load_state_dict(first.state_dict())
    assert not second.state
    renamed = _named_opt({"x": a, "y": b})  # the same tensors under other names
    with pytest.warns(UserWarning, match=r"the checkpoint names other parameters than this optimizer holds \(group 0: "
                                         r"'a.weight' where this optimizer has 'x.weight'\); their states were "
                                         r"given to this optimizer's parameters in its order"):
        renamed.load_state_dict(first.state_dict())
    assert renamed.param_groups[0]["param_names"] == ["x.weight", "x.bias", "y.weight", "y.bias"]
    assert torch.equal(renamed.state[a.weight]["exp_avg_c"], first.state[a.weight]["exp_avg_c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _named_opt({"a": a, "b": b}).load_state_dict(first.state_dict())  # the same names: nothing said


def test_refusals_of_a_rank_edit_and_a_resize_name_the_parameter():
    """The seed-edit refusal named the parameter; the rank-edit and resize ones gave a
    shape only, which many tensors of a model share (a probe)."""
    model = _mlp()
    opt = Flora(model.named_parameters(), lr=1e-2, scale_parameter=False, rank=4, beta1=0.9)
    _cycle(model, opt, 0, tau=1)
    opt.param_groups[0]["rank"] = 2
    model(torch.randn(4, 16)).square().mean().backward()
    with pytest.raises(ValueError, match=r"rank=2 does not fit the compressed momentum of parameter '0.weight', of "
                                         r"shape \(32, 16\)"):
        opt.step()
    opt.param_groups[0]["rank"] = 4
    opt.zero_grad()
    model[2].weight.data = torch.zeros(24, 40)
    model[2].weight.grad = torch.zeros(24, 40)
    with pytest.raises(ValueError, match=r"parameter '2.weight', of shape \(24, 40\) \(960 values\) has a state made "
                                         r"for 768 values"):
        opt.step()


# ------------------------------------------------- the accumulator with other optimizers (probe Z37)


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)) for _ in range(n)]


class _GroupCounted(torch.optim.SGD):
    """SGD whose step size depends on a count kept per group and advanced by every step()
    call, as Schedule-Free's ``k`` and ``weight_sum``."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            g["k"] = g.get("k", 0) + 1
            for p in g["params"]:
                if p.grad is not None:
                    self.state[p]["steps"] = self.state[p].get("steps", 0) + 1
                    p.add_(p.grad, alpha=-float(g["lr"]) / g["k"])


def test_fused_mode_refuses_an_optimizer_that_counts_steps_per_group():
    """Fused mode calls step() once per parameter; a count kept per group advanced once per
    parameter, silently (Schedule-Free: k 15 where plain has 3). Refused at the first fused
    step, naming the value; normal mode equals plain accumulation."""
    m = _small()
    opt = _GroupCounted(m.parameters(), lr=0.1)
    acc = CompressedAccumulator(m, rank=None, tau=2, optimizer=opt, fused=True)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(m(x), y).backward()
    # the message says what had stepped (a probe: a bias had moved, its state made, the
    # counter at 1, unsaid; putting them back cost copies of every fused run's first
    # parameters and states, up to 6x the largest parameter's bytes: a review)
    with pytest.raises(RuntimeError, match=r"fused=True: _GroupCounted.step\(\) changed parameter group 0's 'k' \(a "
                                           r"value kept per group, not per parameter\).* Its step had already moved 2 "
                                           r"parameter\(s\) \('2.bias', '2.weight'\), their states and the group's"):
        nn.functional.mse_loss(m(x), y).backward()
    # tried again (a notebook cell run twice): it names what this attempt moved, not the
    # first attempt's too (a review: 3, 4, 5 names, repeated)
    acc.discard_cycle()
    nn.functional.mse_loss(m(x), y).backward()
    with pytest.raises(RuntimeError, match=r"Its step had already moved 1 parameter\(s\) \('2.bias'\), their"):
        nn.functional.mse_loss(m(x), y).backward()

    def run(accumulate):
        m = _small()
        opt = _GroupCounted(m.parameters(), lr=0.1)
        if accumulate:
            CompressedAccumulator(m, rank=None, tau=2, optimizer=opt)
        for i, (x, y) in enumerate(_batches(6)):
            (nn.functional.mse_loss(m(x), y) / 2).backward()
            if i % 2:
                opt.step()
                opt.zero_grad()
        return [p.detach() for p in m.parameters()], opt.param_groups[0]["k"]

    (plain, k), (acc, k_acc) = run(False), run(True)
    assert k == k_acc == 3 and all(torch.equal(a, b) for a, b in zip(plain, acc))


@pytest.mark.parametrize("name", ["adamw", "adagrad", "sgd"])
def test_fused_mode_with_a_scaler_and_a_fused_kernel_optimizer_steps_a_short_cycle(name):
    """``scaler.step(opt)`` closing a short cycle with AdamW(fused=True) or
    Adagrad(fused=True) failed after the first parameter had stepped: the accumulator's
    found-inf flags had shape [1], and those kernels subtract them from 0-dim step counts
    (a probe). The flags are 0-dim now, as GradScaler's; the step equals plain's."""
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
            "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True)}[name]

    def run(fused):
        m = _small()
        opt = make(m.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        if fused:
            CompressedAccumulator(m, rank=None, tau=3, optimizer=opt, fused=True, scaler=scaler)
        for x, y in _batches(2):  # 2 of tau=3
            scaler.scale(nn.functional.mse_loss(m(x), y) / 3).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return [p.detach() for p in m.parameters()]

    plain, fused = run(False), run(True)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(plain, fused))
    assert all(not torch.equal(a, b) for a, b in zip(fused, _small().parameters()))


@pytest.mark.parametrize("rank", [None, 4])
def test_a_step_under_inference_mode_closes_a_short_cycle(rank):
    """``opt.step()`` under ``torch.inference_mode()`` (plain PyTorch trains so) closing a
    short cycle failed at rank 4 in normal mode: the estimate written into ``.grad`` was an
    inference tensor, which has no version counter (a probe). The cycle now closes outside
    inference mode; at rank=None it equals plain accumulation to the bit."""
    def run(accumulate):
        m = _small()
        opt = torch.optim.AdamW(m.parameters(), lr=0.01)
        if accumulate:
            CompressedAccumulator(m, rank=rank, tau=3, optimizer=opt)
        for i, (x, y) in enumerate(_batches(8)):
            (nn.functional.mse_loss(m(x), y) / 3).backward()
            if (i + 1) % 3 == 0 or i % 4 == 3:  # cycles of 3 and a short one at each 4th batch
                with torch.inference_mode():
                    opt.step()
                opt.zero_grad()
        return [p.detach() for p in m.parameters()]

    plain, acc = run(False), run(True)
    if rank is None:
        assert all(torch.equal(a, b) for a, b in zip(plain, acc))
    assert all(torch.isfinite(p).all() for p in acc)


def test_fused_mode_refuses_an_optimizer_whose_step_needs_a_closure():
    """LBFGS was accepted in fused mode and failed inside every backward that ends a cycle
    ('step() missing 1 required positional argument: closure'; a probe)."""
    m = _small()
    with pytest.raises(ValueError, match=r"fused=True: LBFGS.step\(\) needs a closure"):
        CompressedAccumulator(m, rank=4, tau=2, optimizer=torch.optim.LBFGS(m.parameters()), fused=True)


def _head_over_an_unheld_body():
    """A linear head stepped by SGD over a body that the accumulator compresses but no
    optimizer holds: the body's estimate stays in ``.grad`` unless the loop zeroes it."""
    torch.manual_seed(0)
    body, head = nn.Linear(8, 8), nn.Linear(8, 4)
    model = nn.Sequential(body, nn.Tanh(), head)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    CompressedAccumulator(model, rank=2, tau=2, optimizer=opt)
    return model, opt


@pytest.mark.parametrize("zeroed", [False, True])
def test_an_estimate_left_in_grad_into_the_next_cycle_is_warned_once(zeroed):
    """A parameter the stepping optimizer does not hold (a probe of a linear head over a
    backbone left trainable) keeps the cycle's estimate in ``.grad``; the next backward
    adds to it and the sum is compressed again, so its error compounds (relative 1.4 after
    one cycle, 17 after four, 750 after eight). Said once, naming the parameter; nothing
    is said where the loop zeroes every gradient (``model.zero_grad()``), or zeroes them in
    place (``set_to_none=False``)."""
    model, opt = _head_over_an_unheld_body()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i, (x, _) in enumerate(_batches(8)):
            (model(x).square().mean() / 2).backward()
            if i % 2:
                opt.step()
                if zeroed:
                    model.zero_grad(set_to_none=i % 4 == 1)
                else:
                    opt.zero_grad()
    said = [str(w.message) for w in seen if "still holds the last cycle's estimate" in str(w.message)]
    if zeroed:
        assert not said
    else:
        assert len(said) == 1 and said[0].startswith("CompressedAccumulator: the .grad of '0.weight' still holds")


def test_an_estimate_left_in_grad_from_the_second_cycle_on_is_warned():
    """The watch covers the first two cycles (GradView.WATCHED_CYCLES, a sync each): a loop
    that zeroes after its first step only, and leaves the second cycle's estimate in
    ``.grad``, is warned at the third cycle's first backward (with a window of one cycle
    nothing was said: probe Z72)."""
    model, opt = _head_over_an_unheld_body()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i, (x, _) in enumerate(_batches(6)):
            (model(x).square().mean() / 2).backward()
            if i % 2:
                opt.step()
                if i == 1:
                    model.zero_grad()
                else:
                    opt.zero_grad()
            if i == 3:
                assert not [w for w in seen if "still holds" in str(w.message)]
    said = [str(w.message) for w in seen if "still holds the last cycle's estimate" in str(w.message)]
    assert len(said) == 1 and "'0.weight'" in said[0]


@pytest.mark.parametrize("closed_early", ["finish_cycle", "tau"])
def test_a_cycle_closed_before_the_loops_step_is_warned_with_its_cause(closed_early):
    """A loop that calls ``finish_cycle()`` after every backward (to log gradient norms), or
    runs with ``tau`` below its backward passes per step, closes cycles that its step never
    ends: the next pass adds to the estimate in ``.grad``, compressed again (relative error
    17.8 against 2.0, probe Z79). The warning said only "a parameter the optimizer does not
    hold"; it now names these causes and the remedy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = CompressedAccumulator(model, rank=2, tau=4 if closed_early == "finish_cycle" else 2, optimizer=opt)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i, (x, _) in enumerate(_batches(8)):
            (model(x).square().mean() / 4).backward()
            if closed_early == "finish_cycle":
                acc.finish_cycle()
            if i % 4 == 3:
                opt.step()
                opt.zero_grad()
    said = [str(w.message) for w in seen if "still holds the last cycle's estimate" in str(w.message)]
    assert len(said) == 1
    assert "finish_cycle() called between micro-batches" in said[0] and "a tau below the loop's" in said[0]


def test_fused_mode_leaves_alone_a_frozen_parameter_emptied_after_it_had_state():
    """The size check fused mode runs before a cycle (above) had also refused a parameter
    frozen and then emptied to save memory (``p.data = torch.empty(0)``), which ``step()``
    never steps again (probe Z39: a regression of that check)."""
    model = _mlp()
    opt = Flora(model.named_parameters(), lr=1e-2, scale_parameter=False, rank=4, beta1=0.9)
    CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    _cycle(model, opt, 0)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen.data = torch.empty(0)
    model[0].bias.requires_grad_(False)
    before = model[4].weight.detach().clone()
    for c in range(1, 3):
        for k in range(2):
            g = torch.Generator().manual_seed(10 * c + k)
            h = torch.randn(8, 32, generator=g)
            (model[4](model[3](model[2](h))).square().mean() / 2).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model[4].weight, before)


def test_names_that_differ_by_a_wrappers_prefix_load_silently():
    """The same tensors saved under a plain model's names and loaded under a wrapper's
    (``torch.compile``'s ``_orig_mod.``, DDP's ``module.``; DCP between DDP and FSDP2) were
    warned of as other parameters (probe Z39)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    first = Flora(model.named_parameters(), lr=1e-2, rank=4, beta1=0.9)
    model(torch.randn(2, 8)).sum().backward()
    first.step()
    for prefix in ("_orig_mod.", "module."):
        named = [(prefix + n, p) for n, p in model.named_parameters()]
        again = Flora(named, lr=1e-2, rank=4, beta1=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again.load_state_dict(first.state_dict())
        assert again.param_groups[0]["param_names"] == [prefix + "0.weight", prefix + "0.bias"]


@pytest.mark.parametrize("path", CHEAP_PATHS, ids=PATH_IDS)
def test_an_option_edited_into_one_group_of_many_is_refused_naming_the_group(path):
    """A bad value edited into one group mid-run was refused without saying which group
    (probe Z58: beta1=1.5 in group 1 of a model's groups read as 'beta1 must be ..., got
    1.5'). The refusal names the group by its position in param_groups (since session 47,
    probe Z99) and its parameters' names, or by their count and the first one's shape;
    step_parameter's too. Nothing moves."""
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    ps = list(model.parameters())
    opt = Flora([{"params": ps[:2], "param_names": names[:2]}, {"params": ps[2:], "param_names": names[2:]}],
                lr=1e-2, rank=4, beta1=0.9, **path)
    _cycle(model, opt, 0, tau=1)
    opt.param_groups[1]["beta1"] = 1.5
    model(torch.randn(4, 16)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"beta1 must be .*got 1.5 \(in param_groups\[1\], holding '2.weight', "
                                         r"'2.bias', '4.weight' and 1 more\)"):
        opt.step()
    with pytest.raises(ValueError, match=r"got 1.5 \(in param_groups\[1\], holding '2.weight', '2.bias', "
                                         r"'4.weight' and 1 more\)"):  # the group, not p alone (probe Z64)
        opt.step_parameter(ps[4])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    unnamed = Flora(model.parameters(), lr=1e-2, **path)
    unnamed.param_groups[0]["clip_threshold"] = -1
    ps[2].grad_dtype = None  # step_parameter's check of a gradient of another dtype names the group too
    ps[2].grad = torch.randn(ps[2].shape, dtype=torch.float16)  # (review Z101: a group of one, unnumbered)
    with pytest.raises(ValueError, match=r"got 1.5 \(in param_groups\[1\], holding '2.weight', "):
        opt.step_parameter(ps[2])
    ps[2].grad = None
    ps[2].grad_dtype = torch.float32
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"clip_threshold must be .*got -1 \(in param_groups\[0\], holding 6 "
                                         r"parameters, the first of shape \(32, 16\)\)"):
        unnamed.step()
