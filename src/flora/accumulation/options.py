"""The accumulator's options and parameters: argument checks (each error names the
argument and what is allowed), which parameters are attached, and how each is summed
(compressed along which dimension, or densely)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from .._validation import check_bool, check_choice, check_positive_int, check_real, check_seed, plain
from ..compression import PROJ_DIMS, compressed_dim, dense_reason
from ..options import STEPPED_DTYPES
from ..sharded import is_dtensor
from .estimator import ACCUMULATION_PROJECTIONS, Slot
from .integrations import check_scaler
from .replicas import check_reduce, check_sharded
from .._warn import warn

__all__ = ["Options", "Option", "check_holds_some", "check_options", "named_params", "resolve_exclude", "make_slots"]


@dataclass
class Options:
    """What the accumulator was built with (``exact_last`` resolved). Mutable: the
    accumulator's attributes of the same names read and write it."""

    rank: int | None
    tau: int
    seed: int
    proj_dim: str | int
    projection: str
    max_aspect_ratio: float | None
    exact_last: bool
    fused: bool
    reduce: bool
    process_group: Any
    max_grad_norm: float | None
    cache_projections: bool
    scaler: Any


# Options that may change after the accumulator is built: checked as the constructor
# checks them; all but cache_projections on a cycle boundary only (the micro-batches summed
# so far were scaled, and a fused cycle's first parameters stepped, under the old value).
# The others decide how each parameter is summed (its buffers, its hooks): fixed.
SETTABLE = ("tau", "exact_last", "max_grad_norm", "cache_projections", "scaler")
ON_A_BOUNDARY = ("tau", "exact_last", "max_grad_norm", "scaler")


