"""Flora's options: what a parameter group may hold (``validate_group``), how a group
of an earlier release maps to today's (``upgrade_group``), and the per-tensor decisions
that follow from a group (``momentum_dim``, ``momentum_reason``, ``grouped``)."""

from __future__ import annotations

import numbers

import torch

from .adafactor import FACTOR_DIMS
from ._validation import check_bool, check_choice, check_positive_int, check_real, check_seed, plain_option
from .compression import FLORA_PROJ_DIMS, check_momentum_dtype, compressed_dim, dense_reason, momentum_dtype_name
from .momentum import MOMENTUM_FORMS, SUBSPACE_FORMS, WEIGHTED_FORMS
from .layout import fills_span
from .projection import PROJECTIONS, state_dtype
from . import sharded
from .sharded import is_dtensor

# Options every Flora state_dict has held since the first release: a state without them
# comes from another optimizer.
CORE_KEYS = ("rank", "kappa", "clip_threshold", "decay_rate", "proj_dim")

# Options that change Flora's algorithm (not only its step size): when a loaded state's
# groups set them otherwise than this optimizer was built with, load_state_dict warns.
# (A different rank is refused: the momentum's shape depends on it.)
ALGORITHM_KEYS = ("momentum_form", "projection", "beta1", "kappa", "seed", "rank", "proj_dim", "factor_dims",
                  "complement_weight", "momentum_dtype", "max_aspect_ratio")


def upgrade_group(group: dict, *, saved: bool = True) -> dict:
    """Map a group of an earlier release to today's options, in place: ``momentum`` (a
    form name) became ``momentum_form``; a ``saved`` state without ``projection`` dates
    from when every projection was Gaussian, and keeps those matrices; one without
    ``factor_dims`` from when every second moment was factored over the last two dims
    (``"last"``), and keeps those state shapes; one without ``complement_weight`` from
    before the ``"fixed"`` form, whose weight it leaves None (the option's default); one
    without ``momentum_dtype`` kept its momentum in the state dtype (None)."""
    old = group.get("momentum")
    if isinstance(old, str) and "momentum_form" not in group:
        group["momentum_form"] = group.pop("momentum")
    if saved:
        group.setdefault("projection", "gaussian")
        group.setdefault("factor_dims", "last")
        group.setdefault("complement_weight", None)
        group.setdefault("momentum_dtype", None)
    return group


def momentum_dim(shape, group: dict) -> int | None:
    """The projected dimension of a parameter's first moment in ``group``, or None (dense)."""
    return compressed_dim(shape, group["rank"], proj_dim=group["proj_dim"], max_aspect_ratio=group["max_aspect_ratio"])


def momentum_reason(shape, group: dict) -> str | None:
    if group["beta1"] is None:
        return "beta1=None (no momentum to compress)"
    return dense_reason(shape, group["rank"], proj_dim=group["proj_dim"], max_aspect_ratio=group["max_aspect_ratio"])


# validate_group's refusal that Flora(...)'s group message adds a hint to
WARMUP_NEEDS_RELATIVE_STEP = "warmup_init=True requires relative_step=True"

# On a CPU, tensors up to this many elements step grouped (Python and dispatch overhead
# dominates them); larger ones step one at a time, which keeps each one's temporaries in
# cache where a stack of them goes to memory on every pass (docs/results.md, issue 10).
CPU_GROUP_NUMEL = 1 << 16


def grouped(group: dict, p: torch.Tensor, compiled: bool = False) -> bool:
    """Whether ``p`` (and its bucket) steps on the grouped path: ``foreach=True``; or
    None (the default) off the CPU, on the CPU for small tensors, and everywhere when
    the step is compiled."""
    if group["foreach"] is None:
        return compiled or p.device.type != "cpu" or p.numel() <= CPU_GROUP_NUMEL
    return group["foreach"]


