"""``Flora(compile=...)`` keeps a bucket's state as views of one stack (flora.stacks).

A compiled core takes the stack as one input, instead of a list it would stack and write
back tensor by tensor. These tests check what could go wrong with that: a state entry
replaced or edited by the user, a bucket whose members change, a loaded checkpoint, the
step counters' stack, a narrow momentum, and the bytes a checkpoint takes. Every run is
compared with eager Flora (the single-tensor reference's equal, tests/test_paths.py),
in float64 so that a stale value would show far above the rounding.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import flora
from flora import Flora
from flora import functional as F

pytest.importorskip("torch._dynamo")

SHAPES = [(12, 20), (12, 20), (12, 20), (20,), (20,), (20,)]
BASE = dict(lr=1e-2, rank=3, beta1=0.9, kappa=2, seed=5)
TOL = dict(rtol=1e-9, atol=1e-12)  # float64: the compiled scalars differ by rounding only


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]


def _step(opt, params, t, skip=()):
    g = torch.Generator().manual_seed(100 + t)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad = None if i in skip else grad
    opt.step()


def _pair(**kw):
    """(eager, compiled) optimizers over equal parameters."""
    out = []
    for compiled in (False, "aot_eager"):
        params = _params()
        out.append((params, Flora(params, **{**BASE, **kw}, compile=compiled)))
    return out


def _assert_equal(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x.detach(), y.detach(), **TOL)
        for k, v in oa.state[x].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(ob.state[y][k].to(v.dtype), v, **TOL)
            else:
                assert ob.state[y][k] == v, k


def _stacked(opt, params, key):
    """Whether the bucket's entries ``key`` are the rows of one tensor."""
    ts = [opt.state[p][key] for p in params]
    base = ts[0]._base
    return base is not None and all(t._base is base for t in ts) and base.shape[0] == len(ts)


@pytest.mark.parametrize("kw", [{}, {"momentum_dtype": "bfloat16"}, {"rank": None}],
                         ids=["compressed", "bf16-momentum", "dense-momentum"])
def test_compiled_buckets_hold_their_state_as_one_stack(kw):
    eager, comp = _pair(**kw)
    for t in range(5):  # two resamples
        _step(eager[1], eager[0], t)
        _step(comp[1], comp[0], t)
        if t == 1:
            made = {k: v[0] for k, v in comp[1]._stacks._d.items()}
            counters = {k: v[0] for k, v in comp[1]._device_steps._stacks.items()}
    _assert_equal(eager, comp)
    params, opt = comp
    # made once: later steps (resamples included) reuse the stacks, copying nothing
    assert len(made) == 5 and opt._stacks._d.keys() == made.keys()  # 3 for the matrices, 2 for the vectors
    assert all(opt._stacks._d[k][0] is v for k, v in made.items())
    assert all(opt._device_steps._stacks[k][0] is v for k, v in counters.items()) and len(counters) == 2
    # the bytes held, counted from the tensors (a shared stack once, whole), as eager's
    assert flora.state_bytes(opt) == flora.state_bytes(eager[1]) > 0
    mom = "exp_avg" if kw.get("rank", 3) is None else "exp_avg_c"
    for key in ("exp_avg_sq_row", "exp_avg_sq_col", mom):
        assert _stacked(opt, params[:3], key), key
    assert _stacked(opt, params[3:], "exp_avg_sq") and _stacked(opt, params[3:], "exp_avg")
    assert not _stacked(eager[1], eager[0][:3], "exp_avg_sq_row")  # eager keeps its own tensors
    if "momentum_dtype" in kw:
        assert opt.state[params[0]][mom].dtype == torch.bfloat16


def test_a_replaced_or_edited_entry_is_followed():
    """A user replaces one entry and edits another in place: the next compiled step reads
    both (a stack made earlier and kept would not)."""
    eager, comp = _pair()
    for params, opt in (eager, comp):
        for t in range(3):
            _step(opt, params, t)
        st = opt.state[params[1]]
        st["exp_avg_sq_row"] = st["exp_avg_sq_row"] * 4.0  # a new tensor
        opt.state[params[2]]["exp_avg_c"].mul_(-0.5)  # in place: a view of the stack
        opt.state[params[4]]["exp_avg"] = torch.zeros_like(opt.state[params[4]]["exp_avg"])
        for t in range(3, 5):
            _step(opt, params, t)
    _assert_equal(eager, comp)
    assert _stacked(comp[1], comp[0][:3], "exp_avg_sq_row")


