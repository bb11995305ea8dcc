"""Defects a new user hit (issue 7): generator param groups, partial accumulation cycles,
copies, scheduler option names, float64, non-finite gradients, foreign checkpoints,
GradScaler in fused mode, and the compression summary."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

import flora
from flora import CompressedAccumulator, Flora
from flora.projection import ACCUMULATION_STREAM, compress, decompress, make_projection, projection_seed, transfer

TAU = 3


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 5)).to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 12, generator=g).to(dtype), torch.randn(4, 5, generator=g).to(dtype)) for _ in range(n)]


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y) / TAU


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


# ------------------------------------------------------------- 1. generators


def test_generator_param_groups_hold_their_parameters():
    model = _mlp()
    groups = lambda: [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-3}]  # noqa: E731
    opt = Flora(groups(), lr=1e-2)
    ref = torch.optim.AdamW(groups(), lr=1e-2)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in ref.param_groups] == [2, 2]
    opt.add_param_group({"params": model[4].parameters()})
    assert len(opt.param_groups[2]["params"]) == 2
    with pytest.raises(TypeError, match="set"):  # torch's own refusal still reaches the user
        Flora([{"params": set(model[0].parameters())}], lr=1e-2)


# ------------------------------------------------- 2. partial accumulation cycles

# How a loop closes the short last cycle: the given optimizer's pre-hook, the global
# pre-hook (no optimizer=), an explicit finish_cycle() before stepping, or fused mode.
CLOSERS = ["optimizer", "global", "finish", "fused"]


def _epoch_loop(model, opt, acc, batches, closer):
    """Plain accumulation over an epoch whose length is not a multiple of TAU: a step at
    every TAU-th micro-batch and after the last one."""
    for i, (x, y) in enumerate(batches):
        _loss(model, x, y).backward()
        if (i + 1) % TAU and i + 1 != len(batches):
            continue
        if closer == "fused":
            acc.finish_cycle()  # a no-op on a full cycle
            continue
        if closer == "finish" and acc is not None:
            acc.finish_cycle()
        opt.step()
        opt.zero_grad()


def _make(closer, rank, model, opt_cls=torch.optim.SGD, **opt_kw):
    opt = opt_cls(model.parameters(), **({"lr": 0.1} | opt_kw))
    kw = {"optimizer": opt} if closer in ("optimizer", "fused") else {}
    acc = CompressedAccumulator(model, rank=rank, tau=TAU, seed=2, fused=closer == "fused", **kw)
    return opt, acc


@pytest.mark.parametrize("closer", CLOSERS)
@pytest.mark.parametrize("n_batches", [2 * TAU + 1, 2 * TAU + 2])
def test_partial_cycle_without_compression_is_plain_accumulation(closer, n_batches):
    batches = _batches(n_batches)
    ref = _mlp()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _epoch_loop(ref, ref_opt, None, batches, "plain")
    _epoch_loop(ref, ref_opt, None, batches, "plain")  # a second epoch

    model = _mlp()
    opt, acc = _make(closer, None, model, torch.optim.AdamW, lr=1e-2)
    _epoch_loop(model, opt, acc, batches, closer)
    _epoch_loop(model, opt, acc, batches, closer)
    _assert_equal(_params(model), _params(ref))
    assert acc.micro_step == 0 and acc.cycle == 2 * -(-n_batches // TAU)


@pytest.mark.parametrize("closer", CLOSERS)
def test_partial_cycle_steps_every_parameter_on_its_estimate(closer):
    """SGD with lr=1 moves each parameter by exactly its gradient, so the step of the
    short cycle shows the estimate: decompress(sum of the k compressed gradients)."""
    k = 2
    batches = _batches(TAU + k)
    model = _mlp()
    opt, acc = _make(closer, 4, model, lr=1.0)
    _epoch_loop(model, opt, acc, batches[:TAU], closer)  # one full cycle
    before = _params(model)
    grads = []
    for x, y in batches[TAU:]:  # the k micro-batches of the short cycle, by hand
        probe = copy.deepcopy(model)
        _loss(probe, x, y).backward()
        grads.append([p.grad for p in probe.parameters()])
    _epoch_loop(model, opt, acc, batches[TAU:], closer)
    assert acc.cycle == 2 and acc.micro_step == 0
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        gs = [g[i] for g in grads]
        if p.dim() == 2:  # compressed along the smaller dim with cycle 1's projection
            dim = 0 if p.shape[0] < p.shape[1] else 1
            a = make_projection("orthonormal", projection_seed(2, i, 1, ACCUMULATION_STREAM), 4, p.shape[dim], unbiased=True)
            want = decompress(sum(compress(g, a, dim) for g in gs), a, dim)
        else:
            want = sum(gs)
        torch.testing.assert_close(b - p.detach(), want, rtol=1e-5, atol=1e-6)
    # The next cycle starts cleanly: a full cycle steps again as usual.
    _epoch_loop(model, opt, acc, _batches(TAU, seed=5), closer)
    assert acc.cycle == 3 and acc.micro_step == 0


def test_global_hook_ignores_optimizers_of_other_parameters():
    model, other = _mlp(), nn.Linear(3, 3)
    acc = CompressedAccumulator(model, rank=4, tau=TAU)
    x, y = _batches(1)[0]
    _loss(model, x, y).backward()
    other.weight.grad = torch.ones_like(other.weight)
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    assert acc.micro_step == 1  # not closed by an unrelated optimizer


def test_global_hook_does_not_keep_the_accumulator_alive():
    import gc
    import weakref

    model = _mlp()
    ref = weakref.ref(CompressedAccumulator(model, rank=4, tau=TAU))
    gc.collect()
    # the parameters' hooks still hold it: it lives as long as the model does
    assert ref() is not None
    ref().remove()
    gc.collect()
    assert ref() is None


def test_another_optimizer_stepping_first_closes_a_short_cycle():
    """The accumulator built with optimizer=o1 while o2 steps one of its compressed
    matrices: o2 stepping first on a short cycle stepped on the placeholder (zeros: the
    weight did not move; found by a new-user probe). Now equal to optimizer=None, whose
    global hook closes the cycle for any optimizer."""
    runs = []
    for given in (True, False):
        model = _mlp()
        mats = [p for p in model.parameters() if p.dim() == 2]
        vecs = [p for p in model.parameters() if p.dim() < 2]
        o1 = torch.optim.AdamW(mats[:2] + vecs, lr=1e-2)
        o2 = torch.optim.SGD(mats[2:], lr=0.5)
        acc = CompressedAccumulator(model, rank=2, tau=TAU + 1, optimizer=o1 if given else None, seed=4)
        w0 = mats[2].detach().clone()
        for x, y in _batches(TAU):  # a short cycle
            _loss(model, x, y).backward()
        o2.step()
        o1.step()
        assert not torch.equal(mats[2], w0)
        runs.append([p.detach().clone() for p in model.parameters()])
        acc.remove()
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_an_optimizer_holding_none_of_its_parameters_steps_without_a_sweep(monkeypatch):
    """torch's global step pre-hook runs for every optimizer in the process: one holding
    none of the accumulator's parameters returns before the sweep of its slots (a probe:
    an unrelated 4-element SGD step took 2 ms beside 3,000 slots, 15 us alone); one holding
    some still sweeps and closes the short cycle (the test above)."""
    from flora.accumulation import engine

    sweeps = []
    real = engine.Engine.sweep
    monkeypatch.setattr(engine.Engine, "sweep", lambda self: (sweeps.append(1), real(self))[1])
    model = _mlp()
    acc = CompressedAccumulator(model, rank=2, tau=TAU + 1, seed=4)
    for x, y in _batches(TAU):  # mid-cycle
        _loss(model, x, y).backward()
    other = nn.Parameter(torch.ones(4))
    other.grad = torch.ones(4)
    before = len(sweeps)
    torch.optim.SGD([other], lr=0.1).step()
    assert len(sweeps) == before and torch.equal(other, torch.full((4,), 0.9))
    w = [p for p in model.parameters() if p.dim() == 2][0]
    torch.optim.SGD([w], lr=0.1).step()  # holds one: closes the cycle
    assert len(sweeps) > before
    acc.remove()


def test_a_leftover_unsynced_accelerate_state_drives_no_later_plain_loop():
    """accelerate's gradient state is one per process, and an accumulate() loop stopped
    mid-window (a notebook's interrupt) leaves it unsynced for good; a later plain loop's
    new accumulator took that for a live driver and refused the loop's tau (found by a
    new-user probe). Now it equals the same loop run with no leftover."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import GradientState

    try:
        accelerator = accelerate.Accelerator(gradient_accumulation_steps=3, cpu=True)
        model, opt = accelerator.prepare(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1))
        for x, y in _batches(2):  # stopped inside its first window
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
        assert GradientState._shared_state["sync_gradients"] is False
        runs = []
        for leftover in (True, False):
            if not leftover:
                GradientState._shared_state["sync_gradients"] = True
            model = _mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, seed=3)
            for i, (x, y) in enumerate(_batches(6)):
                (nn.functional.mse_loss(model(x), y) / 2).backward()
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
            runs.append([p.detach().clone() for p in model.parameters()])
            acc.remove()
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        GradientState._reset_state()


