"""Fused mode under ordinary loop habits (found by a new-user probe): a parameter that gets
gradients in some micro-batches only, a checkpoint taken while a cycle waits to be closed,
a GradScaler's skipped cycle in ``last_grad_norm``, a frozen parameter holding a stale
gradient."""

import pytest
import torch
from torch import nn

from flora import CompressedAccumulator, Flora
from flora.accumulation.hooks import remove_dead_global_hooks

TAU = 3


class Aux(nn.Module):
    """A body, a head, and an auxiliary head used in some micro-batches only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.aux = nn.Linear(12, 16), nn.Linear(16, 5), nn.Linear(16, 5)

    def forward(self, x, use_aux):
        h = torch.tanh(self.body(x))
        return self.head(h) + self.aux(h) if use_aux else self.head(h)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 12, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


def _loss(model, i, x, y):
    return nn.functional.mse_loss(model(x, use_aux=i % TAU == 0), y) / TAU


OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
              "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
              "flora": lambda ps: Flora(ps, lr=1e-2, rank=4, beta1=0.9)}


def _habit_run(kind, fused, rank):
    """The usual loop: backward on every micro-batch, ``step(); zero_grad()`` at each
    boundary."""
    model = Aux()
    opt = OPTIMIZERS[kind](model.parameters())
    acc = CompressedAccumulator(model, rank=rank, tau=TAU, optimizer=opt, fused=fused)
    aux0 = model.aux.weight.detach().clone()
    for i, (x, y) in enumerate(_batches(3 * TAU)):
        _loss(model, i, x, y).backward()
        if (i + 1) % TAU == 0:
            opt.step()
            opt.zero_grad()
    assert acc.micro_step == 0 and acc.cycle == 3
    return [p.detach().clone() for p in model.parameters()], (model.aux.weight - aux0).abs().max()


@pytest.mark.parametrize("rank", [4, None])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_the_step_closes_a_fused_cycle_that_waits_for_it(kind, rank):
    """The auxiliary head misses the cycle's last micro-batch: the others step inside that
    backward, the head waits. The user's ``step()`` steps it on what it got, as in normal
    mode (before, fused mode's step did nothing and the ``zero_grad()`` after it dropped
    the head's gradients: it never trained)."""
    want, moved_want = _habit_run(kind, False, rank)
    got, moved = _habit_run(kind, True, rank)
    assert moved_want > 1e-3 and moved == moved_want
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("kind", ["adamw", "flora"])
def test_the_step_closes_a_short_fused_cycle_as_in_normal_mode(kind):
    """7 micro-batches at tau=3 with ``step(); zero_grad()`` at each boundary and at the end:
    the short last cycle steps on its one micro-batch (the step had closed only a cycle
    waiting for it, and the zero_grad() after it dropped the short one: a whole step lost;
    a new-user probe across replicas). A step after every backward closes every cycle, in
    both modes alike."""
    def run(fused, every):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        opt = OPTIMIZERS[kind](model.parameters())
        acc = CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=fused)
        batches = _batches(2 * TAU + 1)
        for i, (x, y) in enumerate(batches):
            (nn.functional.mse_loss(model(x), y) / TAU).backward()
            if every or (i + 1) % TAU == 0 or i + 1 == len(batches):
                opt.step()
                opt.zero_grad()
        assert acc.micro_step == 0 and acc.cycle == (len(batches) if every else 3)
        return [p.detach().clone() for p in model.parameters()]

    for every in (False, True):
        for a, b in zip(run(True, every), run(False, every)):
            assert torch.equal(a, b), (every, (a - b).abs().max())


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_of_a_cycle_waiting_to_be_closed_is_refused(fused):
    """Such a state could not be resumed (fused: a KeyError; normal: refused at load). The
    refusal names the way out, changes nothing, and after the step the save works."""
    model = Aux()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=fused)
    for i, (x, y) in enumerate(_batches(TAU)):
        _loss(model, i, x, y).backward()
    with pytest.raises(RuntimeError, match=r"waits to be closed.*'aux.weight'.*optimizer.step\(\)"):
        acc.state_dict()
    assert acc.micro_step == TAU
    opt.step()
    opt.zero_grad()
    sd = acc.state_dict()
    assert int(sd["cycle"]) == 1 and not sd["counts"].any()


