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