def test_a_leftover_unsynced_state_then_a_live_accelerate_run_with_a_short_first_cycle():
    """After a leftover unsynced flag (an accumulate() loop stopped mid-window), a new
    accelerate run's first cycle (2 micro-batches of a 2-batch loader, tau=3) was not
    followed: its unsynced passes were read as the leftover, so its synced pass did not
    end the cycle, and clipping met the placeholder (torch's 'single memory location'
    error; a new-user probe). Once the flag turns True, the False it read in the cycle
    counts: equal to the same run with no leftover, clipping included."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import GradientState

    def run():
        accelerator = accelerate.Accelerator(gradient_accumulation_steps=3, cpu=True)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(_batches(2), batch_size=None)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        acc = CompressedAccumulator(model, rank=4, tau=3, optimizer=opt, seed=3)
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        acc.remove()
        return [p.detach().clone() for p in model.parameters()], acc.cycle

    try:
        GradientState._reset_state()
        want = run()
        GradientState._shared_state["sync_gradients"] = False  # what the stopped loop leaves
        got = run()
    finally:
        GradientState._reset_state()
    assert got[1] == want[1] == 1
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))


def test_accelerate_marks_the_last_short_cycle():
    """Under accelerator.accumulate() with a prepared dataloader whose length is not a
    multiple of tau, the end of the dataloader ends the cycle at its last backward: that
    gradient enters exactly, and clipping before step() sees every gradient."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import GradientState

    data = _batches(TAU + 2)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=TAU, cpu=True)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    acc = CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, seed=2)
    seen = []
    try:
        for i, (x, y) in enumerate(loader):
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                if accelerator.sync_gradients:
                    seen.append([p.grad is not None for p in model.parameters()])
                    if i + 1 == len(data):  # the short cycle: the exact-last estimate
                        w = model[0].weight
                        a = make_projection("orthonormal", projection_seed(2, 0, 1, ACCUMULATION_STREAM), 4, 12, unbiased=True)
                        g_prev, g_last = [], None
                        for xb, yb in data[TAU:]:
                            probe = copy.deepcopy(model)
                            probe.zero_grad()
                            (nn.functional.mse_loss(probe(xb), yb) / TAU).backward()
                            g_prev.append(probe[0].weight.grad)
                        g_last = g_prev.pop()
                        want = decompress(sum(compress(g, a, 1) for g in g_prev), a, 1) + g_last
                        torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=1e-6)
                opt.step()
                opt.zero_grad()
    finally:
        GradientState._reset_state()
    assert all(all(s) for s in seen) and len(seen) == 2
    assert acc.cycle == 2 and acc.micro_step == 0


