"""Configuration tables shared by the tests: every new option runs through every check."""

# (momentum_form, projection): every supported pair.
MOMENTUM_CONFIGS = [
    ("paper", "gaussian"),
    ("exact", "gaussian"),
    ("paper", "orthonormal"),
    ("exact", "orthonormal"),
    ("subspace", "orthonormal"),
    ("paper", "coordinates"),
    ("exact", "coordinates"),
    ("subspace", "coordinates"),
    ("scaled", "orthonormal"),
    ("scaled", "coordinates"),
    ("adaptive", "orthonormal"),
    ("adaptive", "coordinates"),
    ("fixed", "orthonormal"),
    ("fixed", "coordinates"),
    ("floored", "orthonormal"),
    ("floored", "coordinates"),
]
MOMENTUM_IDS = [f"{f}-{p}" for f, p in MOMENTUM_CONFIGS]

# The "fixed" form runs the tables with a weight of its own, not its default (0.4), so
# that a path which drops complement_weight shows.
FIXED_WEIGHT = 0.25
# The "floored" form's floor in the tables: not the default either, and above the "scaled"
# weight on noise (about sqrt((1 - beta1) / (1 + beta1)) = 0.23 at beta1 = 0.9), so it binds.
FLOORED_WEIGHT = 0.3
FORM_WEIGHTS = {"fixed": FIXED_WEIGHT, "floored": FLOORED_WEIGHT}


def form_options(form: str, projection: str) -> dict:
    """Flora's options for a (momentum_form, projection) pair of the table: the "fixed"
    form with ``complement_weight=FIXED_WEIGHT``, the "floored" with ``FLOORED_WEIGHT``."""
    extra = {"complement_weight": FORM_WEIGHTS[form]} if form in FORM_WEIGHTS else {}
    return dict(momentum_form=form, projection=projection, **extra)


def step_on_noise(opt, params, steps: int, seed: int = 1) -> None:
    """``steps`` steps of ``opt`` on gradients drawn from one seeded generator, in turn."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def assert_same_state(got_opt, got_p, want_opt, want_p, *, rtol: float, atol: float) -> None:
    """Two optimizers hold the same state for a parameter: the same keys, tensors close,
    plain values equal."""
    import torch

    sa, sb = got_opt.state[got_p], want_opt.state[want_p]
    assert sa.keys() == sb.keys()
    for k, v in sb.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(sa[k], v, rtol=rtol, atol=atol)
        else:
            assert sa[k] == v, k


def run_all() -> bool:
    """FLORA_TEST_ALL=1: every test and case, the ``extended`` ones and the compiled
    table's spare rows included."""
    import os

    return os.environ.get("FLORA_TEST_ALL", "") == "1"


def extended(*values, id=None):
    """A parametrized case marked ``extended`` (tests/conftest.py: it runs under
    FLORA_TEST_ALL=1): one that repeats its test's check on one more option or path."""
    import pytest

    return pytest.param(*values, marks=pytest.mark.extended, id=id)