_TO_FSDP2 = ("Shard with PyTorch FSDP2 (torch.distributed.fsdp.fully_shard, or accelerate's FSDP2 plugin: "
             "fsdp_version=2) instead; see docs/distributed.md")


# Parameters larger than this (elements) are not compared element by element where their
# spans of memory overlap: taken unchecked, unless both fill their spans (then overlapping
# spans share elements) or both are blocks of one matrix's rows (decided by arithmetic).
SHARED_CHECK_MAX = 1 << 16


def refuse_shared_memory(tensors, earlier=(), names: dict | None = None) -> None:
    """Two parameters whose memory overlaps (tied by ``b.data = a.data``, overlapping views
    of one buffer) step one tensor twice, and the result would depend on the path (the
    single-tensor path reads the first one's update in the second one's RMS and weight
    decay; the grouped path does not): refused, as the same parameter listed twice is.
    Disjoint views of one buffer (FSDP1's and apex's flat buffers, column splits of one
    matrix) are fine. ``earlier``: the parameters of the groups already there; ``names``:
    id(parameter) -> its name, where known."""
    new = [(p, key) for p in tensors if (key := _storage_key(p)) is not None]
    # of the groups already there, only the parameters in a storage of a new one can
    # overlap one (they were checked against each other when added; an edit since, such as
    # b.data = a.data[:4], is looked for neither here nor at the step): add_param_group, one
    # group at a time, computed every earlier one's span (a probe: 13 s for 2,000 groups,
    # 10x torch's own check)
    keys = {key for _, key in new}
    old = [(p, key) for p in earlier if (key := _storage_key(p)) in keys] if keys else []
    spans = {}
    for p, key in [*old, *new]:
        size = p.element_size()
        start = p.storage_offset() * size
        end = start + (1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))) * size
        spans.setdefault(key, []).append((start, end, p))
    for views in spans.values():
        views.sort(key=lambda x: x[0])
        # a sweep by start: only the earlier views still open (ending after this one's
        # start) can overlap it or any later one, so disjoint views cost O(n log n)
        # (thousands of views of one flat buffer took O(n^2) before)
        open_ = []
        for s1, e1, p1 in views:
            open_ = [v for v in open_ if v[1] > s1]
            for s0, e0, p0 in open_:
                if p0 is not p1 and _share_an_element(p0, p1):
                    n0, n1 = (names or {}).get(id(p0)), (names or {}).get(id(p1))
                    named = f", named {n0!r} and {n1!r}" if n0 and n1 else ""
                    # the same elements, each held once by both (a tie, in another shape or
                    # transposed too: a review), or views overlapping in part
                    same = (s0, e0) == (s1, e1) and p0.numel() == p1.numel() == (e0 - s0) // p0.element_size()
                    if same:  # one memory twice: tied weights made two Parameters
                        how = ("tied by b.data = a.data, say, or tied weights loaded with load_state_dict(..., "
                               "assign=True), which makes a Parameter per key): a step would write it twice and "
                               "depend on the path. Tie them as one Parameter (b.weight = a.weight; a Hugging Face "
                               "model: model.tie_weights()) and list it once, e.g. from model.parameters(), which "
                               "deduplicates")
                    else:  # views of one buffer that overlap in part (a probe: the advice above did not fit)
                        how = ("overlapping views of one buffer): a step would write the shared elements twice "
                               "and depend on the path. Make the views disjoint, or give each parameter memory of "
                               "its own (p.data = p.data.clone())")
                    raise ValueError(f"params: two parameters share memory (shapes {tuple(p0.shape)} and "
                                     f"{tuple(p1.shape)}{named}: {how}")
            open_.append((s1, e1, p1))


def _storage_key(p) -> tuple | None:
    """The (device, storage address) of a parameter :func:`refuse_shared_memory` checks, or
    None for one it does not (empty, meta, DTensor, sparse, not a tensor)."""
    if not isinstance(p, torch.Tensor) or p.numel() == 0 or p.is_meta or is_dtensor(p) or p.is_sparse:
        return None
    return p.device, p.untyped_storage().data_ptr()