def _one_process_accelerate_run(n_batches, rank, *, accumulate=True, finish=False):
    """SGD under a one-process Accelerator(gradient_accumulation_steps=TAU) over a prepared
    dataloader of ``n_batches`` batches, 3 epochs; rank "plain": no accumulator. With
    ``accumulate``, accelerate's accumulate() and clipping at each sync (``finish``: the
    cycle closed by finish_cycle() first, the docs' old workaround); without, a plain loop
    stepping every TAU-th micro-batch. Returns the parameters and (cycle, micro_step) after
    each micro-batch."""
    import accelerate
    from accelerate.state import GradientState

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=TAU, cpu=True)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 12, generator=g), torch.randn(8, 5, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8 // n_batches)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    acc = CompressedAccumulator(model, rank=rank, tau=TAU, optimizer=opt) if rank != "plain" else None
    seen, i = [], 0
    try:
        for _ in range(3):
            for x, y in loader:
                i += 1
                if not accumulate:
                    nn.functional.mse_loss(model(x), y).backward()
                    if i % TAU == 0:
                        opt.step()
                        opt.zero_grad()
                else:
                    with accelerator.accumulate(model):
                        accelerator.backward(nn.functional.mse_loss(model(x), y))
                        if accelerator.sync_gradients:
                            if finish:
                                acc.finish_cycle()
                            accelerator.clip_grad_norm_(model.parameters(), 0.05)
                        opt.step()
                        opt.zero_grad()
                if acc is not None:
                    seen.append((acc.cycle, acc.micro_step))
    finally:
        GradientState._reset_state()
        if acc is not None:
            acc.remove()
    return [p.detach().clone() for p in model.parameters()], seen


@pytest.mark.parametrize("rank", [None, 4])
def test_accelerate_with_a_dataloader_of_one_batch_ends_every_cycle(rank):
    """A prepared dataloader of one batch per epoch under accelerator.accumulate(): every
    backward is synced and ends its cycle of one micro-batch, so no unsynced backward ever
    showed accelerate driving; every cycle stayed open and clipping failed on the
    placeholder in .grad in every epoch (probe Z107; the docs had said only the first).
    Now each cycle closes at its backward: equal, bit for bit, to closing it by hand with
    finish_cycle() (rank=None: to accelerate's plain accumulation)."""
    pytest.importorskip("accelerate")
    got, seen = _one_process_accelerate_run(1, rank)
    assert seen == [(1, 0), (2, 0), (3, 0)]
    want, _ = _one_process_accelerate_run(1, rank, finish=True) if rank else _one_process_accelerate_run(1, "plain")
    _assert_equal(got, want)


def test_a_plain_loop_with_an_accelerator_is_not_driven_at_its_dataloaders_end():
    """A loop without accumulate() under an Accelerator(gradient_accumulation_steps=tau) and
    a prepared dataloader of 4 batches (tau 3): accelerate's flag stays synced, so its
    dataloader's last batch looks like accumulate() ending a cycle there. A first version of
    the one-batch rule above ended the cycle at every epoch's end, and carried on ending
    every next one at its first backward (review Z109). The cycles count tau backwards."""
    pytest.importorskip("accelerate")
    _, seen = _one_process_accelerate_run(4, 4, accumulate=False)
    assert seen == [(i // TAU, i % TAU) for i in range(1, 13)]


# ------------------------------------------------------------ 3. copy, pickle


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_flora_keep_working(how):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(16, 32))
    opt = Flora([p], lr=1e-2, rank=4, beta1=0.9, kappa=2, cache_projections=True)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = twin.param_groups[0]["params"][0]
    g = torch.randn_like(p)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, q)
    twin.load_state_dict(opt.state_dict())


# ------------------------------------------------- 4. scheduler option names


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10),
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2),
])
def test_cyclic_schedulers_raise_their_own_error_and_change_nothing(make):
    p = nn.Parameter(torch.randn(8, 8))
    opt = Flora([p], lr=1e-3, rank=2, beta1=0.9, momentum_form="paper")
    with pytest.raises(ValueError, match="momentum"):
        make(opt)
    assert opt.param_groups[0]["momentum_form"] == "paper" and "momentum" not in opt.param_groups[0]
    # No Flora option may share a name with what torch's schedulers write.
    assert not {"momentum", "betas"} & set(opt.defaults)


