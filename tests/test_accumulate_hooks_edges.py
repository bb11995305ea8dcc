"""CompressedAccumulator's hooks at their edges (probe Z73: one-line mutations of the
engine, the hooks, fused mode and the options that no test had noticed). Each case is a
user's loop where the mutant answered otherwise: a zero_grad() that must drop the open
cycle, a short cycle closed by an optimizer holding more than the accumulator, remove()
leaving nothing behind and keeping what was finished, padding_idx=0, a parameter listed
twice, a warning said once."""

import warnings

import pytest
import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from flora import CompressedAccumulator


def _xs(n, width=16, rows=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, width, generator=g) for _ in range(n)]


def test_zero_grad_after_an_autograd_grad_call_drops_the_open_cycle():
    """A gradient taken with torch.autograd.grad (a gradient penalty) between micro-batches
    ends its own graph task, not the cycle's: a zero_grad() after it still drops the open
    cycle, as plain PyTorch drops .grad (the mutant missed it: the next cycle closed on
    micro-batches 1, 3 and 4)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    acc = CompressedAccumulator(lin, rank=4, tau=3, optimizer=opt)
    xs = _xs(5)
    lin(xs[0]).square().sum().backward()
    torch.autograd.grad(lin(xs[1]).square().sum(), [lin.weight])
    opt.zero_grad()
    assert acc.micro_step == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for x in xs[2:5]:
            lin(x).square().sum().backward()
    assert (acc.cycle, acc.micro_step) == (1, 0)
    assert not [w for w in seen if "estimate" in str(w.message)]


def test_a_short_cycle_is_closed_by_an_optimizer_that_holds_more_than_the_accumulator():
    """No ``optimizer=``: the accumulator holds the body, the optimizer the body and a head.
    The optimizer's step after 2 of tau=4 micro-batches closes the short cycle (torch's
    global step pre-hook sees that it holds some of the accumulator's parameters): the body
    steps on the estimate of its two gradients (the mutant, asking for all of them, stepped
    on the zero placeholders: no movement)."""
    torch.manual_seed(0)
    body, head = nn.Linear(32, 32), nn.Linear(32, 1)
    opt = torch.optim.SGD(list(body.parameters()) + list(head.parameters()), lr=1.0)
    acc = CompressedAccumulator(body.parameters(), rank=8, tau=4)
    for x in _xs(2, 32, 8):
        head(body(x)).square().mean().backward()
    w0 = body.weight.detach().clone()
    opt.step()
    assert acc.micro_step == 0
    assert (body.weight - w0).norm() > 0.1
    acc.remove()


def test_fused_zero_grad_drops_a_cycle_that_some_parameters_have_not_joined():
    """Fused mode: optimizer.zero_grad() after a micro-batch that used one branch only drops
    the open cycle (the mutant asked that every parameter had a gradient, kept the cycle,
    and stepped branch a at the third backward, counting the dropped micro-batch)."""
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    params = list(a.parameters()) + list(b.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    acc = CompressedAccumulator(params, rank=4, tau=3, optimizer=opt, fused=True)
    xs = _xs(5)
    a(xs[0]).square().sum().backward()
    opt.zero_grad()
    assert acc.micro_step == 0
    w0 = a.weight.detach().clone()
    for i in (1, 3):
        (a(xs[i]).square().sum() + b(xs[i + 1]).square().sum()).backward()
    assert torch.equal(a.weight, w0) and acc.micro_step == 2


def test_remove_leaves_no_global_hook_and_the_next_optimizer_trains_unwarned():
    """After remove(), switching optimizers (as the accumulator's own warning advises)
    meets none of its hooks: torch's global step pre-hooks are as before it was built, and
    the new optimizer steps without a warning (the mutant left one hook, which warned that
    another optimizer steps the parameters)."""
    import gc

    from flora.accumulation.hooks import remove_dead_global_hooks

    gc.collect()
    remove_dead_global_hooks()  # an earlier test's dropped accumulator: its hook would go during this one
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    before = len(torch_optimizer._global_optimizer_pre_hooks)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    acc = CompressedAccumulator(lin, rank=4, tau=2, optimizer=opt, fused=True)
    for x in _xs(2):
        lin(x).square().sum().backward()
    acc.remove()
    assert len(torch_optimizer._global_optimizer_pre_hooks) == before
    other = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lin(_xs(1)[0]).square().sum().backward()
        other.step()
    assert not seen, [str(w.message)[:120] for w in seen]


def test_remove_mid_cycle_keeps_a_finished_gradient():
    """remove() drops partial sums only: a parameter whose cycle completed while another
    lags keeps its finished gradient in .grad (the mutant dropped it too)."""
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    acc = CompressedAccumulator(list(a.parameters()) + list(b.parameters()), rank=4, tau=2)
    x = _xs(1)[0]
    (a(x).square().sum() + b(x).square().sum()).backward()
    a(x).square().sum().backward()  # a complete (2 of 2), b lagging (1 of 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # remove() mid-cycle warns
        acc.remove()
    assert a.weight.grad is not None and a.bias.grad is not None
    assert b.weight.grad is None


def test_exact_last_changes_on_a_cycle_boundary_only():
    lin = nn.Linear(16, 16)
    acc = CompressedAccumulator(lin, rank=4, tau=3)
    lin(_xs(1)[0]).sum().backward()
    with pytest.raises(RuntimeError, match="exact_last"):
        acc.exact_last = False
    assert acc.exact_last is True


@pytest.mark.parametrize("padding_idx", [0, 1])
def test_an_embeddings_padding_row_stays_still_at_index_0_too(padding_idx):
    """The padding row of a table with fewer rows than columns gets no gradient: its columns
    are projected (plan: proj_dim 1). padding_idx=0, the usual index, is a padding index
    too (read for its truth, it was not: the rows were mixed, the padding row's estimate
    2.71)."""
    torch.manual_seed(0)
    emb = nn.Embedding(16, 64, padding_idx=padding_idx)
    model = nn.Sequential(emb)
    acc = CompressedAccumulator(model, rank=4, tau=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert [row["proj_dim"] for row in acc.plan()] == [1]
    for _ in range(2):
        (model(torch.tensor([[0, 1, 3, 5, 0, 7, 1]])).square().sum() / 2).backward()
    assert emb.weight.grad[padding_idx].abs().max() == 0


def test_a_parameter_listed_twice_is_one_parameter():
    """``[w, w, b]`` accumulates as ``[w, b]`` (the mutant made two slots of w, and the
    second backward failed with a misleading "the .grad of 'params.0' was replaced")."""
    def run(params_of):
        torch.manual_seed(0)
        lin = nn.Linear(16, 16)
        acc = CompressedAccumulator(params_of(lin), rank=4, tau=3, seed=1)
        for x in _xs(3):
            lin(x).square().sum().backward()
        return lin.weight.grad, len(acc.plan())

    once, n_once = run(lambda m: [m.weight, m.bias])
    twice, n_twice = run(lambda m: [m.weight, m.weight, m.bias])
    assert n_once == n_twice == 2 and torch.equal(once, twice)


def test_another_optimizer_stepping_fused_parameters_is_said_once():
    lin = nn.Linear(16, 16)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    acc = CompressedAccumulator(lin, rank=4, tau=2, optimizer=opt, fused=True)
    other = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            other.step()
    assert sum("another optimizer" in str(w.message) for w in seen) == 1
    acc.remove()
