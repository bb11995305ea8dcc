"""``momentum_dtype``: the first moment stored in bfloat16, its arithmetic in the state dtype.

The reference is the definition: a float32 Flora whose first moment is rounded to
bfloat16 (and back) after every step and after every resample's transfer,
stochastically by ``flora.rounding`` keyed by the step count, takes bit for bit the
steps of ``momentum_dtype="bfloat16"``. Every stepping path is also compared
with the single-tensor one in ``tests/test_paths.py`` (rows ``bf16-momentum`` and
``bf16-dense-momentum``) and FSDP2 in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import flora
from flora import Flora
from flora.bench import optimizers as bench_optimizers
from flora.rounding import AFTER_TRANSFER, stochastic_bfloat16

from _configs import extended

NARROW = {"bfloat16": torch.bfloat16}
MOMENTUM_KEYS = ("exp_avg", "exp_avg_c")


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 6)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 24, generator=g).to(dtype), torch.randint(0, 6, (16,), generator=g)) for _ in range(n)]


def _step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def _round_momentum(opt, dtype, nearest=False):
    """The reference: the first moment rounded to ``dtype`` and back, in place:
    stochastically, keyed by the step count (float64 through float32), or to nearest
    (a state converted when the option changes)."""
    assert dtype == torch.bfloat16
    for st in opt.state.values():
        for k in MOMENTUM_KEYS:
            if k in st:
                st[k].copy_(st[k].to(dtype) if nearest else stochastic_bfloat16(st[k].float(), st["step"]))


@pytest.fixture
def rounded_transfer(monkeypatch):
    """The reference's resample: the transfer's result rounded as a bfloat16 momentum's
    is, keyed by the step count the test puts in the returned dict as "t". (The bfloat16
    optimizer takes the same patched transfer; its own rounding of a value bfloat16
    holds changes nothing.)"""
    import flora.functional as F

    holder = {}

    def transfer(c, a, a_new, dim, _orig=F.transfer):
        out = _orig(c, a, a_new, dim)
        return stochastic_bfloat16(out.float(), holder["t"], AFTER_TRANSFER).to(out.dtype)

    monkeypatch.setattr(F, "transfer", transfer)
    return holder


OPTS = dict(lr=1e-2, beta1=0.9, kappa=3, seed=5, scale_parameter=False)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("rank", [4, None], ids=["compressed", "dense"])
@pytest.mark.parametrize("name", list(NARROW))
def test_equals_float32_rounded_after_every_step(name, rank, foreach, rounded_transfer):
    """Bit for bit: the narrow momentum is the float32 step's momentum rounded
    stochastically (keyed by the step), and the parameters move as a float32 Flora whose momentum is rounded after each
    step (7 steps, two resamples at kappa=3)."""
    model, ref_model = _net(), _net()
    opt = Flora(model.parameters(), rank=rank, momentum_dtype=name, foreach=foreach, **OPTS)
    ref = Flora(ref_model.parameters(), rank=rank, momentum_dtype=None, foreach=foreach, **OPTS)
    for t, batch in enumerate(_batches(7), 1):
        rounded_transfer["t"] = t
        _step(model, opt, batch)
        _step(ref_model, ref, batch)
        _round_momentum(ref, NARROW[name])
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.equal(p, q)
    kinds = set()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for k in MOMENTUM_KEYS:
            if k in opt.state[p]:
                kinds.add(k)
                assert opt.state[p][k].dtype == NARROW[name]
                assert torch.equal(opt.state[p][k], ref.state[q][k].to(NARROW[name]))
        for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if k in opt.state[p]:
                assert opt.state[p][k].dtype == torch.float32  # the second moment keeps the state dtype
    assert kinds == ({"exp_avg_c", "exp_avg"} if rank else {"exp_avg"})


def test_half_the_momentum_bytes_and_close_to_float32():
    """The state counted from the tensors: the momentum's bytes halve, nothing else
    changes; after 30 steps the parameters moved as float32 momentum's to 1% of the
    movement. The default "auto" is "bfloat16" when a rank is set."""
    batches = _batches(30)
    runs = {}
    for name in (None, "bfloat16", "auto"):
        model = _net()
        p0 = [p.detach().clone() for p in model.parameters()]
        opt = Flora(model.parameters(), rank=4, momentum_dtype=name, **OPTS)
        for b in batches:
            _step(model, opt, b)
        mom = sum(st[k].numel() * st[k].element_size() for st in opt.state.values() for k in MOMENTUM_KEYS if k in st)
        runs[name] = (model, p0, flora.state_bytes(opt), mom)
        if name == "auto":
            assert {k: st[k].dtype for st in opt.state.values() for k in MOMENTUM_KEYS if k in st} == {
                "exp_avg_c": torch.bfloat16, "exp_avg": torch.bfloat16}
    (m32, p0, total32, mom32), (m16, _, total16, mom16) = runs[None], runs["bfloat16"]
    assert mom16 * 2 == mom32 and total32 - total16 == mom32 // 2
    shapes = [tuple(p.shape) for p in m16.parameters()]
    assert total16 == flora.flora_state_bytes(shapes, rank=4, beta1=0.9, momentum_dtype=torch.bfloat16)
    assert total32 == flora.flora_state_bytes(shapes, rank=4, beta1=0.9, momentum_dtype=None)
    m_auto, _, total_auto, mom_auto = runs["auto"]
    assert total_auto == total16 == flora.flora_state_bytes(shapes, rank=4, beta1=0.9)  # the default
    with pytest.raises(ValueError, match="momentum_dtype"):
        flora.flora_state_bytes(shapes, rank=4, beta1=0.9, momentum_dtype="int8")
    for a0, a, b, c in zip(p0, m32.parameters(), m16.parameters(), m_auto.parameters()):
        move = (a - a0).abs().max()
        assert move > 1e-2
        assert (a - b).abs().max() <= 0.01 * move
        assert torch.equal(b, c)


def test_float64_parameters_step_in_float64_and_store_bfloat16(rounded_transfer):
    model, ref_model = _net(torch.float64), _net(torch.float64)
    opt = Flora(model.parameters(), rank=4, momentum_dtype=torch.bfloat16, **OPTS)
    ref = Flora(ref_model.parameters(), rank=4, momentum_dtype=None, **OPTS)
    for t, batch in enumerate(_batches(4, torch.float64), 1):
        rounded_transfer["t"] = t
        _step(model, opt, batch)
        _step(ref_model, ref, batch)
        _round_momentum(ref, torch.bfloat16)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["exp_avg_sq_row" if p.dim() == 2 else "exp_avg_sq"].dtype == torch.float64
        assert opt.state[p]["exp_avg_c" if "exp_avg_c" in opt.state[p] else "exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, "int8", "bf16", True, 16, 0.5, "float16", torch.float16])
def test_bad_momentum_dtype_is_refused_naming_the_option(bad):
    model = _net()
    with pytest.raises(ValueError, match="momentum_dtype must be 'auto' .*None .*'bfloat16'"):
        Flora(model.parameters(), rank=4, momentum_dtype=bad, **OPTS)
    opt = Flora(model.parameters(), rank=4, **OPTS)
    with pytest.raises(ValueError, match="momentum_dtype"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], "momentum_dtype": bad})
    # edited in a group mid-run: refused before any change
    _step(model, opt, _batches(1)[0])
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["momentum_dtype"] = bad
    with pytest.raises(ValueError, match="momentum_dtype"):
        _step(model, opt, _batches(2)[1])
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for pid, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][pid][k]) if isinstance(v, torch.Tensor) else v == after["state"][pid][k]


def test_float16_is_refused_saying_why():
    with pytest.raises(ValueError, match="not float16: the momentum holds lr-scaled updates"):
        Flora(_net().parameters(), rank=4, momentum_dtype=torch.float16, **OPTS)


def test_a_torch_dtype_is_held_by_name():
    """Groups hold the name (checkpoints hold plain values); a group added with a dtype too."""
    model = _net()
    opt = Flora(list(model.parameters())[:2], rank=4, momentum_dtype=torch.bfloat16, **OPTS)
    opt.add_param_group({"params": list(model.parameters())[2:], "momentum_dtype": torch.float32})
    assert [g["momentum_dtype"] for g in opt.param_groups] == ["bfloat16", "float32"]
    _step(model, opt, _batches(1)[0])
    w0, w1 = model[0].weight, model[2].weight
    assert opt.state[w0]["exp_avg_c"].dtype == torch.bfloat16
    assert opt.state[w1]["exp_avg_c"].dtype == torch.float32


def test_resume_is_bit_exact_and_loads_weights_only():
    batches = _batches(8)
    model = _net()
    opt = Flora(model.parameters(), rank=4, momentum_dtype="bfloat16", **OPTS)
    for b in batches:
        _step(model, opt, b)
    model2 = _net()
    opt2 = Flora(model2.parameters(), rank=4, momentum_dtype="bfloat16", **OPTS)
    for b in batches[:5]:
        _step(model2, opt2, b)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3 = _net()
    opt3 = Flora(model3.parameters(), rank=4, momentum_dtype="bfloat16", **OPTS)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.state[model3[0].weight]["exp_avg_c"].dtype == torch.bfloat16  # not cast to the parameter's
    for b in batches[5:]:
        _step(model3, opt3, b)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_a_float32_state_converts_at_its_next_step(rounded_transfer):
    """A checkpoint of float32 momentum loads as saved (its options win, as in torch, with
    a warning naming momentum_dtype); set to bfloat16 afterwards, the state is rounded
    at the next step, which then equals the rounded reference's."""
    batches = _batches(6)
    model, ref_model = _net(), _net()
    opt = Flora(model.parameters(), rank=4, momentum_dtype=None, **OPTS)
    ref = Flora(ref_model.parameters(), rank=4, momentum_dtype=None, **OPTS)
    for b in batches[:3]:
        _step(model, opt, b)
        _step(ref_model, ref, b)
    sd = opt.state_dict()
    model2 = _net()
    model2.load_state_dict(model.state_dict())
    opt2 = Flora(model2.parameters(), rank=4, momentum_dtype="bfloat16", **OPTS)
    with pytest.warns(UserWarning, match="momentum_dtype: 'bfloat16' -> None"):
        opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["momentum_dtype"] is None
    opt2.param_groups[0]["momentum_dtype"] = "bfloat16"
    _round_momentum(ref, torch.bfloat16, nearest=True)  # the conversion rounds to nearest
    for t, b in enumerate(batches[3:], 4):
        rounded_transfer["t"] = t
        _step(model2, opt2, b)
        _step(ref_model, ref, b)
        _round_momentum(ref, torch.bfloat16)
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        st = opt2.state[p]
        assert st["exp_avg_c" if "exp_avg_c" in st else "exp_avg"].dtype == torch.bfloat16


