"""Flora's ``factor_dims`` option: the rule (``flora.adafactor.factored_dims``), its
validation, the state it shapes on the single-tensor and grouped paths, its
identity with HF's rule where the two agree, and checkpoints: a group saved without the
option (before it existed) loads as ``"last"`` and resumes bit-exactly; a new checkpoint
round-trips bit-exactly through ``torch.load(weights_only=True)``.

Every stepping path on permuted views is compared with the single-tensor reference in
tests/test_paths.py, FSDP2 in tests/dist_scenarios.py, and the reference with HF Adafactor
on the permuted parameter in tests/test_adafactor_parity.py."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from flora import Flora
from flora.adafactor import FACTOR_DIMS, factor_move, factored_dims, factored_shapes

from _configs import step_on_noise

# (shape, the two largest dims (ties to the later dims), the last two)
RULE = [
    ((4, 5), (0, 1), (0, 1)),
    ((64, 32, 3, 3), (0, 1), (2, 3)),
    ((24, 12, 1, 1), (0, 1), (2, 3)),
    ((40, 6, 5), (0, 1), (1, 2)),
    ((3, 8, 9), (1, 2), (1, 2)),
    ((8, 3, 3), (0, 2), (1, 2)),  # a tie between dims 1 and 2: the later one
    ((3, 3, 3), (1, 2), (1, 2)),
    ((2, 6, 3, 5), (1, 3), (2, 3)),
    ((5, 1, 1, 7), (0, 3), (2, 3)),
    ((8, 4, 6, 2, 9), (0, 4), (3, 4)),
    ((4, 0, 3), (0, 2), (1, 2)),
]


@pytest.mark.parametrize("shape,largest,last", RULE, ids=str)
def test_the_rule(shape, largest, last):
    assert factored_dims(shape, "largest") == largest == factored_dims(shape)
    assert factored_dims(shape, "last") == last
    assert factor_move(shape, "largest") == (None if largest == last else largest)
    assert factor_move(shape, "last") is None
    view = torch.empty(shape).movedim(largest, (-2, -1)).shape
    assert factored_shapes(shape, "largest") == (view[:-1], view[:-2] + view[-1:])
    assert factored_shapes(shape, "last") == (shape[:-1], shape[:-2] + shape[-1:])


def test_fewer_than_two_dims_are_not_factored():
    for rule in FACTOR_DIMS:
        assert factored_dims((), rule) is None and factored_dims((7,), rule) is None


@pytest.mark.parametrize("bad", ["first", "LARGEST", None, True, 1])
def test_factor_dims_is_validated(bad):
    p = nn.Parameter(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"factor_dims must be one of 'largest', 'last'"):
        Flora([p], lr=1e-3, factor_dims=bad)
    opt = Flora([p], lr=1e-3)
    with pytest.raises(ValueError, match="factor_dims"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "factor_dims": bad})


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("factor", FACTOR_DIMS)
def test_state_follows_the_rule_per_group(factor, foreach):
    """Each group's rule shapes its parameters' statistics; the groups hold the option."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(16, 8, 3, 3)), nn.Parameter(torch.randn(16, 8, 3, 3))
    other = "last" if factor == "largest" else "largest"
    opt = Flora([{"params": [a]}, {"params": [b], "factor_dims": other}], lr=1e-2, rank=4, beta1=0.9,
                factor_dims=factor, foreach=foreach)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    for p, rule in ((a, factor), (b, other)):
        row, col = factored_shapes(p.shape, rule)
        assert opt.state[p]["exp_avg_sq_row"].shape == row and opt.state[p]["exp_avg_sq_col"].shape == col
    assert [g["factor_dims"] for g in opt.state_dict()["param_groups"]] == [factor, other]


def _run(shapes, steps, **kw):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    params.append(nn.Parameter(torch.randn(20, 12).t() * 0.1))  # transposed layout
    opt = Flora(params, lr=1e-2, kappa=2, **kw)
    step_on_noise(opt, params, steps)
    return params, opt


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("kw", [dict(rank=None, beta1=0.9), dict(rank=4, beta1=0.9), dict(rank=None, beta1=None)],
                         ids=str)