def test_a_skipped_cycle_shows_in_last_grad_norm():
    """GradScaler with an optimizer other than Flora: a cycle whose gradients are not finite
    is not stepped, and its norm says so (it repeated the last finite cycle's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True, scaler=scaler)
    norms = []
    for i, (x, y) in enumerate(_batches(4)):
        if i == 3:
            x[0, 0] = float("inf")
        scaler.scale(nn.functional.mse_loss(model(x), y) / 2).backward()
        if i % 2:
            scaler.step(opt)
            scaler.update()
            norms.append(acc.last_grad_norm.item())
    assert norms[0] > 0 and not torch.isfinite(torch.tensor(norms[1]))
    assert scaler.get_scale() == 2.0 ** 9


def test_a_frozen_parameter_holding_a_stale_gradient_is_refused():
    """A warm-up loop in the "zero_grad() first" style leaves .grad set; the parameter is
    then frozen and the accumulator built: fused mode would step it at every other
    parameter's step, every cycle (8x plain PyTorch's one step over two cycles)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"hold a gradient.*\(16, 12\).*optimizer.zero_grad\(\)"):
        CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    opt.zero_grad()
    acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)
    frozen = model[0].weight.detach().clone()
    # the same state reached after the accumulator was built: refused at the next cycle's first gradient
    model[0].weight.grad = torch.ones_like(model[0].weight)
    with pytest.raises(ValueError, match="hold a gradient"):
        nn.functional.mse_loss(model(x), y).backward()
    assert torch.equal(model[0].weight, frozen) and acc.micro_step == 0


@pytest.mark.parametrize("mode", ["no optimizer", "optimizer", "fused"])
def test_a_dropped_model_frees_its_accumulator(mode):
    """torch keeps a post-accumulate-grad hook where the garbage collector cannot see it, and
    a module-level map held each accumulator strongly: a model dropped with its optimizer
    and accumulator stayed in memory for good (a leak per trial of an in-process sweep; an
    accumulator without optimizer= also left torch's global step hook behind, which a
    compiled step of any optimizer then traced)."""
    import gc
    import weakref

    from torch.optim.optimizer import _global_optimizer_pre_hooks

    gc.collect()
    remove_dead_global_hooks()  # those of earlier tests' accumulators in this process
    hooks_before = set(_global_optimizer_pre_hooks)  # (an earlier test's may still die meanwhile)

    def trial():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        opt = None if mode == "no optimizer" else torch.optim.AdamW(model.parameters(), lr=1e-2)
        acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=mode == "fused")
        for i, (x, y) in enumerate(_batches(3)):
            nn.functional.mse_loss(model(x), y).backward()
        return weakref.ref(acc), weakref.ref(model[0].weight)

    acc, weight = trial()
    gc.collect()
    assert acc() is None and weight() is None
    remove_dead_global_hooks()  # (what the next accumulator's construction does)
    assert not set(_global_optimizer_pre_hooks) - hooks_before  # the trial's own hook is gone


def test_an_accumulator_collected_during_a_step_does_not_break_it():
    """The collector freed a dead accumulator while torch iterated its global step hooks (a
    live accumulator's hook allocates): its finalizer removed its hook there, and the step
    raised "OrderedDict mutated during iteration". Its removal now waits for a safe point."""
    import gc

    def dead():
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        CompressedAccumulator(model, rank=4, tau=2)
        (x, y), = _batches(1)
        nn.functional.mse_loss(model(x), y).backward()

    gc.collect()
    gc.disable()  # keep the dead one until the step
    try:
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = CompressedAccumulator(model, rank=4, tau=2)
        dead()  # its hook comes after the live one's: removing it mid-loop is what torch's loop trips on
        on_any_step = acc._hooks.on_any_step

        def collecting(optimizer, args=(), kwargs=None):
            gc.collect()  # here the dead accumulator's finalizer runs, inside torch's loop over the hooks
            return on_any_step(optimizer, args, kwargs)

        acc._hooks.on_any_step = collecting
        (x, y), = _batches(1)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # closes the short cycle
        assert acc.micro_step == 0 and acc.cycle == 1
    finally:
        gc.enable()
    acc.remove()


