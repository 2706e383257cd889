"""Property test: random sequences of add / remove / activate / deactivate / pin / unpin / batch
operations against a plain-Python model of the manager's LRU rules.

After every operation the manager and the model agree on slots, LRU order, disk tier and pins
(or both refuse with the same error type), the state's invariants and device contents hold, and
the previous state is unchanged (``donate=False``), or consumed exactly when the device was
written (``donate=True``).
"""

from __future__ import annotations

import copy

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_manager import (
    MemoryDisk,
    assert_unchanged,
    check_invariants,
    make_adapter,
    snapshot,
    toy_state,
)

from jlora import manager as M
from jlora.errors import CapacityError, LoRAError, UnknownAdapterError

NUM_IDS = 6
MODULES = ("attn.q", "attn.k", "mlp.down", "embed")


def pool() -> MemoryDisk:
    """Adapters 1..6 with ranks 1..4 and different module subsets, all reachable on 'disk'."""
    models = {}
    for i in range(1, NUM_IDS + 1):
        mods = tuple(m for k, m in enumerate(MODULES) if (i >> k) & 1 or k == i % 4)
        models[i] = make_adapter(i, rank=1 + i % 4, modules=mods, path=f"/mem/{i}")
    return MemoryDisk(models)


class LRUModel:
    """The manager's rules, written plainly: lists and sets, no device."""

    def __init__(self, max_loras: int, max_cpu_loras: int):
        self.capacity = max_cpu_loras
        self.slots = [0] * (max_loras + 1)
        self.cache: list[int] = []  # least recently used first
        self.disk: set[int] = set()
        self.pinned: set[int] = set()

    def known(self, i):
        return i in self.cache or i in self.disk

    def _require(self, i):
        if not self.known(i):
            raise UnknownAdapterError(i)

    def _free(self, i):
        if i in self.slots[1:]:
            self.slots[self.slots.index(i, 1)] = 0
        self.pinned.discard(i)

    def _insert(self, i, protect):
        if len(self.cache) >= self.capacity:
            victims = [a for a in self.cache if a not in self.pinned and a not in protect]
            if not victims:
                raise CapacityError("host")
            self._free(victims[0])
            self.cache.remove(victims[0])
        self.cache.append(i)

    def _activate(self, i, protect):
        self._require(i)
        if i not in self.cache:
            self._insert(i, protect)
        self.cache.remove(i)
        self.cache.append(i)
        if i in self.slots[1:]:
            return
        if 0 in self.slots[1:]:
            slot = self.slots.index(0, 1)
        else:
            victims = [
                a
                for a in self.cache
                if a in self.slots[1:] and a not in self.pinned and a not in protect
            ]
            if not victims:
                raise CapacityError("device")
            slot = self.slots.index(victims[0], 1)
        self.slots[slot] = i

    def _register(self, i, by_request):
        # A request is remembered even for an adapter cached from a model of the same path, so
        # that it can be reloaded after an eviction.
        if by_request:
            self.disk.add(i)

    # operations ------------------------------------------------------------------------------

    def add(self, i, by_request):
        if by_request:
            self.disk.add(i)
        if i in self.cache:  # the same adapter again: marked most recently used
            self.cache.remove(i)
            self.cache.append(i)
        else:
            self._insert(i, {i})

    def activate(self, i, by_request):
        self._register(i, by_request)
        self._activate(i, {i})

    def pin(self, i, by_request):
        self._register(i, by_request)
        self._activate(i, {i})
        self.pinned.add(i)

    def unpin(self, i, by_request):
        self._require(i)
        self.pinned.discard(i)

    def deactivate(self, i, by_request):
        self._require(i)
        self._free(i)

    def remove(self, i, by_request):
        self._require(i)
        self._free(i)
        if i in self.cache:
            self.cache.remove(i)
        self.disk.discard(i)

    def batch(self, entries, by_request):
        ids = [e for e in entries if e]
        for i in ids:
            if by_request:
                self._register(i, True)
            else:
                self._require(i)
        needed = list(dict.fromkeys(ids))
        if len(needed) > len(self.slots) - 1 - len(self.pinned - set(needed)):
            raise CapacityError("batch")
        for i in needed:
            self._activate(i, set(needed))


def run_manager(state, disk, op, arg, by_request, donate):
    def entry(i):
        return disk.request(i) if by_request else i

    if op == "add":
        return M.add_adapter(state, entry(arg) if by_request else disk.models[arg], donate=donate)
    if op == "batch":
        entries = [entry(i) if i else None for i in arg]
        return M.prepare_batch(state, entries, [1] * len(arg), donate=donate)[0]
    if op == "unpin":
        return M.unpin_adapter(state, arg)
    fn = {
        "activate": M.activate_adapter,
        "pin": M.pin_adapter,
        "deactivate": M.deactivate_adapter,
        "remove": M.remove_adapter,
    }[op]
    target = entry(arg) if op in ("activate", "pin") else arg
    return fn(state, target, donate=donate)


ids = st.integers(1, NUM_IDS)
batches = st.lists(st.integers(0, NUM_IDS), min_size=1, max_size=5)
ops = st.sampled_from(
    ["add", "activate", "pin", "unpin", "deactivate", "remove", "batch", "batch"]
).flatmap(lambda op: st.tuples(st.just(op), batches if op == "batch" else ids, st.booleans()))


@pytest.mark.parametrize("donate", [False, True], ids=["keep", "donate"])
@settings(max_examples=75, deadline=None)
@given(
    max_loras=st.integers(1, 3),
    extra_cpu=st.integers(0, 2),
    program=st.lists(ops, min_size=5, max_size=30),
)
def test_random_operations_follow_the_lru_model(donate, max_loras, extra_cpu, program):
    disk = pool()
    state = toy_state(max_loras=max_loras, max_cpu_loras=max_loras + extra_cpu, load_fn=disk)
    model = LRUModel(max_loras, max_loras + extra_cpu)
    for op, arg, by_request in program:
        before = copy.deepcopy(model)
        want_error = None
        try:
            getattr(model, op)(arg, by_request)
        except LoRAError as e:
            want_error = type(e)
            model = before  # operations are atomic
        snap = snapshot(state)
        old_leaves = jax.tree.leaves(state)
        if want_error is not None:
            with pytest.raises(want_error):
                run_manager(state, disk, op, arg, by_request, donate)
            assert_unchanged(state, snap)
            continue
        new = run_manager(state, disk, op, arg, by_request, donate)
        assert new.slots == tuple(model.slots), (op, arg)
        assert new.lru == tuple(model.cache), (op, arg)
        assert set(new.requests) == model.disk and new.pinned == model.pinned
        check_invariants(new, disk.models)
        wrote = any(x is not y for x, y in zip(jax.tree.leaves(new), old_leaves, strict=True))
        if donate and wrote:
            assert state.is_donated
        else:
            assert_unchanged(state, snap)
        state = new