def _share_an_element(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage, whose spans overlap, have an element in common, by
    their element offsets (views of different element sizes count as sharing; a pair too
    large to compare element by element and not both dense, as not sharing)."""
    if a.data_ptr() == b.data_ptr():
        return True  # both start at one element
    if a.element_size() != b.element_size():
        return True
    if fills_span(a) and fills_span(b):  # each holds every element of its span, and the spans overlap
        return True
    blocks = _row_blocks(a, b)
    if blocks is not None:
        return blocks
    if a.numel() > b.numel():
        a, b = b, a
    if a.numel() > SHARED_CHECK_MAX:
        return False
    mine = _offsets(a).sort().values
    step = max(1, SHARED_CHECK_MAX // max(1, b[0].numel() if b.dim() else 1))
    rows = b.unsqueeze(0) if b.dim() == 0 else b
    return any(bool(torch.isin(_offsets(rows[i:i + step]), mine).any()) for i in range(0, rows.shape[0], step))


def _row_blocks(a: torch.Tensor, b: torch.Tensor) -> bool | None:
    """Whether two blocks of one matrix's rows share an element, by arithmetic: each a 2-D
    view (size-1 dims aside) whose rows are runs of consecutive elements, both at one row
    stride (column splits of a matrix, as ``W[:, :k]`` and ``W[:, j:]``, of any size). None
    where they are not both such blocks. Element ``(i, j)`` of ``a`` sits at ``o_a + i S +
    j``, so they share one exactly when some row offset ``k = i - i'`` puts ``o_b - o_a -
    k S`` between ``-(w_b - 1)`` and ``w_a - 1``."""
    def block(t):
        dims = [(n, st) for n, st in zip(t.shape, t.stride()) if n != 1]
        if not dims:
            return 1, 1, None  # one element
        if len(dims) == 1:
            n, st = dims[0]
            return (1, n, None) if st == 1 else (n, 1, st)  # one row; one column
        if len(dims) != 2 or dims[1][1] != 1 or dims[0][1] < dims[1][0]:
            return None
        return dims[0][0], dims[1][0], dims[0][1]

    ba, bb = block(a), block(b)
    if ba is None or bb is None:
        return None
    (ha, wa, sa), (hb, wb, sb) = ba, bb
    strides = {s for s in (sa, sb) if s is not None}  # a single row has none
    if len(strides) > 1:
        return None  # two row strides: not one matrix's blocks
    stride = strides.pop() if strides else 1 << 62  # two single rows: only k = 0
    d = b.storage_offset() - a.storage_offset()
    lo = max(-((wa - 1 - d) // stride), -(hb - 1))  # ceil((d - wa + 1) / S)
    hi = min((d + wb - 1) // stride, ha - 1)
    return lo <= hi


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offsets of ``t``'s elements (flat, int64, on the CPU)."""
    out = torch.tensor([t.storage_offset()], dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        out = (out[:, None] + torch.arange(n, dtype=torch.int64) * st).reshape(-1)
    return out


def refuse_flat_pieces(p) -> None:
    """Refuse a parameter that is a flat 1-D piece of other parameters, where no factored
    second moment or projected momentum can be formed and stepping it as a vector would
    silently be another optimizer: DeepSpeed ZeRO's partitions (marked ``ds_shape`` /
    ``ds_id``) and FSDP1's ``FlatParameter`` (``FullyShardedDataParallel`` with
    ``use_orig_params=False``: a module's parameters concatenated, marked ``_is_flat_param``)."""
    if hasattr(p, "ds_shape") or hasattr(p, "ds_id"):
        shape = getattr(p, "ds_shape", None)
        raise ValueError(
            f"Flora cannot step DeepSpeed ZeRO partitions (a parameter{f' of shape {tuple(shape)}' if shape else ''} "
            f"carries DeepSpeed's ds_shape/ds_id): ZeRO flattens parameters into 1-D pieces, where Adafactor's "
            f"row/column factors and Flora's projected momentum do not exist. {_TO_FSDP2}")
    if getattr(p, "_is_flat_param", False):
        raise ValueError(
            f"Flora cannot step FSDP1's FlatParameter (a 1-D tensor of {p.numel()} elements: "
            "torch.distributed.fsdp.FullyShardedDataParallel with use_orig_params=False concatenates a module's "
            "parameters into one), where Adafactor's row/column factors, its per-tensor RMS and Flora's projected "
            f"momentum do not exist. {_TO_FSDP2}")


def _some_shapes(params: list) -> str:
    shapes = sorted({tuple(p.shape) for p in params})
    return ", ".join(map(str, shapes[:4])) + (", ..." if len(shapes) > 4 else "")


def refuse_fsdp1_shards(params: list) -> None:
    """FSDP1 with ``use_orig_params=True`` hands the optimizer the model's own parameters,
    each set to this rank's flat 1-D share of it (marked ``_fsdp_flattened``), and keeps
    their shapes only while it does not shard (``NO_SHARD``, or one process). One
    parameter does not tell which: all of them 1-D means sharded shares (a model whose
    every parameter is a vector has nothing for Flora to compress). Checked on every
    parameter when Flora is built, and on those with gradients at each step (a Flora built
    before FSDP1 wrapped the model holds the same tensors, sharded since)."""
    fsdp1 = [p for p in params if getattr(p, "_fsdp_flattened", False)]
    if fsdp1 and all(p.dim() <= 1 for p in fsdp1) and any(p.dim() == 1 for p in fsdp1):
        raise ValueError(
            f"Flora cannot step FSDP1's sharded parameters: all {len(fsdp1)} parameters that "
            "torch.distributed.fsdp.FullyShardedDataParallel (use_orig_params=True) manages here are flat 1-D shares "
            f"of their tensors (shapes {_some_shapes(fsdp1)}), where Adafactor's row/column "
            "factors, its per-tensor RMS and Flora's projected momentum do not exist, and each rank would step "
            f"another optimizer. {_TO_FSDP2}")


def refuse_scheduled_zero_lr(group: dict, state) -> None:
    """A group with ``relative_step=True`` and an lr of 0 (validate_group lets no other
    number through) steps by 0. torch.distributed.checkpoint's state_dict helpers rely on
    that: they step an optimizer whose state is empty, on gradients of zeros, with every
    lr set to 0, to create its state. Any other 0 there was written by a scheduler:
    transformers' ``AdafactorSchedule`` writes 0 at its start (HF's Adafactor ignores
    ``lr`` in relative mode), and Flora would then take steps of size 0 without a word.
    Refused, before any change. (Reads the gradients only in that case, at most once a
    run: a host sync.)"""
    grads = [p.grad for p in group["params"] if p.grad is not None]
    if not any(state.get(p) for p in group["params"]) and not any(
            bool((g.to_local() if is_dtensor(g) else g).count_nonzero()) for g in grads):
        return  # torch.distributed.checkpoint creating the state
    raise ValueError(
        f"lr={group['lr']!r} in a parameter group with relative_step=True: Flora would take steps of size 0. "
        "A scheduler wrote it: transformers' AdafactorSchedule does (HF's Adafactor ignores lr when relative_step "
        "is on); use flora.RelativeStepSchedule(opt) in its place (the Trainer: optimizers=(opt, "
        "flora.RelativeStepSchedule(opt))), or relative_step=False with a numeric lr. (relative_step=True takes "
        "lr=0 from torch.distributed.checkpoint only, on an empty state and gradients of zeros.)")


def validate_group(group: dict, *, read_tensors: bool = False) -> None:
    """Every option of ``group`` (its values merged over the defaults), each error naming
    the option and what it allows. ``read_tensors``: a tensor lr's value is checked too, a
    host sync (where the group is made: the constructor, ``add_param_group``; not at every
    step)."""
    lr, rel = group["lr"], group["relative_step"]
    if "compile" in group:
        raise ValueError("compile applies to the whole optimizer, not to a parameter group: pass it to "
                         "Flora(..., compile=...) and take it out of the group (through a wrapper that writes its "
                         "keyword arguments into every group, as torch's ZeroRedundancyOptimizer does: "
                         "optimizer_class=functools.partial(flora.Flora, compile=...))")
    if isinstance(lr, torch.Tensor):  # a device lr (as torch.optim allows)
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr given as a tensor must hold one floating-point value, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}")
        if read_tensors:
            check_real("lr", float(lr.reshape(())), low=0.0, finite=True)
    else:
        check_real("lr", lr, low=0.0, allow_none=True, finite=True)
    check_bool("relative_step", rel)
    # lr=0 with relative_step is a step of size 0: torch.distributed.checkpoint's state_dict
    # helpers set every group's lr to 0 to create an optimizer's state with one empty step.
    if lr is not None and rel and not (isinstance(lr, (int, float)) and lr == 0):
        got = f"got {lr!r}" if isinstance(lr, (int, float)) else "got a tensor"
        raise ValueError(f"lr must be None when relative_step=True (the step size is then relative), {got}. For a "
                         "fixed lr or an lr scheduler, build Flora with a numeric lr (relative_step then defaults to "
                         "False) or pass relative_step=False with it; a scheduler built on a Flora with lr=None "
                         "(the default) writes its own lr into the groups")
    if lr is None and not rel:
        raise ValueError("lr must be a non-negative number when relative_step=False (give Flora an lr, or each "
                         "parameter group its own)")
    check_bool("warmup_init", group["warmup_init"])
    if group["warmup_init"] and not rel:
        raise ValueError(WARMUP_NEEDS_RELATIVE_STEP)
    check_positive_int("rank", group["rank"], allow_none=True)
    check_positive_int("kappa", group["kappa"])
    check_real("beta1", group["beta1"], low=0.0, high=1.0, high_open=True, allow_none=True)
    check_bool("scale_parameter", group["scale_parameter"])  # before eps[1], whose bound it sets
    eps = group["eps"]
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise TypeError(f"eps must be a pair (eps1, eps2) of numbers, eps1 > 0 and eps2 >= 0 (> 0 with "
                        f"scale_parameter=True), got {eps!r}")
    # eps1 = 0 divides by a zero row or column of a gradient (an unused embedding row): every
    # step of that tensor would be skipped as non-finite; eps2 = 0 under scale_parameter
    # scales the step of a zero-initialised weight (LoRA's B) to 0 for good
    check_real("eps[0]", eps[0], low=0.0, low_open=True, finite=True)
    if eps[0] <= 2.0 ** -150:  # rounds to 0 in a float32 state (a probe, Z143: 1e-46 froze a zero row's tensor)
        raise ValueError(f"eps[0] must be above 2**-150 (about 7e-46: a smaller one rounds to 0 in a float32 state, "
                         "and eps[0] = 0 divides by a zero row or column of a gradient, so that tensor would never "
                         f"step), got {eps[0]}")
    # (A small eps[0] beside large squared gradients still makes a zero row's share of the
    # factored second moment underflow to 0, as in HF Adafactor, which then steps NaN: Flora
    # skips such a step and counts it in nonfinite_skips. The default 1e-30 meets it at
    # gradients near 1e7.)
    try:
        check_real("eps[1]", eps[1], low=0.0, low_open=bool(group["scale_parameter"]), finite=True)
    except ValueError as e:
        if group["scale_parameter"] and eps[1] == 0:  # allowed without it: say why not here
            raise ValueError(f"{e} with scale_parameter=True (which scales the step by max(eps[1], RMS(p)): 0 "
                             "would leave a zero-initialised weight, LoRA's B, at 0 for good); 0 is allowed with "
                             "scale_parameter=False") from None
        raise
    check_real("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
    check_real("decay_rate", group["decay_rate"], high=0.0, high_open=True, finite=True)
    check_real("weight_decay", group["weight_decay"], low=0.0, finite=True)
    check_seed("seed", group["seed"])
    check_choice("proj_dim", group["proj_dim"], FLORA_PROJ_DIMS)
    check_choice("momentum_form", group["momentum_form"], MOMENTUM_FORMS)
    check_choice("projection", group["projection"], PROJECTIONS)
    check_choice("factor_dims", group["factor_dims"], FACTOR_DIMS)
    check_complement_weight(group["complement_weight"], group["momentum_form"])
    check_momentum_dtype(group.get("momentum_dtype"))
    if group["momentum_form"] in SUBSPACE_FORMS and group["projection"] == "gaussian":
        raise ValueError(f"momentum_form={group['momentum_form']!r} needs projection='orthonormal' or "
                         "'coordinates' (its complement u - decompress(compress(u)) is an orthogonal projection "
                         "only for orthonormal rows); got projection='gaussian'")
    check_real("max_aspect_ratio", group["max_aspect_ratio"], low=1.0, allow_none=True)
    check_bool("cache_projections", group["cache_projections"])  # (warmup_init, scale_parameter: above)
    check_bool("foreach", group["foreach"], allow_none=True)


def check_complement_weight(weight, form) -> None:
    """``complement_weight``: None, or a real number in [0, 1] with ``momentum_form="fixed"``
    (its constant complement weight) or ``"floored"`` (the floor under its scaled weight);
    the other forms set their own weight."""
    check_real("complement_weight", weight, low=0.0, high=1.0, allow_none=True)
    if weight is not None and form not in WEIGHTED_FORMS:
        others = ", ".join(repr(f) for f in MOMENTUM_FORMS if f not in WEIGHTED_FORMS)
        raise ValueError(f"complement_weight={weight!r} is the weight of momentum_form='fixed' or 'floored' only; "
                         f"got momentum_form={form!r} (forms {others} set their own, and take "
                         "complement_weight=None). Pass momentum_form='fixed' or 'floored', or leave "
                         "complement_weight None")


_PLAIN_TYPES = (int, float, str, bool, type(None), tuple, torch.Tensor, torch.dtype)


# the parameter dtypes Flora's arithmetic steps (and HF Adafactor's): float8 has no norms or
# rsqrt kernels, so such a parameter is refused before any state is made
STEPPED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gradient_dtypes(p: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The gradient dtypes Flora steps ``p`` with: its own, or its state's (float32 for a
    bfloat16 or float16 parameter that keeps float32 gradients by ``p.grad_dtype``)."""
    return p.dtype, state_dtype(p.dtype)


def grad_dtype_ok(p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether Flora steps ``p`` with gradient ``g``'s dtype: one of ``gradient_dtypes``, and
    the one autograd gives ``p`` (``p.grad_dtype``; None there lets either through)."""
    dt = g.dtype
    declared = getattr(p, "grad_dtype", p.dtype)
    # the parameter's own dtype first: it is the usual case, and this runs per parameter and step
    return (dt == p.dtype or dt in gradient_dtypes(p)) and (declared is None or dt == declared)


def refuse_grad(p: torch.Tensor, g: torch.Tensor, name: str | None) -> None:
    """The refusal of a gradient (or a parameter's layout) Flora cannot step, naming the
    parameter."""
    what, who, shape = label(p, name), f"parameter {name!r}" if name else "a parameter", tuple(p.shape)
    if g.is_sparse:
        raise TypeError(f"Flora does not support sparse gradients (got one for {what}); use dense gradients, "
                        "sparse=False on its nn.Embedding or nn.EmbeddingBag")
    if g.is_complex():
        raise TypeError(f"Flora does not support complex gradients (got one of dtype {g.dtype} for {what}, "
                        f"dtype {p.dtype})")
    if not (g.is_floating_point() and p.is_floating_point()):  # (frozen integer ones, with no grad, pass)
        raise TypeError(f"Flora steps floating-point parameters; got {who} of dtype {p.dtype} with a gradient "
                        f"of dtype {g.dtype} (shape {shape})")
    if p.dtype not in STEPPED_DTYPES:  # float8 and the like: the arithmetic has no kernels for them
        raise TypeError(f"Flora steps parameters of dtype {', '.join(map(str, STEPPED_DTYPES))}; got {who} of "
                        f"dtype {p.dtype} (shape {shape}). Keep it in one of those dtypes, or freeze it "
                        "(requires_grad=False)")
    declared = getattr(p, "grad_dtype", p.dtype)  # torch's p.grad_dtype; None: any dtype
    if g.dtype not in gradient_dtypes(p) and (declared is None or declared == g.dtype):
        allowed = " or ".join(str(d) for d in dict.fromkeys(gradient_dtypes(p)))
        raise TypeError(f"{who} of dtype {p.dtype} (shape {shape}) has a gradient of dtype {g.dtype} "
                        f"(p.grad_dtype = {declared}): Flora steps a {p.dtype} parameter with gradients of "
                        f"dtype {allowed}; set p.grad_dtype to one of them")
    if not grad_dtype_ok(p, g):  # p.data = p.data.double() after backward: torch refuses p.grad = g
        raise TypeError(f"{who} of dtype {p.dtype} (shape {shape}) has a gradient of dtype {g.dtype}: its data "
                        "was changed to another dtype after backward (p.data = ...). Zero the gradients after "
                        "changing a parameter's dtype (or use module.to(dtype), which casts .grad too)")
    raise ValueError(f"{what} is a view whose elements share memory (strides {p.stride()}: an expanded or "
                     "overlapping view), so an in-place step cannot write them. Make it a tensor of its own "
                     "(p.data = p.data.clone()), or keep the smaller parameter and expand it in forward")


def overlaps_itself(p: torch.Tensor) -> bool:
    """Whether two of ``p``'s elements are one memory location (an ``expand``'s stride 0, an
    ``as_strided`` view with strides too small for its sizes). Each dim, by stride, must step
    past the span of the smaller ones; where one does not, the offsets are compared."""
    span = 1
    for st, n in sorted((abs(st), n) for n, st in zip(p.shape, p.stride()) if n > 1):
        if st < span:
            if st == 0 or p.numel() > SHARED_CHECK_MAX:  # too large to list: only a zero stride is certain
                return st == 0
            offsets = _offsets(p)
            return offsets.unique().numel() < offsets.numel()
        span += (n - 1) * st
    return False


def plain_group(group: dict) -> None:
    """Option values of another library's number types edited into a group (numpy's
    float64 lr, int64 kappa) as Python's, in place, so that ``state_dict()`` stays plain
    (``torch.load(weights_only=True)``); a few type checks per group and step."""
    for k, v in group.items():
        if k != "params" and (type(v) not in _PLAIN_TYPES
                              or k == "eps" and type(v) is tuple and any(type(e) not in (int, float) for e in v)):
            group[k] = plain_option(k, v)  # (eps: numpy numbers inside its pair too; probe Z129)


class _Same:
    """Equal to another only for the same object, which it holds (an id alone could be a
    new object's, at a freed one's address)."""

    __slots__ = ("obj",)
    __hash__ = None

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and self.obj is other.obj


def _value_key(v):
    """An option value as :func:`option_values` compares it: a number, string, dtype or
    None as itself, a list or tuple item by item, anything else as the same object: a
    tensor (comparing values would read it back from the device), an array (its ``==``
    is elementwise)."""
    if isinstance(v, (numbers.Number, str, torch.dtype, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        types = tuple(map(type, v))
        if _SCALARS.issuperset(types):  # (a pair of floats, a list of names: no call per item)
            return types, tuple(v)
        return tuple((type(x), _value_key(x)) for x in v)
    return _Same(v)


def option_values(group: dict) -> tuple:
    """A group's option values with their types, so that an edit shows even where it equals
    the value before: numpy's 1e-3 equals Python's but is not plain, a tuple of tensors
    equals one of numbers (probe Z129: neither was checked again). Not the parameters,
    nor their names (torch's ``param_names``, which no check reads: a list as long as the
    group, compared at each parameter's step in fused mode)."""
    return tuple((type(v), v if type(v) in _SCALARS else _value_key(v)) for k, v in group.items()
                 if k not in ("params", "param_names"))


_SCALARS = frozenset((int, float, str, bool, type(None)))  # (most values: compared without a call)


def label(p: torch.Tensor, name: str | None = None) -> str:
    """A parameter as an error message names it: by its name where Flora was given
    ``named_parameters()`` (torch keeps them as the group's ``param_names``), else by shape."""
    return f"parameter {name!r} (shape {tuple(p.shape)})" if name else f"a parameter of shape {tuple(p.shape)}"


def group_names(group: dict) -> list:
    """The group's parameter names (``param_names``), or Nones: one per parameter."""
    names = group.get("param_names")
    params = group["params"]
    return list(names) if isinstance(names, (list, tuple)) and len(names) == len(params) else [None] * len(params)


def name_in(group: dict, p: torch.Tensor) -> str | None:
    """``p``'s name in ``group`` (see :func:`group_names`), or None: a scan of the group,
    for error messages."""
    return next((n for q, n in zip(group["params"], group_names(group)) if q is p), None)


def validate_named(group: dict, index: int | None = None) -> None:
    """:func:`validate_group`, its error naming the group by its position in
    ``param_groups`` (``index``, where known) and its parameters: an option edited into one
    group of many mid-run had been refused without saying which (probe Z58)."""
    try:
        validate_group(group)
    except (ValueError, TypeError) as e:
        names, params = [n for n in group_names(group) if n], group["params"]
        if names:
            which = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        elif len(params) > 1:
            which = f"{len(params)} parameters, the first of shape {tuple(params[0].shape)}"
        elif params:
            which = f"a parameter of shape {tuple(params[0].shape)}"
        elif index is None:
            raise
        where = "the parameter group" if index is None else f"param_groups[{index}]"
        raise type(e)(f"{e} (in {where}" + (f", holding {which})" if params else ")")) from None


def check_grads(param_groups, state=None, validated: dict | None = None, numbered: bool = True) -> None:
    """Before any change: every group's options and every gradient Flora can step
    (``state``, the optimizer's: a relative step's lr of 0 is also checked). ``validated``:
    id(group) -> its :func:`option_values` when last validated; a group whose values are
    unchanged is not validated again (a group per parameter paid the check for each,
    every step). ``numbered``: ``param_groups`` is the optimizer's own list, whose positions
    the messages name."""
    fsdp1 = []  # FSDP1 sharded after Flora was built (use_orig_params=True): the same tensors, now 1-D
    for index, group in enumerate(param_groups):
        index = index if numbered else None
        if validated is None:
            validate_named(group, index)
        else:
            values = option_values(group)
            if validated.get(id(group)) != values:
                validate_named(group, index)
                validated[id(group)] = values
        if state is not None and group["relative_step"] and group["lr"] is not None:
            refuse_scheduled_zero_lr(group, state)
        names = None
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if (g.is_sparse or not g.is_floating_point() or p.dtype not in STEPPED_DTYPES
                    or not grad_dtype_ok(p, g)
                    or (not p.is_contiguous() and overlaps_itself(p))):
                names = names or group_names(group)
                refuse_grad(p, g, names[i])
            refuse_flat_pieces(p)
            if getattr(p, "_fsdp_flattened", False):
                fsdp1.append(p)
            if is_dtensor(p):
                sharded.layout(p)  # a placement Flora cannot step is refused here, before any change
    refuse_fsdp1_shards(fsdp1)
