"""``Flora(compile=...)``: the step's cores compiled with ``torch.compile``.

The cores are :func:`flora.functional.grouped_core` (a bucket of parameters of one shape)
and :func:`flora.functional.single_core`, compiled with ``fullgraph=True, dynamic=False``:
dynamo caches one graph per shape signature of a bucket (``tests/test_compile.py``:
equal to the eager step to 1e-5, nothing compiled after the first step).
"""

from __future__ import annotations

from typing import Callable

import torch

from .functional import grouped_core, single_core

# torch.compile options of Flora(compile=...): one graph per shape signature, no graph
# break allowed inside (torchao's low-bit optimizers compile their per-parameter step the
# same way).
COMPILE_OPTIONS = dict(fullgraph=True, dynamic=False)
_compiled: dict[tuple, Callable] = {}


def compiled_core(grouped: bool, backend="inductor", options: dict | None = None) -> Callable:
    """The core function compiled with ``backend`` (one compiled function per backend and
    options; dynamo caches its graphs per shape signature)."""
    key = (grouped, backend if isinstance(backend, str) else id(backend), tuple(sorted((options or {}).items())))
    fn = _compiled.get(key)
    if fn is None:
        fn = torch.compile(grouped_core if grouped else single_core, backend=backend, options=options,
                           **COMPILE_OPTIONS)
        _compiled[key] = fn
    return fn


__all__ = ["compiled_core", "COMPILE_OPTIONS"]
