"""Training quality: Flora's default momentum form must beat Adafactor without momentum
(``beta1=None``) on tasks where momentum should help, so that a regression in the form
(for instance an update that falls back to the bare normalised gradient) fails the suite.

Both optimizers are ``flora.Flora`` at the same lr with ``scale_parameter=False`` (an
absolute lr): the default form is Flora's defaults (momentum_form, projection, kappa)
with a rank and ``beta1=0.9``; the baseline is ``beta1=None``, which is HF Adafactor's
update (tested equal elsewhere). Every run is seeded; the margins are means over three
seeds (each seed is also checked), measured on this CPU and stated next to each test.
A few seconds in all."""

import math
import statistics

import pytest
import torch
from torch import nn

import flora

RANK = 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster (two spin against each other on a busy
    machine), and the figures below do not depend on the machine's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _default(params, lr):
    return flora.Flora(params, lr=lr, rank=RANK, beta1=0.9, scale_parameter=False)


def _no_momentum(params, lr):
    return flora.Flora(params, lr=lr, beta1=None, scale_parameter=False)


def _check_compressed(opt):
    group = opt.param_groups[0]
    defaults = flora.Flora.__init__.__kwdefaults__
    assert (group["momentum_form"], group["projection"]) == (defaults["momentum_form"], defaults["projection"])
    assert any("exp_avg_c" in st for st in opt.state.values()), "no tensor was compressed: the test would test nothing"


# ------------------------------------------------------------------ digits, a small MLP


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()  # 1797 8 x 8 images, 10 classes, shipped with scikit-learn
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def _digits_run(data, make, seed, lr, steps=300, batch=32):
    """An MLP 64-64-64-10 trained on mini-batches of 32; cross-entropy on the whole
    training and test sets at the end. The 64 x 64 weights are compressed at rank 8,
    the 10 x 64 head along its 10 rows."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = make(model.parameters(), lr)
    gen = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (nn.functional.cross_entropy(model(xtr), ytr).item(), nn.functional.cross_entropy(model(xte), yte).item(),
                opt)


def test_default_form_beats_no_momentum_on_digits(digits):
    """lr 3e-2, 300 steps, one thread, seeds 0-5. At this lr both jitter, and the jitter
    follows the float rounding, so single seeds swing (test loss 0.11-0.22 for one
    optimizer): three seeds were too few. Measured 2026-12-02 over seeds 0-11 (train / test
    cross-entropy, mean ± standard error; docs/quality/digits_seeds.py), the default (the
    "floored" form, kappa 100, its momentum in bfloat16): 0.060 ± 0.011 / 0.187 ± 0.015;
    the same in float32 (the default before): 0.061 ± 0.016 / 0.166 ± 0.016; beta1=None:
    0.086 ± 0.009 / 0.225 ± 0.015. (At lr 1e-2, the best of 3e-3, 1e-2, 3e-2 and 1e-1 for
    both momentum dtypes, bfloat16 and float32 tie: test 0.148 and 0.147, paired +0.0010 ±
    0.0014; at this lr, above it, bfloat16 is +0.021 ± 0.012 behind.) Seeds 0-5, this
    test's: ratios of the means 0.64 (train) and 0.85 (test), 6 wins of 6 on train loss.
    (2026-12-01, float32 on seeds 0-2: 0.68 and 0.87; "fixed" 0.58 and 0.86; "scaled", the
    default before: 0.66 and 0.85; with kappa 1000, before kappa 100, 0.36.) It is not just
    the lr: at 1e-2, beta1=None's best lr of three, the two tie (train 0.045 against 0.061,
    test 0.140 and 0.143): momentum carries the higher lr."""
    lr = 3e-2
    mine, base = [], []
    for seed in range(6):
        train, test, opt = _digits_run(digits, _default, seed, lr)
        _check_compressed(opt)
        mine.append((train, test))
        train, test, _ = _digits_run(digits, _no_momentum, seed, lr)
        base.append((train, test))
    wins = sum(m_train < b_train for (m_train, _), (b_train, _) in zip(mine, base))
    assert wins >= 4, (mine, base)  # measured 6
    mean = [statistics.fmean(v[i] for v in mine) for i in (0, 1)]
    ref = [statistics.fmean(v[i] for v in base) for i in (0, 1)]
    assert mean[0] < 0.8 * ref[0], (mine, base)  # train loss: measured 0.64
    assert mean[1] < 0.92 * ref[1], (mine, base)  # test loss: measured 0.85
    assert mean[0] < 0.1 and ref[0] < 0.5 < math.log(10)  # both trained (from ln 10 = 2.3)


# ------------------------------------------------------------------ an ill-conditioned regression


def _regression_run(make, seed, lr, steps=300, batch=256, n_in=64, n_out=32, cond=1e3, noise=0.05):
    """Linear least squares y = W* x + noise, inputs correlated in a random basis
    (covariance eigenvalues from 1 down to 1/cond), mini-batches of 256; the excess risk
    E|(W - W*) x|^2 at the end. The 32 x 64 weight is compressed along its 32 rows at
    rank 8. Adafactor's per-row/column scaling cannot undo a rotated ill-conditioning; at
    an lr that the high-curvature directions find large, the bare normalised update keeps
    its size and jitters, where momentum averages the jitter out."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    basis, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g))
    mix = basis * torch.logspace(0, -math.log10(cond) / 2, n_in)  # x = mix z, z ~ N(0, I)
    torch.manual_seed(seed)
    model = nn.Linear(n_in, n_out, bias=False)
    opt = make(model.parameters(), lr)
    for _ in range(steps):
        x = torch.randn(batch, n_in, generator=g) @ mix.T
        y = x @ w_star.T + noise * torch.randn(batch, n_out, generator=g)
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((model.weight.detach() - w_star) @ mix).square().sum().item(), opt


def test_default_form_beats_no_momentum_on_an_ill_conditioned_regression():
    """lr 1e-2, noise 0.05. Measured excess risk (seeds 0, 1, 2; about 8 at init):
    default 0.0146, 0.0153, 0.0142; beta1=None 0.0452, 0.0331, 0.0409 (ratio of the means
    0.37). Over lrs 3e-3, 1e-2, 3e-2, beta1=None does best at 3e-3 (0.0196, 0.0194,
    0.0175), still above the default form at 1e-2."""
    lr = 1e-2
    mine, base = [], []
    for seed in range(3):
        risk, opt = _regression_run(_default, seed, lr)
        _check_compressed(opt)
        mine.append(risk)
        base.append(_regression_run(_no_momentum, seed, lr)[0])
    for m, b in zip(mine, base):
        assert m < 0.7 * b, (mine, base)  # measured 0.32 to 0.46
    assert statistics.fmean(mine) < 0.5 * statistics.fmean(base), (mine, base)
    assert statistics.fmean(base) < 0.5  # the baseline trained too
    # A control that the comparison tells forms apart: the paper's form with Gaussian
    # rows at rank 2 moves W in a 2-dimensional row space until the first resample (kappa
    # 1000) and ends near where it started (measured 8.3 on seed 0).
    paper = lambda ps, lr: flora.Flora(ps, lr=lr, rank=2, beta1=0.9, scale_parameter=False,  # noqa: E731
                                       momentum_form="paper", projection="gaussian")
    assert _regression_run(paper, 0, lr)[0] > 10 * base[0]
