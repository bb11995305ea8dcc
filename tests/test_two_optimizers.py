"""More than one optimizer, accumulator or backward pass per micro-batch (found by a
new-user probe, 2026-12-04)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora import CompressedAccumulator


def _shared():
    torch.manual_seed(0)
    trunk = nn.Linear(16, 32)
    a, b = nn.Sequential(trunk, nn.Tanh(), nn.Linear(32, 2)), nn.Sequential(trunk, nn.Tanh(), nn.Linear(32, 2))
    return trunk, a, b


def test_a_shared_compressed_parameter_is_closed_by_either_optimizers_step():
    """A layer shared by two models, each with its own optimizer, and one accumulator
    given the first optimizer: the second optimizer's step of a short cycle met the zero
    placeholder (the trunk did not move), then the first stepped it twice. Now either step
    closes the cycle: both steps move the trunk by the same estimate, whichever comes
    first, and with rank=None as plain accumulation does."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def run(rank, order):
        trunk, a, b = _shared()
        opts = {"a": torch.optim.SGD(a.parameters(), lr=0.1), "b": torch.optim.SGD(b.parameters(), lr=0.1)}
        acc = CompressedAccumulator(nn.ModuleList([a, b]), rank=rank, tau=4, optimizer=opts["a"]) \
            if rank != "plain" else None
        before = trunk.weight.detach().clone()
        for _ in range(2):  # a short cycle: 2 of 4
            ((a(x).square().mean() + b(x).square().mean()) / 4).backward()
        moves = []
        for name in order:
            was = trunk.weight.detach().clone()
            opts[name].step()
            moves.append((trunk.weight.detach() - was).abs().max().item())
        if acc is not None:
            acc.remove()
        return moves, trunk.weight.detach() - before

    for rank in (4, None):
        (m_ba, d_ba), (m_ab, d_ab) = run(rank, "ba"), run(rank, "ab")
        assert min(m_ba) > 1e-4 and m_ba == m_ab, (rank, m_ba, m_ab)  # each step moves it by the estimate
        torch.testing.assert_close(d_ba, d_ab, rtol=0, atol=1e-7)
    torch.testing.assert_close(run(None, "ba")[1], run("plain", "ba")[1], rtol=0, atol=0)


def _gan():
    torch.manual_seed(0)
    return nn.Linear(4, 8), nn.Linear(8, 1)


def _gan_cycle(g, d, accs, steps, z):
    """A micro-batch: a backward that reaches only D, then one that reaches only G."""
    for _ in range(steps):
        d(g(z).detach()).mean().div(4).backward()
        d.requires_grad_(False)
        (-d(g(z)).mean() / 4).backward()
        d.requires_grad_(True)


def test_a_gan_needs_one_accumulator_per_model_and_says_so():
    """tau counts backward passes: one accumulator over both models, with a backward per
    model per micro-batch, ends its cycle at the tau-th pass, halfway through; the
    refusal now names that cause. One accumulator per model equals plain accumulation."""
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    g, d = _gan()
    acc = CompressedAccumulator(nn.ModuleList([g, d]), rank=None, tau=4)
    with pytest.raises(RuntimeError, match="tau counts those passes: use one accumulator per model"):
        _gan_cycle(g, d, [acc], 4, z)
    acc.remove()
    runs = []
    for per_model in (False, True):
        g, d = _gan()
        accs = [CompressedAccumulator(m, rank=None, tau=4) for m in (g, d)] if per_model else []
        _gan_cycle(g, d, accs, 4, z)
        runs.append([p.grad.clone() for p in (*g.parameters(), *d.parameters())])
        for a in accs:
            a.remove()
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_refused_backward_leaves_no_end_of_pass_entry():
    """A backward refused by a hook never reaches its end-of-pass callback: its entry in
    the hooks' queue stayed, one per refusal (found by a new-user probe)."""
    g, d = _gan()
    acc = CompressedAccumulator(nn.ModuleList([g, d]), rank=None, tau=4)
    z = torch.randn(6, 4)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            _gan_cycle(g, d, [acc], 4, z)
    assert acc._hooks.queued == {}
    acc.remove()
