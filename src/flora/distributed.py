"""Compressed communication across data-parallel replicas.

Flora draws its projections from integer seeds, so every replica can draw the same matrix
without sending it, and compression is linear: the sum over replicas of ``compress(G_i)``
is ``compress(sum_i G_i)``. Replicas therefore only exchange the compressed buffers (``r x
m`` or ``n x r``), with one all-reduce and no error-feedback buffer.

Two ways to use it:

- :func:`projection_hook`, a DDP communication hook (used like torch's PowerSGD hook)::

      state = flora.distributed.ProjectionState(rank=32, seed=0)
      ddp_model.register_comm_hook(state, flora.distributed.projection_hook)

  Each step, every matrix of a gradient bucket is compressed under a projection drawn
  fresh for that step, the tensors that the package's compression rule
  (:func:`flora.compression.compressed_dim`) leaves dense are sent as they are, all of it
  packed into one flat buffer: one all-reduce per bucket. DDP then sees the mean over
  replicas of the decompressed (unbiased) estimate.
- ``flora.CompressedAccumulator(..., reduce=True)``: compressed gradient accumulation whose
  compressed and dense buffers are all-reduced in one packed collective per cycle.

Details, costs and a ``torchrun`` example: ``docs/distributed.md``.
"""

# No ``from __future__ import annotations``: DDP compares the hook's annotations with
# dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
import threading
import weakref

import torch
import torch.distributed as dist

from torch.utils._python_dispatch import TorchDispatchMode

from ._validation import (COUNTER_LIMIT, check_choice, check_nonneg_int, check_positive_int, check_process_group,
                          check_real, check_seed, plain)
from .accumulation.estimator import write_estimate_
from .agreement import check_agreement  # the replicas' option check, shared with reduce=True
from ._warn import warn
from .compression import PROJ_DIMS, compressed_dim
from .layout import bucket_gradients
from .projection import (
    COMMUNICATION_STREAM,
    PROJECTIONS,
    compress,
    compressed_shape,
    make_projection,
    matrix_shape,
    projection_seed,
    state_dtype,
)

__all__ = ["ProjectionState", "projection_hook", "HOOK_PROJECTIONS", "CollectiveCounter", "check_agreement"]

# Unbiased estimators only: the mean over replicas of decompress(compress(G_i)) must
# average to the mean gradient.
HOOK_PROJECTIONS = ("orthonormal", "gaussian")