def test_an_accumulator_not_kept_still_accumulates():
    """Its hooks keep it: the loop works without a reference to it, and a second one on the
    same model is refused until ``remove_from``."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    CompressedAccumulator(model, rank=4, tau=2)
    gc.collect()
    (x, y), (x2, y2) = _batches(2)
    nn.functional.mse_loss(model(x), y).backward()
    assert model[0].weight.grad.stride() == (0, 0)  # the placeholder: the micro-batch went into the buffer
    with pytest.raises(RuntimeError, match="already has a CompressedAccumulator"):
        CompressedAccumulator(model, rank=4, tau=2)
    with pytest.warns(UserWarning, match="partial sums are dropped"):
        assert CompressedAccumulator.remove_from(model) == 1


@pytest.mark.parametrize("inf_in_short", [False, True], ids=["finite", "overflow-in-short-cycle"])
@pytest.mark.parametrize("kind", ["adamw", "flora"])
def test_scaler_step_closes_a_short_fused_cycle(kind, inf_in_short):
    """fused=True, scaler=: 5 micro-batches at tau=3 with ``scaler.step(opt);
    scaler.update()`` at each boundary and at the end. The short last cycle failed in
    GradScaler ('No inf checks were recorded for this optimizer': no .grad to unscale) and
    stayed open (a new-user probe). Now it steps as ``acc.finish_cycle()`` first does, and
    an overflow in it lowers the scale and steps nothing."""
    def run(finish_first):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        opt = OPTIMIZERS[kind](model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        acc = CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=True, scaler=scaler)
        batches = _batches(TAU + 2)
        for i, (x, y) in enumerate(batches):
            if inf_in_short and i == TAU:
                x[0, 0] = float("inf")
            scaler.scale(nn.functional.mse_loss(model(x), y) / TAU).backward()
            if (i + 1) % TAU == 0 or i + 1 == len(batches):
                if finish_first:
                    acc.finish_cycle()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        assert acc.micro_step == 0 and acc.cycle == 2
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    (got, scale), (want, want_scale) = run(False), run(True)
    assert scale == want_scale == (2.0 ** 9 if inf_in_short else 2.0 ** 10)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("registered", ["before", "after"])
def test_a_flora_step_pre_hook_that_fused_mode_passes_by_is_said(registered):
    """Fused mode steps flora.Flora through step_parameter, so its step pre-hooks run at
    the loop's step(), after the cycle's gradients were freed: a gradient-centralising
    pre-hook changed nothing, silently, where under AdamW it runs per parameter (probe
    Z144). Said once, at the first cycle with one, pointing at the user's line; a
    normal-mode accumulator's own hook and an AdamW in fused mode say nothing."""
    import warnings

    def centralise(opt, args, kwargs):
        for g in opt.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.sub_(p.grad.mean())

    def run(kind, fused):
        model = Aux()
        opt = OPTIMIZERS[kind](model.parameters())
        if registered == "before":
            opt.register_step_pre_hook(centralise)
        CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=fused)
        if registered == "after":
            opt.register_step_pre_hook(centralise)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for i, (x, y) in enumerate(_batches(2 * TAU)):
                _loss(model, i, x, y).backward()
                if (i + 1) % TAU == 0:
                    opt.step()
                    opt.zero_grad()
        return [w for w in seen if "step pre-hooks" in str(w.message)]

    said = run("flora", True)
    assert len(said) == 1 and said[0].filename == __file__
    assert "(test_a_flora_step_pre_hook_that_fused_mode_passes_by_is_said.<locals>.centralise), which run at the " \
           "loop's optimizer.step(), after the cycle's parameters stepped" in str(said[0].message)
    assert "fused=False" in str(said[0].message) and "max_grad_norm=" in str(said[0].message)
    assert not run("flora", False) and not run("adamw", True)


def _hooked_fused_run(opt_hooks=0, global_hook=False):
    """A fused cycle of Flora with ``opt_hooks`` step pre-hooks named hook0, hook1, ...
    (and a global one): the pre-hook warnings it gives."""
    import warnings

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = Aux()
    opt = Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    for i in range(opt_hooks):
        def hook(o, a, k):
            pass
        hook.__qualname__ = f"hook{i}"
        opt.register_step_pre_hook(hook)

    def global_centralise(o, a, k):
        pass
    handle = register_optimizer_step_pre_hook(global_centralise) if global_hook else None
    try:
        CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for i, (x, y) in enumerate(_batches(TAU)):
                _loss(model, i, x, y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        if handle is not None:
            handle.remove()
    return [str(w.message) for w in seen if "step pre-hooks" in str(w.message)]


def test_the_pre_hook_warning_names_global_hooks_and_three_at_most():
    """torch's global step pre-hooks run at Flora's step() too; the warning names up to three
    hooks (mutation probe Z147: a global hook unsaid, a third name dropped or dots at three
    survived the tests)."""
    said = _hooked_fused_run(global_hook=True)
    assert len(said) == 1 and "global_centralise" in said[0], said
    three, four = _hooked_fused_run(opt_hooks=3), _hooked_fused_run(opt_hooks=4)
    assert len(three) == 1 and "(hook0, hook1, hook2), which run" in three[0], three
    assert len(four) == 1 and "(hook0, hook1, hook2, ...), which run" in four[0], four