def _one_cycle_run(weight_decay, lrs=None, steps=10):
    """Flora ("paper" momentum, a resample every 3 steps) on fixed gradients, its lr set by
    OneCycleLR (cycle_momentum=False) or, with ``lrs``, by hand before each step; the
    weights after every step and the lr the group held at each step."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 8))
    opt = Flora([p], lr=1e-3, rank=2, beta1=0.9, momentum_form="paper", kappa=3, scale_parameter=False,
                weight_decay=weight_decay)
    sched = None if lrs else torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps,
                                                                  cycle_momentum=False)
    gen = torch.Generator().manual_seed(1)
    weights, used = [p.detach().clone()], []
    for t in range(steps):
        if lrs:
            opt.param_groups[0]["lr"] = lrs[t]
        used.append(opt.param_groups[0]["lr"])
        p.grad = torch.randn(8, 8, generator=gen)
        opt.step()
        if sched:
            sched.step()
        weights.append(p.detach().clone())
    assert opt.param_groups[0]["momentum_form"] == "paper"
    return weights, used


def test_one_cycle_without_cycling_momentum_works():
    """Each step uses the lr OneCycleLR sets for it. The schedule's values come from the
    same scheduler driving a plain SGD. The lr a step used is read from the weight
    decay: with scale_parameter=False the update does not depend on the weights, so two
    runs that differ only in weight_decay (wd and 0) differ by D_t, and
    D_{t+1} - D_t = -wd * lr_t * p_t exactly."""
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=1e-2, total_steps=10, cycle_momentum=False)
    schedule = []
    for _ in range(10):
        schedule.append(sched.get_last_lr()[0])
        probe.step()
        sched.step()
    assert max(schedule) == pytest.approx(1e-2) and schedule[0] == pytest.approx(4e-4)  # warm-up, then anneal
    wd = 0.5
    decayed, used = _one_cycle_run(wd)
    plain, _ = _one_cycle_run(0.0)
    assert used == pytest.approx(schedule, rel=1e-12)
    for t, lr in enumerate(schedule):
        d0, d1, w = decayed[t] - plain[t], decayed[t + 1] - plain[t + 1], decayed[t]
        read = (-((d1 - d0) * w).sum() / (wd * w.square().sum())).item()
        assert abs(read - lr) < 1e-4 * max(schedule), (t, read, lr)  # measured: within 4e-8 (float32)
    # and the momentum path: the same as setting each step's lr by hand
    by_hand, _ = _one_cycle_run(wd, lrs=schedule)
    assert all(torch.equal(a, b) for a, b in zip(decayed, by_hand))
    constant, _ = _one_cycle_run(wd, lrs=[schedule[0]] * 10)
    assert not torch.allclose(constant[-1], decayed[-1], rtol=0, atol=1e-3)


def test_checkpoint_with_the_old_option_name_loads():
    p = nn.Parameter(torch.randn(8, 8))
    opt = Flora([p], lr=1e-3, rank=2, beta1=0.9, momentum_form="paper")
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["momentum"] = g.pop("momentum_form")
    opt2 = Flora([p], lr=1e-3, rank=2, beta1=0.9)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["momentum_form"] == "paper" and "momentum" not in opt2.param_groups[0]
    with pytest.warns(FutureWarning, match="momentum_form"):
        assert Flora([p], lr=1e-3, momentum="paper").param_groups[0]["momentum_form"] == "paper"


# ------------------------------------------------------------------ 5. float64


@pytest.mark.parametrize("kw", [dict(lr=1e-2, relative_step=False, beta1=0.9), dict(lr=None, beta1=None)])
def test_float64_without_compression_equals_hf_adafactor(kw):
    results = []
    for make in (lambda ps: Adafactor(ps, warmup_init=False, **kw), lambda ps: Flora(ps, **kw)):
        model = _mlp(torch.float64)
        opt = make(model.parameters())
        for x, y in _batches(5, dtype=torch.float64):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        results.append(_params(model))
    _assert_equal(*results)


def _accumulated_flora_run(dtype, rank, **options):
    model = _mlp(dtype)  # float32 init, cast: every dtype starts from the same values
    start = _params(model)
    opt = Flora(model.parameters(), lr=1e-2, rank=rank, beta1=0.9, kappa=2, **options)
    acc = CompressedAccumulator(model, rank=rank, tau=TAU, optimizer=opt)
    _epoch_loop(model, opt, acc, _batches(2 * TAU + 1, dtype=dtype), "optimizer")
    return model, opt, start


def test_float64_compressed_momentum_and_accumulation():
    """float64 weights keep float64 state and follow the float32 run (same start, same
    batches, same projections, the momentum in float32: the default "auto" keeps a float64
    momentum and a float32 one in bfloat16) to float32 rounding: within 1e-4 of each
    tensor's movement (measured 1e-5)."""
    model, opt, start = _accumulated_flora_run(torch.float64, 4)
    ref, _, _ = _accumulated_flora_run(torch.float32, 4, momentum_dtype=None)
    assert any("exp_avg_c" in opt.state[p] for p in model.parameters())
    for p, p0, q in zip(model.parameters(), start, ref.parameters()):
        assert p.dtype == torch.float64
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float64
        moved = (p.detach() - p0).norm()
        assert moved > 1e-3
        assert (p.detach() - q.detach().double()).norm() < 1e-4 * moved