def test_a_bucket_whose_members_change():
    """A parameter without a gradient for a step leaves its bucket (a stack of the others
    is made), and one whose step count differs steps in a bucket of its own; both come
    back: equal to eager throughout."""
    eager, comp = _pair()
    for params, opt in (eager, comp):
        _step(opt, params, 0)
        _step(opt, params, 1, skip=(1, 4))
        _step(opt, params, 2)  # parameters 1 and 4 are a step behind: buckets of their own
        opt.state[params[0]]["step"] = opt.state[params[1]]["step"]  # now 0 and 1 share a count
        for t in range(3, 6):
            _step(opt, params, t)
    _assert_equal(eager, comp)


@pytest.mark.parametrize("pattern", [[{0, 1}, {0, 2}, {0, 1, 2}, {0}, {0, 1, 2}, {1, 2}],
                                     [{0, 1, 2}, {1, 2}, {0, 1, 2}, {0, 1}, {0, 1, 2}, {2}]],
                         ids=["one-alone-while-others-restack", "leaver-steps-alone"])
def test_a_member_that_leaves_its_stack_keeps_this_steps_update(pattern):
    """A parameter that steps on every step but alone (its count differs from the others')
    still holds a row of its old stack while a later bucket of the same step dissolves that
    stack: its core's update goes to that row, which must stay its state (a copy made at the
    dissolving lost the whole step: its state was the previous step's, and its weights
    drifted; found by a new-user probe)."""
    eager, comp = _pair()
    for params, opt in (eager, comp):
        for t, on in enumerate(pattern):
            _step(opt, params, t, skip=[i for i in range(3) if i not in on])
    _assert_equal(eager, comp)


def test_a_dropped_state_takes_its_stack_with_it():
    """The README's remedy for a resized parameter, ``opt.state.pop(p)``: at the next step
    no stack holds the dropped state, and the bytes held are eager's."""
    eager, comp = _pair()
    for params, opt in (eager, comp):
        for t in range(2):
            _step(opt, params, t)
        opt.state.pop(params[0])
        opt.state.pop(params[3])
        for t in range(2, 4):
            _step(opt, params, t, skip=(0, 1, 3))
    _assert_equal(eager, comp)
    params, opt = comp
    live = {id(st) for st in opt.state.values()}
    assert all(id(st) in live for _, _, states, _ in opt._stacks._d.values() for st in states)
    assert flora.state_bytes(opt) == flora.state_bytes(eager[1])


