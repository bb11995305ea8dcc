"""Hand-fused kernels (Triton, CUDA) with their PyTorch references; see
:mod:`flora.kernels.adafactor`. Imports without triton."""

from .adafactor import HAVE_TRITON, available, factored_normalize, factored_normalize_reference, factored_step_
from .adafactor import factored_step_reference_, supported

__all__ = ["HAVE_TRITON", "available", "supported", "factored_normalize", "factored_normalize_reference",
           "factored_step_", "factored_step_reference_"]