def test_float64_accumulation_without_compression_equals_hf_adafactor():
    """The same loop with rank=None (optimizer and accumulator): HF Adafactor in float64
    with plain accumulation, number for number."""
    model, _, _ = _accumulated_flora_run(torch.float64, None)
    ref = _mlp(torch.float64)
    opt = Adafactor(ref.parameters(), lr=1e-2, beta1=0.9, relative_step=False, warmup_init=False)
    _epoch_loop(ref, opt, None, _batches(2 * TAU + 1, dtype=torch.float64), "plain")
    _assert_equal(_params(model), _params(ref))


# ------------------------------------------------------ 6. remove() mid-cycle


def test_remove_mid_cycle_drops_every_partial_sum():
    model = _mlp()
    acc = CompressedAccumulator(model, rank=4, tau=TAU)
    _loss(model, *_batches(1)[0]).backward()
    with pytest.warns(UserWarning, match="partial sums are dropped"):
        acc.remove()
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------- 7. GradScaler, fused


def _scaled_run(fused, poison, opt_cls):
    model = _mlp()
    opt = opt_cls(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc = CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=fused,
                                **({"scaler": scaler} if fused else {}))
    batches = _batches(2 * TAU)
    if poison:  # a NaN input in the second cycle: every gradient of that cycle is NaN
        batches[TAU + 1][0][0, 0] = float("nan")
    for i, (x, y) in enumerate(batches):
        scaler.scale(_loss(model, x, y)).backward()
        if (i + 1) % TAU == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if i + 1 == TAU:
                after_first = _params(model)
    assert acc.cycle == 2
    return _params(model), scaler.get_scale(), after_first


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, Flora])
@pytest.mark.parametrize("poison", [False, True])
def test_fused_with_grad_scaler_equals_normal_mode(poison, opt_cls):
    p_ref, s_ref, _ = _scaled_run(False, poison, opt_cls)
    p_got, s_got, after_first = _scaled_run(True, poison, opt_cls)
    assert s_got == s_ref == (2.0**9 if poison else 2.0**10)  # the scaler saw the NaN and backed off
    _assert_equal(p_got, p_ref)
    if poison:
        _assert_equal(p_got, after_first)  # nothing stepped in the poisoned cycle


def test_scaler_needs_fused_mode():
    model = _mlp()
    with pytest.raises(ValueError, match="scaler"):
        CompressedAccumulator(model, rank=4, tau=2, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="scaler"):
        CompressedAccumulator(model, rank=4, tau=2, fused=True, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                              scaler=object())


# ---------------------------------------------------- 8. non-finite gradients

CONFIGS = {  # every path of the step: compressed, dense momentum, none; 2-D and 1-D
    "compressed": dict(rank=2, beta1=0.9),
    "compressed-paper": dict(rank=2, beta1=0.9, momentum_form="paper"),
    "compressed-float32": dict(rank=2, beta1=0.9, momentum_dtype=None),
    "dense-momentum": dict(beta1=0.9),
    "no-momentum": dict(),
    "weight-decay": dict(rank=2, beta1=0.9, weight_decay=0.1),
}


# (bad gradient entry, parameter dtype): a value whose square overflows the state's dtype
# (float32 for half parameters, float64 for float64 ones) as well as NaN and inf
BAD_ENTRIES = [(float("nan"), torch.float32), (float("inf"), torch.float32), (1e20, torch.float32),
               (1e20, torch.bfloat16), (float("inf"), torch.float16), (1e200, torch.float64)]


