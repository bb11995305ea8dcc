"""Issue 16 (reliability II), items 4, 5, 7 and 8: the projection cache under changing
subsets of parameters, load_state_dict's changes of algorithm, 0-size parameters with
max_aspect_ratio, and seeds and lrs that must be refused."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import flora
from flora import CompressedAccumulator, Flora
from flora.compression import compressed_dim, dense_reason
from flora.cache import cache_projections
from flora.projection import projection_seed

# ------------------------------------------------------------ 4. the projection cache


def _moe_run(cache: bool, foreach, steps: int, *, n=16, active=4, shape=(64, 64), rank=8, kappa=1000, seed=0):
    """16 experts of 64 x 64 at rank 8; each step a different 4 of them get gradients."""
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(shape, generator=g)) for _ in range(n)]
    opt = Flora(ps, lr=1e-2, rank=rank, beta1=0.9, kappa=kappa, cache_projections=cache, foreach=foreach)
    sizes = []
    for _ in range(steps):
        chosen = set(torch.randperm(n, generator=g)[:active].tolist())
        for i, p in enumerate(ps):
            p.grad = torch.randn(shape, generator=g) if i in chosen else None
        opt.step()
        sizes.append((len(opt.projection_cache), opt.cache_bytes()))
    return ps, opt, sizes


@pytest.mark.parametrize("foreach", [True, None, False], ids=["grouped", "default", "single"])
def test_cache_holds_one_projection_per_tensor_whatever_subset_steps(foreach):
    """Issue 16 item 4: 600 steps of 4 of 16 experts (64 x 64, rank 8) used to leave 101
    entries and 409,600 bytes, where the bound is r * min(n, m) floats per compressed
    tensor, 32,768 bytes. The same at a smaller size: 16 x 16 at rank 4, 80 steps."""
    _, opt, sizes = _moe_run(True, foreach, 80, shape=(16, 16), rank=4)
    bound = 16 * 4 * 16 * 4
    assert max(n for n, _ in sizes) <= 16
    assert max(b for _, b in sizes) <= bound
    assert sizes[-1] == (16, bound)  # every expert has stepped: one projection each, nothing else
    # cache_bytes counts the storage the cache keeps alive, not a sum over views
    storages = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for _, _, a in opt.projection_cache.items()}
    assert opt.cache_bytes() == sum(storages.values())


def test_cache_stays_bounded_across_resamples_of_subsets():
    """With kappa 3 every expert resamples at its own pace (its own counters): the entries
    are replaced, never added to, and a projection is redrawn exactly as drawn alone."""
    ps, opt, sizes = _moe_run(True, True, 80, shape=(16, 16), rank=4, kappa=3)
    assert max(b for _, b in sizes) <= 16 * 4 * 16 * 4
    for i, p in enumerate(ps):
        st = opt.state[p]
        entries = {j: (k, a) for j, k, a in opt.projection_cache.items()}
        key_count = entries[i][0][3]
        assert key_count == st["proj_count"] > 0  # the entry is the current projection
        want = flora.make_projection("orthonormal", projection_seed(0, i, st["proj_count"]), 4, 16)
        assert torch.equal(entries[i][1], want)


@pytest.mark.parametrize("foreach", [True, False], ids=["grouped", "single"])
def test_cache_changes_no_result_under_changing_subsets(foreach):
    a, _, _ = _moe_run(True, foreach, 40, shape=(16, 16), rank=4, kappa=4)
    b, opt, _ = _moe_run(False, foreach, 40, shape=(16, 16), rank=4, kappa=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt.cache_bytes() == 0 and len(opt.projection_cache) == 0


def test_a_steady_bucket_gets_its_cached_stack_back_without_a_copy():
    """The grouped path's speed: a bucket that steps every time gets the very stack it was
    drawn as (no stacking per step) until its next resample."""
    ps = [nn.Parameter(torch.randn(12, 12)) for _ in range(3)]
    opt = Flora(ps, lr=1e-2, rank=4, beta1=0.9, kappa=100, foreach=True)
    group = opt.param_groups[0]
    first = cache_projections(opt.projection_cache, group, [0, 1, 2], 0, 12, "cpu", torch.float32, stacked=True)
    again = cache_projections(opt.projection_cache, group, [0, 1, 2], 0, 12, "cpu", torch.float32, stacked=True)
    assert again is first and first.shape == (3, 4, 12)
    assert cache_projections(opt.projection_cache, group, [1], 0, 12, "cpu", torch.float32, stacked=False).data_ptr() == first[1].data_ptr()
    assert opt.cache_bytes() == 3 * 4 * 12 * 4
    # a sub-bucket is stacked from the entries (a copy, not kept), equal to a fresh draw
    sub = cache_projections(opt.projection_cache, group, [2, 0], 0, 12, "cpu", torch.float32, stacked=True)
    assert torch.equal(sub, torch.stack([first[2], first[0]])) and opt.cache_bytes() == 3 * 4 * 12 * 4
    # parameter 1 moves on to its next projection: the old stack is freed, the others keep copies
    cache_projections(opt.projection_cache, group, [1], 1, 12, "cpu", torch.float32, stacked=True)
    assert opt.cache_bytes() == 3 * 4 * 12 * 4 and len(opt.projection_cache) == 3
    assert torch.equal(cache_projections(opt.projection_cache, group, [0], 0, 12, "cpu", torch.float32, stacked=False), first[0])


# ---------------------------------------------- 5. load_state_dict changes the algorithm


def _state(**kw):
    p = nn.Parameter(torch.randn(16, 16))
    opt = Flora([p], lr=1e-2, rank=4, **kw)
    p.grad = torch.randn(16, 16)
    opt.step()
    return p, opt.state_dict()


def test_loading_a_state_of_other_algorithm_options_warns_naming_old_and_new():
    p, sd = _state(beta1=0.9, momentum_form="scaled")
    opt = Flora([p], lr=1e-2, rank=4, momentum_form="exact", projection="gaussian", beta1=0.5, kappa=10, seed=7)
    with pytest.warns(UserWarning) as rec:
        opt.load_state_dict(sd)
    (w,) = [r for r in rec if "load_state_dict" in str(r.message)]
    msg = str(w.message)
    for part in ("momentum_form: 'exact' -> 'scaled'", "projection: 'gaussian' -> 'orthonormal'",
                 "beta1: 0.5 -> 0.9", "kappa: 10 -> 100", "seed: 7 -> 0"):
        assert part in msg, (part, msg)
    g = opt.param_groups[0]  # torch's convention: the loaded groups win
    assert (g["momentum_form"], g["projection"], g["beta1"], g["kappa"], g["seed"]) == ("scaled", "orthonormal",
                                                                                         0.9, 100, 0)


def test_loading_proj_dim_and_the_same_options_and_lr():
    p, sd = _state(beta1=0.9, proj_dim=0)
    opt = Flora([p], lr=1e-2, rank=4, beta1=0.9, proj_dim=1)
    with pytest.warns(UserWarning, match="proj_dim: 1 -> 0"):
        opt.load_state_dict(sd)
    # the same options, or only a different lr (a schedule's business): no warning
    p, sd = _state(beta1=0.9)
    for lr in (1e-2, 3e-3):
        opt = Flora([p], lr=lr, rank=4, beta1=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.load_state_dict(copy.deepcopy(sd))


def test_a_saved_proj_dim_that_the_state_does_not_follow_is_not_reported():
    """(Found as a new user would.) An FSDP2 checkpoint saves proj_dim="auto", which took the
    unsharded dim (1) there; one process resumes it with proj_dim=1, as docs/distributed.md
    says. The load warned "proj_dim: 1 -> 'auto' ... build Flora with the checkpoint's
    options", and that advice fails (DCP: another momentum shape). Every loaded state's
    projected dim is the one this optimizer gives it: nothing to report."""
    p, sd = _state(beta1=0.9, proj_dim=1)
    sd["param_groups"][0]["proj_dim"] = "auto"  # what the sharded run's group said
    assert sd["state"][0]["proj_dim"] == 1
    opt = Flora([p], lr=1e-2, rank=4, beta1=0.9, proj_dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(sd)
    p.grad = torch.randn(16, 16)
    opt.step()  # the state's layout goes on
    assert opt.state[p]["proj_dim"] == 1 and tuple(opt.state[p]["exp_avg_c"].shape) == (16, 4)


def test_loading_names_the_group_when_there_are_several():
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    src = Flora([{"params": [a]}, {"params": [b], "kappa": 5}], lr=1e-2, rank=2, beta1=0.9)
    dst = Flora([{"params": [a]}, {"params": [b], "kappa": 7}], lr=1e-2, rank=2, beta1=0.9)
    with pytest.warns(UserWarning, match=r"kappa: 7 -> 5 \(group 1\)") as rec:
        dst.load_state_dict(src.state_dict())
    assert "group 0" not in str(rec[0].message)


# ----------------------------------------------- 7. 0-size parameters, max_aspect_ratio


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (4, 0, 3), (0, 0)])
def test_zero_size_tensors_stay_dense_with_a_reason(shape):
    for kw in (dict(max_aspect_ratio=4.0), dict(), dict(proj_dim=1), dict(proj_dim=0)):
        assert compressed_dim(shape, 2, **kw) is None
        assert dense_reason(shape, 2, **kw).startswith("0-size tensor")


@pytest.mark.parametrize("foreach", [True, False], ids=["grouped", "single"])
def test_flora_with_a_zero_size_parameter_and_max_aspect_ratio(foreach):
    ps = [nn.Parameter(torch.zeros(0, 8)), nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.zeros(4, 0, 3))]
    opt = Flora(ps, lr=1e-2, rank=2, beta1=0.9, max_aspect_ratio=4.0, foreach=foreach)  # ZeroDivisionError before
    plan = opt.plan()
    assert [r["compressed"] for r in plan] == [False, True, False]
    assert plan[0]["reason"].startswith("0-size tensor") and "0-size tensor" in opt.summary()
    for p in ps:
        p.grad = torch.randn_like(p)
    before = ps[1].detach().clone()
    opt.step()
    assert not torch.equal(ps[1], before) and "exp_avg" in opt.state[ps[0]]


def test_accumulator_with_a_zero_size_parameter_and_max_aspect_ratio():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        model[1].reset_parameters()
    acc = CompressedAccumulator(model, rank=2, tau=2, max_aspect_ratio=4.0)  # ZeroDivisionError before
    acc.remove()


# ------------------------------------------------------------- 8. seeds and lrs


@pytest.mark.parametrize("seed,exc", [(2**70, ValueError), (2**64, ValueError), (2**63, ValueError),
                                      (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_seeds_outside_the_supported_range_are_refused(seed, exc):
    with pytest.raises(exc, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        Flora([nn.Parameter(torch.randn(4, 4))], lr=1e-3, rank=2, beta1=0.9, seed=seed)


def test_the_largest_seed_works_and_differs_from_seed_zero():
    top = 2**63 - 1
    Flora([nn.Parameter(torch.randn(4, 4))], lr=1e-3, rank=2, beta1=0.9, seed=top)
    assert projection_seed(top, 0, 0) != projection_seed(0, 0, 0)
    with pytest.raises(ValueError, match="seed"):  # 2**64 used to give seed 0's projections
        projection_seed(2**64, 0, 0)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_lr_is_refused_naming_lr_and_its_range(lr):
    with pytest.raises(ValueError, match=r"lr must be a finite real number in \[0.0, inf\)"):
        Flora([nn.Parameter(torch.randn(4, 4))], lr=lr)
    p = nn.Parameter(torch.randn(4, 4))
    opt = Flora([p], lr=1e-3)
    opt.param_groups[0]["lr"] = lr
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr must be a finite"):
        opt.step()
    assert torch.equal(p, before)


# ------------------------------------------------- 6. docs that contradicted the code


def _readme():
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _bullet(text, start):
    i = text.index(start)
    j = text.find("\n- ", i + 1)
    return text[i:j]


def test_readme_rank_bullet_and_docstring_name_the_default_projection():
    import inspect

    default = inspect.signature(Flora).parameters["projection"].default
    assert default == "orthonormal"
    rank = _bullet(_readme(), "- `rank`:")
    assert "by default one with orthonormal rows" in rank and f'projection="{default}"' in rank
    assert "under a Gaussian projection" not in rank
    head = Flora.__doc__.split("Args:")[0]  # the summary above the arguments
    assert "by default one with orthonormal rows" in head and "under a Gaussian projection" not in head


def test_readme_choosing_lr_reports_the_finished_sweep():
    text = _readme()
    section = text[text.index("### Choosing lr"):text.index("### State, dtypes")]
    assert "will revisit" not in section and "3 seeds" in section
    assert "suite_default/win_matrix.md" in section  # links the 3-seed best lrs of the current default


PATHS = {"single": dict(foreach=False), "grouped": dict(foreach=True), "compiled": dict(compile="aot_eager")}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (4, 0, 3), (0,)], ids=["0x5", "5x0", "4x0x3", "0"])
def test_an_empty_parameter_is_no_skip_and_changes_nothing(shape, path):
    """A 0-size parameter (nn.Linear(8, 0).weight) took its second moment from means over
    nothing, NaN, and every step counted it in nonfinite_skips (3 after 3 finite steps)
    though its gradient held no NaN. Now it is stepped as nothing: no skip, its state
    stays finite, and the parameters beside it move as without it."""
    def run(with_empty):
        torch.manual_seed(0)
        q = nn.Parameter(torch.randn(6, 6))
        e = nn.Parameter(torch.zeros(shape))
        opt = Flora([q, e] if with_empty else [q], lr=1e-2, rank=2, beta1=0.9, **PATHS[path])
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            q.grad, e.grad = torch.randn(6, 6, generator=g), torch.zeros(shape)
            opt.step()
        return q, e, opt
    q, e, opt = run(True)
    ref, _, _ = run(False)
    assert int(opt.nonfinite_skips) == 0
    assert torch.equal(q, ref)
    assert all(torch.isfinite(v).all() for v in opt.state[e].values() if isinstance(v, torch.Tensor))
    assert opt.state[e]["step"] == 3


@pytest.mark.parametrize("path", list(PATHS) + ["step_parameter"])
@pytest.mark.parametrize("lr_shape", [(1,), (1, 1), (1, 1, 1)], ids=["1", "1x1", "1x1x1"])
def test_a_one_element_lr_tensor_of_any_shape_steps_as_a_0_dim_one(lr_shape, path):
    """torch accepts a tensor lr of one element in any shape. [[1e-2]] passed Flora's check
    and then failed in step() ("output with shape [4, 20] doesn't match the broadcast
    shape [1, 1, 4, 20]"). Now every shape steps as the 0-dim lr does, bit for bit."""
    def run(lr):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(4, 20)), nn.Parameter(torch.randn(4, 20)), nn.Parameter(torch.randn(7))]
        opt = Flora(ps, lr=lr, rank=3, beta1=0.9, **PATHS.get(path, {}))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            if path == "step_parameter":
                for p in ps:
                    opt.step_parameter(p)
            else:
                opt.step()
        return ps
    for a, b in zip(run(torch.full(lr_shape, 1e-2)), run(torch.tensor(1e-2))):
        assert torch.equal(a, b)


