"""The grouped step (``foreach=True``; the default off the CPU) against the single-tensor
reference (``foreach=False``; the default on the CPU), for a table of configurations; no
host syncs in ``step()`` on either path; ``step_parameter``'s constant-time lookup."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flora import Flora

from _configs import MOMENTUM_CONFIGS, MOMENTUM_IDS, assert_same_state, form_options

# Shapes with repeats (buckets of several), a 3-D tensor, 1-D tensors, one tall and one
# wide matrix (proj_dim 0 and 1 under "auto").
SHAPES = [(12, 20), (12, 20), (12, 20), (20, 12), (20, 12), (6, 4, 5), (20,), (20,), (3, 40)]

BASE = dict(lr=1e-2, rank=3, beta1=0.9, kappa=2, seed=7)
CONFIGS = {f"{f}-{p}": form_options(f, p) for f, p in MOMENTUM_CONFIGS}
CONFIGS.update({
    "scale_parameter": dict(scale_parameter=True),
    "weight_decay": dict(weight_decay=0.1),
    "scale_parameter+weight_decay": dict(scale_parameter=True, weight_decay=0.1),
    "relative_step": dict(lr=None, scale_parameter=True),
    "tensor_lr": dict(lr=torch.tensor(1e-2)),
    "rank_none": dict(rank=None),
    "no_momentum": dict(beta1=None),
    "proj_dim0": dict(proj_dim=0),
    "proj_dim1": dict(proj_dim=1),
    "proj_dim_sharded": dict(proj_dim="sharded"),
    "cache": dict(cache_projections=True),
    "clip": dict(clip_threshold=0.1),
})
GROUPED_OPTIONS = [{**BASE, "scale_parameter": False, **v} for v in CONFIGS.values()]


def _params(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _run(kw, foreach, steps=5, dtype=torch.float32):
    params = _params(dtype)
    opt = Flora(params, foreach=foreach, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kw", GROUPED_OPTIONS, ids=list(CONFIGS))
def test_grouped_equals_single_tensor(kw):
    """5 steps with kappa=2 (two resamples): weights and every state tensor agree to float
    rounding."""
    ref, ref_opt = _run(kw, False)
    got, opt = _run(kw, True)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert_same_state(opt, b, ref_opt, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_grouped_equals_single_tensor_other_dtypes(dtype):
    kw = dict(BASE, scale_parameter=True, weight_decay=0.1)
    ref, _ = _run(kw, False, dtype=dtype)
    got, _ = _run(kw, True, dtype=dtype)
    for a, b in zip(ref, got):
        assert b.dtype == dtype
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("foreach", [None, True, False], ids=["default", "grouped", "single"])
@pytest.mark.parametrize("conv,fmt", [(nn.Conv2d, torch.channels_last), (nn.Conv3d, torch.channels_last_3d)],
                         ids=["conv2d-channels_last", "conv3d-channels_last_3d"])
def test_channels_last_convolution_steps_as_contiguous(conv, fmt, foreach):
    """Issue 16: the grouped path stepped a channels_last weight by the raw normalised
    update (up to 2.8 where the right step moves 0.05): its k x n x m view was a copy that
    the compressed step wrote into and the step then ignored."""
    moved = []
    for layout in (torch.contiguous_format, fmt):
        torch.manual_seed(0)
        model = conv(8, 16, 3)
        x = torch.randn((2, 8) + (6,) * (model.weight.dim() - 2))
        model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
        assert model.weight.is_contiguous(memory_format=layout)
        w0 = model.weight.detach().clone()
        opt = Flora(model.parameters(), lr=1e-2, scale_parameter=False, rank=4, beta1=0.9, foreach=foreach)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        moved.append(model.weight.detach() - w0)
    assert moved[0].abs().max() > 0.02
    torch.testing.assert_close(moved[1], moved[0], rtol=0, atol=1e-6)


def test_buckets_are_split_by_size():
    """Small ``BUCKET_NUMEL`` (several buckets of a shape) changes nothing but rounding."""
    from flora import functional

    ref, _ = _run(BASE, True)
    old = functional.BUCKET_NUMEL
    try:
        functional.BUCKET_NUMEL = 300  # one (12, 20) matrix per bucket
        got, _ = _run(BASE, True)
    finally:
        functional.BUCKET_NUMEL = old
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_mixed_counters_step_in_separate_buckets():
    """A parameter that missed a step has another step count: it must not be stacked with
    the others (its lr, bias correction and projection differ)."""
    kw = dict(BASE, momentum_form="scaled", projection="orthonormal")
    results = []
    for foreach in (False, True):
        params = _params()
        opt = Flora(params, foreach=foreach, **kw)
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = None if (i == 1 and step == 1) else torch.randn(p.shape, generator=g)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _grouped_steps(groups, steps=4, **kw):
    """Step ``groups`` (lists of indices into SHAPES, each with its option overrides) with
    one Flora on the grouped path; returns the parameters and the buckets each step made."""
    from flora import functional

    params = _params()
    opt = Flora([{"params": [params[i] for i in idx], **extra} for idx, extra in groups],
                **{**BASE, "foreach": True, **kw})
    g = torch.Generator().manual_seed(1)
    made, real = [], functional.prepare

    def counting(ps, *args, **kwargs):
        made.append(len(ps))
        return real(ps, *args, **kwargs)

    functional.prepare = counting
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    finally:
        functional.prepare = real
    return params, made


def test_groups_of_equal_options_share_buckets():
    """A group per parameter (mmengine's, a per-layer lr decay at equal lrs) steps as one
    group: the same buckets, the same bits; it had stepped in buckets of one (1,000 vectors:
    227 ms against 12.7 ms in one group). A key torch adds (``param_names``) and a foreign
    one do not keep groups apart."""
    one, made_one = _grouped_steps([(range(len(SHAPES)), {})])
    each, made_each = _grouped_steps([([i], {"param_names": [f"p{i}"], "layer": i}) for i in range(len(SHAPES))])
    assert made_each == made_one == [3, 2, 1, 2, 1] * 4  # 5 buckets a step
    for a, b in zip(one, each):
        assert torch.equal(a, b)


def _single_tensor_steps(groups, steps=4, **kw):
    """``_grouped_steps``' run on the single-tensor path (``foreach=False``)."""
    params = _params()
    opt = Flora([{"params": [params[i] for i in idx], **extra} for idx, extra in groups],
                **{**BASE, "foreach": False, **kw})
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params


@pytest.mark.parametrize("option, values", [("weight_decay", (0.0, 0.1)), ("beta1", (0.9, None)), ("rank", (3, None)),
                                            ("clip_threshold", (1.0, 0.1))])
def test_groups_of_other_options_step_apart(option, values):
    """Groups that differ in an option are not merged, and each steps with its own: a
    group per parameter, alternating two values, makes the buckets and bits of two groups
    (one per value), and equals the single-tensor step."""
    split = [[i for i in range(len(SHAPES)) if i % 2 == j] for j in (0, 1)]
    two, made_two = _grouped_steps([(split[0], {option: values[0]}), (split[1], {option: values[1]})])
    # the same order of parameters (a parameter's position keys its projections)
    each, made_each = _grouped_steps([([i], {option: values[i % 2]}) for i in split[0] + split[1]])
    assert sorted(made_each) == sorted(made_two) and len(made_two) == 8 * 4  # 4 + 4 buckets a step
    for a, b in zip(two, each):
        assert torch.equal(a, b)
    ref = _single_tensor_steps([(split[0], {option: values[0]}), (split[1], {option: values[1]})])
    for a, b in zip(ref, two):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


LRS = ((1e-2, 3e-3), (torch.tensor(1e-2), torch.tensor(1e-2)), (torch.tensor(1e-2), 3e-3))


@pytest.mark.parametrize("extra", [{}, dict(scale_parameter=True, weight_decay=0.1)], ids=["plain", "scaled+wd"])
@pytest.mark.parametrize("lrs", LRS, ids=["floats", "tensors", "mixed"])
def test_groups_that_differ_in_lr_alone_share_buckets(lrs, extra):
    """Groups whose options differ only in a fixed lr (a per-layer lr decay; a tensor lr
    each, which Flora gives every group that takes the default) step in one group's buckets,
    each parameter with its own lr, and equal the single-tensor step. They had stepped apart
    (a probe: 1,000 groups of a vector, 125 ms a step against 19 ms in one group)."""
    split = [[i for i in range(len(SHAPES)) if i % 2 == j] for j in (0, 1)]
    got, made = _grouped_steps([(split[j], {"lr": lrs[j]}) for j in (0, 1)], **extra)
    _, made_one = _grouped_steps([(range(len(SHAPES)), {})], **extra)
    assert sorted(made) == sorted(made_one) == sorted([3, 2, 1, 2, 1] * 4)
    ref = _single_tensor_steps([(split[j], {"lr": lrs[j]}) for j in (0, 1)], **extra)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("fresh_dynamo")  # counts compilations
def test_merged_lrs_follow_a_per_group_schedule_compiled_without_recompiling():
    """Per-group schedules (LambdaLR with a lambda each, a warmup from 0 where every lr is
    equal at the first step) on merged groups: the buckets stay the same at every step
    (they had merged at the warmup's first step only, compiling graphs and a CPU workspace
    for it), nothing compiles after the first step, and the compiled step equals eager."""
    from torch._dynamo.utils import counters

    def run(compile):
        params = _params()
        split = [[params[i] for i in range(len(SHAPES)) if i % 2 == j] for j in (0, 1)]
        opt = Flora([{"params": split[0], "lr": 1e-2}, {"params": split[1], "lr": 3e-3}],
                    **{**BASE, "lr": 1e-2, "foreach": True, "compile": compile})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: min(1.0, t / 2), lambda t: min(1.0, t / 3)])
        g = torch.Generator().manual_seed(1)
        graphs = []
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step()
            graphs.append(counters["stats"]["unique_graphs"])
        return params, graphs

    counters.clear()
    compiled, graphs = run("aot_eager")
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 4
    for a, b in zip(run(False)[0], compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_groups_merged_across_layouts_and_dtypes_equal_the_single_tensor_step(dtype):
    """Groups of equal options merged into one bucket hold what separate groups never put
    together: conv weights of one shape in channels_last and contiguous layouts (and a
    transposed view), in float32, bfloat16 and float64. Each steps as the single-tensor
    path steps it."""
    def run(foreach):
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(8, 6, 3, 3, generator=g).to(dtype) for _ in range(4)]
        ws[1] = ws[1].contiguous(memory_format=torch.channels_last)
        ws[3] = ws[3].contiguous(memory_format=torch.channels_last)
        mats = [torch.randn(12, 20, generator=g).to(dtype), torch.randn(20, 12, generator=g).to(dtype).t()]
        params = [nn.Parameter(t) for t in ws + mats]
        opt = Flora([{"params": [p]} for p in params], **{**BASE, "scale_parameter": True, "weight_decay": 0.1,
                                                          "foreach": foreach})
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        return params

    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else \
        dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(run(False), run(True)):
        assert b.dtype == dtype and b.stride() == a.stride()
        torch.testing.assert_close(b, a, **tol)


