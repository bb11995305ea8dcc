"""CompressedAccumulator in the loops real users write (a probe's findings, 2026-12-04):
branches that a micro-batch does not reach (experts routed in turn, two task towers, an
auxiliary head), a zero_grad() that drops a micro-batch, a mid-cycle resume, and an
optimizer of another model. Each compared with plain PyTorch, or with the same run
uninterrupted, for every mode the docs promise it in."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import flora

TAU = 4


class MoE(nn.Module):
    """A trunk, two experts used in alternate micro-batches, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(12, 16)
        self.experts = nn.ModuleList([nn.Linear(16, 24) for _ in range(2)])
        self.head = nn.Linear(24, 5)

    def forward(self, x, e):
        return self.head(torch.tanh(self.experts[e](torch.tanh(self.trunk(x)))))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 12, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


def _build(fused, experts_only, opt_cls):
    m = MoE()
    if experts_only:
        m.trunk.requires_grad_(False)
        m.head.requires_grad_(False)
    opt = opt_cls([p for p in m.parameters() if p.requires_grad])
    return m, opt, flora.CompressedAccumulator(m, rank=4, tau=TAU, seed=0, optimizer=opt, fused=fused)


OPTIMIZERS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
              "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
              "flora": lambda ps: flora.Flora(ps, lr=1e-2, beta1=0.9, rank=4)}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("experts_only", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_a_mid_cycle_resume_with_experts_routed_in_turn_is_bit_exact(fused, experts_only, opt_name):
    """load_state_dict restored the cycle's count of backward passes only with reduce=True:
    after a resume the tau-th pass no longer ended a cycle in which no parameter got all tau
    gradients (3.4e-2 off; with only the experts trainable, the documented loop's clipping
    failed on the placeholders)."""
    data = _data()

    def run(resume_after=None):
        m, opt, acc = _build(fused, experts_only, OPTIMIZERS[opt_name])
        for i, (x, y) in enumerate(data):
            (nn.functional.mse_loss(m(x, i % 2), y) / TAU).backward()
            if i == resume_after:
                b = io.BytesIO()
                torch.save({"m": m.state_dict(), "o": opt.state_dict(), "a": acc.state_dict()}, b)
                b.seek(0)
                st = torch.load(b, weights_only=True)
                with pytest.warns(UserWarning, match="middle of a cycle"):
                    acc.remove()
                m, opt, acc = _build(fused, experts_only, OPTIMIZERS[opt_name])
                m.load_state_dict(st["m"])
                opt.load_state_dict(st["o"])
                acc.load_state_dict(st["a"])
            if (i + 1) % TAU == 0:
                if not fused:  # the estimates are in .grad (no placeholder left): clipping works
                    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in m.parameters()]

    ref = run()
    for a, b in zip(ref, run(resume_after=1)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rank", ["plain", None, 4])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("zero", ["optimizer", "submodule"])
def test_zero_grad_of_a_branch_the_last_micro_batch_skips_drops_it(rank, set_to_none, zero):
    """Micro-batch 1 reaches tower A, zero_grad() drops it, the cycle's last micro-batch
    reaches tower B only: tower A must not move, as in plain PyTorch. Before, the zero_grad()
    was seen only by a parameter reached again, and tower A stepped on the dropped
    micro-batch's estimate."""
    torch.manual_seed(0)
    enc = nn.Linear(32, 32).requires_grad_(False)
    towers = nn.ModuleList([nn.Linear(32, 16), nn.Linear(32, 16)])
    opt = torch.optim.SGD(towers.parameters(), lr=1.0)
    acc = None if rank == "plain" else flora.CompressedAccumulator(towers, rank=rank, tau=2, optimizer=opt)
    w0 = towers[0].weight.detach().clone()
    x = torch.randn(4, 32)
    towers[0](enc(x)).pow(2).mean().backward()  # dropped
    (opt if zero == "optimizer" else towers[0]).zero_grad(set_to_none=set_to_none)
    towers[1](enc(x)).pow(2).mean().backward()  # the tau-th
    if acc is not None:
        assert acc.cycle == 0 and acc.micro_step == 1  # the dropped pass does not count
        acc.finish_cycle()
    opt.step()
    assert torch.equal(towers[0].weight, w0)


class Aux(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.aux = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x, use_aux):
        h = torch.tanh(self.body(x))
        return self.head(h) + self.aux(h) if use_aux else self.head(h)  # aux's gradient comes first


@pytest.mark.parametrize("pattern", [(True, False, False), (True, True, True)])
@pytest.mark.parametrize("rank", [None, 4])
def test_passes_dropped_by_zero_grad_do_not_count_towards_tau(rank, pattern):
    """A bad micro-batch without the aux head, dropped with zero_grad(), then tau good ones
    whose first gradient is aux's: the dropped pass still counted, so the cycle ended one
    pass early (a refusal at the third, also uncompressed; or, compressed, a different
    update). Now the run equals the same good micro-batches alone."""
    tau = 3
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 32, generator=g) for _ in range(4)]

    def run(drop_first):
        m = Aux()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        flora.CompressedAccumulator(m, rank=rank, tau=tau, seed=0, optimizer=opt)
        if drop_first:
            (m(xs[0], use_aux=False).pow(2).mean() / tau).backward()
            opt.zero_grad()
        for i, use_aux in enumerate(pattern):
            (m(xs[i + 1], use_aux=use_aux).pow(2).mean() / tau).backward()
        opt.step()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_an_optimizer_of_another_model_is_refused_in_fused_mode_and_said_in_normal_mode():
    """Normal mode took it silently: each of its steps closed this model's cycle (8 cycles
    instead of 2 in the probe's loop); fused mode said a parameter was unfrozen since. Normal
    mode warns (an optimizer of fp32 master copies, or one filled later with
    add_param_group, holds none of them and works on full cycles: the review); the warning
    points at the caller's line."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    other = torch.optim.SGD(b.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"holds none of the accumulator's 2 parameter\(s\) \('weight', 'bias'\)"):
        flora.CompressedAccumulator(a, rank=2, tau=2, optimizer=other, fused=True)
    with pytest.warns(UserWarning, match=r"holds none of the accumulator's 2 parameter\(s\)") as got:
        acc = flora.CompressedAccumulator(a, rank=2, tau=2, optimizer=other)
    assert got[0].filename == __file__
    acc.remove()
    both = torch.optim.SGD(list(a.parameters()) + list(b.parameters()), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flora.CompressedAccumulator(a, rank=2, tau=2, optimizer=both)  # holds some: nothing said


def _conv_cycles(fused, cycles, before):
    """Two conv layers, Flora (kappa 2) and an accumulator of tau 2 over ``cycles`` cycles;
    ``before(model, cycle, micro_batch)`` runs before each backward. The final parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9, kappa=2, foreach=False)
    acc = flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=fused)
    g = torch.Generator().manual_seed(1)
    for cycle in range(cycles):
        for mb in range(2):
            before(model, cycle, mb)
            model(torch.randn(2, 3, 8, 8, generator=g)).square().mean().backward()
        if not fused:
            opt.step()
        opt.zero_grad()
    acc.remove()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [False, True])
