"""Random projections, regenerated from integer seeds and never stored.

A projection for a dimension of size ``d`` at rank ``r`` is one of (``PROJECTIONS``):

- ``"gaussian"``: the ``r x d`` matrix ``A`` with i.i.d. N(0, 1/r) entries, so
  ``E[A^T A] = I`` and ``decompress(compress(G))`` is an unbiased estimate of ``G``
  (the paper's choice);
- ``"orthonormal"``: ``Q``, the ``r x d`` matrix with orthonormal rows from the QR
  factorisation of that same Gaussian draw (a uniformly random r-dim subspace):
  ``decompress(compress(G))`` is the orthogonal projection of ``G`` on it, biased but
  with far less noise; times ``sqrt(d / r)`` it is unbiased again;
- ``"coordinates"``: ``r`` of the ``d`` coordinates drawn without replacement, kept as
  an int64 index vector: compressing selects them, decompressing scatters them back, no
  matmul (FRUGAL's and BAdam's choice of random blocks). Biased like ``"orthonormal"``.

Every one is drawn by the CPU generator (and factorised on the CPU) and then moved, so
the same seed gives the same projection on every device.

Views (:func:`matrix_shape`): a tensor with two or more dims is seen as the 2-D matrix
``(shape[0], prod(shape[1:]))`` (a convolution: output channels by the rest), except a
stack of matrices (:func:`is_stack`: stacked experts ``(E, n, m)``), seen as
``(prod(shape[:-1]), shape[-1])`` so that its matrices are projected each on its own, by
one shared projection of their columns. ``dim=0`` projects the rows away (stores
``r x m``), ``dim=1`` projects the columns away (stores ``n x r``).
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch

from ._validation import check_bool, check_nonneg_int, check_positive_int, check_seed

__all__ = [
    "projection_seed",
    "PROJECTIONS",
    "gaussian_projection",
    "make_projection",
    "make_projections",
    "state_dtype",
    "as_matrix",
    "is_stack",
    "one_matrix",
    "matrix_shape",
    "choose_dim",
    "compressed_shape",
    "compress",
    "decompress",
    "decompress_add_",
    "transfer",
]

ProjDim = Union[Literal["auto"], int]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A well-mixed 64-bit bijection: nearby inputs give unrelated seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


# Streams keep the optimizer's, the accumulator's and the communication hook's matrices
# unrelated even when they are given the same seed.
MOMENTUM_STREAM = 0
ACCUMULATION_STREAM = 1
COMMUNICATION_STREAM = 2


def projection_seed(base_seed: int, index: int, count: int, stream: int = MOMENTUM_STREAM) -> int:
    """Seed of parameter ``index``'s projection number ``count`` in ``stream``.

    A pure function of its integers, so a resumed run regenerates exactly the matrices it
    would have used, with no history to save. Returns a 63-bit integer. ``base_seed``
    must lie in [0, 2**63): a larger one would be folded onto another seed; ``index``,
    ``count`` and ``stream`` are integers in [0, 2**64) (``MOMENTUM_STREAM``,
    ``ACCUMULATION_STREAM``, ``COMMUNICATION_STREAM`` or a stream of one's own).

    The draws see fewer bits: torch's CPU generator (which draws every projection, for any
    device) seeds its Mersenne Twister from the low 32 bits, so seeds equal mod 2**32 draw
    the same matrix. Among ``P`` parameters over ``K`` projections each, about
    ``(P K)**2 / 2**33`` pairs coincide (12 of 400,000 draws in a probe): harmless to the
    estimate, which stays unbiased, and kept so that checkpoints keep their projections.
    """
    check_seed("base_seed", base_seed)
    # stream too (before 2026-12-04 it was not checked: 1.7 and "1" gave stream 1's seeds, 2**64
    # stream 0's, a probe): its product with an odd constant mod 2**64 is a bijection of [0, 2**64)
    for name, v in (("index", index), ("count", count), ("stream", stream)):
        check_nonneg_int(name, v)
        if v > _MASK64:
            raise ValueError(f"{name} must be below 2**64 (a larger one would be folded onto another's), got {v}")
    h = _splitmix64((int(base_seed) & _MASK64) ^ (int(stream) * 0xD1B54A32D192ED03 & _MASK64))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    h = _splitmix64(h ^ (int(count) & _MASK64))
    return h >> 1


def gaussian_projection(
    seed: int,
    rank: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``rank x dim`` matrix with i.i.d. N(0, 1/rank) entries drawn from ``seed``.

    Drawn by the CPU generator and then moved, so the same seed gives the same matrix
    on every device (CUDA's generator is a different algorithm).
    """
    return make_projections("gaussian", [seed], rank, dim, device=device, dtype=dtype)[0]