class ProjectionState:
    """Options and step counter of :func:`projection_hook`.

    Args:
        rank: rank of the compressed matrices (positive integer), or None to send every
            tensor dense (what DDP sends without a hook; for comparisons).
        seed: base seed of the projections (non-negative integer). Every replica must use
            the same seed (checked on the first step).
        projection: ``"orthonormal"`` (default: the seeded Gaussian draw's orthonormal
            rows scaled by ``sqrt(d / r)``, unbiased, mean squared error
            ``(d / r - 1) |G|^2``) or ``"gaussian"`` (N(0, 1/r) entries, the paper's,
            error ``(d + 1) / r |G|^2``). Biased kinds are refused: with a fresh projection
            every step and no error feedback, only an unbiased estimate averages out.
        proj_dim: the matrix dimension projected away: ``"auto"`` (the smaller one, less
            noise; a matrix then sends ``r x max(n, m)`` numbers), 0 or 1.
        max_aspect_ratio: send tensors with ``max(n, m) / min(n, m)`` above this dense;
            None compresses every shape.
        process_group: the group to all-reduce over (None: the default group).

    ``step`` counts the steps hooked so far; a tensor is compressed at step ``t`` with
    ``make_projection(projection, seed_for(b, i, t), rank, d, unbiased=True)`` where
    ``seed_for(b, i, t) = projection_seed(seed, b * 2**32 + i, t, COMMUNICATION_STREAM)``
    and ``(b, i)`` is the bucket and position where this process's hook first saw it (DDP
    assigns buckets identically on every replica; it rebuilds them after the first step,
    and a resumed process starts from the first layout again, so the first one keys every
    tensor: a resumed run draws the projections of the run that never stopped).
    """

    def __init__(self, rank: int | None, seed: int = 0, *, projection: str = "orthonormal",
                 proj_dim: str | int = "auto", max_aspect_ratio: float | None = None, process_group=None):
        check_positive_int("rank", rank, allow_none=True)
        check_seed("seed", seed)
        if projection not in HOOK_PROJECTIONS:
            biased = " ('coordinates' is biased)" if projection in PROJECTIONS else ""
            raise ValueError(f"projection must be one of {', '.join(map(repr, HOOK_PROJECTIONS))}; got "
                             f"{projection!r}{biased}")
        rank, seed, proj_dim, max_aspect_ratio = map(plain, (rank, seed, proj_dim, max_aspect_ratio))
        check_choice("proj_dim", proj_dim, PROJ_DIMS)
        check_real("max_aspect_ratio", max_aspect_ratio, low=1.0, allow_none=True)
        check_process_group(process_group)
        self.rank, self.seed, self.projection = rank, seed, projection
        self.proj_dim, self.max_aspect_ratio, self.process_group = proj_dim, max_aspect_ratio, process_group
        self.step = 0
        self._checked = False  # the replicas' options are compared on the first step hooked
        # parameter -> (bucket index, position) where this process's hook first saw it:
        # DDP's first layout, the same in a resumed process (DDP rebuilds its buckets after
        # the first step, so keying by the current layout would change every projection at
        # a resume). By id(), each entry with a weak reference that confirms it: a state reused
        # for a new model (a sweep, an in-process resume) had found its parameters under the ids
        # of the old one's, freed and reused differently on each replica, whose projections
        # then differed (a probe)
        self._keys: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}

    def key(self, p: torch.Tensor, bucket_index: int, position: int) -> tuple[int, int]:
        """``(bucket, position)`` where this process's hook first saw ``p`` (given now if it
        has not seen it: this bucket and position)."""
        hit = self._keys.get(id(p))
        if hit is None or hit[0]() is not p:  # new, or another tensor at a freed id
            hit = self._keys[id(p)] = (weakref.ref(p), (bucket_index, position))
        return hit[1]

    def __getstate__(self) -> dict:
        # the keys name this process's tensors (a new process keys them afresh, by DDP's first
        # layout, as the run that saved did); a process group does not pickle (torch's
        # PowerSGD state leaves it out too, and says so)
        if self.process_group is not None:
            warn("ProjectionState: pickled, its process_group is left out (it does not pickle): set "
                 "state.process_group again after loading it", UserWarning)
        return {**self.__dict__, "_keys": {}, "process_group": None, "_checked": False}

    def __copy__(self) -> "ProjectionState":
        # a copy serves another DDP model in this process: the same group, its own keys
        new = ProjectionState.__new__(ProjectionState)
        new.__dict__.update({**self.__dict__, "_keys": {}, "_checked": False})
        return new

    def __deepcopy__(self, memo) -> "ProjectionState":
        return self.__copy__()  # every field is a plain value but the group, held by reference

    def dim(self, shape) -> int | None:
        """The projected dimension of a tensor of ``shape``, or None when it is sent dense."""
        return compressed_dim(tuple(shape), self.rank, proj_dim=self.proj_dim,
                              max_aspect_ratio=self.max_aspect_ratio)

    def wire_numel(self, shape) -> int:
        """Numbers the hook sends for a tensor of ``shape``: ``rank x`` the kept dimension
        when compressed, every element otherwise."""
        d = self.dim(shape)
        if d is None:
            return int(torch.Size(shape).numel())
        a, b = compressed_shape(tuple(shape), self.rank, d)
        return a * b

    def seed_for(self, bucket_index: int, position: int, step: int) -> int:
        """Seed of the projection of tensor ``position`` of bucket ``bucket_index`` at ``step``."""
        return projection_seed(self.seed, (int(bucket_index) << 32) + int(position), step, COMMUNICATION_STREAM)

    def state_dict(self) -> dict[str, int | float]:
        """Plain numbers: ``rank`` (0 for None), ``seed``, ``projection`` (its index in
        ``HOOK_PROJECTIONS``), ``proj_dim`` (its index in ``PROJ_DIMS``), ``max_aspect_ratio``
        (0.0 for None) and ``step``."""
        return {"rank": self.rank or 0, "seed": self.seed, "projection": HOOK_PROJECTIONS.index(self.projection),
                "proj_dim": PROJ_DIMS.index(self.proj_dim), "max_aspect_ratio": float(self.max_aspect_ratio or 0.0),
                "step": self.step}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore ``step``; ``rank``, ``seed``, ``projection``, ``proj_dim`` and
        ``max_aspect_ratio`` must match this state's (checked before anything changes; the
        last two are absent from a state_dict saved before 2026-12-06, which is not checked
        for them). Call it on every replica (each process loads the
        checkpoint): the replicas are compared again on the next step, by a collective that
        every replica joins, so one replica loading alone leaves the others' collectives
        unmatched (gloo aborts with a size mismatch; NCCL may hang)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict (ProjectionState.state_dict()), got "
                            f"{type(state_dict).__name__}")
        mine = self.state_dict()
        for key in ("rank", "seed", "projection", "step"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r}: not a ProjectionState's state_dict")
        # said as the constructor takes them (the state_dict's codes had been shown: rank=0,
        # projection=1; a probe)
        shown = {"rank": lambda v: v or None, "seed": lambda v: v,
                 "projection": lambda v: HOOK_PROJECTIONS[v] if v < len(HOOK_PROJECTIONS) else v}
        for key in ("rank", "seed", "projection"):
            check_nonneg_int(f"state_dict[{key!r}]", state_dict[key])
            if int(state_dict[key]) != mine[key]:
                raise ValueError(f"state_dict has {key}={shown[key](int(state_dict[key]))!r} but this "
                                 f"ProjectionState has {key}={getattr(self, key)!r}; build it with the same {key}")
        # how tensors are compressed (a resumed run compressing other tensors, or along
        # another dimension, had gone unnoticed: every replica loads the same checkpoint)
        if "proj_dim" in state_dict:
            d = plain(state_dict["proj_dim"])  # (numpy's int64, as the other fields take it)
            check_choice("state_dict['proj_dim']", d, range(len(PROJ_DIMS)))
            if PROJ_DIMS[d] != self.proj_dim:
                raise ValueError(f"state_dict has proj_dim={PROJ_DIMS[d]!r} but this ProjectionState has "
                                 f"proj_dim={self.proj_dim!r}; build it with the same proj_dim")
        if "max_aspect_ratio" in state_dict:
            r = state_dict["max_aspect_ratio"]
            check_real("state_dict['max_aspect_ratio']", r, low=0.0)
            if (r or None) != self.max_aspect_ratio:
                raise ValueError(f"state_dict has max_aspect_ratio={r or None!r} but this ProjectionState has "
                                 f"max_aspect_ratio={self.max_aspect_ratio!r}; build it with the same "
                                 "max_aspect_ratio")
        step = state_dict.get("step")
        check_nonneg_int("state_dict['step']", step)
        if step >= COUNTER_LIMIT:
            raise ValueError(f"state_dict['step'] must be below 2**63, got {step}: the state_dict is damaged")
        self.step = int(step)
        self._checked = False

    def __repr__(self) -> str:
        return (f"ProjectionState(rank={self.rank}, seed={self.seed}, projection={self.projection!r}, "
                f"proj_dim={self.proj_dim!r}, max_aspect_ratio={self.max_aspect_ratio}, step={self.step})")


