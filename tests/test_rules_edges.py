"""The shape rules, the projection's sign convention and the state stacks at their edges
(probe Z76: one-line mutations of projection.py, compression.py, options.py and stacks.py
that the rule tables had not pinned). Each case fails on its mutant."""

import pytest
import torch

from flora import Flora
from flora.compression import compressed_dim, dense_reason
from flora.options import CPU_GROUP_NUMEL, grouped
from flora.projection import choose_dim, is_stack, make_projection
from flora.stacks import StateStacks


def test_a_stack_with_as_many_experts_as_its_smaller_side_is_a_stack():
    """(E, n, m) with E == min(n, m) is a stack of matrices: its columns are projected, so
    each expert keeps its own rows (read with `<`, it was one (E * n) x m matrix projected
    across its rows, mixing the experts: momentum (2, 32) for (32, 2))."""
    assert is_stack((4, 8, 4)) and choose_dim((4, 8, 4)) == 1 and compressed_dim((4, 8, 4), 2) == 1
    p = torch.nn.Parameter(torch.randn(4, 8, 4))
    opt = Flora([p], lr=1e-2, rank=2, beta1=0.9)
    p.grad = torch.randn(4, 8, 4)
    opt.step()
    assert tuple(opt.state[p]["exp_avg_c"].shape) == (32, 2)


@pytest.mark.parametrize("shape, kw", [((5, 0), dict(proj_dim=0)), ((0, 5), dict(max_aspect_ratio=4.0)),
                                       ((0, 5), {}), ((5, 0), {})])
def test_a_tensor_with_a_zero_size_side_is_dense(shape, kw):
    """Either side 0 makes a 0-size tensor: dense, said so (one side at a time had been
    tested: with `and`, (5, 0) under proj_dim=0 kept a (2, 0) compressed momentum and
    (0, 5) under an aspect limit divided by zero)."""
    assert compressed_dim(shape, 2, **kw) is None
    assert "0-size" in dense_reason(shape, 2, **kw)


def test_a_tensor_of_exactly_the_grouped_limit_steps_grouped_on_a_cpu():
    """The CPU rule is "up to CPU_GROUP_NUMEL elements": the limit itself is grouped."""
    group = {"foreach": None}
    assert grouped(group, torch.empty(CPU_GROUP_NUMEL))
    assert not grouped(group, torch.empty(CPU_GROUP_NUMEL + 1))


@pytest.mark.parametrize("rank, dim", [(4, 16), (8, 8), (3, 50)])
def test_an_orthonormal_projection_is_the_q_of_its_draw_with_a_positive_r(rank, dim):
    """The orthonormal projection is Q of the QR of the seed's Gaussian draw, with diag(R) >
    0 (Q made unique): ``A G^T = R`` has a positive diagonal. Without the sign fix the run's
    own arithmetic was unchanged (every use is A^T A), but the stored momentum's signs
    followed LAPACK's choice, so a checkpoint would be read under other projections."""
    for seed in range(10):
        a = make_projection("orthonormal", seed, rank, dim, unbiased=False).double()
        g = torch.randn(rank, dim, generator=torch.Generator().manual_seed(seed)).double()
        assert (torch.diagonal(a @ g.T) > 0).all(), seed


def test_a_bucket_that_grew_gets_a_stack_with_a_row_for_its_new_member():
    """A stack is keyed by its first member; a bucket that grew by one keeps that first
    member, and its stack must be made anew (reused, it had no row for the new member)."""
    stacks = StateStacks()
    s1, s2, s3 = {"k": torch.zeros(2)}, {"k": torch.ones(2)}, {"k": torch.full((2,), 2.0)}
    stacks.stacked([s1, s2], "k")
    grown = stacks.stacked([s1, s2, s3], "k")
    assert tuple(grown.shape) == (3, 2)
    assert torch.equal(grown[2], torch.full((2,), 2.0))


def test_settle_keeps_a_state_entry_replaced_after_its_member_left_the_stack():
    """A member that left a stack and whose state entry was then replaced (a load, a user's
    write) keeps the new tensor when the stacks settle (settled unconditionally, it got its
    old row back)."""
    stacks = StateStacks()
    t1, t2 = {"k": torch.zeros(2)}, {"k": torch.ones(2)}
    stacks.stacked([t1, t2], "k")
    stacks.stacked([t1], "k")
    new = torch.full((2,), 7.0)
    t2["k"] = new
    stacks.settle()
    assert t2["k"] is new