PROJECTIONS = ("gaussian", "orthonormal", "coordinates")


def _to_device(a: torch.Tensor, device) -> torch.Tensor:
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return a
    return a.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else a.to(device)


def make_projection(
    kind: str,
    seed: int,
    rank: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    unbiased: bool = False,
) -> torch.Tensor:
    """The projection of ``kind`` (see ``PROJECTIONS``) for a dimension of size ``dim``.

    ``unbiased=True`` scales an orthonormal projection by ``sqrt(dim / rank)`` so that
    ``decompress(compress(G))`` is unbiased (a Gaussian one already is; coordinates are
    refused). A ``"coordinates"`` projection is an int64 vector of ``rank`` sorted
    indices; the matrix kinds are ``rank x dim`` in ``dtype``."""
    return make_projections(kind, [seed], rank, dim, device=device, dtype=dtype, unbiased=unbiased)[0]


def make_projections(
    kind: str,
    seeds,
    rank: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    unbiased: bool = False,
) -> torch.Tensor:
    """``make_projection`` for each of ``seeds``, stacked (``k x rank x dim``, or
    ``k x rank`` indices): one QR call for all of them and one copy to ``device``. The
    matrix of a seed is the same, bit for bit, whether drawn alone or in a stack."""
    if kind not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(map(repr, PROJECTIONS))}; got {kind!r}")
    check_bool("unbiased", unbiased)  # ("no" would be truthy: scaled; a probe)
    if kind == "coordinates" and unbiased:
        raise ValueError("projection 'coordinates' has no unbiased form here; use 'gaussian' or 'orthonormal'")
    check_positive_int("rank", rank)
    check_positive_int("dim", dim)
    if kind != "gaussian" and rank > dim:  # a QR or a choice of coordinates gives at most dim rows
        raise ValueError(f"projection {kind!r} has at most dim={dim} rows, got rank={rank}; use rank <= dim "
                         "(or 'gaussian', whose rows need not be independent)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")
    for s in seeds:
        check_seed("seed", s)  # a float, a string or a seed out of range would be folded onto another's
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    if kind == "coordinates":
        out = torch.stack([torch.randperm(dim, generator=g)[:rank].sort().values for g in gens])
        return _to_device(out, device)
    g = torch.stack([torch.randn(rank, dim, generator=gen, dtype=torch.float32) for gen in gens])
    if kind == "gaussian":
        g.mul_(1.0 / math.sqrt(rank))
    else:  # orthonormal: Q of the QR of that Gaussian draw
        q, r = _qr_one_thread(g.mT.double())  # k x dim x rank, in float64 so rows stay orthonormal in float32
        d = torch.diagonal(r, dim1=-2, dim2=-1)
        q = q * torch.sign(d).masked_fill_(d == 0, 1.0).unsqueeze(-2)  # unique: diag(R) > 0
        if unbiased:
            q = q * math.sqrt(dim / rank)
        g = q.mT.to(dtype).contiguous()
    g = _to_device(g, device)
    return g if g.dtype == dtype else g.to(dtype)


def _qr_one_thread(x: torch.Tensor):
    """``torch.linalg.qr`` on one CPU thread: LAPACK's threaded QR rounds differently with
    the thread count (a probe: 0.1-2% of 2048 x 32 draws kept a 1-ulp difference in
    float32), so projections, hence runs, depended on torch.set_num_threads (replicas of
    one run with other thread counts drifted apart)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return torch.linalg.qr(x)
    torch.set_num_threads(1)
    try:
        return torch.linalg.qr(x)
    finally:
        torch.set_num_threads(threads)


def is_coordinates(a: torch.Tensor) -> bool:
    """Whether ``a`` is a coordinate projection (an index vector) rather than a matrix."""
    return a.dtype == torch.int64


HALF = (torch.float16, torch.bfloat16)  # dtypes a step widens to float32 before its arithmetic


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of optimizer state, buffers and projections for a tensor of ``dtype``:
    float64 stays float64 (as in HF Adafactor), everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype autograd gives ``p``'s gradient: ``p.grad_dtype`` where torch has it (a
    bfloat16 parameter may be set to keep float32 gradients), else ``p.dtype``."""
    return getattr(p, "grad_dtype", None) or p.dtype


