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
]
MOMENTUM_IDS = [f"{f}-{p}" for f, p in MOMENTUM_CONFIGS]


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
