"""Projections: distribution, unbiasedness, determinism, devices.

Statistical tests use fixed seeds and a tolerance of 6 standard errors of the mean
(computed from the known variances or from the samples), so they fail only if the
estimator is biased, never by chance for these seeds. The seeds' projections are drawn
as one stack (``make_projections``: the same matrix per seed, bit for bit, as drawn
alone) and pushed through ``compress``/``decompress``/``transfer`` as stacks: the same
samples as a loop over seeds, in a few batched calls."""

import functools
import math

import pytest
import torch

from flora.momentum import exact_momentum_, paper_momentum_, resample_
from flora.projection import (
    PROJECTIONS,
    choose_dim,
    compress,
    compressed_shape,
    decompress,
    decompress_add_,
    gaussian_projection,
    make_projection,
    make_projections,
    projection_seed,
    transfer,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N_SEEDS = 4000
SEEDS = range(N_SEEDS)


@functools.lru_cache(maxsize=None)
def _gaussians(r, d):
    """The Gaussian projections of seeds 0 .. N_SEEDS - 1 as one stack (read only: shared
    by the tests and their parameters)."""
    return make_projections("gaussian", SEEDS, r, d)


def test_a_stack_draws_each_seed_s_own_matrix():
    """What the batched tests below rely on."""
    stack = _gaussians(3, 7)
    assert stack.shape == (N_SEEDS, 3, 7)
    for s in (0, 1, 1234, N_SEEDS - 1):
        assert torch.equal(stack[s], gaussian_projection(s, 3, 7))


def test_entries_are_n_0_1_over_r():
    r, d = 16, 4096
    a = gaussian_projection(7, r, d)
    assert a.shape == (r, d) and a.dtype == torch.float32
    n = r * d
    # mean 0 (se = sqrt(1/r / n)); variance 1/r (se of the sample variance ~ sqrt(2/n)/r)
    assert abs(a.mean().item()) < 6 * math.sqrt(1 / r / n)
    assert abs(a.var().item() - 1 / r) < 6 * math.sqrt(2 / n) / r


def test_expected_gram_is_identity():
    """E[A^T A] = I: (A^T A)_ij has variance 1/r off the diagonal and 2/r on it."""
    r, d = 4, 12
    a = _gaussians(r, d).double()
    mean = (a.mT @ a).mean(0)
    err = (mean - torch.eye(d, dtype=torch.float64)).abs()
    tol = 6 * math.sqrt(2 / r / N_SEEDS)
    assert err.max().item() < tol, (err.max().item(), tol)


def test_deterministic_and_seed_sensitive():
    a1 = gaussian_projection(123, 8, 50)
    a2 = gaussian_projection(123, 8, 50)
    b = gaussian_projection(124, 8, 50)
    assert torch.equal(a1, a2)
    assert not torch.allclose(a1, b)


def test_projection_seed_is_pure_and_spreads():
    assert projection_seed(0, 3, 5) == projection_seed(0, 3, 5)
    seeds = {projection_seed(s, i, k) for s in range(4) for i in range(20) for k in range(20)}
    assert len(seeds) == 4 * 20 * 20  # no collisions among nearby inputs
    assert all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("shape,dim,want", [((10, 30), 0, (4, 30)), ((10, 30), 1, (10, 4)), ((6, 2, 5), 1, (6, 4))])
def test_compress_shapes(shape, dim, want):
    g = torch.randn(shape)
    a = gaussian_projection(0, 4, (shape[0], math.prod(shape[1:]))[dim])
    c = compress(g, a, dim)
    assert tuple(c.shape) == want == compressed_shape(shape, 4, dim)
    assert decompress(c, a, dim).shape == (shape[0], math.prod(shape[1:]))


def test_auto_dim_is_the_smaller():
    assert choose_dim((10, 30)) == 0
    assert choose_dim((30, 10)) == 1
    assert choose_dim((49152, 576)) == 1
    assert choose_dim((4, 3, 3, 3)) == 0  # viewed as 4 x 27
    assert choose_dim((10, 30), 1) == 1


def _mean_and_se(samples):
    x = samples.double() if isinstance(samples, torch.Tensor) else torch.stack(samples).double()
    return x.mean(0), x.std(0) / math.sqrt(len(x))


@pytest.mark.parametrize("dim", [0, 1])
def test_decompress_compress_is_unbiased(dim):
    torch.manual_seed(0)
    g = torch.randn(6, 9)
    r = 3
    a = _gaussians(r, g.shape[dim])
    samples = decompress(compress(g.expand(N_SEEDS, *g.shape), a, dim), a, dim)
    mean, se = _mean_and_se(samples)
    assert ((mean - g.double()).abs() <= 6 * se + 1e-9).all()


@pytest.mark.parametrize("form", ["paper", "exact"])
def test_compressed_momentum_is_unbiased(form):
    """Over random projections, the decompressed momentum update has the dense EMA as
    its mean (one projection held for all steps, as within a kappa window)."""
    torch.manual_seed(1)
    us = [torch.randn(5, 8) for _ in range(4)]
    beta, r, dim = 0.9, 2, 1
    dense = torch.zeros(5, 8)
    for u in us:
        dense.mul_(beta).add_(u, alpha=1 - beta)
    rule = paper_momentum_ if form == "paper" else exact_momentum_
    a = _gaussians(r, 8)
    c = torch.zeros(N_SEEDS, 5, r)  # one momentum per projection, stepped together
    for u in us:
        samples = rule(c, u.expand(N_SEEDS, *u.shape).clone(), a, dim, beta)
    mean, se = _mean_and_se(samples)
    assert ((mean - dense.double()).abs() <= 6 * se + 1e-9).all()
    # and the estimator is not trivially exact: its spread is real
    assert se.max().item() > 1e-4


@pytest.mark.parametrize("dim", [0, 1])
def test_transfer_is_unbiased(dim):
    """E over the new projection of decompress(transfer(C)) equals decompress(C) under
    the old one: resampling carries the momentum over without bias."""
    r = 3
    a_old = gaussian_projection(999, r, 7)
    torch.manual_seed(2)
    c = torch.randn(r, 5) if dim == 0 else torch.randn(5, r)
    target = decompress(c, a_old, dim).double()
    a_new = _gaussians(r, 7)
    samples = decompress(transfer(c.expand(N_SEEDS, *c.shape), a_old.expand(N_SEEDS, r, 7), a_new, dim), a_new, dim)
    mean, se = _mean_and_se(samples)
    assert ((mean - target).abs() <= 6 * se + 1e-9).all()


def test_transfer_matches_decompress_then_compress():
    a_old, a_new = gaussian_projection(1, 4, 20), gaussian_projection(2, 4, 20)
    c = torch.randn(9, 4)
    want = compress(decompress(c, a_old, 1), a_new, 1)
    assert torch.allclose(transfer(c, a_old, a_new, 1), want, atol=1e-5)
    c0 = torch.randn(4, 9)
    want0 = compress(decompress(c0, a_old, 0), a_new, 0)
    assert torch.allclose(transfer(c0, a_old, a_new, 0), want0, atol=1e-5)
    c2 = c.clone()
    resample_(c2, a_old, a_new, 1)
    assert torch.allclose(c2, want, atol=1e-5)


@cuda
@pytest.mark.parametrize("kind", PROJECTIONS)
def test_same_matrix_on_cpu_and_cuda(kind):
    for seed in (0, 5, 2**62 + 3):
        a_cpu = make_projection(kind, seed, 32, 1000)
        a_gpu = make_projection(kind, seed, 32, 1000, device="cuda")
        assert a_gpu.device.type == "cuda"
        assert torch.equal(a_cpu, a_gpu.cpu())


@pytest.mark.parametrize("rank,d", [(3, 20), (32, 576), (8, 8)])
def test_orthonormal_rows_span_the_seeded_gaussian(rank, d):
    q = make_projection("orthonormal", 7, rank, d)
    assert q.shape == (rank, d) and q.dtype == torch.float32
    torch.testing.assert_close(q @ q.T, torch.eye(rank), rtol=0, atol=2e-6)
    g = gaussian_projection(7, rank, d)  # QR of the same draw: same row space
    torch.testing.assert_close(g @ q.T @ q, g, rtol=0, atol=1e-4)
    assert torch.equal(make_projection("orthonormal", 7, rank, d), q)  # deterministic


def test_coordinates_are_distinct_sorted_indices():
    idx = make_projection("coordinates", 7, 5, 40)
    assert idx.dtype == torch.int64 and idx.shape == (5,)
    assert idx.unique().numel() == 5 and torch.equal(idx, idx.sort().values) and 0 <= idx.min() and idx.max() < 40
    g = torch.randn(6, 40)
    c = compress(g, idx, 1)
    assert torch.equal(c, g[:, idx])
    back = decompress(c, idx, 1, size=40)
    rest = torch.ones(40, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(back[:, idx], c) and not back[:, rest].any()
    with pytest.raises(ValueError, match="size"):
        decompress(c, idx, 1)
    with pytest.raises(ValueError, match="unbiased"):
        make_projection("coordinates", 7, 5, 40, unbiased=True)


def test_orthonormal_unbiased_scaling_and_its_lower_noise():
    """sqrt(d/r) Q: E[D(C(g))] = g over seeds, and the mean squared error is
    (d/r - 1)|g|^2 against (d+1)/r |g|^2 for the Gaussian (r=4, d=24: 5 vs 6.25).
    2000 seeds; tolerances about 4 standard errors."""
    torch.manual_seed(0)
    g = torch.randn(5, 24)
    g_sq = g.square().sum()
    for kind in ("gaussian", "orthonormal"):
        a = make_projections(kind, range(2000), 4, 24, unbiased=True)  # one batched QR for the orthonormal
        xs = decompress(compress(g.expand(2000, *g.shape), a, 1), a, 1)
        assert (xs.mean(0) - g).abs().max() < 0.25  # unbiased (per-entry std error about 0.05)
        mse = (xs - g).square().sum((1, 2)).mean() / g_sq
        want = 24 / 4 - 1 if kind == "orthonormal" else 25 / 4
        assert abs(mse - want) < 0.12 * want, (kind, mse)


def test_transfer_for_every_kind_matches_decompress_then_compress():
    for kind in PROJECTIONS:
        a_old, a_new = make_projection(kind, 1, 4, 20), make_projection(kind, 2, 4, 20)
        for dim, c in ((1, torch.randn(9, 4)), (0, torch.randn(4, 9))):
            want = compress(decompress(c, a_old, dim, size=20), a_new, dim)
            torch.testing.assert_close(transfer(c, a_old, a_new, dim), want, rtol=1e-5, atol=1e-5)


def test_streams_separate_optimizer_and_accumulator_seeds():
    from flora.projection import ACCUMULATION_STREAM, MOMENTUM_STREAM

    assert projection_seed(0, 1, 2) == projection_seed(0, 1, 2, MOMENTUM_STREAM)
    assert projection_seed(0, 1, 2, ACCUMULATION_STREAM) != projection_seed(0, 1, 2, MOMENTUM_STREAM)


@pytest.mark.parametrize("kind", ["gaussian", "orthonormal", "coordinates"])
def test_a_rank_the_kind_cannot_give_is_refused_naming_it(kind):
    """The public make_projection: an orthonormal or coordinate projection has at most dim
    rows (a reduced QR of dim x rank gave dim x dim, biased by dim/rank when "unbiased");
    rank and dim must be positive for every kind (rank 0 gave a bare ZeroDivisionError)."""
    if kind == "gaussian":
        assert tuple(make_projection(kind, 1, 16, 8).shape) == (16, 8)  # its rows need not be independent
    else:
        with pytest.raises(ValueError, match=f"projection '{kind}' has at most dim=8 rows, got rank=16"):
            make_projection(kind, 1, 16, 8)
        assert make_projection(kind, 1, 8, 8).shape[0] == 8  # rank == dim is fine
    for rank, dim, name in ((0, 8, "rank"), (-1, 8, "rank"), (2, 0, "dim")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            make_projection(kind, 1, rank, dim)
    with pytest.raises(TypeError, match="rank must be a positive integer"):
        make_projection(kind, 1, 2.0, 8)


def test_projections_and_compressed_sums_do_not_depend_on_the_thread_count():
    """Runs from one seed differed in the last bit between torch.set_num_threads(1) and (2)
    (replicas with other thread counts drifted apart; a new-user probe): LAPACK's threaded
    QR (seed 1579's first 32 x 2048 draw kept a 1-ulp difference) and torch's split sum of
    more than 32,768 values into one (15 of 20 sums of 2048 x 32). The QR runs on one thread
    and the sums go one dim at a time."""
    from flora.momentum import _msum

    threads = torch.get_num_threads()
    xs = [torch.randn(2048, 32, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    xs += [torch.randn(3, 32, 4096, generator=torch.Generator().manual_seed(99))]
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append((make_projection("orthonormal", projection_seed(1579, 0, 0), 32, 2048),
                        [_msum(x) for x in xs]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0][0], got[1][0])
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("kind", PROJECTIONS)
@pytest.mark.parametrize("count", [2, 4])
def test_stacked_projections_refuse_a_stack_of_another_count(kind, count):
    """One stacked projection per matrix: 2 or 4 projections for a stack of 3 matrices are
    refused by compress, decompress and transfer, naming both counts. Coordinates had
    silently dropped the third matrix (a probe: compress gave 2 x 2 x 10 for 3 x 6 x 10)."""
    a = make_projections(kind, range(count), 2, 10)
    g = torch.randn(3, 6, 10)
    with pytest.raises(ValueError, match=rf"compress: {count} stacked projections .* got shape \(3, 6, 10\)"):
        compress(g, a, 1)
    with pytest.raises(ValueError, match=rf"decompress: {count} stacked projections .* got shape \(3, 6, 2\)"):
        decompress(torch.randn(3, 6, 2), a, 1, size=10)
    with pytest.raises(ValueError, match=rf"transfer: {count} stacked projections"):
        transfer(torch.randn(3, 6, 2), a, make_projections(kind, range(9, 9 + count), 2, 10), 1)
    # the matching count works, each matrix by its own projection
    a3 = make_projections(kind, range(3), 2, 10)
    c = compress(g, a3, 1)
    for i in range(3):
        torch.testing.assert_close(c[i], compress(g[i], a3[i], 1))


def test_decompress_add_refuses_a_stack_of_another_count():
    """decompress_add_ (public beside decompress) checks the count as decompress does: stacked
    coordinates had scattered into the first matrices only (review Z122: sums 12, 12, 0)."""
    a = make_projections("coordinates", range(2), 2, 10)
    with pytest.raises(ValueError, match=r"decompress_add_: 2 stacked projections .* got shape \(3, 6, 2\)"):
        decompress_add_(torch.zeros(3, 6, 10), torch.ones(3, 6, 2), a, 1)
    with pytest.raises(ValueError, match=r"decompress_add_: 2 stacked projections .* got shape \(3, 6, 10\)"):
        decompress_add_(torch.zeros(3, 6, 10), torch.ones(2, 6, 2), a, 1)
    out = decompress_add_(torch.zeros(2, 6, 10), torch.ones(2, 6, 2), a, 1)
    assert out.sum(dim=(1, 2)).tolist() == [12.0, 12.0]
