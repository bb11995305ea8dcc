"""A compiled bucket's state held as one stacked tensor (``Flora(compile=...)``).

A compiled core takes a bucket's state as graph inputs. Handed a list of ``k`` tensors,
inductor writes a loop to stack each and another to write each back: on SmolLM2's shapes
(buckets of 30) 180 of the 189 loops of a staged update graph, and most of the cold
compile's time (docs/compile.md, sixth pass). Held as the rows of one ``k x ...``
tensor, a bucket's state is one input and one loop.
"""

from __future__ import annotations

import operator

import torch


class StateStacks:
    """The state entries of compiled buckets kept as views of one stacked tensor per
    bucket and key: ``state[p][key]`` is row ``i`` of the stack, its value unchanged, so
    that checkpoints, ``state_dict`` and every reader see what they saw. The stack is made
    (one copy) when a bucket's entries are not the views it made last: at the first
    compiled step, after ``load_state_dict`` or an edit of the state, or when a bucket's
    members change. Not state: rebuilt empty after a deep copy, a pickle and
    ``load_state_dict``.

    A view keeps its whole stack alive: ``torch.save`` of one state tensor writes its
    bucket's (a whole ``state_dict`` writes each stack once). So when a bucket's members
    change (parameters that step on some steps only), the stacks its new members were
    rows of are dissolved: members that left get copies of their rows, and no stack is
    kept that the optimizer no longer uses. The copies are made once the step's cores have
    run (:meth:`settle`, from ``Flora._apply``; at the next step's start when the step is
    traced into the caller's graph), not while the step is prepared: a bucket prepared
    earlier in the same step may hold a leaving member's row, and its core writes that
    step's update there (a copy made at once lost it: found by a new-user probe). A stack
    of which a state was dropped (``opt.state.pop(p)``, a resized parameter) is dissolved
    at the next step, as is one of which a state was replaced (``opt.state[new] = ...;
    opt.state.pop(old)``: adapters swapped; before 2026-12-04 such stacks were kept, one
    state's worth a swap, a probe)."""

    def __init__(self) -> None:
        # (id of the first state, key) -> (stack, its row views as written into the states,
        # the states, the rows' data pointers: a view given other memory by .data = or set_()
        # is the same object, and must not be read from the stack)
        self._d: dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor], list[dict], list[int]]] = {}
        self._member: dict[tuple[int, str], tuple[int, str]] = {}  # (id(state), key) -> its stack's key
        self._leaving: list[tuple[dict, str, torch.Tensor]] = []  # (state, key, its row): copied by settle()
        self.made = False  # a stack made since the last settle(live): stacks it replaced may be left to dissolve

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        self.made = False
        self._d.clear()
        self._member.clear()
        self._leaving.clear()

    def settle(self, live: dict | None = None) -> None:
        """When no prepared core is left to run (after a step's cores, or at a step's start):
        members that left a stack get a copy of their row (the step's update is in it), and, given the
        optimizer's ``state`` (``live``), stacks holding a state no longer in it are
        dissolved the same way."""
        if live is not None:
            self.made = False
        if live is not None and self._d:
            ids = {id(st) for st in live.values()}
            for ck in [ck for ck, (_, _, states, _) in self._d.items() if any(id(st) not in ids for st in states)]:
                if ck in self._d:  # states no longer the optimizer's get no copy
                    self._dissolve(ck, [st for st in self._d[ck][2] if id(st) not in ids])
        for st, key, v in self._leaving:
            if st.get(key) is v:
                st[key] = v.clone()
        self._leaving.clear()

    def _dissolve(self, ck: tuple[int, str], keep: list[dict]) -> None:
        """Drop stack ``ck``: its members not in ``keep`` that still hold their row get a
        copy of it at :meth:`settle` (``keep`` is about to get rows of a new stack)."""
        _, views, states, _ = self._d.pop(ck)
        key = ck[1]
        for st, v in zip(states, views):
            if self._member.get((id(st), key)) == ck:
                del self._member[(id(st), key)]
            if not any(st is s for s in keep) and st.get(key) is v:
                self._leaving.append((st, key, v))

    def stacked(self, states: list[dict], key: str) -> torch.Tensor:
        """``states[i][key]`` as rows of one tensor (made, and written into the states as
        views, unless they already are its rows)."""
        ts = [st[key] for st in states]
        ck = (id(states[0]), key)
        hit = self._d.get(ck)
        # identity, not id(): a stale entry can only match tensors that are its own views; and
        # their memory still the stack's (an optimizer_to(opt, device) snippet sets .data: a probe
        # found the compiled step then reading the old stack, and the state no longer updated)
        if (hit is not None and len(hit[1]) == len(ts) and all(map(operator.is_, hit[1], ts))
                and all(map(operator.eq, map(torch.Tensor.data_ptr, ts), hit[3]))):
            return hit[0]
        stack = torch.stack(ts)  # before any dissolving: ts may be rows of the stacks dropped
        old = {self._member.get((id(st), key)) for st in states} | {ck}
        for o in old:
            if o in self._d:
                self._dissolve(o, states)
        views = list(stack.unbind(0))
        for st, v in zip(states, views):
            st[key] = v
            self._member[(id(st), key)] = ck
        self._d[ck] = (stack, views, list(states), [v.data_ptr() for v in views])
        self.made = True
        return stack


def first(xs) -> torch.Tensor:
    """A tensor with the dtype and device of a bucket's state: the stack itself (indexing
    it would dispatch an operation on every step), or a list's first."""
    return xs if isinstance(xs, torch.Tensor) else xs[0]


def stack(xs) -> torch.Tensor:
    """A bucket's state inside a core: its stack (:class:`StateStacks`) as it is, or a
    list of tensors stacked (a copy)."""
    return xs if isinstance(xs, torch.Tensor) else torch.stack(xs)


def write_back(targets, new: torch.Tensor) -> None:
    """``new`` (a stacked state) into the bucket's own tensors: a stack, or a list."""
    if isinstance(targets, torch.Tensor):
        if targets is not new:
            targets.copy_(new)
    else:
        torch._foreach_copy_(targets, list(new.unbind(0)))


__all__ = ["StateStacks", "first", "stack", "write_back"]
