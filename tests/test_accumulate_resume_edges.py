"""CompressedAccumulator's mid-cycle checkpoints and gradient dtypes at their edges (probe
Z72: one-line mutations of the accumulator's checkpoint, estimator and gradient
bookkeeping that no test had noticed). Each test compares with the run that never stopped,
or with what the documentation promises, on an input where the mutant answers otherwise."""

import copy
import warnings

import pytest
import torch
from torch import nn

from flora import CompressedAccumulator

TAU = 3


def _mlp(dtype=torch.float32, grad_dtype=None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)
    if grad_dtype is not None:
        for p in m.parameters():
            p.grad_dtype = grad_dtype
    return m


def _xs(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 12, generator=g).to(dtype) for _ in range(n)]


def _backward(m, x):
    m(x).float().pow(2).sum().backward()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["bfloat16", "bfloat16 with float32 grads"])
def test_a_bfloat16_mid_cycle_resume_is_exact(kind, fused):
    """A bfloat16 model saved after one micro-batch of three and resumed equals the run that
    never stopped, bit for bit: the partial sums load in the dtypes the live cycle sums in
    (compressed: float32; dense: the gradient's dtype, float32 where ``p.grad_dtype`` says
    so). Loaded in the parameter's dtype, the compressed sums were rounded (7.8e-3 off) and
    a dense sum was refused by ``.grad`` after the cycle had been replaced."""
    gd = torch.float32 if "float32" in kind else None
    xs = _xs(TAU, torch.bfloat16)

    def build():
        m = _mlp(torch.bfloat16, gd)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return m, opt, CompressedAccumulator(m, rank=4, tau=TAU, seed=1, optimizer=opt, fused=fused)

    a, _, _ = build()
    for x in xs:
        _backward(a, x)
    b, _, accb = build()
    _backward(b, xs[0])
    sd = copy.deepcopy(accb.state_dict())
    c, _, accc = build()
    accc.load_state_dict(sd)
    slots = accc._engine.slots
    for k, t in accc._engine.cycle.buffers.items():  # compressed: float32; dense (fused mode): the gradient's
        assert t.dtype == (torch.float32 if slots[k].dim is not None else gd or torch.bfloat16), (k, t.dtype)
    assert any(slots[k].dim is None for k in accc._engine.cycle.buffers) == fused
    for x in xs[1:]:
        _backward(c, x)
    if fused:  # fused mode steps at the cycle's end: compare the parameters
        got, ref = list(c.parameters()), list(a.parameters())
    else:
        got, ref = [p.grad for p in c.parameters()], [p.grad for p in a.parameters()]
    for p, q in zip(ref, got):
        assert p.dtype == q.dtype and torch.equal(p, q)


def test_a_short_cycle_of_bfloat16_parameters_with_float32_grads_ends_in_float32():
    """finish_cycle() writes the estimate in the gradient's dtype (``p.grad_dtype``), not the
    parameter's: in bfloat16, ``.grad`` refused it."""
    m = _mlp(torch.bfloat16, torch.float32)
    acc = CompressedAccumulator(m, rank=4, tau=TAU, seed=1)
    for x in _xs(2, torch.bfloat16):
        _backward(m, x)
    acc.finish_cycle()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_gradients_zeroed_in_place_between_cycles_are_not_a_stale_estimate():
    """``zero_grad(set_to_none=False)`` after each step leaves zeros, not the last cycle's
    estimate: no warning (without the all-zero check, every such loop was told its estimate
    was stale)."""
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    CompressedAccumulator(m, rank=4, tau=2, seed=1, optimizer=opt)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i, x in enumerate(_xs(6)):
            _backward(m, x)
            if i % 2:
                opt.step()
                opt.zero_grad(set_to_none=False)
    assert not [w for w in seen if "estimate" in str(w.message)], [str(w.message)[:120] for w in seen]


