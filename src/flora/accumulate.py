"""Compatibility: compressed gradient accumulation now lives in the package
``flora.accumulation``; this module re-exports its public names so that existing imports
(``from flora.accumulate import CompressedAccumulator``) keep working."""

from .accumulation import ACCUMULATION_PROJECTIONS, CompressedAccumulator, accumulate_compressed_, write_estimate_

__all__ = ["CompressedAccumulator", "accumulate_compressed_", "write_estimate_", "ACCUMULATION_PROJECTIONS"]