def test_members_that_come_and_go_leave_no_stack_behind(monkeypatch):
    """Parameters that step on some steps only (experts of a mixture, frozen parts): each
    step's bucket is a new set, so a new stack is made. The members that left get copies
    of their rows, and the old stack is freed: the bytes held stay eager's, and one stack
    per bucket and key is kept (views of every old stack would hold a stack per set of
    members seen), as the staged step keeps the transposed projections of this step's
    buckets only. Equal to eager throughout."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)  # the matrices' buckets step in stages
    eager, comp = _pair()
    for params, opt in (eager, comp):
        for t in range(8):
            _step(opt, params, t, skip=(t % 3, 3 + t % 3))  # a different member missing each step
    _assert_equal(eager, comp)
    params, opt = comp
    assert flora.state_bytes(opt) == flora.state_bytes(eager[1])
    assert len(opt._stacks) == 5  # the last step's two buckets: 3 keys and 2 keys
    # the staged step's transposed projections: of the last step's buckets only
    assert set(opt._transposed) <= {id(p) for p in params[:3] if p.grad is not None} and opt._transposed
    held = {id(v[0]) for v in opt._stacks._d.values()}
    for p in params:
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v._base is not None:
                assert id(v._base) in held  # a view of a stack the optimizer keeps


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_the_compiled_workspace_is_reported_and_holds_no_uncached_projection(monkeypatch, cache):
    """(Found by a new-user probe of memory.) The staged step's two bucket-sized buffers
    were reported by no public figure (a 32 MiB parameter held 64 MiB more than state_bytes
    + cache_bytes said): flora.workspace_bytes counts them, 0 when eager. And with
    cache_projections=False the staged step kept each bucket's projection alive (for its
    transposed view): it keeps none now, and steps as the cached run."""
    import weakref

    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)  # the matrices' bucket steps in stages
    runs = []
    for compiled in (False, "aot_eager"):
        params = _params()
        opt = Flora(params, **BASE, compile=compiled, cache_projections=cache)
        for t in range(3):
            _step(opt, params, t)
        runs.append((params, opt))
    _assert_equal(*runs)
    eager, comp = runs[0][1], runs[1][1]
    assert flora.workspace_bytes(eager) == 0 and flora.workspace_bytes(torch.optim.SGD(runs[0][0], lr=0.1)) == 0
    # the staged (3, 12, 20) bucket's update and decompressed momentum, float64: the largest buffers
    assert flora.workspace_bytes(comp) == comp.workspace_bytes() >= 2 * 3 * 12 * 20 * 8
    assert bool(comp._transposed) == cache
    if not cache:  # this step's projection is freed once the step is over
        seen = []
        real = F.prepare

        def spy(*a, **k):
            work = real(*a, **k)
            if work.a is not None:
                seen.append(weakref.ref(work.a))
            return work
        monkeypatch.setattr(F, "prepare", spy)
        _step(comp, runs[1][0], 3)
        assert seen and all(r() is None for r in seen)


def test_load_state_dict_into_a_running_compiled_optimizer():
    """A checkpoint of step 3 loaded into the same compiled optimizer after step 5: its
    stacks and counters are rebuilt from the loaded state (counters back at 3), and it
    steps on as an uninterrupted run."""
    eager, comp = _pair(lr=None)  # a relative step: reads the counters
    for params, opt in (eager, comp):
        for t in range(3):
            _step(opt, params, t)
    saved = copy.deepcopy(comp[1].state_dict())
    saved_params = [p.detach().clone() for p in comp[0]]
    for t in range(3, 5):
        _step(comp[1], comp[0], t)
    with torch.no_grad():
        for p, q in zip(comp[0], saved_params):
            p.copy_(q)
    comp[1].load_state_dict(saved)
    for params, opt in (eager, comp):
        for t in range(3, 6):
            _step(opt, params, t)
    _assert_equal(eager, comp)


def test_a_checkpoint_writes_each_stack_once():
    """torch.save of a stacked state writes the stacks' bytes once (not once per view),
    and it loads with weights_only=True."""
    eager, comp = _pair()
    sizes = []
    for params, opt in (eager, comp):
        for t in range(2):
            _step(opt, params, t)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        sizes.append(buf.tell())
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert len(loaded["state"]) == len(SHAPES)
    assert sizes[1] <= sizes[0]


def test_counters_edited_on_the_host_are_followed():
    """Every member of a bucket set back to step 0 on the host (a reset): the bucket's
    stacked device counters are rewritten from the integers (a relative step size reads
    them), as eager Flora's step reads the integers."""
    eager, comp = _pair(lr=None)
    for params, opt in (eager, comp):
        for t in range(3):
            _step(opt, params, t)
        for p in params:
            opt.state[p]["step"] = 0
        _step(opt, params, 3)
    _assert_equal(eager, comp)


@pytest.mark.usefixtures("fresh_dynamo")  # counts compilations
def test_the_users_compiled_step_takes_stacks_too():
    """torch.compile(opt.step): the prelude, the one graph break, knows it is traced and
    hands the caller's graph stacked state; equal to eager, every graph compiled once."""
    from torch._dynamo.testing import CompileCounter

    eager_params = _params()
    eager = (eager_params, Flora(eager_params, **BASE))
    params = _params()
    opt = Flora(params, **BASE)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for t in range(5):
        _step(eager[1], eager[0], t)
        g = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        step()
        if t == 1:
            frames = counter.frame_count
    assert counter.frame_count == frames  # nothing compiled after the second step
    _assert_equal(eager, (params, opt))
    assert _stacked(opt, params[:3], "exp_avg_c") and _stacked(opt, params[3:], "exp_avg")
    torch._dynamo.reset()


@pytest.mark.parametrize("kw,ops", [({}, []), ({"momentum_dtype": "bfloat16"}, [])],
                         ids=["float32", "bf16-momentum"])