def test_both_rules_are_bit_identical_where_they_agree(kw, foreach):
    """2-D tensors and tensors whose last two dims are the largest: "largest" runs the
    very operations of "last" (no view is taken), bit for bit."""
    shapes = [(12, 20), (1, 9), (3, 8, 9), (2, 5, 6, 7), (7,)]
    pa, oa = _run(shapes, 4, factor_dims="largest", foreach=foreach, **kw)
    pb, ob = _run(shapes, 4, factor_dims="last", foreach=foreach, **kw)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k, v in oa.state[a].items():
            assert torch.equal(v, ob.state[b][k]) if isinstance(v, torch.Tensor) else v == ob.state[b][k]


# ------------------------------------------------------------------ checkpoints


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 5))


def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


OPTS = dict(lr=1e-2, rank=3, beta1=0.9, kappa=3, seed=5)


def _through_weights_only(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _uninterrupted(batches, **kw):
    ref = _conv_net()
    _train(ref, Flora(ref.parameters(), **kw, **OPTS), batches)
    return ref


def _saved_after(batches, **kw):
    model = _conv_net()
    opt = Flora(model.parameters(), **kw, **OPTS)
    _train(model, opt, batches)  # mid-way through a kappa window
    return model, opt


def _resume(ckpt, batches, ref, *, warns: str | None, row, col) -> Flora:
    """Load ``ckpt`` into a fresh net and a default Flora (warning ``warns``, or
    silently), check the first kernel's (16 x 3 x 3 x 3) statistics' shapes, train on
    ``batches`` and compare with ``ref`` bit for bit."""
    model = _conv_net()
    opt = Flora(model.parameters(), **OPTS)  # the default, "largest"
    model.load_state_dict(ckpt["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if warns is None:
            opt.load_state_dict(ckpt["opt"])
        else:
            with pytest.warns(UserWarning, match=warns):
                opt.load_state_dict(ckpt["opt"])
    kernel = model[0].weight
    assert opt.state[kernel]["exp_avg_sq_row"].shape == row and opt.state[kernel]["exp_avg_sq_col"].shape == col
    _train(model, opt, batches)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    return opt


def test_old_checkpoint_of_a_conv_net_loads_as_last_and_resumes_bit_exactly():
    """A checkpoint from before factor_dims (its groups lack the key; its conv kernels'
    statistics are over the last two dims) loads into a Flora built with the default
    ("largest"): the group becomes "last", with a warning naming the change, the state
    keeps its shapes, and training resumes as a run under "last" that never stopped."""
    batches = _batches(8)
    model, opt = _saved_after(batches[:4], factor_dims="last")
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["factor_dims"]  # as saved before the option existed
    ckpt = _through_weights_only({"model": model.state_dict(), "opt": sd})
    opt2 = _resume(ckpt, batches[4:], _uninterrupted(batches, factor_dims="last"),
                   warns=r"factor_dims: 'largest' -> 'last'", row=(16, 3, 3), col=(16, 3, 3))
    assert opt2.param_groups[0]["factor_dims"] == "last"


def test_old_checkpoint_of_matrices_loads_without_a_warning():
    """Where the two rules factor every tensor alike (2-D and 1-D), an old checkpoint
    loads as "last" silently: nothing changes."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    opt = Flora(model.parameters(), **OPTS)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["factor_dims"]
    opt2 = Flora(model.parameters(), **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["factor_dims"] == "last"


def test_new_checkpoint_round_trips_bit_exactly():
    batches = _batches(8)
    model, opt = _saved_after(batches[:4])
    ckpt = _through_weights_only({"model": model.state_dict(), "opt": opt.state_dict()})
    assert [g["factor_dims"] for g in ckpt["opt"]["param_groups"]] == ["largest"]
    # the kernel's view: (3, 3, 16, 3)
    _resume(ckpt, batches[4:], _uninterrupted(batches), warns=None, row=(3, 3, 16), col=(3, 3, 3))


def test_state_of_the_other_rule_is_refused_before_any_change():
    """A state whose statistics were shaped by "largest", in groups that claim "last": a
    clear error naming factor_dims; the optimizer is unchanged."""
    model = _conv_net()
    opt = Flora(model.parameters(), **OPTS)
    _train(model, opt, _batches(1))
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        g["factor_dims"] = "last"
    other = Flora(model.parameters(), **OPTS)
    with pytest.raises(ValueError, match="exp_avg_sq_row.*factor_dims than 'last'"):
        other.load_state_dict(sd)
    assert not other.state and other.param_groups[0]["factor_dims"] == "largest"


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_factor_dims_edited_mid_run_is_refused_before_any_change(foreach):
    """factor_dims edited in a group after its state exists: step() refuses it with an
    error naming the option and the shapes, before a parameter or state moves; set back,
    the run goes on; with the parameter's state dropped, it starts afresh on the new rule."""
    model = _conv_net()
    opt = Flora(model.parameters(), foreach=foreach, **OPTS)
    batches = _batches(3)
    _train(model, opt, batches[:1])
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["factor_dims"] = "last"
    with pytest.raises(ValueError, match=r"factor_dims='last' does not fit the second moment of a parameter of "
                                         r"shape \(16, 3, 3, 3\).*optimizer.state.pop"):
        _train(model, opt, batches[1:2])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    after = torch.optim.Optimizer.state_dict(opt)["state"]  # Flora's refuses the edit too
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(after[i][k], v) if isinstance(v, torch.Tensor) else after[i][k] == v
    opt.param_groups[0]["factor_dims"] = "largest"  # back: steps
    _train(model, opt, batches[1:2])
    opt.param_groups[0]["factor_dims"] = "last"
    for p in model.parameters():
        if p.dim() >= 3:
            opt.state.pop(p)
    _train(model, opt, batches[2:])
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert tuple(opt.state[conv]["exp_avg_sq_row"].shape) == factored_shapes(tuple(conv.shape), "last")[0]


def test_factor_dims_edited_mid_run_is_refused_by_step_parameter():
    """The same check on the per-parameter path (optimizer-in-backward)."""
    model = _conv_net()
    opt = Flora(model.parameters(), **OPTS)
    _train(model, opt, _batches(1))
    opt.param_groups[0]["factor_dims"] = "last"
    conv = next(p for p in model.parameters() if p.dim() == 4)
    conv.grad = torch.randn_like(conv)
    before = conv.detach().clone()
    with pytest.raises(ValueError, match="factor_dims='last' does not fit"):
        opt.step_parameter(conv)
    with pytest.raises(ValueError, match="factor_dims='last' does not fit"):
        opt.step_parameters([conv])
    assert torch.equal(conv, before)


def test_old_pickle_gets_last():
    """An optimizer pickled before the option existed (no factor_dims in its groups or
    defaults) unpickles with "last", the rule its state was shaped by, in its groups and
    its defaults, and steps."""
    model = _conv_net()
    opt = Flora(model.parameters(), factor_dims="last", **OPTS)
    _train(model, opt, _batches(2))
    for g in opt.param_groups:
        del g["factor_dims"]
    del opt.defaults["factor_dims"]
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2.param_groups[0]["factor_dims"] == "last"
    params = [p for g in opt2.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt2.step()
    kernel = params[0]
    assert opt2.state[kernel]["exp_avg_sq_row"].shape == (16, 3, 3)
    assert opt2.defaults["factor_dims"] == "last"  # a group added later steps as the others
    opt2.add_param_group({"params": [nn.Parameter(torch.randn(8, 4, 3, 3))]})
    assert opt2.param_groups[-1]["factor_dims"] == "last"


def test_a_permuted_tensor_never_reaches_the_triton_kernels():
    """compile="triton" normalises 2-D parameters only (never permuted): a conv kernel's
    spec carries its factored dims and no kernel; a matrix's, the kernel and no view."""
    from flora.functional import make_spec

    group = Flora([nn.Parameter(torch.randn(2, 2))], lr=1e-3).param_groups[0]
    conv = make_spec(group, {}, (16, 8, 3, 3), torch.float32, kernel="triton")
    assert conv.kernel is None and conv.factor == (0, 1)
    last = make_spec({**group, "factor_dims": "last"}, {}, (16, 8, 3, 3), torch.float32, kernel="triton")
    assert last.kernel is None and last.factor is None
    matrix = make_spec(group, {}, (16, 8), torch.float32, kernel="triton")
    assert matrix.kernel == "triton" and matrix.factor is None
