"""Optimizer-state size, counted from the tensors themselves, and Flora's formula."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer

from .projection import compressed_shape


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by every tensor in ``optimizer.state`` (any optimizer). Tensors inside
    containers and one level inside plain objects (GaLore's and APOLLO's projector
    objects hold their projection matrices) are counted; a storage shared between entries
    is counted once."""
    seen: set[int] = set()
    total = 0

    def visit(v, depth=0):
        nonlocal total
        if isinstance(v, torch.Tensor):
            key = v.untyped_storage().data_ptr() if v.device.type != "meta" else id(v)
            if key not in seen:
                seen.add(key)
                total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x, depth)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x, depth)
        elif depth == 0 and hasattr(v, "__dict__") and not isinstance(v, type):
            visit(vars(v), depth + 1)

    for s in optimizer.state.values():
        visit(s)
    return total


def flora_state_bytes(shapes: Iterable[tuple[int, ...]], *, rank, beta1, **group) -> int:
    """Flora's state in bytes for parameters of these shapes (all float32):

    - second moment: ``n + m`` numbers for a tensor of 2+ dims (rows are ``shape[:-1]``,
      columns ``shape[:-2] + shape[-1:]``, as in Adafactor), ``numel`` for 1-D;
    - first moment (when ``beta1`` is set): ``r * (other dim)`` for a compressed tensor,
      ``numel`` otherwise.
    """
    from .optimizer import momentum_plan  # late import: optimizer imports this module's siblings

    opts = {"rank": rank, "proj_dim": group.get("proj_dim", "auto"),
            "max_aspect_ratio": group.get("max_aspect_ratio")}
    total = 0
    for shape in shapes:
        shape = tuple(shape)
        numel = math.prod(shape)
        if len(shape) >= 2:
            total += math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])
        else:
            total += numel
        if beta1 is not None:
            dim = momentum_plan(shape, opts)
            total += numel if dim is None else math.prod(compressed_shape(shape, rank, dim))
    return 4 * total