def test_the_prelude_dispatches_nothing_per_tensor(kw, ops):
    """Once the stacks exist, a step's eager prelude (no resample due) dispatches no
    operation for them, in float32 and with a bfloat16 momentum (widened and rounded back
    inside the compiled core; it was one widening copy per bucket before). Indexing a
    stack (``stack[0].dtype``) would add one each."""
    from torch.profiler import ProfilerActivity, profile

    params = _params()
    opt = Flora(params, **{**BASE, "kappa": 100}, **kw, compile="aot_eager")
    for t in range(2):
        _step(opt, params, t)
    g = torch.Generator().manual_seed(9)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt._prelude_eager()
    top = [e.name for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    assert top == ops


def test_a_copy_or_pickle_keeps_compiling():
    """torch's __getstate__ holds groups and state only: a deep copy or a pickle of a
    compiled Flora came back eager, silently."""
    import pickle

    params, opt = _pair()[1]
    _step(opt, params, 0)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other._compile == "aot_eager" and other._kernel is None


def test_a_parameter_cast_after_compiled_steps_takes_its_state_along():
    """model.to(torch.float32) after float64 steps: the second moment stayed float64 beside
    float32 arithmetic, and the compiled graph failed (compile then off for the process,
    the warning blaming the compiler). The state follows the parameter's dtype, as a fresh
    one would, and the run equals eager's."""
    runs = []
    for params, opt in _pair():
        for t in range(2):
            _step(opt, params, t)
        for p in params:
            p.data = p.data.float()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            for t in range(2, 4):
                _step(opt, params, t)
        assert all(v.dtype in (torch.float32, torch.bfloat16) for p in params for v in opt.state[p].values()
                   if isinstance(v, torch.Tensor) and v.is_floating_point())
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _held_bytes(opt) -> int:
    """The bytes the state tensors keep alive: each storage once, whole (a view of a
    stack keeps the stack), counted here independently of flora.state_bytes (which
    counts the same way)."""
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                s = v.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_members_changing_at_every_step_hold_eagers_bytes_between_steps(monkeypatch):
    """(Found by a new-user probe.) With a different member of a bucket missing at every
    step (experts skipping in turn), the member that left kept a view of its old stack
    until the next step's start: the stack stayed alive between steps, up to about twice
    eager's bytes. The copies are made once every core of the step has run now, so the
    bytes held between steps are eager's, and the steps still equal eager's."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    eager, comp = _pair()
    for t in range(8):
        skip = (t % 3, 3 + t % 3)
        _step(eager[1], eager[0], t, skip=skip)
        _step(comp[1], comp[0], t, skip=skip)
        if t >= 1:
            assert _held_bytes(comp[1]) == _held_bytes(eager[1]), t
    _assert_equal(eager, comp)


@pytest.mark.parametrize("edit", ["data", "clone", "set_"])
def test_a_state_tensor_given_other_memory_is_read_from_it(edit):
    """``v.data = ...`` or ``v.set_(...)`` keeps the state tensor's object and changes its
    memory (the widely copied ``optimizer_to(opt, device)`` snippet sets ``.data``). The
    compiled step had kept reading and writing the old stack: the edit ignored, and the
    state in ``opt.state`` (what a checkpoint saves) no longer updated (probe Z55)."""
    def change(v):
        if edit == "data":
            v.data = v.data * 1.5
        elif edit == "clone":
            v.data = v.data.clone()
        else:
            v.set_(v.detach().clone().mul_(0.5))

    runs = _pair()
    for params, opt in runs:
        for t in range(3):
            _step(opt, params, t)
        for st in opt.state.values():
            for v in [v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]:
                change(v)
        before = {k: v.clone() for k, v in opt.state[params[0]].items() if isinstance(v, torch.Tensor)}
        for t in range(3, 5):
            _step(opt, params, t)
        assert any(not torch.equal(before[k], opt.state[params[0]][k]) for k in before)  # the state moves
    _assert_equal(*runs)


def test_a_dropped_state_leaves_its_stack_when_step_parameter_made_another_meanwhile():
    """A state dropped (opt.state.pop) takes its stack with it at the next step, seen as
    fewer states than the last step left; a state made by step_parameter in between had
    made the count equal, and the stacks (the dropped state's rows with them) were kept
    while their other members idled (probe Z55)."""
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(12, 20, generator=g, dtype=torch.float64)) for _ in range(3)]
    opt = Flora(ps, **BASE, compile="aot_eager")
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    assert len(opt._stacks) > 0
    opt.state.pop(ps[0])
    d = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))
    opt.add_param_group({"params": [d]})
    d.grad = torch.randn(7, generator=g, dtype=d.dtype)
    opt.step_parameter(d)
    d.grad = None
    for p in ps:
        p.grad = None
    opt.step()
    assert len(opt._stacks) == 0
