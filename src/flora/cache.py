"""The projections a Flora keeps between steps (``cache_projections=True``): at most one
per parameter, whatever subset of parameters steps."""

from __future__ import annotations

import torch

from .projection import make_projections, projection_seed


def cache_projections(cache: "ProjectionCache", group: dict, indices: list[int], count: int, size: int,
                      device, dtype, *, stacked: bool) -> torch.Tensor:
    """Projection number ``count`` of the parameters at ``indices`` (a ``k x r x d``
    stack, or one ``r x d`` matrix), drawn together, or taken from the cache."""
    key = (group["projection"], group["seed"], group["rank"], count, size, dtype, torch.device(device))
    indices = list(indices)
    if not group["cache_projections"]:
        cache.discard(indices)
        seeds = [projection_seed(group["seed"], i, count) for i in indices]
        a = make_projections(group["projection"], seeds, group["rank"], size, device=device, dtype=dtype)
        return a if stacked else a[0]
    if stacked:
        a = cache.stack(indices, key)  # the stack this bucket was drawn as: no copy
        if a is not None:
            return a
    found = [cache.get(i, key) for i in indices]
    missing = [i for i, a in zip(indices, found) if a is None]
    if missing:
        seeds = [projection_seed(group["seed"], i, count) for i in missing]
        drawn = make_projections(group["projection"], seeds, group["rank"], size, device=device, dtype=dtype)
        if len(missing) == len(indices):
            cache.put_stack(indices, key, drawn)
        else:  # a bucket that mixes cached and new projections: the new ones alone
            for i, a in zip(missing, drawn.unbind(0)):
                cache.put(i, key, a.clone())
        new = iter(drawn.unbind(0))
        found = [next(new) if a is None else a for a in found]
        if len(missing) == len(indices):
            return drawn if stacked else drawn[0]
    if not stacked:
        return found[0]
    # A bucket made of projections cached apart (parameters that step in changing
    # subsets, as experts of a mixture do): stacked for this step only.
    return found[0].unsqueeze(0) if len(found) == 1 else torch.stack(found)


class ProjectionCache:
    """Projections kept between steps: one entry per parameter index, ``index -> (key,
    r x d matrix or r indices)``, the key naming the draw (projection, seed, rank, count,
    size, dtype, device). A new key for an index replaces its entry, so the cache holds at
    most one projection per parameter whatever subset of parameters steps.

    A bucket drawn together is kept as one ``k x r x d`` stack whose slices are its
    members' entries, so that the grouped path gets the same stack back with no copy on
    every step until its next resample. When a member's entry is replaced or dropped, the
    stack is dissolved: the other members keep copies of their own slices, and the
    stack's memory is freed."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, torch.Tensor]] = {}
        self._stacks: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}
        self._member: dict[int, tuple[int, ...]] = {}  # index -> the stack it is a slice of

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        """``(index, key, projection)`` of every entry; ``key[3]`` is the projection's number."""
        return [(i, k, a) for i, (k, a) in self._entries.items()]

    def clear(self) -> None:
        self._entries.clear()
        self._stacks.clear()
        self._member.clear()

    def get(self, index: int, key: tuple) -> torch.Tensor | None:
        hit = self._entries.get(index)
        return hit[1] if hit is not None and hit[0] == key else None

    def stack(self, indices, key: tuple) -> torch.Tensor | None:
        hit = self._stacks.get(tuple(indices))
        return hit[1] if hit is not None and hit[0] == key else None

    def _release(self, index: int) -> None:
        """Detach ``index`` from the stack it is a slice of, dissolving that stack."""
        members = self._member.pop(index, None)
        if members is None:
            return
        del self._stacks[members]
        for j in dict.fromkeys(members):  # (one index twice: a ZeRO checkpoint's, loaded into one process)
            if j != index:
                del self._member[j]
                k, a = self._entries[j]
                self._entries[j] = (k, a.clone())

    def discard(self, indices) -> None:
        for i in indices:
            self._release(i)
            self._entries.pop(i, None)

    def put(self, index: int, key: tuple, a: torch.Tensor) -> None:
        self._release(index)
        self._entries[index] = (key, a)

    def put_stack(self, indices, key: tuple, stack: torch.Tensor) -> None:
        indices = tuple(indices)
        if self._stacks.pop(indices, None) is not None:  # the same bucket's previous draw: nothing to copy
            for i in dict.fromkeys(indices):  # (one index twice: see _release)
                del self._member[i]
        for i in indices:
            self._release(i)
        for i, a in zip(indices, stack.unbind(0)):
            self._entries[i] = (key, a)
            self._member[i] = indices
        self._stacks[indices] = (key, stack)

    def nbytes(self) -> int:
        """Bytes of the distinct storages the entries keep alive."""
        seen: dict[tuple, int] = {}
        for _, a in self._entries.values():
            if a.device.type == "meta":  # no addresses (all 0): each its own, as flora.state_bytes counts them
                seen[("meta", id(a))] = a.numel() * a.element_size()
                continue
            s = a.untyped_storage()
            seen[(a.device, s.data_ptr())] = s.nbytes()
        return sum(seen.values())