# ------------------------------------------------------------ a tensor lr shared by groups


@pytest.mark.parametrize("foreach", [False, True])
def test_groups_taking_a_tensor_default_lr_are_scheduled_apart(foreach):
    """torch gives every group that takes the default lr the one tensor, so a scheduler with
    one lr per group filled it with the last group's for all (a probe: [1e-2, 1e-3]
    stepped as [1e-3, 1e-3]). Each later group gets a copy; the first keeps the tensor."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(6, 5, generator=g)) for _ in range(3))
    lr = torch.tensor(1e-2)
    opt = Flora([{"params": [a]}, {"params": [b]}], lr=lr, rank=None, beta1=0.9, foreach=foreach)
    opt.add_param_group({"params": [c]})
    lrs = [grp["lr"] for grp in opt.param_groups]
    assert lrs[0] is lr and len({id(x) for x in lrs}) == 3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda t: 1.0, lambda t: 0.1, lambda t: 0.5 ** t])
    ref = [Flora([p.detach().clone().requires_grad_()], lr=v, rank=None, beta1=0.9, foreach=foreach)
           for p, v in zip((a, b, c), (1e-2, 1e-3, 1e-2))]
    for step in range(3):
        for i, p in enumerate((a, b, c)):
            p.grad = torch.randn(6, 5, generator=g)
            ref[i].param_groups[0]["params"][0].grad = p.grad.clone()
            ref[i].param_groups[0]["lr"] = 1e-2 * 0.5 ** step if i == 2 else (1e-2, 1e-3)[i]
            ref[i].step()
        opt.step()
        sched.step()
    assert [float(grp["lr"]) for grp in opt.param_groups] == pytest.approx([1e-2, 1e-3, 1e-2 * 0.5 ** 3])
    for p, r in zip((a, b, c), ref):
        torch.testing.assert_close(p, r.param_groups[0]["params"][0], rtol=1e-6, atol=1e-7)
    # a checkpoint of groups that share one tensor (saved before, or by torch's optimizers)
    # loads as one tensor per group, in a torch.save round trip that keeps the sharing
    shared = torch.tensor(1e-2)
    saved = opt.state_dict()
    for grp in saved["param_groups"]:
        grp["lr"] = shared
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert len({id(grp["lr"]) for grp in opt.param_groups}) == 3
    # a tensor the user hands two groups: the later one gets a copy, said (kept shared, a
    # ReduceLROnPlateau halved it once per group at each reduction, and a resume, which
    # loads one tensor per group, then stepped otherwise than the run that never stopped: a probe)
    shared = torch.tensor(1e-2)
    with pytest.warns(UserWarning, match="group 1's lr is the tensor of group 0: it gets a copy"):
        opt2 = Flora([{"params": [nn.Parameter(torch.randn(3, 3))], "lr": shared},
                      {"params": [nn.Parameter(torch.randn(3, 3))], "lr": shared}], lr=1e-3)
    assert opt2.param_groups[0]["lr"] is shared and opt2.param_groups[1]["lr"] is not shared
    assert torch.equal(opt2.param_groups[1]["lr"], shared)


def test_a_tensor_lr_given_to_two_groups_resumes_as_the_run_that_never_stopped():
    """ReduceLROnPlateau over two groups given one lr tensor: each reduction halves each
    group's lr once (it halved the shared tensor twice), and a resume from a checkpoint
    continues to the bit."""
    def build(seed=0):
        g = torch.Generator().manual_seed(seed)
        ps = [nn.Parameter(torch.randn(8, 6, generator=g)) for _ in range(2)]
        lr = torch.tensor(1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = Flora([{"params": [ps[0]], "lr": lr}, {"params": [ps[1]], "lr": lr}], rank=2, beta1=0.9,
                        scale_parameter=False)
        return ps, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)

    def run(ps, opt, sched, steps):
        for t in steps:
            g = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step(1.0)  # no improvement after the first: every step reduces

    ps, opt, sched = build()
    run(ps, opt, sched, range(3))
    assert [float(g["lr"]) for g in opt.param_groups] == pytest.approx([1e-2 / 4] * 2)
    saved = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "ps": [p.detach().clone() for p in ps]}, saved)
    run(ps, opt, sched, range(3, 6))
    saved.seek(0)
    ck = torch.load(saved, weights_only=True)
    ps2, opt2, sched2 = build(1)
    with torch.no_grad():
        for p, q in zip(ps2, ck["ps"]):
            p.copy_(q)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    run(ps2, opt2, sched2, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


# ------------------------------------------------------------ a Gaussian projection's carry-over


def test_gaussian_momentum_growth_is_warned_where_it_grows():
    """A Gaussian projection carries the momentum over a resample by A_old A_new^T, which
    multiplies its norm by about sqrt(d / r); decayed by beta1**kappa in between, it grows
    without bound where the product exceeds 1 (a probe: inf, then NaN parameters, after 44
    steps at kappa 1, rank 8 of 128). Warned at construction; orthonormal rows never grow."""
    from flora.reports import gaussian_growth

    def norms(projection, kappa, steps=30):
        g = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(128, 128, generator=g))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = Flora([p], lr=1e-2, rank=8, beta1=0.9, kappa=kappa, projection=projection, momentum_form="paper",
                        scale_parameter=False)
        out = []
        for _ in range(steps):
            p.grad = torch.randn(128, 128, generator=g)
            opt.step()
            out.append(float(opt.state[p]["exp_avg_c"].float().norm()))
        return out

    assert gaussian_growth(8, 128, 0.9, 1) == pytest.approx(3.6)
    with pytest.warns(UserWarning, match=r"gaussian.*grows about 3\.6x .*kappa >= 14$"):
        Flora([nn.Parameter(torch.randn(128, 128))], lr=1e-2, rank=8, beta1=0.9, kappa=1, projection="gaussian",
              momentum_form="paper")
    # the advice is the least kappa that holds it (it said 'kappa > 14'), and covers every
    # group (it quoted the worst tensor's: following it left another group's growing; probe Z10)
    with pytest.warns(UserWarning, match=r"gaussian.*kappa >= 14$"):
        Flora([nn.Parameter(torch.randn(128, 128))], lr=1e-2, rank=8, beta1=0.9, kappa=13, projection="gaussian",
              momentum_form="paper")
    with pytest.warns(UserWarning, match=r"grows about 32x .*kappa >= 69 in every group with a Gaussian projection"):
        Flora([{"params": [nn.Parameter(torch.randn(4096, 2))], "beta1": 0.5, "rank": 1, "proj_dim": 0},
               {"params": [nn.Parameter(torch.randn(8, 8))], "beta1": 0.99, "rank": 2}],
              lr=1e-2, beta1=0.9, kappa=1, projection="gaussian", momentum_form="paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Flora([nn.Parameter(torch.randn(128, 128))], lr=1e-2, rank=8, beta1=0.9, kappa=1000, projection="gaussian",
              momentum_form="paper")
        Flora([nn.Parameter(torch.randn(128, 128))], lr=1e-2, rank=8, beta1=0.9, kappa=14, projection="gaussian",
              momentum_form="paper")
        Flora([{"params": [nn.Parameter(torch.randn(4096, 2))], "beta1": 0.5, "rank": 1, "proj_dim": 0},
               {"params": [nn.Parameter(torch.randn(8, 8))], "beta1": 0.99, "rank": 2}],
              lr=1e-2, beta1=0.9, kappa=69, projection="gaussian", momentum_form="paper")
        Flora([nn.Parameter(torch.randn(128, 128))], lr=1e-2, rank=8, beta1=0.9, kappa=1)  # orthonormal
    grown = norms("gaussian", 1)
    assert grown[-1] > 1e6 * grown[4]  # what the warning is about
    kept = norms("orthonormal", 1)
    assert max(kept[4:]) < 10 * kept[4]