@pytest.mark.parametrize("bad,dtype", BAD_ENTRIES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_nonfinite_gradient_skips_that_parameter_only(config, bad, dtype):
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(6, 10, dtype=dtype)), nn.Parameter(torch.randn(10, dtype=dtype))
    ref_w, ref_b = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    kw = dict(lr=1e-2, kappa=2, **CONFIGS[config])
    opt, ref = Flora([w, b], **kw), Flora([ref_w, ref_b], **kw)
    for step in range(4):
        gw, gb = torch.randn(6, 10, dtype=dtype), torch.randn(10, dtype=dtype)
        if step == 2:  # w gets a bad gradient; b a good one
            gw[1, 3] = bad
            w_before = w.detach().clone()
            state_before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[w].items()}
        w.grad, b.grad = gw, gb.clone()
        opt.step()
        if step == 2:
            assert torch.equal(w, w_before)
            for k, v in opt.state[w].items():
                if isinstance(v, torch.Tensor):
                    want = state_before[k]
                    if k == "exp_avg_c":  # this step resampled (kappa=2): M only moved to the new projection
                        assert opt.state[w]["proj_count"] == state_before["proj_count"] + 1
                        dim, g = state_before["proj_dim"], opt.param_groups[0]
                        a_old, a_new = (make_projection(g["projection"], projection_seed(0, 0, n), 2, w.shape[dim])
                                        for n in (0, 1))
                        want = transfer(want.to(a_old.dtype), a_old, a_new, dim)
                        # batched vs plain matmul; a bfloat16 momentum (the default) rounded once after
                        tol = 2.0 ** -7 if v.dtype == torch.bfloat16 else 1e-6
                        torch.testing.assert_close(v.to(want.dtype), want, rtol=tol,
                                                   atol=1e-9 + tol * want.abs().max().item())
                        continue
                    assert torch.equal(v, want), k
            ref_b.grad = gb.clone()
            ref.step()  # the reference sees b's gradient only
        else:
            ref_w.grad, ref_b.grad = gw.clone(), gb.clone()
            ref.step()
    assert int(opt.nonfinite_skips) == 1
    assert torch.isfinite(w).all() and torch.equal(b, ref_b)


# ------------------------------------------------- 9, 10. foreign checkpoints