def test_an_option_edited_invalid_in_one_of_many_groups_is_refused_before_any_change():
    """Validation is skipped for a group whose options did not change since its last step
    (35 us a group); an edit is still seen, and refused before any parameter moves."""
    params = _params()
    opt = Flora([{"params": [p]} for p in params], **BASE)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.param_groups[5]["beta1"] = 1.5
    with pytest.raises(ValueError, match="beta1"):
        opt.step()
    opt.param_groups[5]["beta1"] = 0.9
    opt.param_groups[7]["eps"] = [1e-30, -1.0]
    with pytest.raises(ValueError, match=r"eps\[1\]"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))


# ------------------------------------------------------------------ host syncs


class _SyncCounter(TorchDispatchMode):
    """Counts what would make a GPU wait for the host: ``aten._local_scalar_dense`` (behind
    ``item()``, ``float()``, ``bool()`` and ``int()`` of a tensor), plus ``tolist()``,
    which reads memory without dispatching."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_syncs(monkeypatch):
    counter = _SyncCounter()
    real = torch.Tensor.tolist

    def tolist(self):
        counter.calls.append("tolist")
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return counter


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
@pytest.mark.parametrize("kw", GROUPED_OPTIONS + [dict(BASE, lr=None, scale_parameter=True, warmup_init=True)],
                         ids=list(CONFIGS) + ["warmup_init"])
def test_no_host_sync_in_step(kw, foreach, count_syncs):
    """Zero syncs in a step, including a resample step (kappa=2). Projections are drawn on
    the CPU from integer seeds and copied to the device: no device value is read."""
    params = _params()
    opt = Flora(params, foreach=foreach, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        with count_syncs:
            opt.step()
    assert count_syncs.calls == []


def test_the_counter_sees_syncs(count_syncs):
    x = torch.ones(3)
    with count_syncs:
        x.sum().item()
        bool(x.all())
        x.tolist()
    assert len(count_syncs.calls) == 3


def test_step_parameter_has_no_sync(count_syncs):
    params = _params()
    opt = Flora(params, **BASE)
    for p in params:
        p.grad = torch.randn_like(p)
        with count_syncs:
            opt.step_parameter(p)
    assert count_syncs.calls == []


# ------------------------------------------------------------------ step_parameter


class _CountingList(list):
    iterations = 0

    def __iter__(self):
        _CountingList.iterations += 1
        return super().__iter__()


def test_step_parameter_finds_a_parameter_without_a_search():
    params = [nn.Parameter(torch.randn(4, 6)) for _ in range(50)]
    opt = Flora(params, **BASE)
    opt.param_groups[0]["params"] = _CountingList(opt.param_groups[0]["params"])
    opt.step_parameter(params[0])  # builds the map: one pass
    _CountingList.iterations = 0
    for p in params:
        p.grad = torch.randn_like(p)
        opt.step_parameter(p)
    assert _CountingList.iterations == 0


def test_step_parameter_follows_group_changes():
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    opt = Flora([a], **BASE)
    a.grad = torch.randn_like(a)
    opt.step_parameter(a)
    with pytest.raises(ValueError, match="not a parameter"):
        opt.step_parameter(b)
    opt.add_param_group({"params": [b]})
    b.grad = torch.randn_like(b)
    opt.step_parameter(b)
    assert opt.state[b]["step"] == 1


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_step_parameter_equals_step(foreach):
    kw = dict(BASE, foreach=foreach, scale_parameter=True)
    p1, p2 = _params(), _params()
    o1, o2 = Flora(p1, **kw), Flora(p2, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(p1, p2):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        o1.step()
        for b in p2:
            o2.step_parameter(b)
    for a, b in zip(p1, p2):
        if foreach is False:
            assert torch.equal(a, b)
        else:  # buckets of one against buckets of several
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_default_path_follows_the_device_and_size():
    from flora.optimizer import CPU_GROUP_NUMEL, _grouped

    small, large = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(CPU_GROUP_NUMEL + 1))
    group = Flora([small], lr=1e-3).param_groups[0]
    assert group["foreach"] is None
    assert _grouped(group, small) and not _grouped(group, large)  # CPU: by size
    assert _grouped(group, torch.empty(CPU_GROUP_NUMEL + 1, device="meta"))  # accelerators: grouped
    assert _grouped({**group, "foreach": True}, large) and not _grouped({**group, "foreach": False}, small)


def test_foreach_is_validated():
    with pytest.raises(TypeError, match="foreach"):
        Flora([nn.Parameter(torch.randn(3))], lr=1e-3, foreach="yes")


@pytest.mark.parametrize("bad", [torch.tensor([1e-3, 1e-3]), torch.tensor(1)])
def test_tensor_lr_is_checked(bad):
    with pytest.raises(ValueError, match="lr"):
        Flora([nn.Parameter(torch.randn(3))], lr=bad)


@pytest.mark.usefixtures("fresh_dynamo")  # counts compilations
def test_merged_lrs_under_a_compiled_opt_step_equal_eager():
    """torch.compile(opt.step) (torch's recipe: tensor lrs) over two groups that differ in
    lr alone, each scheduled apart: one graph, equal to the eager step."""
    from torch._dynamo.utils import counters

    def run(traced):
        params = _params()
        groups = [{"params": params[0::2], "lr": torch.tensor(1e-2)}, {"params": params[1::2], "lr": torch.tensor(3e-3)}]
        opt = Flora(groups, **{**BASE, "lr": torch.tensor(1e-2), "foreach": True})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 0.9 ** t, lambda t: 0.8 ** t])
        step = torch.compile(opt.step, backend="aot_eager") if traced else opt.step
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            step()
            sched.step()
        return params

    counters.clear()
    traced = run(True)
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(run(False), traced):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