def test_a_change_of_memory_format_between_micro_batches_is_followed(fused):
    """model.to(memory_format=torch.channels_last) between the micro-batches of a cycle lays
    out each .grad anew (the placeholder's data swapped for dense zeros): normal mode took
    that for an edit of .grad and refused it (a probe; fused mode followed it). Both follow
    it now, equal to the run that stays contiguous; an edit of the values is still refused."""
    def run(convert, edit=False):
        def before(model, cycle, mb):
            if cycle == 1 and mb == 1:
                if convert:
                    model.to(memory_format=torch.channels_last)
                if edit:
                    w = model[2].weight
                    w.grad.data = torch.ones_like(w)
        return _conv_cycles(fused, 2, before)

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if not fused:
        with pytest.raises(RuntimeError, match="replaced"):
            run(False, edit=True)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _closure_run(how, acc_kw, opt_name, windows=3, tau=3):
    """``windows`` optimizer steps of ``tau`` micro-batches: ``"plain"`` (backward each
    micro-batch, then step), ``"lightning"`` (PyTorch Lightning's accumulate_grad_batches:
    micro-batches 1 to tau-1 run the closure directly, the tau-th inside
    ``optimizer.step(closure=closure)``), ``"short"`` (``optimizer.step(closure)``, the
    closure running tau-1 micro-batches: a short cycle) or ``"short, then step"`` (the same
    closure called, then ``optimizer.step()``), with an accumulator unless ``acc_kw`` is
    None."""
    model = _net()
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    if acc_kw is not None:
        flora.CompressedAccumulator(model, tau=tau, seed=0, optimizer=opt, **acc_kw)
    data = iter(_data(windows * tau))
    for _ in range(windows):
        if how.startswith("short"):
            def closure():
                for _ in range(tau - 1):
                    x, y = next(data)
                    (nn.functional.mse_loss(model(x), y) / tau).backward()
                return 0.0
            if how == "short":
                opt.step(closure)
            else:
                closure()
                opt.step()
        else:
            for i in range(tau):
                x, y = next(data)

                def closure(x=x, y=y):
                    loss = nn.functional.mse_loss(model(x), y) / tau
                    loss.backward()
                    return loss
                if how == "lightning" and i == tau - 1:
                    opt.step(closure=closure)
                else:
                    closure()
            if how == "plain":
                opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "flora"])
