"""Flora: low-rank, resampled random projections of gradients and momentum
(Hao, Cao, Mou, ICML 2024)."""

from .accumulation import CompressedAccumulator
from . import distributed
from .memory import cache_bytes, flora_state_bytes, state_bytes, workspace_bytes
from .optimizer import Flora
from .schedule import RelativeStepSchedule
from .momentum import MOMENTUM_FORMS
from .projection import (
    PROJECTIONS,
    compress,
    decompress,
    gaussian_projection,
    make_projection,
    projection_seed,
    transfer,
)

__all__ = [
    "Flora",
    "CompressedAccumulator",
    "distributed",
    "RelativeStepSchedule",
    "state_bytes",
    "cache_bytes",
    "workspace_bytes",
    "flora_state_bytes",
    "gaussian_projection",
    "make_projection",
    "MOMENTUM_FORMS",
    "PROJECTIONS",
    "projection_seed",
    "compress",
    "decompress",
    "transfer",
]
__version__ = "0.1.0"


def __getattr__(name):
    # flora.AccumulatorCallback imports transformers (seconds, and an optional dependency):
    # only when asked for, so it stays out of __all__.
    if name == "AccumulatorCallback":
        from .trainer_callback import AccumulatorCallback

        return AccumulatorCallback
    raise AttributeError(f"module 'flora' has no attribute {name!r}")