def test_state_of_another_rank_is_refused_naming_both():
    p = nn.Parameter(torch.randn(8, 8))
    opt = Flora([p], lr=1e-3, rank=3, beta1=0.9)
    p.grad = torch.randn_like(p)
    opt.step()
    other = Flora([p], lr=1e-3, rank=4, beta1=0.9)
    with pytest.raises(ValueError, match=r"rank=3.*rank=4"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


def test_state_of_another_optimizer_is_refused():
    p = nn.Parameter(torch.randn(8, 8))
    adam = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    adam.step()
    opt = Flora([p], lr=1e-3, rank=2, beta1=0.9)
    with pytest.raises(ValueError, match="different optimizer"):
        opt.load_state_dict(adam.state_dict())


# ------------------------------------------------------------ summaries, lr=None


def test_summary_and_warning_when_nothing_is_compressed():
    model = _mlp()
    with pytest.warns(UserWarning, match="beta1=None"):
        Flora(model.parameters(), lr=1e-3, rank=32)
    with pytest.warns(UserWarning, match="projected dim <= rank 32"):
        Flora(model.parameters(), lr=1e-3, rank=32, beta1=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = Flora(model.parameters(), lr=1e-3, rank=4, beta1=0.9)
        Flora(model.parameters(), lr=1e-3)  # no rank asked for: nothing to warn about
    rows = opt.plan()
    assert [r["compressed"] for r in rows] == [True, False, True, False, True, False]
    assert rows[1]["reason"] == "1-D" and rows[0]["momentum_shape"] == (16, 4)
    text = opt.summary()
    assert "3 of 6" in text and "compressed to 16 x 4" in text and "dense: 1-D" in text
    # where the momentum lives: bfloat16 with a rank (the default "auto"), float32 without
    assert {r["momentum_dtype"] for r in rows} == {"bfloat16"} and "momentum in bfloat16" in text
    rows = Flora(model.parameters(), lr=1e-3, beta1=0.9).plan()
    assert {r["momentum_dtype"] for r in rows} == {"float32"}
    rows = Flora(model.double().parameters(), lr=1e-3, rank=4, beta1=0.9).plan()
    assert {r["momentum_dtype"] for r in rows} == {"float64"}
    no_momentum = Flora(model.parameters(), lr=1e-3)
    assert {r["momentum_dtype"] for r in no_momentum.plan()} == {None}
    assert "momentum in" not in no_momentum.summary()
    model[0].requires_grad_(False)  # frozen tensors are said so, in the rows and the headline
    rows, text = (opt := Flora(model.parameters(), lr=1e-3, rank=4, beta1=0.9)).plan(), opt.summary()
    assert [r["frozen"] for r in rows] == [True, True, False, False, False, False]
    # the headline counts trainable tensors only (it had said "3 of 6", the frozen kernel among the 3)
    assert "2 of 4 trainable parameter tensors keep compressed momentum (2 more frozen: requires_grad=False" in text
    assert text.splitlines()[1].endswith("momentum in float64, frozen") and "frozen" not in text.splitlines()[3]


@pytest.mark.parametrize("warmup_init", [False, True])
def test_relative_step_schedule_reports_and_changes_nothing(warmup_init):
    """get_last_lr() is the relative step of the next optimizer step, as torch's
    schedulers report the lr the next step will use (with warm-up the Trainer's log had
    been one step late)."""
    model = _mlp()
    opt = Flora(model.parameters(), lr=None, warmup_init=warmup_init)
    sched = flora.RelativeStepSchedule(opt)

    def size(t):
        return min(1e-6 * t if warmup_init else 1e-2, t**-0.5)

    assert sched.get_last_lr() == [size(1)]
    for t, (x, y) in enumerate(_batches(3), start=1):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        assert sched.get_last_lr() == [size(t + 1)]
        assert opt.param_groups[0]["lr"] is None
    with pytest.raises(ValueError, match="relative_step"):
        flora.RelativeStepSchedule(Flora(model.parameters(), lr=1e-3))
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)


def test_relative_step_schedule_leaves_a_fixed_lr_group_alone():
    """Flora(groups, lr=None) with one group of its own lr (the README's mixed groups): the
    schedule refused it ('use any torch scheduler for those', which the Trainer's one
    scheduler cannot), and every torch scheduler fails on the None lr. It reports the fixed
    lr as it is and changes nothing (a new-user probe)."""
    model = _mlp()
    first, *rest = list(model.parameters())
    opt = Flora([{"params": [first], "lr": 1e-3}, {"params": rest}], lr=None)
    sched = flora.RelativeStepSchedule(opt)
    assert sched.get_last_lr() == [1e-3, 1e-2]
    for t, (x, y) in enumerate(_batches(3), start=1):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert sched.get_last_lr() == [1e-3, 1e-2] and [g["lr"] for g in opt.param_groups] == [1e-3, None]


@pytest.mark.parametrize("order", ["zero_grad-first", "scheduler-first"])
def test_hf_adafactor_schedule_is_refused_not_a_silent_zero_step(order):
    """transformers' AdafactorSchedule writes lr=0 into every group (HF's Adafactor ignores
    lr in relative mode): Flora took steps of size 0 without a word in one loop order, and
    in the other one such step, then failed inside the schedule (no ``_get_lr``). Refused
    at the first step, before any change, naming RelativeStepSchedule; torch.distributed.
    checkpoint's initialisation (an empty state, gradients of zeros, lr 0) still steps."""
    from transformers.optimization import AdafactorSchedule

    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = Flora(model.parameters(), lr=None, rank=2, beta1=0.9, warmup_init=True, weight_decay=0.1)
    sched = AdafactorSchedule(opt)
    (x, y), = _batches(1)
    nn.functional.mse_loss(model(x), y).backward()
    if order == "scheduler-first":
        with pytest.raises(ValueError, match=r"lr=0.0 in a parameter group with relative_step=True: .*"
                                             r"AdafactorSchedule .*flora.RelativeStepSchedule"):
            opt.step()
            sched.step()
    else:
        with pytest.raises(ValueError, match="AdafactorSchedule"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not any(opt.state.get(p) for p in model.parameters())
    # the initialisation torch.distributed.checkpoint makes (state_dict._init_optim_state)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weight decay at lr 0


def test_hf_adafactor_schedule_over_a_numeric_lr_is_refused_naming_the_scheduler_to_use():
    """With a numeric lr, AdafactorSchedule's lr=0 is a legal value (a warm-up from 0 writes
    it too), so the step runs at lr 0; the schedule's first step() then called a method
    Flora lacked (an AttributeError, under the Trainer as by hand: probe Z142). Now a
    refusal naming the schedulers to use; no weight moved."""
    from transformers.optimization import AdafactorSchedule

    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = Flora(model.parameters(), lr=1e-3, rank=2, beta1=0.9, weight_decay=0.1)
    sched = AdafactorSchedule(opt)
    (x, y), = _batches(1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"AdafactorSchedule drives HF Adafactor's relative step: it wrote lr=0 .*"
                                         r"transformers.get_scheduler.*flora.RelativeStepSchedule\(opt\)"):
        sched.step()
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


@pytest.mark.parametrize("schedule", ["adafactor", "warmup", "fused"])
def test_ten_steps_at_lr_0_are_said_once(schedule):
    """AdafactorSchedule over a numeric lr, in a loop that zeroes the gradients before the
    schedule's step() (or under fused accumulation), never reached the refusal above: it
    trained at lr 0 without a word (a review). Said once, at the tenth step in a row with
    every lr 0; a warm-up from 0 (one such step) says nothing."""
    import warnings

    from transformers import get_linear_schedule_with_warmup
    from transformers.optimization import AdafactorSchedule

    model = _mlp()
    opt = Flora(model.parameters(), lr=1e-3, rank=2, beta1=0.9)
    sched = get_linear_schedule_with_warmup(opt, 3, 30) if schedule == "warmup" else AdafactorSchedule(opt)
    (x, y), = _batches(1)
    if schedule == "fused":  # docs/accumulation.md's fused loop: no opt.step() (a review: it had said nothing)
        from flora import CompressedAccumulator
        acc = CompressedAccumulator(model, rank=None, tau=2, optimizer=opt, fused=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(25):
            if schedule == "fused":
                for _ in range(2):
                    (nn.functional.mse_loss(model(x), y) / 2).backward()
                acc.finish_cycle()
                sched.step()
                continue
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    said = [w for w in seen if "lr has been 0" in str(w.message)]
    if schedule == "warmup":
        assert not said
        return
    if schedule == "fused":
        assert len(said) == 1
        return
    assert len(said) == 1 and said[0].filename == __file__
    assert "every parameter group's lr has been 0 for 10 steps, so no weight moved. transformers' " \
           "AdafactorSchedule writes lr=0" in str(said[0].message)


def test_zero_grad_after_a_failed_backward_drops_the_whole_partial_sum():
    """A backward that raises after the accumulator's hook announced a gradient (a user's
    NaN guard, an out-of-memory error) and is dropped with zero_grad(), as in plain
    PyTorch: the next micro-batches start a clean cycle for every parameter. Before, the
    announced parameter stayed "in flight" for good, zero_grad() went unseen for it, and
    its estimate kept the dropped micro-batch 0 (found by a new-user probe)."""
    grads = []
    for fail in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = flora.CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, seed=1)
        state = {"i": -1}

        def guard(g):
            if fail and state["i"] == 1:
                raise FloatingPointError("a NaN guard")

        model[2].weight.register_hook(guard)  # after the accumulator's own hook
        for i, (x, y) in enumerate(_batches(4)):
            state["i"] = i
            if i == 1 and not fail:
                opt.zero_grad()  # the same micro-batch dropped without a failure
                continue
            try:
                _loss(model, x, y).backward()
            except FloatingPointError:
                opt.zero_grad()
        acc.finish_cycle()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    # without zero_grad() the failed micro-batch's partial gradients stay, as in plain
    # PyTorch (rank=None: the accumulator is plain accumulation, to the bit)
    runs = []
    for acc_on in (False, True):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if acc_on:
            acc = flora.CompressedAccumulator(model, rank=None, tau=TAU, optimizer=opt)
        state = {"i": -1}

        def guard(g):
            if state["i"] == 1:
                raise FloatingPointError("a NaN guard")

        model[2].weight.register_hook(guard)
        for i, (x, y) in enumerate(_batches(TAU)):  # the partial micro-batch counts for the layers it reached
            state["i"] = i
            try:
                _loss(model, x, y).backward()
            except FloatingPointError:
                pass
        if acc_on:
            acc.finish_cycle()
        runs.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_cycle_of_one_micro_batch_is_one_cycle():
    """tau=1 (or a one-micro-batch cycle ended early) closes after the whole backward,
    not after the first parameter's hook."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = CompressedAccumulator(model, rank=4, tau=1, optimizer=opt)
    for x, y in _batches(3):
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert acc.cycle == 3


def test_fused_mode_steps_a_torch_optimizer_over_the_ready_parameters_alone():
    """Fused mode steps a non-Flora optimizer once per parameter; torch's optimizers scan
    every group's list for gradients at each step, O(parameters^2) a cycle (a probe: AdamW
    9.7x plain accumulation at 4,000 tensors). Its groups are narrowed to the parameter for
    the step, and restored: every step sees one parameter, the groups are whole after, and
    the result equals plain accumulation."""
    seen = []
    runs = []
    for fused in (True, False):
        model = _mlp()
        opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() == 2]},
                                 {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-2)
        lists = [g["params"] for g in opt.param_groups]
        real_step = opt.step

        def step(*a, real_step=real_step, opt=opt, fused=fused, **k):  # what the step sees (not a hook: see below)
            if fused:
                seen.append(sum(len(g["params"]) for g in opt.param_groups))
            return real_step(*a, **k)

        opt.step = step
        acc = CompressedAccumulator(model, rank=None, tau=TAU, optimizer=opt, fused=fused)
        for i, (x, y) in enumerate(_batches(2 * TAU)):
            _loss(model, x, y).backward()
            if not fused and (i + 1) % TAU == 0:
                opt.step()
                opt.zero_grad()
        assert len(opt.param_groups) == 2 and all(a is b for a, b in zip((g["params"] for g in opt.param_groups), lists))
        acc.remove()
        runs.append([p.detach().clone() for p in model.parameters()])
    n = len(list(_mlp().parameters()))
    assert seen and set(seen) == {1} and len(seen) == 2 * n
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fused_mode_leaves_the_groups_whole_for_an_optimizer_with_step_hooks():
    """A step hook of the user's (or a global one) may read the groups or save a checkpoint:
    state_dict() on the narrowed view raised KeyError, its state holding other parameters (a
    review). Such an optimizer is stepped over its whole lists, as before the narrowing."""
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sizes = []
    opt.register_step_pre_hook(lambda o, a, k: sizes.append(len(o.state_dict()["param_groups"][0]["params"])))
    acc = CompressedAccumulator(model, rank=None, tau=TAU, optimizer=opt, fused=True)
    for x, y in _batches(2 * TAU):
        _loss(model, x, y).backward()
    n = len(list(model.parameters()))
    assert sizes and set(sizes) == {n}
    acc.remove()
