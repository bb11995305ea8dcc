"""Rules at their boundaries, where a mutation probe (Z68) changed one comparison or one
increment and no test failed (or only a slow or compiled one did): an overdue cycle at
exactly tau backward passes, a projection index past a chain of taken ones, the staged
compiled step's count of skipped parameters, an aspect ratio equal to the limit, and a
1-D parameter's second moment following a cast on the eager paths."""

import warnings

import pytest
import torch
from torch import nn

import flora.functional as F
from flora import CompressedAccumulator, Flora
from flora.compression import compressed_dim
from flora.state import free_index


def test_a_cycle_overdue_after_exactly_tau_passes_stays_overdue_when_its_done_slot_is_dropped():
    """tau=2: both layers get gradients in the first pass, only ``a`` in the second, so
    ``a`` is done and ``b`` lags. Discarding ``a``'s gradient leaves no slot done, but tau
    passes ran: the next backward is refused (it had been taken into the same cycle, whose
    estimate for ``b`` then summed passes 1 and 3: three passes in a cycle of two)."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    acc = CompressedAccumulator(nn.ModuleDict({"a": a, "b": b}), rank=2, tau=2)
    x = torch.randn(4, 8)
    (a(x).pow(2).sum() + b(x).pow(2).sum()).backward()
    a(x).pow(2).sum().backward()
    a.weight.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"waits to be stepped: it ended after 2 backward passes"):
            b(x).pow(2).sum().backward()
        acc.remove()  # mid-cycle: says the partial sums are dropped


@pytest.mark.parametrize("order", [(2, 3), (3, 2)])
def test_a_new_state_skips_a_chain_of_taken_indices_by_steps_of_n(order):
    """N=4 parameters; live states hold 2, 3 and 6 (= 2 + N). New states at positions 2
    and 3 take 10 and 7 in either order: each walks its own sequence p, p+N, p+2N, ...
    (a walk by 1 gave 7 and 8, swapped by the order, so that step() and step_parameter()
    drew other projections)."""
    groups = [{"params": [None] * 4}]
    taken, got = {2, 3, 6}, {}
    for pos in order:
        got[pos] = free_index(pos, taken, groups)
        taken.add(got[pos])
    assert got == {2: 10, 3: 7}


def test_the_staged_compiled_step_counts_each_skipped_parameter(monkeypatch):
    """Two of a bucket's three parameters with a NaN gradient: two skips (the staged step
    had been checked with one bad parameter only, where ``any()`` equals ``sum()``)."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(16, 12)) for _ in range(3)]
    opt = Flora(ps, lr=1e-2, beta1=0.9, rank=4, compile="aot_eager")
    for step in range(2):
        for i, p in enumerate(ps):
            p.grad = torch.randn_like(p)
            if step == 1 and i < 2:
                p.grad[0, 0] = float("nan")
        opt.step()
    assert int(opt.nonfinite_skips) == 2


def test_a_staged_bucket_of_one_reads_the_users_gradient_and_skips_a_nan_in_it(monkeypatch):
    """A staged bucket of one parameter reads its gradient in place (no copy), and since
    2026-12-07 its third stage reads it again for the normalised update: a NaN there
    leaves the weights and state as they were and is counted, the gradient is not
    written, and the other steps equal the eager step."""
    monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(20, 12))]  # two shapes: buckets of one
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, beta1=0.9, rank=4, weight_decay=0.1)
    opt, eager = Flora(ps, compile="aot_eager", **kw), Flora(ref, **kw)
    for step in range(3):
        grads = [torch.randn_like(p) for p in ps]
        if step == 1:
            grads[0][3, 5] = float("nan")
            before = ps[0].detach().clone()
        kept = [g.clone() for g in grads]
        for p, q, g in zip(ps, ref, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        eager.step()
        for g, k in zip(grads, kept):
            torch.testing.assert_close(g, k, rtol=0, atol=0, equal_nan=True)
        if step == 1:
            assert torch.equal(ps[0].detach(), before)
        for p, q in zip(ps, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert int(opt.nonfinite_skips) == int(eager.nonfinite_skips) == 1


def test_an_aspect_ratio_equal_to_the_limit_is_compressed():
    """``max_aspect_ratio`` is the largest ratio compressed: (4, 16) at 4.0 is, (4, 17) is
    not (only a 2-process hook test had noticed ``>=`` for ``>``)."""
    assert compressed_dim((4, 16), 2, max_aspect_ratio=4.0) == 0
    assert compressed_dim((4, 17), 2, max_aspect_ratio=4.0) is None
    p = nn.Parameter(torch.randn(4, 16))
    p.grad = torch.randn(4, 16)
    opt = Flora([p], lr=1e-2, beta1=0.9, rank=2, max_aspect_ratio=4.0)
    opt.step()
    assert "exp_avg_c" in opt.state[p] and "exp_avg" not in opt.state[p]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "grouped"])
def test_a_vectors_second_moment_follows_a_cast_on_the_eager_paths(foreach):
    """Only the compiled path's test had checked it."""
    torch.manual_seed(0)
    v, w = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6, 6))
    opt = Flora([v, w], lr=1e-2, beta1=0.9, foreach=foreach)
    for step in range(2):
        for q in (v, w):
            q.grad = torch.randn_like(q)
        opt.step()
        if step == 0:
            v.data, w.data = v.data.double(), w.data.double()
    assert opt.state[v]["exp_avg_sq"].dtype == opt.state[w]["exp_avg_sq_row"].dtype == torch.float64
