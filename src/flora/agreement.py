"""One collective that refuses processes whose options disagree: every process of a group
(a DDP model's, a DTensor parameter's device mesh) must step, compress and project alike,
or their sums mean nothing and the replicas drift apart. Used by Flora under FSDP2 and
HSDP (``flora.sharded``), by the accumulator across replicas (``reduce=True``) and under
FSDP2, and by ``flora.distributed``'s hook."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import torch

__all__ = ["check_agreement", "check_on_meshes", "mesh_groups", "mesh_device"]

_MASK64 = (1 << 64) - 1
_SMALL = 1 << 24  # integers said as a range when processes disagree


def _encode(value) -> tuple[int, int]:
    """An option as (kind, a 64-bit integer): a value of another type by a checksum of its
    repr. The kind keeps values of different kinds apart whose 64 bits agree (None and -1,
    -1 and 2**64 - 1, 0 and 2**64 had passed as equal: a probe)."""
    if value is None:
        return 0, 0
    if isinstance(value, bool):
        return 1, int(value)  # True and 1 behave alike: agree
    if isinstance(value, float) and value.is_integer():  # 2.0 and 2 behave alike: agree
        value = int(value)
    elif isinstance(value, float):
        return 2, struct.unpack("<Q", struct.pack("<d", value))[0]
    if isinstance(value, str):  # the whole string (its first 8 characters had been all: probe Z71)
        return 3, (len(value) << 32) | zlib.crc32(value.encode())
    if isinstance(value, int) and 0 <= value <= _MASK64:
        return 1, value
    if isinstance(value, int) and -(1 << 63) <= value < 0:
        return 4, value & _MASK64
    return 5, zlib.crc32(repr(value).encode())


def check_agreement(what: str, fields: dict[str, Any], *, device, group=None, groups=None,
                    among: str = "replicas", why: str | None = None) -> None:
    """Refuse processes that disagree on ``fields`` (name -> value), with one all-reduce per
    group (MAX of each value and its negation, in 32-bit halves, so that the largest and
    smallest value arrive together; over ``groups`` in turn, the extremes over all of
    them: a device mesh's dimensions). Raises ``ValueError`` naming every field that
    differs (with its range, for a small non-negative integer), on every process alike
    (none is left waiting). ``among``: what the processes are called in the message;
    ``why``: its end."""
    import torch.distributed as dist

    names = list(fields)
    halves = []  # per field: its kind and its value in 32-bit halves
    for name in names:
        kind, v = _encode(fields[name])
        halves += [kind, v >> 32, v & 0xFFFFFFFF]
    t = torch.tensor(halves + [-h for h in halves], dtype=torch.int64, device=device)
    for g in (groups if groups is not None else [group]):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g)
    hi, lo = t[:len(halves)].tolist(), [-x for x in t[len(halves):].tolist()]
    bad = [i for i in range(len(names)) if hi[3 * i:3 * i + 3] != lo[3 * i:3 * i + 3]]
    if not bad:
        return

    def said(i: int) -> str:
        v = fields[names[i]]
        # a range only where every value is a small non-negative integer, by its kind (another
        # process's string, such as proj_dim "auto" beside 1, is a large number here: said as
        # a number, it misled), on every process alike (6.0 beside 4 had been said on one only)
        span = (f"from {lo[3 * i + 2]} to {hi[3 * i + 2]}; "
                if hi[3 * i] == lo[3 * i] == 1 and hi[3 * i + 1] == lo[3 * i + 1] == 0 and hi[3 * i + 2] < _SMALL
                else "")
        return f"{names[i]} ({span}this process: {v!r})"

    why = why or ("every replica must be built with the same options (and load the same state_dict) or their "
                  "compressed buffers cannot be summed")
    raise ValueError(f"{what}: the {among} disagree on {', '.join(said(i) for i in bad)}; {why}")


def mesh_groups(mesh) -> list:
    """The process groups of a device mesh's dimensions (all its processes, in turn)."""
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def mesh_device(mesh) -> torch.device:
    """Where a collective over ``mesh`` puts its tensor."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def check_on_meshes(what: str, fields: dict[str, Any], tensors, *, why: str, checked: set | None = None) -> None:
    """:func:`check_agreement` over every process of each distinct device mesh of the
    DTensors among ``tensors`` (FSDP2's shard group; HSDP's replicas too), once per mesh
    not in ``checked`` (its process groups' ids, added there once it passes: each
    ``fully_shard`` call makes a mesh object of its own over the same groups)."""
    from torch.distributed.tensor import DTensor

    meshes = {}
    for t in tensors:
        if isinstance(t, DTensor):
            mesh = t.device_mesh
            meshes.setdefault(tuple(map(id, mesh_groups(mesh))), mesh)
    for key, mesh in meshes.items():
        if checked is not None and key in checked:
            continue
        check_agreement(f"{what} on a device mesh of {mesh.size()} processes", fields, device=mesh_device(mesh),
                        groups=mesh_groups(mesh), among="processes", why=why)
        if checked is not None:
            checked.add(key)