@pytest.mark.parametrize("acc_kw", [dict(rank=4), dict(rank=None), dict(rank=4, fused=True), dict(rank=None, fused=True)],
                         ids=["normal-r4", "normal-dense", "fused-r4", "fused-dense"])
def test_a_micro_batch_run_by_the_steps_closure_is_the_cycles_last(acc_kw, opt_name):
    """A closure runs its backward inside step(), after the step pre-hooks, which closed the
    cycle first (a probe): in normal mode the compressed tensors stepped on the placeholder's
    zeros and never trained, in fused mode each window stepped without its last micro-batch,
    and that micro-batch began the next cycle. Lightning's loop now equals the plain loop
    with the same accumulator, bit for bit."""
    want = _closure_run("plain", acc_kw, opt_name)
    got = _closure_run("lightning", acc_kw, opt_name)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True])
def test_a_short_cycle_run_inside_the_steps_closure_is_closed_after_it(fused):
    """optimizer.step(closure) whose closure runs fewer than tau micro-batches: the step's
    pre-hook closed the cycle before the closure ran, so the step saw zeros (normal mode) or
    nothing (fused mode). Uncompressed, it now equals plain PyTorch; compressed, the same
    closure called before step()."""
    want = _closure_run("short", None, "sgd-momentum")
    got = _closure_run("short", dict(rank=None, fused=fused), "sgd-momentum")
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    want = _closure_run("short, then step", dict(rank=4, fused=fused), "sgd-momentum")
    got = _closure_run("short", dict(rank=4, fused=fused), "sgd-momentum")
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_fused_mode_says_when_another_optimizer_steps_its_parameters():
    """Fused mode steps with the optimizer it was built with; a loop that switched to a new
    optimizer over the same parameters went on training with the old one, silently (a
    probe: 2e-2 moved under a new optimizer of lr 0). Said once; normal mode follows the
    new optimizer, and says nothing."""
    for fused in (False, True):
        model = _net()
        old = torch.optim.SGD(model.parameters(), lr=0.1)
        flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=old, fused=fused)
        new = torch.optim.SGD(model.parameters(), lr=0.0)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for i, (x, y) in enumerate(_data(6)):
                (nn.functional.mse_loss(model(x), y) / 2).backward()
                if i % 2:
                    new.step()
                    new.zero_grad()
        said = [str(w.message) for w in seen if "another optimizer" in str(w.message)]
        if fused:
            assert len(said) == 1 and "steps 4 of its parameters" in said[0] and "acc.remove()" in said[0], said
            # a tensor shared by two optimizers, the accumulator's and another (probe Z144)
            assert "A tensor stepped by two optimizers (one of them this accumulator's) needs normal mode" in said[0]
        else:
            assert not said


@pytest.mark.parametrize("back", ["bfloat16", "double", "channels_last"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_cast_and_a_cast_back_between_micro_batches_is_followed(fused, back):
    """model.bfloat16().float() (or .double().float(), or channels_last and back) between two
    micro-batches: each cast writes the placeholder anew, the last one back in its own
    dtype and layout as dense zeros, which normal mode took for an edit of .grad and refused
    ("replaced", probe Z90), though one cast is followed as documented. Both modes follow
    it now, equal to the run without the casts to the rounding of the partial sum's trip."""
    def run(cast):
        def before(model, cycle, mb):
            if cast and mb == 1:
                if back == "channels_last":
                    model.to(memory_format=torch.channels_last).to(memory_format=torch.contiguous_format)
                else:
                    getattr(model, back)().float()
        return _conv_cycles(fused, 1, before)

    tol = dict(rtol=1e-2, atol=1e-3) if back == "bfloat16" else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **tol)