@pytest.mark.parametrize("fused", [False, True])
def test_a_mid_cycle_state_dict_is_a_snapshot(fused):
    """What state_dict() returns mid-cycle does not change as the cycle goes on: its partial
    sums are copies (compressed and dense), as torch's optimizers' state_dict promises of
    a deep copy taken at once (without the clones, one more backward changed the saved sums
    by up to 2.3)."""
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    acc = CompressedAccumulator(m, rank=4, tau=TAU, seed=1, optimizer=opt, fused=fused)
    xs = _xs(2)
    _backward(m, xs[0])
    sd = acc.state_dict()
    snap = copy.deepcopy(sd)
    assert sd["compressed"] and sd["dense"]
    _backward(m, xs[1])
    for kind in ("compressed", "dense"):
        for i, t in sd[kind].items():
            assert torch.equal(t, snap[kind][i]), (kind, i)


class _Routed(nn.Module):
    """Two experts; each micro-batch goes through one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 16, bias=False)
        self.b = nn.Linear(12, 16, bias=False)

    def forward(self, x, use_b):
        return (self.b if use_b else self.a)(x)


def test_a_state_saved_before_backwards_was_recorded_ends_its_cycle_at_tau():
    """A mid-cycle state from before the accumulator recorded its backward passes (no
    ``backwards`` key) counts the most any parameter got: the cycle still ends at the tau-th
    backward, as the run that never stopped does (counting 0, it ended one backward late and
    expert b's gradient was missing)."""
    xs, route = _xs(TAU), [False, False, True]

    def run(resume):
        m = _Routed()
        acc = CompressedAccumulator(m, rank=4, tau=TAU, seed=1)
        for x, r in zip(xs[:2], route[:2]):
            m(x, r).pow(2).sum().backward()
        if resume:
            sd = acc.state_dict()
            sd.pop("backwards")
            m = _Routed()
            acc = CompressedAccumulator(m, rank=4, tau=TAU, seed=1)
            acc.load_state_dict(sd)
        m(xs[2], route[2]).pow(2).sum().backward()
        return acc.cycle, acc.micro_step, [None if p.grad is None else p.grad.clone() for p in m.parameters()]

    (c0, s0, g0), (c1, s1, g1) = run(False), run(True)
    assert (c1, s1) == (c0, s0) == (0, TAU)  # every backward of the cycle counted (no optimizer: it stays open)
    for p, q in zip(g0, g1):
        assert p is not None and q is not None and torch.equal(p, q)


def test_zero_grad_after_a_mid_cycle_load_drops_the_loaded_partial_sum():
    """A loaded partial sum is marked as ``.grad``'s placeholder, as a live one is: a
    ``zero_grad()`` right after the load (a micro-batch discarded) drops it, as it does in
    the run that never stopped (unmarked, it survived: 3.3 off, the cycle one micro-batch
    ahead)."""
    xs = _xs(4)
    a = _mlp()
    acc = CompressedAccumulator(a, rank=4, tau=TAU, seed=1)
    _backward(a, xs[0])
    sd = copy.deepcopy(acc.state_dict())
    b = _mlp()
    accb = CompressedAccumulator(b, rank=4, tau=TAU, seed=1)
    accb.load_state_dict(sd)
    a.zero_grad()
    b.zero_grad()
    for x in xs[1:]:
        _backward(a, x)
        _backward(b, x)
    assert (accb.cycle, accb.micro_step) == (acc.cycle, acc.micro_step)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_a_state_counting_tau_micro_batches_is_refused():
    """A cycle closes at its tau-th micro-batch and is never saved with tau of them: counts
    equal to tau are refused (only counts above tau had been tested)."""
    m = _mlp()
    acc = CompressedAccumulator(m, rank=4, tau=TAU, seed=1)
    for x in _xs(2):
        _backward(m, x)
    sd = acc.state_dict()
    sd["counts"] = sd["counts"] + 1
    assert int(sd["counts"].max()) == TAU
    other = CompressedAccumulator(_mlp(), rank=4, tau=TAU, seed=1)
    with pytest.raises(ValueError, match=r"counts must lie in \[0, tau=3\)"):
        other.load_state_dict(sd)
    assert other.micro_step == 0