def is_stack(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` is a stack of matrices over its last two dims: 3+ dims,
    the last two its largest (no leading dim larger than either; the rule by which
    ``factor_dims="largest"`` factors it over them), as stacked experts ``(E, n, m)`` with
    ``n, m >= E``. A convolution's kernel dims are smaller than its channels: not a stack."""
    return len(shape) >= 3 and max(shape[:-2]) <= min(shape[-2], shape[-1])


def one_matrix(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a tensor of 3+ dims is one matrix behind leading dims of 1 (``(1, N, d)``
    position embeddings, ``(1, 1, d)`` class tokens): nothing to mix, so that matrix."""
    return len(shape) >= 3 and math.prod(shape[:-2]) == 1


def matrix_shape(shape: torch.Size | tuple[int, ...], like=None) -> tuple[int, int]:
    """The 2-D matrix a tensor of ``shape`` (2+ dims) is seen as: ``(shape[0], rest)``, or
    for a stack (:func:`is_stack`) ``(rest, shape[-1])``, each matrix's rows in turn.
    ``like``: the shape whose rule applies (a whole tensor's, for a shard of its first dim:
    a shard of a tensor that is not a stack may look like one)."""
    if is_stack(shape if like is None else like):
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def as_matrix(t: torch.Tensor, like=None) -> torch.Tensor:
    """View (or copy, where no view exists) a tensor of two or more dims as its
    :func:`matrix_shape`."""
    return t if t.dim() == 2 else t.reshape(matrix_shape(t.shape, like))  # -1 fails on 0 rows


def choose_dim(shape: torch.Size | tuple[int, ...], proj_dim: ProjDim = "auto") -> int:
    """The matrix dimension to project away: ``"auto"`` takes the smaller one (less
    noise, since the estimator's variance grows like d / r), ties going to the columns;
    for a stack of two or more matrices, its columns (its rows would mix its matrices)."""
    n, m = matrix_shape(shape)
    if proj_dim == "auto":
        if is_stack(shape) and not one_matrix(shape):
            return 1
        return 0 if n < m else 1  # a 2-D tensor, or one matrix behind leading 1s (one_matrix)
    return int(proj_dim)


def compressed_shape(shape: torch.Size | tuple[int, ...], rank: int, dim: int, like=None) -> tuple[int, int]:
    n, m = matrix_shape(shape, like)
    return (rank, m) if dim == 0 else (n, rank)


def _batched(a: torch.Tensor) -> bool:
    """Whether ``a`` is a stack of projections (``k x r x d``, or ``k x r`` indices)."""
    return a.dim() > (1 if is_coordinates(a) else 2)


def _bcast(x):
    """A per-matrix coefficient (0-dim or ``k``) shaped to scale ``(k x) n x m`` matrices."""
    return x.view(*x.shape, 1, 1) if isinstance(x, torch.Tensor) else x  # one view op (indexing dispatches two)


def _index(a: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Stacked coordinates ``k x r`` as a gather/scatter index for ``k x n x m`` tensors."""
    k, r = a.shape
    n, m = like.shape[-2:]
    return a[:, :, None].expand(k, r, m) if dim == 0 else a[:, None, :].expand(k, n, r)


def _check_stack(where: str, name: str, x: torch.Tensor, a: torch.Tensor) -> None:
    """Stacked projections (``k x r x d``, or ``k x r`` coordinates) take a ``k x n x m``
    stack: one projection per matrix. Another count is refused (shapes only: no sync);
    gathering by stacked coordinates had silently dropped the matrices past the k-th (a probe)."""
    if _batched(a) and (x.dim() != 3 or x.shape[0] != a.shape[0]):
        raise ValueError(f"{where}: {a.shape[0]} stacked projections (shape {tuple(a.shape)}) need {name} to be a "
                         f"stack of {a.shape[0]} matrices ({a.shape[0]} x n x m); got shape {tuple(x.shape)}")


def _check_tensors(where: str, a, what: str = "the projection", **named) -> None:
    """``a`` a projection as make_projection draws it (``r x d`` floating-point, ``r``
    int64 indices, or a stack of either: ``k x r x d``, ``k x r``), and each of ``named``
    a tensor: refused by name otherwise (shapes and types only: no sync). A 1-D float
    vector (``a[0]`` by mistake) had been taken as a projection by compress, and other
    mistakes failed inside torch (probe Z137)."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor; got {type(x).__name__}")
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{where}: {what} must be a torch.Tensor (make_projection(kind, seed, rank, dim)); "
                        f"got {type(a).__name__}")
    if not (a.is_floating_point() or is_coordinates(a)):  # an int32 index vector, say (transfer had failed
        # with a bare IndexError: a review)
        raise ValueError(f"{where}: {what} has dtype {a.dtype}; a matrix projection is floating-point and a "
                         "coordinate projection an int64 index vector (make_projection(kind, seed, rank, dim))")
    if a.dim() not in ((1, 2) if is_coordinates(a) else (2, 3)):
        raise ValueError(f"{where}: {what} has shape {tuple(a.shape)} ({a.dtype}); a matrix projection is "
                         "r x d (a stack of them k x r x d) and a coordinate projection r int64 indices (k x r): "
                         "make_projection(kind, seed, rank, dim)")


def _check_dim(dim, where: str) -> None:
    if isinstance(dim, (bool, float)) or dim not in (0, 1):  # 1.0 == 1, but indexes nothing
        hint = " ('auto' is Flora's proj_dim: flora.compression.compressed_dim resolves it for a shape)" \
            if dim == "auto" else ""
        raise ValueError(f"{where}: dim must be 0 (the rows projected away) or 1 (the columns); got {dim!r}{hint}")


def compress(g: torch.Tensor, a: torch.Tensor, dim: int) -> torch.Tensor:
    """``A G`` (dim 0, gives r x m) or ``G A^T`` (dim 1, gives n x r); for coordinates,
    the selected rows (dim 0) or columns (dim 1). With stacked projections (``a`` of
    ``k x r x d`` or ``k x r``), ``g`` is the ``k x n x m`` stack of matrices.

    A matrix projection's size is checked against ``g``'s; coordinates are bare indices,
    which carry no size: ones drawn for another size are refused only where an index falls
    outside ``g`` (checking more would cost a sync), so draw them for the size at hand."""
    _check_dim(dim, "compress")
    _check_tensors("compress", a, g=g)
    if g.dim() < 2:
        raise ValueError(f"compress: g must have 2 or more dims (a matrix, or a tensor seen as one); got shape "
                         f"{tuple(g.shape)}")
    batched = _batched(a)
    _check_stack("compress", "g", g, a)
    if not batched:
        g = as_matrix(g)
    size = g.shape[dim - 2]  # the projected dimension (of each matrix of a stack)
    if is_coordinates(a):
        return _indexing("compress", lambda: _select(g, a, dim, batched), a, size, f"g's dimension {dim}")
    # as decompress checks size= against a matrix projection (shapes only: no sync)
    _check_dtypes("compress", "g", g, a)
    if a.shape[-1] != size:
        raise ValueError(f"compress: the projection maps a dimension of {a.shape[-1]} (shape {tuple(a.shape)}) but "
                         f"g's dimension {dim} has size {size} (g {'of' if batched else 'seen as'} shape "
                         f"{tuple(g.shape)}); draw it for that size (make_projection(kind, seed, rank, {size}))")
    return a @ g if dim == 0 else g @ a.mT


def _check_dtypes(where: str, name: str, x: torch.Tensor, a: torch.Tensor) -> None:
    """A matrix projection multiplies ``x``: torch's matmul does not promote, so say which
    to cast (shapes and dtypes only: no sync). Under autocast the matmul casts both: no
    check there (Flora's own steps turn autocast off first)."""
    if not a.is_floating_point():  # an int32 index vector, say: coordinates are int64
        raise ValueError(f"{where}: the projection has dtype {a.dtype}; a matrix projection is floating-point and "
                         "a coordinate projection an int64 index vector (make_projection(kind, seed, rank, dim))")
    if not (x.is_floating_point() or x.is_complex()):  # no projection can be drawn in its dtype (a probe: the hint said to)
        raise ValueError(f"{where}: {name} is {x.dtype}; a matrix projection multiplies floating-point tensors: "
                         f"cast {name} to the projection's {a.dtype}")
    if x.is_complex():  # no projection is drawn complex: the hint below named one make_projection refuses (Z137)
        raise ValueError(f"{where}: {name} is {x.dtype}; a matrix projection is real and multiplies real tensors: "
                         f"project {name}.real and {name}.imag apart, or use a coordinate projection")
    if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{where}: {name} is {x.dtype} but the projection is {a.dtype}; draw the projection in "
                         f"{name}'s dtype (make_projection(..., dtype={x.dtype})) or cast {name} to {a.dtype}")


def _select(g: torch.Tensor, a: torch.Tensor, dim: int, batched: bool) -> torch.Tensor:
    """Coordinates ``a`` of ``g``'s dimension ``dim`` (each matrix's, for a stack)."""
    if not batched:
        return g.index_select(dim, a)
    return torch.gather(g, dim + 1, _index(a, dim, g))


def _indexing(where: str, run, a: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """``run()``, an indexing by coordinates ``a``; nothing checked on the way (no sync):
    should torch refuse it, an index out of range is diagnosed then (``_refuse_coordinates``)."""
    if torch.compiler.is_compiling():
        return run()
    try:
        return run()
    except (IndexError, RuntimeError) as e:
        _refuse_coordinates(where, a, size, what, e)
        raise


def _refuse_coordinates(where: str, a: torch.Tensor, size: int, what: str, error: Exception) -> None:
    """After torch refused to index with coordinates ``a``: a ValueError naming the projection
    if its indices do not fit ``size`` (``what``: the dimension), else nothing (torch's own
    error stands). Runs only on that failure, never on a step that works."""
    try:
        lo, hi = int(a.min()), int(a.max())
    except Exception:  # noqa: BLE001 - the diagnosis is best-effort; torch's error is raised then
        return
    if lo < 0 or hi >= size:
        raise ValueError(f"{where}: the coordinate projection holds indices in [{lo}, {hi}], outside [0, {size}) "
                         f"({what}): it was drawn for a dimension of another size; draw it for this one "
                         f"(make_projection('coordinates', seed, rank, {size}))") from error


def decompress(c: torch.Tensor, a: torch.Tensor, dim: int, *, size: int | None = None) -> torch.Tensor:
    """``A^T C`` (dim 0) or ``C A`` (dim 1): an n x m matrix (unbiased for the original
    with a Gaussian ``A``). Coordinates are scattered into zeros of the projected
    dimension's ``size``, which they need (a matrix projection's own size is checked against
    ``size`` when given). Stacks as in :func:`compress`."""
    _check_dim(dim, "decompress")
    _check_tensors("decompress", a, c=c)
    coordinates = is_coordinates(a)
    if c.dim() < 2:
        raise ValueError(f"decompress: c must have 2 or more dims (the compressed r x m or n x r matrix, or a "
                         f"stack of them); got shape {tuple(c.shape)}")
    if isinstance(size, (bool, float, str)) or (isinstance(size, int) and size < 0):
        raise ValueError(f"decompress: size must be a non-negative int (the projected dimension); got {size!r}")
    _check_stack("decompress", "c", c, a)
    # c's rank against the projection's (shapes only: no sync)
    rank = a.shape[-1] if coordinates else a.shape[-2]
    if c.shape[dim - 2] != rank:
        raise ValueError(f"decompress: c has {c.shape[dim - 2]} {'rows' if dim == 0 else 'columns'} (shape "
                         f"{tuple(c.shape)}) but the projection has rank {rank} (shape {tuple(a.shape)}); with "
                         f"dim={dim} c is the {'r x m' if dim == 0 else 'n x r'} compressed tensor of this "
                         "projection")
    if coordinates:
        if size is None:
            raise ValueError("decompress: a coordinate projection needs size= (the projected dimension)")
        shape = (size, c.shape[-1]) if dim == 0 else (c.shape[-2], size)
        out = c.new_zeros(c.shape[:-2] + shape)
        return _indexing("decompress", lambda: decompress_add_(out, c, a, dim), a, size,
                         f"size={size!r}, the projected dimension")
    # one matrix projection fixes the size: say so, not ignore it (for a stack of them the
    # references pass the flattened view's size, which their matrices do not use)
    if size is not None and not _batched(a) and size != a.shape[-1]:
        raise ValueError(f"decompress: size={size!r} does not match the projection, which maps a dimension of "
                         f"{a.shape[-1]} (shape {tuple(a.shape)}); leave size out for a matrix projection")
    _check_dtypes("decompress", "c", c, a)
    return a.mT @ c if dim == 0 else c @ a


def decompress_add_(out: torch.Tensor, c: torch.Tensor, a: torch.Tensor, dim: int, *,
                    beta: float | torch.Tensor = 1.0, alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``out <- beta out + alpha decompress(c, a, dim)`` in place (``out`` an n x m
    matrix, or a ``k x n x m`` stack), without the n x m temporary that
    ``out + decompress(...)`` would allocate. ``beta`` and ``alpha`` may be tensors (0-dim,
    or one per matrix of a stack): they stay on the device.

    Under ``torch.compile`` (matrix projections), returns ``beta out + D(alpha c)`` as a
    new tensor instead: the compiler then fuses ``beta out +`` into whatever consumes the
    result (Flora's parameter update), where an in-place ``addmm_`` would cost a scaled
    copy of ``out`` and a copy into the matmul's output. Use the returned tensor."""
    if torch.compiler.is_compiling() and not is_coordinates(a):
        return out * _bcast(beta) + decompress(c * _bcast(alpha), a, dim)
    _check_stack("decompress_add_", "c", c, a)
    _check_stack("decompress_add_", "out", out, a)
    if isinstance(beta, torch.Tensor) or isinstance(alpha, torch.Tensor):
        out.mul_(_bcast(beta))
        c = c * _bcast(alpha)
        beta = alpha = 1.0
    batched = _batched(a)
    if is_coordinates(a):
        if beta != 1.0:
            out.mul_(beta)
        if not batched:  # counted from the last two dims, as a matrix projection's matmul broadcasts a batch
            return out.index_add_(out.dim() - 2 + dim, a, c, alpha=alpha)
        return out.scatter_add_(dim + 1, _index(a, dim, c), c if alpha == 1.0 else c * alpha)
    if not batched:
        if dim == 0:
            return out.addmm_(a.T, c, beta=beta, alpha=alpha)
        return out.addmm_(c, a, beta=beta, alpha=alpha)
    if dim == 0:
        return out.baddbmm_(a.mT, c, beta=beta, alpha=alpha)
    return out.baddbmm_(c, a, beta=beta, alpha=alpha)


def overlap(a_old: torch.Tensor, a_new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A_new A_old^T`` (r x r, or k x r x r for stacks): how the new projection sees the
    old one's coordinates."""
    if is_coordinates(a_new):
        return (a_new[..., :, None] == a_old[..., None, :]).to(dtype)
    return a_new @ a_old.mT


def transfer(c: torch.Tensor, a_old: torch.Tensor, a_new: torch.Tensor, dim: int) -> torch.Tensor:
    """Move a compressed tensor (or a stack) from one projection to another without
    leaving r x r: ``A_new A_old^T C`` (dim 0) or ``C A_old A_new^T`` (dim 1)."""
    _check_dim(dim, "transfer")
    _check_tensors("transfer", a_old, "a_old", c=c)
    _check_tensors("transfer", a_new, "a_new")
    if a_old.dtype != a_new.dtype or a_old.shape != a_new.shape:  # the kinds too: int64 is coordinates
        raise ValueError(f"transfer: a_old (shape {tuple(a_old.shape)}, {a_old.dtype}) and a_new (shape "
                         f"{tuple(a_new.shape)}, {a_new.dtype}) must be projections of one kind, rank, size and dtype "
                         "(a resample of the same make_projection call with another seed)")
    rank = a_old.shape[-1] if is_coordinates(a_old) else a_old.shape[-2]
    if c.dim() < 2 or c.shape[dim - 2] != rank:
        raise ValueError(f"transfer: c (shape {tuple(c.shape)}) must be the compressed tensor of a rank-{rank} "
                         f"projection along dim={dim}: {'r x m' if dim == 0 else 'n x r'}")
    _check_stack("transfer", "c", c, a_old)
    if not is_coordinates(a_old):
        _check_dtypes("transfer", "c", c, a_old)
    t = overlap(a_old, a_new, c.dtype)
    return t @ c if dim == 0 else c @ t.mT