class Option:
    """An attribute of the accumulator that lives in its ``Options``."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj._engine.opts, self.name)

    def __set__(self, obj, value) -> None:
        eng, name = obj._engine, self.name
        if name not in SETTABLE:
            raise AttributeError(f"CompressedAccumulator.{name} is fixed when the accumulator is built (it decides "
                                 "how each parameter is summed); build a new one (acc.remove() first). Settable: "
                                 + ", ".join(SETTABLE))
        if getattr(eng, "removed", False):
            raise RuntimeError(f"CompressedAccumulator.{name}: this accumulator was removed (acc.remove()); build "
                               "a new one")
        value = plain(value)
        if name == "exact_last":
            check_bool(name, value, when=" once the accumulator is built")
        o = dataclasses.replace(eng.opts, **{name: value})
        check_options(o.rank, o.tau, seed=o.seed, proj_dim=o.proj_dim, max_aspect_ratio=o.max_aspect_ratio,
                      projection=o.projection, exact_last=o.exact_last, fused=o.fused,
                      cache_projections=o.cache_projections, reduce=o.reduce, process_group=o.process_group,
                      max_grad_norm=o.max_grad_norm, optimizer=eng.optimizer, scaler=o.scaler)
        was = getattr(eng.opts, name)
        changed = value is not was if name == "scaler" else value != was
        if name in ON_A_BOUNDARY and changed and eng.micro_step():
            raise RuntimeError(f"CompressedAccumulator.{name} can change on a cycle boundary only (after the step, "
                               f"finish_cycle() to keep the open cycle's gradients or discard_cycle() to drop "
                               f"them); this cycle has seen {eng.micro_step()} backward pass(es)")
        setattr(eng.opts, name, value)  # reduce=True: a changed tau is compared across the replicas again
        # at the next collective (Replicas.reduce_cycle), so set it on every replica alike


def check_options(rank, tau, *, seed, proj_dim, max_aspect_ratio, projection, exact_last, fused,
                  cache_projections, reduce, process_group, max_grad_norm, optimizer, scaler) -> None:
    check_positive_int("rank", rank, allow_none=True)
    check_positive_int("tau", tau)
    check_seed("seed", seed)
    check_choice("proj_dim", plain(proj_dim), PROJ_DIMS)
    check_real("max_aspect_ratio", max_aspect_ratio, low=1.0, allow_none=True)
    if projection not in ACCUMULATION_PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(map(repr, ACCUMULATION_PROJECTIONS))}; "
                         f"got {projection!r}")
    check_bool("exact_last", exact_last, allow_none=True)
    for name, v in (("fused", fused), ("cache_projections", cache_projections), ("reduce", reduce)):
        check_bool(name, v)
    check_reduce(reduce, process_group, exact_last)
    check_real("max_grad_norm", max_grad_norm, low=0.0, low_open=True, allow_none=True)
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if fused and optimizer is None:
        raise ValueError("fused=True needs optimizer=: the optimizer steps inside backward")
    if max_grad_norm is not None and not fused:
        raise ValueError("max_grad_norm applies to fused=True only; in normal mode call "
                         "torch.nn.utils.clip_grad_norm_ after the tau-th backward, as usual")
    check_scaler(scaler, fused)


def check_holds_some(optimizer: Optimizer, slots: list[Slot], fused: bool) -> None:
    """``optimizer=`` should step at least one of the accumulator's parameters: its step
    closes their cycle (normal mode), or steps them (fused). One that holds none (another
    model's) had closed this model's cycle at each of its own steps, silently (a probe: 8
    cycles instead of 2): refused in fused mode, which cannot step them; said in normal mode,
    where an optimizer of master copies (a bf16 model's fp32 weights) or one filled later
    (``add_param_group``) holds none of them and still works on full cycles."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not slots or any(id(s.param) in held for s in slots):
        return
    what = (f"CompressedAccumulator(optimizer=...): the optimizer holds none of the accumulator's {len(slots)} "
            f"parameter(s) ({', '.join(repr(s.name) for s in slots[:3])}{', ...' if len(slots) > 3 else ''})")
    if fused:
        raise ValueError(f"{what}, so nothing would step them; give the optimizer of this model's parameters")
    warn(f"{what}: each of its steps closes this model's open cycle (another model's optimizer "
         "would close it at every one of its steps). If it steps copies of these parameters (fp32 "
         "masters) or gets them later (add_param_group), this is expected; otherwise give this "
         "model's optimizer, or none", UserWarning)


def _named_item(item) -> tuple[str | None, Any]:
    """``(name, tensor)`` as ``named_parameters()`` yields it, or a bare tensor (unnamed)."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item
    return None, item


def named_params(model_or_params) -> list[tuple[str, torch.Tensor]]:
    """The parameters with their names: a module's own, the names of ``(name, tensor)``
    pairs (``model.named_parameters()``, as torch's optimizers take them), else
    ``params.i`` by position."""
    if isinstance(model_or_params, nn.Module):
        return list(model_or_params.named_parameters())
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    if not hasattr(model_or_params, "__iter__") or isinstance(model_or_params, (str, bytes)):
        # None or a number had failed in the loop below ('NoneType' object is not iterable, probe Z137)
        raise TypeError(f"model_or_params must be an nn.Module or an iterable of tensors, of (name, tensor) "
                        f"pairs, or of parameter groups; got {type(model_or_params).__name__}")
    out: list[tuple[str | None, Any]] = []
    for item in model_or_params:
        if isinstance(item, dict):  # parameter groups, as an optimizer takes them
            ps = item["params"]
            out.extend([(None, ps)] if isinstance(ps, torch.Tensor) else [_named_item(q) for q in ps])
        else:
            out.append(_named_item(item))
    for i, (_, p) in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"model_or_params must be an nn.Module or an iterable of tensors, of (name, tensor) "
                            f"pairs, or of parameter groups; item {i} is a {type(p).__name__}")
    seen: set[int] = set()
    named = []
    for i, (name, p) in enumerate(out):
        if id(p) not in seen:  # a tensor listed twice is one parameter
            seen.add(id(p))
            named.append((f"params.{i}" if name is None else name, p))
    return named


def resolve_exclude(exclude: Iterable[Any], named, model=None) -> set[int]:
    """The ids of the parameters ``exclude`` names (names or tensors). A name of ``model``
    that ``named_parameters()`` leaves out because its tensor is tied to an earlier one (an
    LM head tied to the embedding) names that tensor."""
    if isinstance(exclude, (str, torch.Tensor)):
        exclude = [exclude]
    if exclude is None or not hasattr(exclude, "__iter__"):
        raise TypeError(f"exclude must be parameter names or tensors (one, or an iterable of them), got {exclude!r}")
    by_name = {n: p for n, p in named}
    ids = {id(p) for _, p in named}
    out: set[int] = set()
    for e in exclude:
        if isinstance(e, str):
            p = by_name.get(e)
            if p is None and isinstance(model, nn.Module):
                try:
                    p = model.get_parameter(e)
                except AttributeError:
                    p = None
            if p is None or id(p) not in ids:
                raise ValueError(f"exclude: no parameter named {e!r} (names are those of "
                                 "named_parameters(), or 'params.<i>' for a list)")
            out.add(id(p))
        elif isinstance(e, torch.Tensor):
            if id(e) not in ids:
                raise ValueError(f"exclude: a tensor of shape {tuple(e.shape)} is not among model_or_params")
            out.add(id(e))
        else:
            raise TypeError(f"exclude must hold parameter names or tensors, got {type(e).__name__}")
    return out


def padded_tables(model) -> set[int]:
    """The ids of the weights of ``nn.Embedding`` and ``nn.EmbeddingBag`` modules with a
    ``padding_idx`` (and of peft's trainable-token tables holding the padding token): their
    padding row gets no gradient and must not move. Projecting a
    table's rows (``"auto"`` does where it has fewer rows than columns: a small vocabulary)
    mixes them, and the padding row's estimate was not zero (probe Z20: 5.4 where plain
    accumulation gives 0; probe Z26: 4e-3 for an EmbeddingBag, not a subclass of Embedding)."""
    if not isinstance(model, nn.Module):
        return set()
    ids = set()
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "padding_idx", None) is not None:
            ids.add(id(m.weight))
        # peft's trainable tokens: a table of the chosen tokens' rows over an embedding; the
        # padding token's row among them gets no gradient (probe Z31: it moved)
        deltas, chosen = getattr(m, "trainable_tokens_delta", None), getattr(m, "token_indices", None)
        pad = getattr(getattr(m, "base_layer", None), "padding_idx", None)
        if isinstance(deltas, nn.ParameterDict) and isinstance(chosen, dict) and pad is not None:
            ids.update(id(p) for name, p in deltas.items() if pad in chosen.get(name, ()))
    return ids


def refuse_sparse_tables_fused(model, slots) -> None:
    """Fused mode sums each gradient itself and steps inside backward: a trainable
    ``nn.Embedding`` or ``nn.EmbeddingBag`` built with ``sparse=True`` is refused here. At
    its gradient it came after the layers behind it in backward had stepped (probe Z129:
    the model and the optimizer left half-updated). A table whose weight another module
    holds too (an LM head tied to it) is not: autograd sums that module's dense gradient
    with the table's into a dense one. (A weight used densely by a function alone cannot
    be seen here: sparse=False steps it alike.)"""
    if not isinstance(model, nn.Module):
        return
    tables = (nn.Embedding, nn.EmbeddingBag)
    sparse, dense = set(), set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            (sparse if isinstance(m, tables) and getattr(m, "sparse", False) else dense).add(id(p))
    bad = [s.name for s in slots if id(s.param) in sparse - dense and s.param.requires_grad]
    if bad:
        raise TypeError(f"fused=True: parameter(s) {bad[:5]} belong to an nn.Embedding or nn.EmbeddingBag with "
                        "sparse=True, whose sparse gradient fused mode cannot take (it sums dense gradients). Build "
                        "the table with sparse=False, or use the accumulator in normal mode (fused=False) with "
                        f"exclude={bad[:5]!r}, which leaves the table's sum to autograd")


def make_slots(named, excluded: set[int], *, rank, proj_dim, max_aspect_ratio, reduce: bool,
               keep_rows: set[int] = frozenset()) -> list[Slot]:
    """One slot per trainable parameter, in order, with its projected dimension (None:
    dense); FSDP2 parameters project their unsharded columns, and so do the tables of
    ``keep_rows`` (ids: :func:`padded_tables`), whose rows must not mix."""
    slots = []
    for index, (name, p) in enumerate(named):
        if not p.requires_grad:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(f"parameter {name!r} is not initialised yet (a lazy module before its first forward "
                             "pass): run one forward pass (a dry run), then build the accumulator")
        pd, reason = proj_dim, None
        if is_dtensor(p):  # FSDP2: project the unsharded columns (see check_sharded)
            check_sharded(name, p, rank, proj_dim, max_aspect_ratio, reduce=reduce)
            pd = 0 if proj_dim == 0 else 1
        if id(p) in keep_rows and p.dim() == 2:
            pd, reason = 1, "an embedding with padding_idx: its columns are projected, so that no row mixes"
        if id(p) in excluded:
            dim, reason = None, "excluded"
        else:
            dim = compressed_dim(tuple(p.shape), rank, proj_dim=pd, max_aspect_ratio=max_aspect_ratio)
            if dim is None:
                reason = dense_reason(tuple(p.shape), rank, proj_dim=pd, max_aspect_ratio=max_aspect_ratio)
        if p.is_complex() and (dim is not None or reduce):  # summed densely it is autograd's own sum
            raise TypeError(f"parameter {name!r} is complex: CompressedAccumulator compresses real tensors only; "
                            f"exclude=[{name!r}] sums its gradient densely (or leave it out of model_or_params)")
        if p.is_floating_point() and p.dtype not in STEPPED_DTYPES and (dim is not None or reduce):
            raise TypeError(f"parameter {name!r} is {p.dtype}: CompressedAccumulator compresses and reduces "
                            f"{', '.join(map(str, STEPPED_DTYPES))} tensors only; exclude=[{name!r}] sums its "
                            "gradient densely (or leave it out of model_or_params)")
        slots.append(Slot(index, name, p, dim, reason))
    if not slots:
        raise ValueError("model_or_params has no parameter with requires_grad=True")
    warn_flat_pieces(slots, rank)
    return slots


def _flat_piece(p) -> bool:
    """A 1-D piece that a wrapper cut from other tensors: DeepSpeed ZeRO's partitions, FSDP1's
    FlatParameter, or FSDP1's share of a parameter (``use_orig_params=True``)."""
    return (hasattr(p, "ds_shape") or hasattr(p, "ds_id") or getattr(p, "_is_flat_param", False)
            or (getattr(p, "_fsdp_flattened", False) and p.dim() <= 1))


def warn_flat_pieces(slots: list[Slot], rank) -> None:
    """With a rank, say so when nothing can be compressed because the model's matrices reached
    the accumulator as flat pieces: the sums stay exact (dense, as plain accumulation's) but
    save nothing, which would otherwise go unnoticed."""
    if rank is None or any(s.dim is not None for s in slots):
        return
    flat = [s.name for s in slots if _flat_piece(s.param)]
    if flat:
        warn(f"CompressedAccumulator(rank={rank}) compresses nothing here: {len(flat)} of its "
             f"{len(slots)} parameters (e.g. {flat[0]!r}) are flat 1-D pieces that DeepSpeed ZeRO or "
             "FSDP1 (FullyShardedDataParallel) cut from the model's matrices, so every gradient is summed "
             "densely, exact but with no memory saved. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
             "whose parameters keep their shapes.", UserWarning)
    elif any(s.param.dim() >= 2 for s in slots):  # matrices, none compressed: LoRA adapters of rank <= this one
        warn(f"CompressedAccumulator(rank={rank}) compresses nothing here: each of its {len(slots)} "
             "trainable parameters is 1-D, excluded, or has no projected dimension above the rank (LoRA "
             "adapters of a rank <= this one, say), so every gradient is summed densely, exact but with no "
             "memory saved. See acc.plan()", UserWarning)