def _check_state(state: ProjectionState, device, group) -> None:
    check_agreement("flora.distributed.projection_hook", {
        "rank": state.rank, "seed": state.seed, "projection": state.projection, "proj_dim": state.proj_dim,
        "max_aspect_ratio": state.max_aspect_ratio, "step": state.step}, device=device, group=group)
    state._checked = True


@torch.no_grad()
def projection_hook(state: ProjectionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: one all-reduce per bucket of the compressed matrices and the
    dense rest, packed; the result is the mean over replicas of the decompressed estimate.

    Register with ``ddp_model.register_comm_hook(state, projection_hook)``. On the first
    step (and the first after ``state.load_state_dict``) the replicas' options and step
    counters are compared with one extra small all-reduce; replicas that disagree raise
    ``ValueError`` naming the options."""
    if not isinstance(state, ProjectionState):
        raise TypeError(f"projection_hook's state must be a flora.distributed.ProjectionState, got "
                        f"{type(state).__name__}")
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    if not state._checked:
        _check_state(state, buffer.device, group)
    step, index = state.step, bucket.index()
    if bucket.is_last():
        state.step += 1

    params = bucket.parameters()
    keys = [state.key(p, index, i) for i, p in enumerate(params)]
    dims = [state.dim(p.shape) for p in params]
    if buffer.is_sparse or any(p.is_complex() for p in params) or all(d is None for d in dims):
        # nothing to compress, a sparse bucket (nn.Embedding(sparse=True); DDP gives it no
        # gradients() to compress) or a complex one (DDP buckets complex parameters apart, its
        # buffer their real view, twice as long, where gradients() shows real tensors of the
        # complex shapes: compressing those had parted the replicas, a review): as DDP sends it
        buffer.mul_(1 / world)
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    grads = bucket_gradients(bucket)  # as DDP lays them out: gradients() shows a channels_last one permuted
    pieces, plan = [], []
    for i, (g, d) in enumerate(zip(grads, dims)):
        if d is None:
            pieces.append(g.reshape(-1))
            plan.append((g, None, None))
        else:
            sd = state_dtype(g.dtype)
            a = make_projection(state.projection, state.seed_for(*keys[i], step), state.rank,
                                matrix_shape(g.shape)[d], device=g.device, dtype=sd, unbiased=True)
            pieces.append(compress(g.to(sd), a, d).reshape(-1))
            plan.append((g, a, d))
    # The wire dtype is the bucket's: float32 buckets send float32, bf16 buckets bf16.
    flat = torch.cat([t.to(buffer.dtype) for t in pieces])
    # the mean, scaled first as DDP's reducer does, by 1 / world (x / 3 and x * (1 / 3) differ in
    # the last bit: rank=None had been 2e-7 off plain DDP on 3 processes, a probe)
    flat.mul_(1 / world)
    fut = dist.all_reduce(flat, group=group, async_op=True).get_future()
    threads = torch.get_num_threads()

    def unpack(f: torch.futures.Future) -> torch.Tensor:
        out = f.value()[0]
        if out.device.type == "cpu" and torch.get_num_threads() != threads:
            # gloo may run this on its own thread, whose OpenMP thread count is not the
            # caller's (torch.set_num_threads sets the calling thread's): the estimate's
            # matmul would round otherwise on that replica, and the replicas would part
            torch.set_num_threads(threads)
        offset = 0
        with torch.no_grad():
            for g, a, d in plan:
                if d is None:
                    n = g.numel()
                    g.copy_(out[offset:offset + n].view_as(g))
                else:
                    shape = compressed_shape(g.shape, a.shape[0], d)
                    n = shape[0] * shape[1]
                    write_estimate_(g, out[offset:offset + n].view(shape).to(a.dtype), a, d, add=False)
                offset += n
        return buffer

    return fut.then(unpack)


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives that run while it is active: ``calls`` lists ``(op, numel,
    bytes)``, e.g. ``("allreduce", 1024, 4096)``; ``count(op)`` and ``bytes(op)`` sum them
    (op None: every collective).

    Two taps, so that nothing is missed and nothing counted twice: as a dispatch mode it
    sees every collective that this thread launches, DDP's C++ reducer included; and
    ``torch.distributed.all_reduce`` is wrapped while it is active, which also sees the
    all-reduces that hooks launch from a future's callback on another thread (PowerSGD
    launches two of its three that way). A test and benchmark tool: the wrapper is global
    while any counter is active, and every operator of this thread passes through Python."""

    _local = threading.local()  # inside a wrapped call: the dispatch mode must not count it again

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []
        self._saved = None

    def _record(self, op: str, tensors) -> None:
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.calls.append((op, sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = getattr(func, "namespace", "")
        if ns in ("c10d", "_c10d_functional") and not getattr(self._local, "inside", False):
            op = func._schema.name.split("::")[-1].rstrip("_").replace("all_reduce", "allreduce")
            self._record(op, args[0] if args and isinstance(args[0], (list, tuple)) else args[:1])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = dist.all_reduce
        counter = self

        def all_reduce(tensor, *args, **kwargs):
            counter._record("allreduce", [tensor])
            local = CollectiveCounter._local
            outer, local.inside = getattr(local, "inside", False), True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                local.inside = outer

        self._saved = original
        dist.all_reduce = all_reduce
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            dist.all_reduce = self._saved

    def count(self, op: str | None = "allreduce") -> int:
        return sum(1 for o, _, _ in self.calls if op is None or o == op)

    def bytes(self, op: str | None = "allreduce") -> int:
        return sum(b for o, _, b in self.calls if op is None or o == op)

    def clear(self) -> None:
        self.calls.clear()