def test_a_state_saved_before_the_option_loads_with_none():
    """A checkpoint from before the option (or before "auto", saving None) keeps its
    float32 momentum: silently into Flora(momentum_dtype=None), with the usual warning
    naming the option into a default-built Flora ("auto")."""
    model = _net()
    opt = Flora(model.parameters(), rank=4, momentum_dtype=None, **OPTS)
    _step(model, opt, _batches(1)[0])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["momentum_dtype"]  # as saved before the option existed
    opt2 = Flora(_net().parameters(), rank=4, momentum_dtype=None, **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.param_groups[0]["momentum_dtype"] is None
    model5 = _net()
    opt5 = Flora(model5.parameters(), rank=4, **OPTS)
    with pytest.warns(UserWarning, match="momentum_dtype: 'auto' -> None"):
        opt5.load_state_dict(copy.deepcopy(sd))
    assert opt5.param_groups[0]["momentum_dtype"] is None
    _step(model5, opt5, _batches(2)[1])
    assert {st["exp_avg_c"].dtype for st in opt5.state.values() if "exp_avg_c" in st} == {torch.float32}
    # and an optimizer pickled before it
    opt3 = Flora(_net().parameters(), rank=4, momentum_dtype="bfloat16", **OPTS)
    state = opt3.__getstate__()
    del state["defaults"]["momentum_dtype"]
    for g in state["param_groups"]:
        del g["momentum_dtype"]
    opt4 = Flora.__new__(Flora)
    opt4.__setstate__(state)
    assert opt4.param_groups[0]["momentum_dtype"] is None and opt4.defaults["momentum_dtype"] is None


def test_deepcopy_and_pickle_keep_the_stored_dtype():
    model = _net()
    opt = Flora(model.parameters(), rank=4, momentum_dtype="bfloat16", **OPTS)
    _step(model, opt, _batches(1)[0])
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.param_groups[0]["momentum_dtype"] == "bfloat16"
        assert {v["exp_avg_c"].dtype for v in other.state.values() if "exp_avg_c" in v} == {torch.bfloat16}


def test_bench_names_carry_the_momentum_dtype():
    spec = bench_optimizers.parse("flora-r32+bf16")
    assert (spec.rank, spec.momentum_dtype, spec.momentum_form) == (32, "bfloat16", "floored")
    spec = bench_optimizers.parse("flora-r8-exact-orthonormal+bf16+ca-r8")
    assert (spec.momentum_dtype, spec.momentum_form, spec.accumulate_rank) == ("bfloat16", "exact", 8)
    assert bench_optimizers.parse("flora-r8").momentum_dtype is None  # Flora's default, "auto"
    assert bench_optimizers.parse("flora-r8+fp32").momentum_dtype == "float32"
    fp32 = bench_optimizers.make_optimizer(bench_optimizers.parse("flora-r8+fp32"), _net().parameters(), 1e-3,
                                           kappa=10, seed=0)
    assert fp32.param_groups[0]["momentum_dtype"] == "float32"
    default = bench_optimizers.make_optimizer(bench_optimizers.parse("flora-r8"), _net().parameters(), 1e-3,
                                              kappa=10, seed=0)
    assert default.param_groups[0]["momentum_dtype"] == "auto"
    opt = bench_optimizers.make_optimizer(spec, _net().parameters(), 1e-3, kappa=10, seed=0)
    assert opt.param_groups[0]["momentum_dtype"] == "bfloat16"
    for bad in ("adamw+bf16", "adafactor-b0.9+bf16", "flora-dense+bf16", "adamw+fp32"):
        with pytest.raises(ValueError, match=r"\+(bf16|fp32) .* follows a flora-rR name only"):
            bench_optimizers.parse(bad)
    with pytest.raises(ValueError, match="unknown optimizer"):
        bench_optimizers.parse("flora-r8+fp16")


@pytest.mark.parametrize("beta1", [extended(0.9), 0.99])  # (0.99: the larger bias of rounding to nearest)
def test_a_steady_gradient_is_reached_at_any_beta1(beta1):
    """A constant gradient, dense momentum (it holds lr times the normalised update, here
    lr times 1): float32's momentum reaches lr. Rounded to nearest, bfloat16's would stop
    where (1 - beta1) (u - m) falls below half a unit in the last place: 20% short at
    beta1 = 0.99 (0.7-0.85 of lr, measured before rounding became stochastic), up to 4% at
    0.9. Rounded stochastically it is unbiased and reaches lr to within 1% on average (16
    elements, the last 200 of 1500 steps)."""
    lr = 1e-4
    final = {}
    for name in (None, "bfloat16"):
        p = nn.Parameter(torch.zeros(4, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about at any beta1
            opt = Flora([p], lr=lr, beta1=beta1, momentum_dtype=name, scale_parameter=False, relative_step=False)
        seen = []
        for i in range(1500):
            p.grad = torch.ones(4, 4)
            opt.step()
            if i >= 1300:
                seen.append(opt.state[p]["exp_avg"].float().mean().item() / lr)
        final[name] = sum(seen) / len(seen)
    assert final[None] > 0.99
    assert abs(final["bfloat16"] - 1.0) < 0.01, final


@pytest.mark.parametrize("kw", [dict(rank=None, beta1=0.9), dict(rank=4, beta1=None), dict(rank=None, beta1=None)],
                         ids=["no-rank", "no-momentum", "neither"])
def test_an_old_checkpoint_loads_silently_where_auto_stores_as_none(kw):
    """Without a rank or without a momentum, "auto" stores as None does: a checkpoint saved
    with None (or before the option) loads into a default-built Flora with no warning."""
    model = _net()
    opt = Flora(model.parameters(), momentum_dtype=None, **{**OPTS, **kw})
    _step(model, opt, _batches(1)[0])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["momentum_dtype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank=4 without beta1 warns that nothing is compressed
        opt2 = Flora(_net().parameters(), **{**OPTS, **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.load_state_dict(sd)


def test_a_momentum_narrowed_on_its_way_in_is_named():
    """torch.distributed.checkpoint loads into the tensors the loading optimizer made: a
    float32 checkpoint read into a default-built Flora arrives in bfloat16, rounded. The
    load cannot undo that; it warns, saying how to resume exactly (momentum_dtype=None)."""
    model = _net()
    opt = Flora(model.parameters(), rank=4, momentum_dtype=None, **OPTS)
    _step(model, opt, _batches(1)[0])
    sd = copy.deepcopy(opt.state_dict())  # (a state_dict's per-parameter dicts are the optimizer's own)
    for st in sd["state"].values():  # what DCP hands over: the saved values in the loader's bfloat16 tensors
        for k in MOMENTUM_KEYS:
            if k in st:
                st[k] = st[k].to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"4 loaded momentum tensor\(s\) are narrower .* momentum_dtype=None"):
        Flora(_net().parameters(), rank=4, **OPTS).load_state_dict(copy.deepcopy(sd))
    sd_ok = opt.state_dict()  # float32 as saved: no such warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Flora(_net().parameters(), rank=4, **OPTS).load_state_dict(sd_ok)
    assert not [w for w in seen if "narrower" in str(w.message)]
    # momentum_dtype edited to float32 mid-run, a parameter idle since, then saved: its
    # momentum was saved in bfloat16 and nothing is rounded; the warning names that cause
    # too, and the resumed run equals the uninterrupted one bit for bit (probe Z16)
    ends = []
    for resume in (False, True):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
        opt = Flora([a, b], lr=1e-2, rank=None, beta1=0.9, momentum_dtype="bfloat16", foreach=False)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            if step == 2:
                opt.param_groups[0]["momentum_dtype"] = None
            if resume and step == 3:
                sd = copy.deepcopy(opt.state_dict())
                a, b = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
                opt = Flora([a, b], lr=1e-2, rank=None, beta1=0.9, momentum_dtype=None, foreach=False)
                with pytest.warns(UserWarning, match=r"1 loaded momentum .* or they were saved so"):
                    opt.load_state_dict(sd)
            a.grad = torch.randn(6, 5, generator=g)
            b.grad = torch.randn(6, 5, generator=g) if step < 2 or step == 5 else None
            opt.step()
        ends.append((a.detach(), b.detach()))
    assert all(torch.equal(x, y) for x, y in zip(*ends))
    # a model cast to float64 after a step and saved before the next: the default ("auto")
    # group's bfloat16 momentum is what it holds, widened at its next step; nothing was
    # rounded on the way in, and the load said so (a probe)
    model = _net()
    opt = Flora(model.parameters(), rank=4, **OPTS)
    _step(model, opt, _batches(1)[0])
    model.double()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Flora(model.parameters(), rank=4, **OPTS).load_state_dict(opt.state_dict())
    assert not [w for w in seen if "narrower" in str(w.message)]
