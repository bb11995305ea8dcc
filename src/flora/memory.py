"""Optimizer-state size, counted from the tensors themselves, and Flora's formula."""

from __future__ import annotations

import math
import operator
from typing import Iterable

import torch
from torch.optim import Optimizer

from ._validation import _is_int
from .adafactor import factored_shapes
from .compression import check_momentum_dtype, compressed_dim, momentum_storage
from .options import STEPPED_DTYPES
from .projection import compressed_shape, state_dtype


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by every tensor in ``optimizer.state`` (any optimizer). Tensors inside
    containers and one level inside plain objects (GaLore's and APOLLO's projector
    objects hold their projection matrices) are counted; a storage shared between entries
    is counted once, whole (``Flora(compile=...)`` keeps a bucket's state as views of one
    stack: flora.stacks); a tensor subclass (torchao's 8-bit state) by the tensors it
    wraps."""
    if not isinstance(getattr(optimizer, "state", None), dict):
        raise TypeError(f"state_bytes takes an optimizer (its .state is counted), got {type(optimizer).__name__}; "
                        "for a model's parameters use flora.flora_state_bytes")
    seen: set[int] = set()
    total = 0

    def visit(v, depth=0):
        nonlocal total
        if isinstance(v, torch.Tensor) and type(v) not in (torch.Tensor, torch.nn.Parameter) \
                and hasattr(v, "__tensor_flatten__"):
            for name in v.__tensor_flatten__()[0]:
                visit(getattr(v, name), depth)
        elif isinstance(v, torch.Tensor):
            if v.device.type == "meta":
                key, size = id(v), v.numel() * v.element_size()
            else:  # what the storage holds: a view's whole stack
                storage = v.untyped_storage()
                key, size = storage.data_ptr(), max(storage.nbytes(), v.numel() * v.element_size())
            if key not in seen:
                seen.add(key)
                total += size
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


def _beside_state(optimizer, what: str) -> int:
    """``optimizer.<what>()``, through wrappers that hold the optimizer as ``.optimizer``
    (accelerate's, which the Hugging Face Trainer's ``trainer.optimizer`` is); 0 for an
    optimizer without it."""
    if not isinstance(getattr(optimizer, "state", None), dict):
        raise TypeError(f"{what} takes an optimizer, got {type(optimizer).__name__}")
    seen = 0
    while not callable(getattr(optimizer, what, None)) and isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer, seen = optimizer.optimizer, seen + 1
        if seen > 8:
            break
    fn = getattr(optimizer, what, None)
    return int(fn()) if callable(fn) else 0


def cache_bytes(optimizer: Optimizer) -> int:
    """Bytes an optimizer holds beside its state: the projections a ``flora.Flora``
    caches with ``cache_projections=True`` (0 for any other optimizer; a wrapper such as
    accelerate's is looked through). Count it, and :func:`workspace_bytes`, with
    :func:`state_bytes` when budgeting memory."""
    return _beside_state(optimizer, "cache_bytes")


def workspace_bytes(optimizer: Optimizer) -> int:
    """Bytes of the buffers a ``flora.Flora(compile=...)`` keeps between steps beside its
    state and cache (``Flora.workspace_bytes``; 0 eager and for any other optimizer; a
    wrapper such as accelerate's is looked through)."""
    return _beside_state(optimizer, "workspace_bytes")


# Flora options that flora_state_bytes accepts (and ignores when they do not change the size).
_FLORA_OPTIONS = frozenset((
    "lr", "kappa", "eps", "clip_threshold", "decay_rate", "weight_decay", "scale_parameter", "relative_step",
    "warmup_init", "seed", "proj_dim", "momentum_form", "projection", "max_aspect_ratio", "cache_projections",
    "factor_dims", "complement_weight", "momentum_dtype", "foreach", "compile",
))


def _check_options(rank, beta1, options: dict) -> dict:
    """The options as Flora's constructor checks them (``ValueError`` / ``TypeError`` naming
    the option and the allowed values); the group they make, defaults filled."""
    import inspect

    from .compression import momentum_dtype_name
    from .optimizer import Flora, check_compile
    from .options import plain_group, validate_group

    check_momentum_dtype(options.get("momentum_dtype"))
    check_compile(options.get("compile"), backends=False)  # its type; a name is Flora's to look up
    group = {k: v.default for k, v in inspect.signature(Flora.__init__).parameters.items()
             if v.default is not inspect.Parameter.empty and k not in ("compile", "momentum")}
    group.update({k: v for k, v in options.items() if k != "compile"}, rank=rank, beta1=beta1)
    group["momentum_dtype"] = momentum_dtype_name(group["momentum_dtype"])
    if isinstance(group["eps"], list):
        group["eps"] = tuple(group["eps"])
    if group["relative_step"] is None:
        group["relative_step"] = group["lr"] is None
    plain_group(group)  # numpy numbers as Python's, as Flora takes them
    validate_group(group)
    return group


def _parameter_dtype(dtype) -> torch.dtype:
    """A floating-point ``torch.dtype``, or its name (``"float64"``, ``"torch.bfloat16"``)."""
    got = dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or dtype not in STEPPED_DTYPES:  # float8: Flora refuses it (probe Z137)
        raise ValueError(f"flora_state_bytes: dtype must be one Flora steps, {', '.join(map(str, STEPPED_DTYPES))}, "
                         f"or its name ('float32', 'bfloat16', ...), got {got!r}")
    return dtype


def _shape_list(shapes) -> list[tuple]:
    """``shapes`` as a list of tuples; one shape given alone (``(30, 40)``, a ``torch.Size``),
    a tensor or anything that holds no shapes is a TypeError that says what to pass (before
    2026-12-04: ``'int' object is not iterable``, a probe)."""
    allowed = "a list of shapes (tuples of integers, or torch.Size)"
    if isinstance(shapes, torch.Tensor):
        raise TypeError(f"flora_state_bytes: shapes must be {allowed}, got a tensor of shape {tuple(shapes.shape)}: "
                        "pass the parameters' shapes, [p.shape for p in params]")
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Iterable):
        raise TypeError(f"flora_state_bytes: shapes must be {allowed}, got {shapes!r} ({type(shapes).__name__})")
    shapes = list(shapes)
    if shapes and all(_is_int(d) for d in shapes):
        one = tuple(int(d) for d in shapes)
        raise TypeError(f"flora_state_bytes: shapes must be {allowed}, got a single shape {one}: pass [{one}]")
    out = []
    for shape in shapes:
        if isinstance(shape, torch.Tensor):
            raise TypeError(f"flora_state_bytes: shapes must be {allowed}, got a tensor (of shape "
                            f"{tuple(shape.shape)}) among them: pass its .shape")
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise TypeError(f"flora_state_bytes: shapes must be {allowed}, got {shape!r} ({type(shape).__name__}) "
                            "among them")
        out.append(tuple(shape))
    return out


def _plain_shape(shape: tuple) -> tuple:
    """A checked shape's dims as Python ints: numpy's int32 had wrapped round in the
    products (a 128256 x 8192 embedding counted as -91,663,360 bytes, probe Z137)."""
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"flora_state_bytes: a shape must hold non-negative integers, got {shape}")
    return tuple(operator.index(d) for d in shape)


def flora_state_bytes(shapes: Iterable[tuple[int, ...]], *, rank, beta1, dtype=torch.float32, **options) -> int:
    """Flora's state in bytes for parameters of these shapes and ``dtype`` (a floating-point
    dtype or its name; the state is float32, float64 for float64 parameters):

    - second moment: for a tensor of 2+ dims, a row and a column statistic over the two
      dims that ``factor_dims`` picks (:func:`flora.adafactor.factored_shapes`; default
      ``"largest"``: ``(n + m) * (the other dims' product)`` for the two largest dims n, m;
      ``"last"``: rows ``shape[:-1]``, columns ``shape[:-2] + shape[-1:]``, as in HF
      Adafactor), ``numel`` for 1-D;
    - first moment (when ``beta1`` is set): ``r * (other dim)`` for a compressed tensor
      (:func:`flora.compression.compressed_dim`), ``numel`` otherwise, in
      ``momentum_dtype`` (default ``"auto"``: 2 bytes when ``rank`` is set and the state
      is float32, the state dtype's otherwise).

    ``options`` are Flora's other keyword arguments (``proj_dim``, ``max_aspect_ratio``
    and ``factor_dims`` matter); an unknown name is a ``TypeError``."""
    unknown = sorted(set(options) - _FLORA_OPTIONS)
    if unknown:
        raise TypeError(f"flora_state_bytes got unknown option(s) {unknown}; Flora's options are "
                        f"rank, beta1, {', '.join(sorted(_FLORA_OPTIONS))}")
    # compile is the optimizer's, not a group's option, and changes no state size
    group = _check_options(rank, beta1, options)
    rank, beta1 = group["rank"], group["beta1"]  # numpy numbers as Python's
    dtype = _parameter_dtype(dtype)
    total = moment = 0
    for shape in map(_plain_shape, _shape_list(shapes)):
        numel = math.prod(shape)
        if len(shape) >= 2:
            row, col = factored_shapes(shape, group["factor_dims"])
            total += math.prod(row) + math.prod(col)
        else:
            total += numel
        if beta1 is not None:
            dim = compressed_dim(shape, rank, proj_dim=group["proj_dim"], max_aspect_ratio=group["max_aspect_ratio"])
            moment += numel if dim is None else math.prod(compressed_shape(shape, rank, dim))
    # the parameters' dtype in, the state's out: half-precision parameters keep float32 state
    wide = state_dtype(dtype)

    def size(d):
        return torch.empty((), dtype=d).element_size()

    return size(wide) * total + size(momentum_storage(group, dtype)) * moment
