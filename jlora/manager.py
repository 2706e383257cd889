"""The adapter manager: device slot banks, a host LRU cache of converted adapters and a disk tier,
held in one functional state value. Every operation returns a new state; none retraces a jitted
forward, because only the fixed-shape banks ever enter one.

State. ``AdapterManagerState`` holds, per ``TargetModule``, a tuple of ``LoRABank`` (one per
output slice): ``a [max_loras+1, in, max_lora_rank]``, ``b [max_loras+1, max_lora_rank, out_i]``,
``scale float32 [max_loras+1]``; slot 0 is all zeros (the base model). Beside the banks it keeps
host bookkeeping in immutable containers (tuples, frozensets, ``MappingProxyType``):
``slots`` (slot -> adapter id, 0 = free), ``cache`` (id -> converted ``LoRAModel``, at most
``max_cpu_loras``), ``requests`` (id -> ``LoRARequest``: the disk tier), ``lru`` (cached ids,
least recently used first) and ``pinned``. No operation mutates an input state's bookkeeping.

Bookkeeping stays out of jit cache keys. Jitted forwards take ``state.banks`` (a plain dict,
target name -> tuple of banks), never the state. The state is a pytree whose only leaves are the
bank arrays (so ``jax.tree.leaves``, ``jax.device_put``, ``jax.block_until_ready`` work on it),
but it refuses to be rebuilt from tracers: passing it into ``jax.jit``/``vmap``/``scan`` raises
at trace time instead of silently keying a compile on the slot table.

Donation. Device writes go through two jitted functions, each compiled once per bank layout:
``_write_slot`` copies one adapter into one slot (all its banks in one dispatch; the slot index is
a traced int32, so slot 3 and slot 5 share a program) and ``_clear_slots`` zeroes the scales of
freed slots. By default (``donate=True``) both donate the input banks, so a swap updates the
slot in place instead of copying GBs of banks: the input state's device arrays are then consumed,
like any donated JAX buffer, and using that old state again raises ``DonatedStateError``. Pass
``donate=False`` to keep old states usable (each write then copies the banks). An operation that
writes nothing (a cache hit, an already active adapter) returns a state sharing the input's
arrays. On CPU with jax 0.10.2 donation works (the buffers are reused in place, no "donated
buffers were not usable" warning) because every donated bank has a same-shaped output.

Failures. Every check, every disk load and the batch mapping happen on the host before the first
device write, so an operation that raises a ``LoRAError`` has donated nothing and its input state
is exactly as it was.

Freed slots. Deactivating or evicting an adapter zeroes only its slot's ``scale`` (the A/B rows
stay until the slot is reused, when every bank of the slot is overwritten, zeros for the modules
the new adapter does not target): a stale mapping into a freed slot serves the base model.

LRU rules (one recency order over cached adapters; ``add``, ``activate``, ``pin`` and
``prepare_batch`` mark an adapter most recently used):
- Host cache full on insert: evict the least recently used adapter that is not pinned and not
  needed by the operation; if it held a slot, the slot is freed. An evicted adapter registered
  by a ``LoRARequest`` stays known and is reloaded from its path on demand; one added as a bare
  ``LoRAModel`` is forgotten.
- No free slot on activate: evict the least recently used active adapter that is not pinned and
  not needed by the operation; free slots are taken lowest index first.
- Pinned adapters hold a slot and their cache entry until unpinned; ``deactivate_adapter`` and
  ``remove_adapter`` are explicit and drop the pin.

Disk tier identity. A request's path is made absolute when it is recorded. The first read of an
id's files stamps them (``sources``); a reload that finds other files raises
``AdapterMismatchError`` rather than serve other weights under the same id.

Imports jlora data-model modules; jlora.loader and jlora.checkpoint only lazily (disk tier).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import LORA_DTYPES, LoRAConfig, is_int
from jlora.errors import (
    AdapterMismatchError,
    AdapterWeightsError,
    CapacityError,
    DonatedStateError,
    LoRAConfigError,
    LoRAError,
    UnknownAdapterError,
)
from jlora.hostio import FLOAT_DTYPE_NAMES, count_nonfinite, is_frozen
from jlora.mapping import LoRAMapping
from jlora.request import LoRARequest
from jlora.targets import TargetModule, split_whole_layer
from jlora.weights import LoRABank, LoRALayerWeights, LoRAModel, PackedLoRALayerWeights, pad_to_rank

BASE_ID = 0  # adapter id and slot of the base model ("no adapter")

LoadFn = Callable[[LoRARequest, LoRAConfig, np.dtype], LoRAModel]
BatchEntry = LoRARequest | int | None


def load_from_disk(request: LoRARequest, config: LoRAConfig, dtype: np.dtype) -> LoRAModel:
    """The default disk tier: a ``jlora.save_adapter`` checkpoint is restored with orbax, any
    other directory is read as a PEFT adapter with ``jlora.loader.load_adapter``."""
    from jlora import checkpoint, loader

    # A checkpoint's item directory without its metadata is a broken checkpoint, not a PEFT
    # folder: restore_adapter says so.
    if os.path.isdir(os.path.join(request.path, checkpoint.META_ITEM)):
        model = checkpoint.restore_adapter(request.path)
    else:
        # No dtype: the loader keeps the stored one (or config.lora_dtype) and the manager's fit
        # check casts only when the bank dtype differs, so a matching adapter is never copied.
        model = loader.load_adapter(
            request.path, adapter_id=request.adapter_id, name=request.name, config=config
        )
    # The path read, not the one a checkpoint recorded: the request's path is this copy's.
    return model.replace(id=request.adapter_id, name=request.name, path=request.path)


@dataclasses.dataclass(frozen=True, eq=False)
class _Layout:
    """What never changes over a state's lineage: shared by every state derived from one
    ``init_state``."""

    config: LoRAConfig
    targets: tuple[TargetModule, ...]
    dtype: np.dtype
    load_fn: LoadFn
    index: Mapping[str, tuple[int, int]]  # PEFT module name -> (target index, slice index)
    by_name: Mapping[str, int]  # target name -> target index


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AdapterManagerState:
    """Device slot banks plus host bookkeeping; see the module docstring. Build with
    ``init_state``; change only through this module's functions, which return new states.

    Attributes:
      bank_list: per target (in ``targets`` order), one ``LoRABank`` per output slice.
      slots: ``[max_loras + 1]`` adapter id per slot; 0 = free (slot 0 is always the base).
      cache: adapter id -> converted ``LoRAModel`` (host numpy, bank dtype).
      requests: adapter id -> ``LoRARequest`` for adapters that can be reloaded from disk.
      lru: cached adapter ids, least recently used first.
      pinned: ids pinned into the host cache and a device slot.
      sources: adapter id -> stamp of the files it was first read from (``_source_stamp``;
        None for a custom ``load_fn``): a reload must find the same files.
    """

    bank_list: tuple[tuple[LoRABank, ...], ...]
    layout: _Layout
    slots: tuple[int, ...]
    cache: Mapping[int, LoRAModel]
    requests: Mapping[int, LoRARequest]
    lru: tuple[int, ...]
    pinned: frozenset[int]
    sources: Mapping[int, tuple | None]

    @property
    def banks(self) -> dict[str, tuple[LoRABank, ...]]:
        """Target name -> its slice banks: the pytree a jitted forward takes (a fresh dict)."""
        return {t.name: b for t, b in zip(self.layout.targets, self.bank_list, strict=True)}

    @property
    def config(self) -> LoRAConfig:
        return self.layout.config

    @property
    def targets(self) -> tuple[TargetModule, ...]:
        return self.layout.targets

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def active(self) -> Mapping[int, int]:
        """Adapter id -> slot, for every device-resident adapter."""
        return types.MappingProxyType({a: s for s, a in enumerate(self.slots) if a != BASE_ID})

    def slot_of(self, adapter_id: int) -> int | None:
        """The slot holding ``adapter_id``, or None when it is not on the device."""
        return self.active.get(adapter_id)

    def is_known(self, adapter_id: int) -> bool:
        return adapter_id in self.cache or adapter_id in self.requests

    @property
    def is_donated(self) -> bool:
        """True when this state's banks were donated to a later state (it is then unusable)."""
        return any(x.is_deleted() for x in jax.tree.leaves(self.bank_list))

    def __repr__(self) -> str:
        return (
            f"AdapterManagerState(targets={len(self.targets)}, slots={list(self.slots)}, "
            f"lru={list(self.lru)}, pinned={sorted(self.pinned)}, "
            f"disk={sorted(self.requests)}, dtype={self.dtype.name})"
        )


class _HostSide:
    """The pytree aux data of a state: compared by identity, never hashed by value."""

    __slots__ = ("fields",)

    def __init__(self, fields: tuple):
        self.fields = fields


def _flatten(state: AdapterManagerState):
    host = (
        state.layout,
        state.slots,
        state.cache,
        state.requests,
        state.lru,
        state.pinned,
        state.sources,
    )
    return (state.bank_list,), _HostSide(host)


def _unflatten(host: _HostSide, children) -> AdapterManagerState:
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(children)):
        raise TypeError(
            "AdapterManagerState cannot be an argument of jax.jit / vmap / scan: its host "
            "bookkeeping (slot table, LRU order) would become part of the compile key. Pass "
            "state.banks to the jitted function instead."
        )
    return AdapterManagerState(children[0], *host.fields)


jax.tree_util.register_pytree_node(AdapterManagerState, _flatten, _unflatten)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One known adapter, as ``list_adapters`` reports it."""

    id: int
    name: str
    path: str | None
    slot: int | None  # device slot, None when not active
    cached: bool  # converted copy in the host cache
    pinned: bool
    rank: int | None  # None when only on disk


# ---------------------------------------------------------------------------------------------
# Construction


def init_state(
    config: LoRAConfig,
    targets: Sequence[TargetModule],
    *,
    dtype: jnp.dtype | str | None = None,
    load_fn: LoadFn | None = None,
    shardings: Mapping[str, Sequence[LoRABank]] | None = None,
) -> AdapterManagerState:
    """An empty manager: zero banks for every target slice, no adapters.

    Args:
      config: ``max_loras`` slots (+ slot 0), ``max_lora_rank``, ``max_cpu_loras``, dtype.
      targets: the model's LoRA-able layers (``jlora.targets.TargetModule``).
      dtype: the base model's dtype, used when ``config.lora_dtype`` is "auto" (default float32).
      load_fn: disk tier ``(request, config, dtype) -> LoRAModel``; default ``load_from_disk``.
      shardings: target name -> one ``LoRABank`` of shardings per slice
        (``jlora.sharding.bank_shardings``): the banks are created on the mesh, each device
        allocating only its shard (on every process of a multi-host mesh); slot writes keep
        the layout.

    >>> from jlora.targets import TargetModule
    >>> t = TargetModule(name="q", in_dim=8, out_dims=(4,), peft_names=("layers.0.q_proj",))
    >>> s = init_state(LoRAConfig(max_loras=2, max_lora_rank=4), [t])
    >>> s.banks["q"][0].a.shape, s.slots
    ((3, 8, 4), (0, 0, 0))
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    targets = tuple(targets)
    index: dict[str, tuple[int, int]] = {}
    by_name: dict[str, int] = {}
    for i, t in enumerate(targets):
        if not isinstance(t, TargetModule):
            raise TypeError(f"targets must be TargetModules, got {type(t).__name__}")
        if t.name in by_name:
            raise AdapterMismatchError(f"target {t.name!r} is listed twice")
        by_name[t.name] = i
        for j, peft_name in enumerate(t.peft_names):
            if peft_name in index:
                other = targets[index[peft_name][0]].name
                raise AdapterMismatchError(
                    f"PEFT module {peft_name!r} is served by both {other!r} and {t.name!r}; "
                    "each PEFT module must map to exactly one target slice"
                )
            index[peft_name] = (i, j)
    bank_dtype = np.dtype(config.jnp_dtype(jnp.float32 if dtype is None else dtype))
    if bank_dtype.name not in LORA_DTYPES:  # e.g. "auto" from a quantized base's int8 / fp8
        raise LoRAConfigError(
            f"init_state: the slot banks would be {bank_dtype.name}, but LoRA weights are held "
            f"in one of {LORA_DTYPES[1:]}; pass dtype= the model's activation dtype or set "
            "LoRAConfig.lora_dtype"
        )
    num_slots = config.max_loras + 1
    if shardings is not None:
        _check_shardings(targets, shardings, num_slots, config.max_lora_rank)
    bank_list = tuple(
        tuple(
            LoRABank.zeros(
                num_slots,
                t.in_dim,
                out,
                config.max_lora_rank,
                bank_dtype,
                sharding=None if shardings is None else shardings[t.name][j],
            )
            for j, out in enumerate(t.out_dims)
        )
        for t in targets
    )
    layout = _Layout(
        config=config,
        targets=targets,
        dtype=bank_dtype,
        load_fn=load_fn or load_from_disk,
        index=types.MappingProxyType(index),
        by_name=types.MappingProxyType(by_name),
    )
    return AdapterManagerState(
        bank_list=bank_list,
        layout=layout,
        slots=(BASE_ID,) * num_slots,
        cache=types.MappingProxyType({}),
        requests=types.MappingProxyType({}),
        lru=(),
        pinned=frozenset(),
        sources=types.MappingProxyType({}),
    )


def _check_shardings(targets, shardings, num_slots: int, rank: int) -> None:
    """Every target has one ``LoRABank`` of ``jax.sharding.Sharding`` s per slice, each dividing
    its array: checked before any allocation, with the target named (JAX's errors name none)."""
    names = {t.name for t in targets}
    if set(shardings) != names:
        raise AdapterMismatchError(
            f"shardings are given for targets {sorted(shardings)}, the state has {sorted(names)}"
        )
    for t in targets:
        given = tuple(shardings[t.name])
        if len(given) != len(t.out_dims):
            raise AdapterMismatchError(
                f"target {t.name!r} has {len(t.out_dims)} slices {t.peft_names} but "
                f"{len(given)} bank shardings; build them with jlora.sharding.bank_shardings"
            )
        for bank, out, peft_name in zip(given, t.out_dims, t.peft_names, strict=True):
            shapes = {
                "a": (num_slots, t.in_dim, rank),
                "b": (num_slots, rank, out),
                "scale": (num_slots,),
            }
            for field, shape in shapes.items():
                sharding = getattr(bank, field, None)
                if not isinstance(sharding, jax.sharding.Sharding):
                    raise LoRAConfigError(
                        f"{peft_name}: bank sharding {field!r} is {type(sharding).__name__}, not "
                        "a jax.sharding.Sharding (jlora.sharding.bank_shardings gives them; "
                        "bank_specs gives PartitionSpecs)"
                    )
                try:
                    sharding.shard_shape(shape)
                except ValueError as e:
                    raise LoRAConfigError(
                        f"{peft_name} LoRA {field} {shape} does not divide over its sharding "
                        f"({e}); fully sharded LoRA splits the rank: make "
                        "LoRAConfig.max_lora_rank a multiple of the model axis size"
                    ) from None


# ---------------------------------------------------------------------------------------------
# Public operations: each returns a new state and leaves its input as it was (bookkeeping
# always; device arrays too unless donate=True and the operation wrote to the device).


def add_adapter(
    state: AdapterManagerState, adapter: LoRAModel | LoRARequest, *, donate: bool = True
) -> AdapterManagerState:
    """Registers an adapter in the host cache (most recently used); does not activate it.

    A ``LoRARequest`` is loaded through the disk tier and stays reloadable after eviction; a
    ``LoRAModel`` is checked and converted to the bank dtype. A full cache evicts its least
    recently used unpinned adapter (freeing its slot, a device write). Re-adding the same
    adapter is a no-op; the same id with other weights, name or path raises
    ``AdapterMismatchError``; an adapter that does not fit the model's targets raises it too.
    """
    plan = _Plan(state)
    plan.register(adapter)
    return plan.commit(donate)


def add_adapters(
    state: AdapterManagerState,
    adapters: Sequence[LoRAModel | LoRARequest],
    *,
    donate: bool = True,
) -> AdapterManagerState:
    """``add_adapter`` for each of ``adapters`` in order, as one operation: if any of them
    fails, none is added and the input state is unchanged. Later ones may evict earlier ones
    from a full host cache (a ``LoRARequest`` stays reloadable)."""
    if isinstance(adapters, LoRAModel | LoRARequest):  # a LoRAModel iterates as a Mapping
        raise TypeError("add_adapters takes a list of adapters; use add_adapter for one")
    plan = _Plan(state)
    for adapter in adapters:
        plan.register(adapter)
    return plan.commit(donate)


def check_requests(state: AdapterManagerState, requests: Sequence[LoRARequest]) -> None:
    """Raises ``AdapterMismatchError`` if a request's id is registered for another adapter (name
    or path), or two of ``requests`` give one id to different adapters. Loads nothing and
    changes nothing: a serving loop calls it before it serves any of them."""
    plan = _Plan(state)
    for request in requests:
        if not isinstance(request, LoRARequest):
            raise TypeError(f"check_requests takes LoRARequests, got {type(request)}")
        if plan.is_known(request.adapter_id):
            plan._check_same_request(request)
        else:
            plan.requests[request.adapter_id] = request  # later duplicates must match it


def remove_adapter(
    state: AdapterManagerState, adapter_id: int, *, donate: bool = True
) -> AdapterManagerState:
    """Forgets an adapter: host cache, disk tier and pin; an active one's slot is freed."""
    plan = _Plan(state)
    plan.require_known(adapter_id)
    plan.forget(adapter_id)
    return plan.commit(donate)


def activate_adapter(
    state: AdapterManagerState, adapter: int | LoRARequest, *, donate: bool = True
) -> AdapterManagerState:
    """Puts an adapter in a device slot (a no-op write if it already has one).

    An unknown ``LoRARequest`` is added first; an adapter evicted from the host cache is
    reloaded from disk. With no free slot, the least recently used unpinned active adapter is
    evicted from the device; when every slot is pinned, ``CapacityError``.
    """
    plan = _Plan(state)
    adapter_id = plan.resolve(_one_adapter(adapter))
    plan.activate(adapter_id, protect=frozenset({adapter_id}))
    return plan.commit(donate)


def deactivate_adapter(
    state: AdapterManagerState, adapter_id: int, *, donate: bool = True
) -> AdapterManagerState:
    """Frees an adapter's slot (and drops its pin); it stays in the host cache. No-op when it is
    not active."""
    plan = _Plan(state)
    plan.require_known(adapter_id)
    plan.free_slot(adapter_id)
    return plan.commit(donate)


def pin_adapter(
    state: AdapterManagerState, adapter: int | LoRARequest, *, donate: bool = True
) -> AdapterManagerState:
    """Activates an adapter and pins it: it keeps its slot and cache entry until unpinned,
    deactivated or removed. ``CapacityError`` when every slot is already pinned."""
    plan = _Plan(state)
    adapter_id = plan.resolve(_one_adapter(adapter))
    plan.activate(adapter_id, protect=frozenset({adapter_id}))
    plan.pinned.add(adapter_id)
    return plan.commit(donate)


def unpin_adapter(state: AdapterManagerState, adapter_id: int) -> AdapterManagerState:
    """Makes a pinned adapter evictable again (host only; it stays active)."""
    plan = _Plan(state)
    plan.require_known(adapter_id)
    plan.pinned.discard(adapter_id)
    return plan.commit(donate=False)


def warmup(state: AdapterManagerState, *, donate: bool = True) -> AdapterManagerState:
    """Compiles this bank layout's device writers, so that a serving run's first adapter swap
    compiles nothing: the slot write from both source orders (a PEFT load's, and a restored or
    given ``LoRAModel``'s) and the slot clear, for ``donate`` and for the donated variant that an
    operation's later writes use. It rewrites the base slot with its zeros, so the new state
    serves as the input did; with ``donate=True`` the input's banks are consumed."""
    _Plan(state)  # raises DonatedStateError for a donated state
    banks = state.bank_list
    variants = (True,) if donate else (False, True)
    for owned in variants:
        for torch_order in (False, True):
            a, b, scales, _ = _base_slot_values(state.layout, torch_order)
            banks = _WRITE[owned](banks, np.int32(BASE_ID), a, b, scales, torch_order)
        banks = _CLEAR[owned](banks, np.ones(state.num_slots, bool))
    return dataclasses.replace(state, bank_list=banks)


def reload_error(state: AdapterManagerState, adapter_id: int) -> LoRAError | None:
    """The error that reloading ``adapter_id`` (known by its request, out of the host cache)
    from disk raises now, or None when it loads (or is cached). Reads the files once and
    changes nothing: a serving loop uses it to find which adapter a failed step could not load.
    """
    plan = _Plan(state)
    plan.require_known(adapter_id)
    if adapter_id in plan.cache:
        return None
    try:
        plan.load(plan.requests[adapter_id])
    except LoRAError as e:
        return e
    return None


def list_adapters(state: AdapterManagerState) -> tuple[AdapterInfo, ...]:
    """Every known adapter (cached or on disk), by id."""
    infos = []
    active = state.active
    for adapter_id in sorted(set(state.cache) | set(state.requests)):
        model = state.cache.get(adapter_id)
        request = state.requests.get(adapter_id)
        infos.append(
            AdapterInfo(
                id=adapter_id,
                name=model.name if model is not None else request.name,
                path=request.path if request is not None else model.path,
                slot=active.get(adapter_id),
                cached=model is not None,
                pinned=adapter_id in state.pinned,
                rank=model.rank if model is not None else None,
            )
        )
    return tuple(infos)


def prepare_batch(
    state: AdapterManagerState,
    requests: Sequence[BatchEntry],
    lengths: Sequence[int] | np.ndarray,
    is_prefill: bool = True,
    *,
    donate: bool = True,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
) -> tuple[AdapterManagerState, LoRAMapping]:
    """Activates every adapter a batch needs and builds its ``LoRAMapping``.

    Args:
      requests: per sequence a ``LoRARequest`` (added on first sight), a registered adapter id,
        or ``None`` / 0 for the base model.
      lengths: tokens of each sequence in this step.
      num_tokens / num_seqs: padded sizes (default: ``jlora.mapping`` buckets).

    Raises ``CapacityError`` naming the counts when the batch needs more distinct adapters than
    there are unpinned slots; ``split_batch`` splits such a batch.
    """
    plan = _Plan(state)
    ids = [plan.resolve(r) for r in requests]
    needed = _distinct_adapters(ids)
    _check_batch_fits(state, needed)
    protect = frozenset(needed)
    for adapter_id in needed:
        plan.activate(adapter_id, protect=protect)
    seq_slots = [0 if a == BASE_ID else plan.slots.index(a) for a in ids]
    mapping = LoRAMapping.build(
        np.asarray(seq_slots, np.int32),
        lengths,
        num_slots=state.num_slots,
        is_prefill=is_prefill,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )
    return plan.commit(donate), mapping


def split_batch(state: AdapterManagerState, requests: Sequence[BatchEntry]) -> list[list[int]]:
    """Splits a batch into sub-batches that ``prepare_batch`` can serve one at a time.

    Returns lists of sequence indices (ascending within each). Every sequence of one adapter
    lands in the same sub-batch; base-model and pinned-adapter sequences go in the first; the
    number of sub-batches is the fewest possible given the pinned slots. For example, with
    2 free slots and adapter ids ``[1, 2, 3, 5, 1, 4]``: ``[[0, 1, 4], [2, 3], [5]]``.
    """
    ids = [_request_id(r) for r in requests]
    pinned = state.pinned
    movable = [a for a in _distinct_adapters(ids) if a not in pinned]
    room = state.config.max_loras - len(pinned)
    if movable and room <= 0:
        raise CapacityError(
            f"all max_loras={state.config.max_loras} slots are pinned ({sorted(pinned)}); "
            "unpin an adapter to serve others"
        )
    group_of = {a: k // room for k, a in enumerate(movable)}
    groups: list[list[int]] = [[] for _ in range(max(1, -(-len(movable) // max(room, 1))))]
    for i, a in enumerate(ids):
        groups[group_of.get(a, 0)].append(i)
    return [g for g in groups if g]


# ---------------------------------------------------------------------------------------------
# Planning: bookkeeping changes on private mutable copies, device writes recorded as dirty
# slots and applied in commit() after every check has passed.


class _Plan:
    def __init__(self, state: AdapterManagerState):
        if state.is_donated:
            raise DonatedStateError(
                "this AdapterManagerState's device banks were donated to the state returned by a "
                "later operation (donate=True is the default); continue from that state, or pass "
                "donate=False to keep old states usable"
            )
        self.state = state
        self.layout = state.layout
        self.slots = list(state.slots)
        self.cache = dict(state.cache)
        self.requests = dict(state.requests)
        self.lru = list(state.lru)
        self.pinned = set(state.pinned)
        self.sources = dict(state.sources)
        self.dirty: set[int] = set()

    # -- queries ---------------------------------------------------------------------------

    def slot_of(self, adapter_id: int) -> int | None:
        return self.slots.index(adapter_id) if adapter_id in self.slots[1:] else None

    def is_known(self, adapter_id: int) -> bool:
        return adapter_id in self.cache or adapter_id in self.requests

    def require_known(self, adapter_id: int) -> None:
        if not is_int(adapter_id):
            raise TypeError(f"an adapter id is an int >= 1, got {type(adapter_id).__name__}")
        if not _is_id(adapter_id):
            raise UnknownAdapterError(f"adapter ids are ints >= 1, got {adapter_id!r}")
        if adapter_id not in self.cache and adapter_id not in self.requests:
            raise UnknownAdapterError(
                f"adapter id {adapter_id} is not registered; add it first "
                f"(known: {sorted(set(self.cache) | set(self.requests))})"
            )

    def resolve(self, entry: BatchEntry) -> int:
        """The adapter id of a batch entry, registering an unseen ``LoRARequest``."""
        if isinstance(entry, LoRARequest):
            entry = _absolute(entry)
            adapter_id = entry.adapter_id
            if adapter_id in self.requests or adapter_id in self.cache:
                self._check_same_request(entry)
            if adapter_id not in self.requests:
                # Loaded when activated; recorded for a cached adapter too, so that after an
                # eviction it is reloaded from disk, as after add_adapter(request).
                self._check_cached_model_is_at(entry)
                self.requests[adapter_id] = entry
            return adapter_id
        adapter_id = _request_id(entry)
        if adapter_id != BASE_ID:
            self.require_known(adapter_id)
        return adapter_id

    # -- host cache --------------------------------------------------------------------------

    def touch(self, adapter_id: int) -> None:
        self.lru.remove(adapter_id)
        self.lru.append(adapter_id)

    def register(self, adapter: LoRAModel | LoRARequest) -> None:
        if isinstance(adapter, LoRARequest):
            self.register_request(adapter, protect=frozenset({adapter.adapter_id}))
        elif isinstance(adapter, LoRAModel):
            self.register_model(adapter, protect=frozenset({adapter.id}))
        else:
            raise TypeError(f"add_adapter takes a LoRAModel or LoRARequest, got {type(adapter)}")

    def register_request(self, request: LoRARequest, protect: frozenset[int]) -> None:
        request = _absolute(request)
        adapter_id = request.adapter_id
        if adapter_id in self.requests or adapter_id in self.cache:
            self._check_same_request(request)
            if adapter_id not in self.requests:
                self._check_cached_model_is_at(request)
            self.requests[adapter_id] = request
            if adapter_id in self.cache:
                self.touch(adapter_id)
                return  # the same adapter again: no-op
        else:
            self.requests[adapter_id] = request
        self.ensure_cached(adapter_id, protect)

    def _check_cached_model_is_at(self, request: LoRARequest) -> None:
        """A bare ``LoRAModel`` cached under the request's id must be what its path holds: an
        eviction would reload the id from there (register_model checks the other order)."""
        cached = self.cache.get(request.adapter_id)
        if cached is not None and (differs := _difference(cached, self.load(request))):
            raise AdapterMismatchError(
                f"adapter id {request.adapter_id} is registered as the LoRAModel "
                f"{cached.name!r}, and what {request.path} holds differs from it ({differs}); "
                "give the request its own id, or remove the model first"
            )

    def register_model(self, model: LoRAModel, protect: frozenset[int]) -> None:
        if not _is_id(model.id):
            raise AdapterMismatchError(f"adapter {model.name!r}: ids are ints >= 1, got {model.id}")
        if type(model.id) is not int:  # as LoRARequest does: a NumPy id prints differently
            model = model.replace(id=int(model.id))
        existing = self.cache.get(model.id)
        if existing is not None and _holds_the_same_weights(existing, model):
            self.touch(model.id)
            return  # the same adapter object again: no-op, without comparing its arrays
        fitted = _fit(self.layout, model, checked=False)
        if existing is not None:
            if not (differs := _difference(existing, fitted)):
                self.touch(model.id)
                return  # the same adapter again: no-op
            raise AdapterMismatchError(
                f"adapter id {model.id} is already registered as {existing.name!r}, and the "
                f"{model.name!r} being added differs ({differs}); give the new adapter its own "
                "id or remove the old one first"
            )
        request = self.requests.get(model.id)
        if request is not None:
            if model.name != request.name or (
                model.path is not None and _norm(model.path) != _norm(request.path)
            ):
                raise AdapterMismatchError(
                    f"adapter id {model.id} is registered for {request.name!r} at "
                    f"{request.path}; {model.name!r} (path {model.path}) needs its own id"
                )
            # An eviction would reload the id from the request's path, so the model must be
            # what is there: read it once to compare (only an evicted request gets here).
            if differs := _difference(self.load(request), fitted):
                raise AdapterMismatchError(
                    f"adapter id {model.id} is registered for {request.name!r} at "
                    f"{request.path}, and the {model.name!r} being added differs from what is "
                    f"there ({differs}); give it its own id or remove the old one first"
                )
        self.insert(fitted, protect)

    def ensure_cached(self, adapter_id: int, protect: frozenset[int]) -> None:
        if adapter_id in self.cache:
            return
        self.insert(self.load(self.requests[adapter_id]), protect)

    def load(self, request: LoRARequest) -> LoRAModel:
        """The adapter at ``request``'s path, through ``load_fn``, fitted to the banks. A
        reload (the id was read before) must find the files of the first read."""
        adapter_id = request.adapter_id
        where = f"adapter {request.name!r} (id {adapter_id})"
        stamp = _source_stamp(request.path) if self.layout.load_fn is load_from_disk else None
        first = self.sources.get(adapter_id, _UNREAD)
        # Files gone are left to the load, which names them; any other difference is refused.
        if first is not _UNREAD and stamp is not None and not set(stamp) <= set(first):
            changed = sorted({n for n, *_ in set(stamp) - set(first)})
            raise AdapterMismatchError(
                f"{where}: {', '.join(changed)} at {request.path} changed since it was first "
                "read, so its id would now serve other weights; remove_adapter and add it "
                "again (or give the new files their own id)"
            )
        try:
            model = self.layout.load_fn(request, self.layout.config, self.layout.dtype)
        except LoRAError as e:
            if first is _UNREAD:
                raise
            raise type(e)(
                f"{where} was evicted from the host cache and cannot be reloaded from its "
                f"path: {e} (restore its files, or remove_adapter({adapter_id}))"
            ) from e
        if first is _UNREAD:
            self.sources[adapter_id] = stamp
        if not isinstance(model, LoRAModel):
            raise TypeError(f"load_fn returned {type(model).__name__}, not a LoRAModel")
        model = model.replace(id=request.adapter_id, name=request.name)
        # jlora's own readers refuse NaN/Inf as they read; a custom load_fn is checked here.
        return _fit(self.layout, model, checked=self.layout.load_fn is load_from_disk)

    def insert(self, model: LoRAModel, protect: frozenset[int]) -> None:
        capacity = self.layout.config.max_cpu_loras
        if len(self.cache) >= capacity:
            victim = next((a for a in self.lru if a not in self.pinned and a not in protect), None)
            if victim is None:
                raise CapacityError(
                    f"host cache full: all max_cpu_loras={capacity} cached adapters are pinned "
                    f"or needed now ({sorted(self.cache)}); raise max_cpu_loras or unpin one"
                )
            self.evict_from_host(victim)
        self.cache[model.id] = model
        self.lru.append(model.id)

    def evict_from_host(self, adapter_id: int) -> None:
        self.free_slot(adapter_id)
        del self.cache[adapter_id]
        self.lru.remove(adapter_id)

    def forget(self, adapter_id: int) -> None:
        if adapter_id in self.cache:
            self.evict_from_host(adapter_id)
        self.requests.pop(adapter_id, None)
        self.sources.pop(adapter_id, None)
        self.pinned.discard(adapter_id)

    # -- device slots ------------------------------------------------------------------------

    def free_slot(self, adapter_id: int) -> None:
        slot = self.slot_of(adapter_id)
        if slot is not None:
            self.slots[slot] = BASE_ID
            self.dirty.add(slot)
        self.pinned.discard(adapter_id)

    def activate(self, adapter_id: int, protect: frozenset[int]) -> int:
        self.require_known(adapter_id)
        self.ensure_cached(adapter_id, protect)
        self.touch(adapter_id)
        slot = self.slot_of(adapter_id)
        if slot is not None:
            return slot
        if BASE_ID in self.slots[1:]:
            slot = self.slots.index(BASE_ID, 1)
        else:
            victim = next(
                (
                    a
                    for a in self.lru
                    if a not in self.pinned and a not in protect and a in self.slots
                ),
                None,
            )
            if victim is None:
                n = self.layout.config.max_loras
                raise CapacityError(
                    f"cannot activate adapter {adapter_id}: all max_loras={n} slots hold pinned "
                    f"adapters {sorted(self.pinned)} or ones this batch needs "
                    f"{sorted(protect - {adapter_id})}; unpin or deactivate one"
                )
            slot = self.slot_of(victim)
        self.slots[slot] = adapter_id
        self.dirty.add(slot)
        return slot

    # -- commit ------------------------------------------------------------------------------

    def commit(self, donate: bool) -> AdapterManagerState:
        state = self.state
        banks = state.bank_list
        dirty = sorted(self.dirty)
        freed = [s for s in dirty if self.slots[s] == BASE_ID]
        # Only the first device call may touch the caller's buffers; later ones donate our own
        # intermediates, so donate=False costs one copy of the banks, not one per write.
        owned = donate
        if freed:
            keep = np.ones(state.num_slots, bool)
            keep[freed] = False
            banks = _CLEAR[owned](banks, keep)
            owned = True
        for slot in dirty:
            adapter_id = self.slots[slot]
            if adapter_id != BASE_ID:
                a, b, scales, torch_order = _slot_values(self.layout, self.cache[adapter_id])
                banks = _WRITE[owned](banks, np.int32(slot), a, b, scales, torch_order)
                owned = True
        return AdapterManagerState(
            bank_list=banks,
            layout=self.layout,
            slots=tuple(self.slots),
            cache=types.MappingProxyType(self.cache),
            requests=types.MappingProxyType(self.requests),
            lru=tuple(self.lru),
            pinned=frozenset(self.pinned),
            sources=types.MappingProxyType(self.sources),
        )

    def _check_same_request(self, request: LoRARequest) -> None:
        adapter_id = request.adapter_id
        known = self.requests.get(adapter_id)
        if known is not None:
            if known.name != request.name or _norm(known.path) != _norm(request.path):
                raise AdapterMismatchError(
                    f"adapter id {adapter_id} is registered for {known.name!r} at {known.path}; "
                    f"the request for {request.name!r} at {request.path} needs its own id"
                )
            return
        model = self.cache[adapter_id]
        if (
            model.name != request.name
            or model.path is None
            or (_norm(model.path) != _norm(request.path))
        ):
            raise AdapterMismatchError(
                f"adapter id {adapter_id} is registered for {model.name!r} (path {model.path}); "
                f"the request for {request.name!r} at {request.path} needs its own id"
            )


# ---------------------------------------------------------------------------------------------
# Fit checks and slot contents (host)


def _fit(layout: _Layout, model: LoRAModel, *, checked: bool) -> LoRAModel:
    """``model`` checked against the targets and converted to the bank dtype (host numpy).
    ``checked``: its values were already found finite (by the PEFT or checkpoint reader)."""
    if not model.loras:  # the loaders refuse such a file too: it would serve the base model
        raise AdapterMismatchError(
            f"adapter {model.name!r} (id {model.id}) holds no LoRA modules; nothing to serve"
        )
    seen: dict[tuple[int, int], str] = {}
    for name, weights in model.loras.items():
        layers = weights.slices if isinstance(weights, PackedLoRALayerWeights) else (weights,)
        for layer in layers:
            for role in ("lora_a", "lora_b"):
                x = getattr(layer, role, None)
                if isinstance(layer, LoRALayerWeights) and not (
                    hasattr(x, "dtype") and hasattr(x, "shape")
                ):
                    raise TypeError(
                        f"adapter {model.name!r} (id {model.id}), module {name!r}: {role} is a "
                        f"{type(x).__name__}; give a NumPy or JAX array"
                    )
        for (i, j), layer in _placements(layout, model, name, weights):
            target = layout.targets[i]
            where = f"adapter {model.name!r} (id {model.id}), module {layer.module_name or name!r}"
            if (i, j) in seen:
                raise AdapterMismatchError(
                    f"{where}: slice {j} of target {target.name!r} is also given by "
                    f"{seen[(i, j)]!r}; give each PEFT module once"
                )
            seen[(i, j)] = name
            if layer.is_embedding != target.is_embedding:
                kind = "an embedding" if layer.is_embedding else "a linear"
                raise AdapterMismatchError(
                    f"{where}: {kind} LoRA, but target {target.name!r} is "
                    f"{'an embedding' if target.is_embedding else 'a linear'} layer"
                )
            want = (target.in_dim, target.out_dims[j])
            have = (layer.input_dim, layer.output_dim)
            if have != want:
                raise AdapterMismatchError(
                    f"{where}: LoRA maps {have[0]} -> {have[1]} but target {target.name!r} "
                    f"(slice {j}) maps {want[0]} -> {want[1]}; the adapter was trained for "
                    "another model"
                )
            if layer.rank > layout.config.max_lora_rank:
                raise AdapterMismatchError(
                    f"{where}: rank {layer.rank} exceeds max_lora_rank="
                    f"{layout.config.max_lora_rank}; raise LoRAConfig.max_lora_rank"
                )
            if layer.bias is not None:
                raise AdapterMismatchError(
                    f"{where}: carries a LoRA bias, which the slot banks do not hold; merge it "
                    "into the base model (jlora.merge_adapter) or serve one trained with "
                    "lora_bias=False"
                )
            for role in ("lora_a", "lora_b"):
                x = getattr(layer, role)
                # The NaN/Inf check knows these; float8 and the like are not LoRA weights.
                if np.dtype(x.dtype).name not in FLOAT_DTYPE_NAMES:
                    raise AdapterWeightsError(
                        f"{where}: {role} is {np.dtype(x.dtype).name}; LoRA weights are one of "
                        f"{sorted(FLOAT_DTYPE_NAMES)} (cast them, e.g. to float32, before adding "
                        "the adapter)"
                    )
                if not checked and (bad := count_nonfinite(np.asarray(x))):
                    raise AdapterWeightsError(
                        f"{where}: {role} holds {bad} NaN/Inf values; the adapter is corrupt "
                        "(re-export it from training)"
                    )
    dtype = layout.dtype
    # The cache keeps read-only arrays (as the loaders hand out) as they are; others are copied
    # and frozen, or a caller reusing its buffer would change what the slots serve. Its own
    # dict too: the caller may edit theirs.
    if all(_is_frozen(x, dtype) for x in jax.tree.leaves(model)):
        return model.replace(loras=dict(model.loras))
    with np.errstate(over="ignore"):  # an overflow is refused below, naming the module
        converted = jax.tree.map(lambda x: x if _is_frozen(x, dtype) else _frozen(x, dtype), model)
    _check_cast(model, converted, dtype)
    return converted


def _is_frozen(x, dtype: np.dtype) -> bool:
    return _is_host_ready(x, dtype) and is_frozen(x)


def _frozen(x, dtype: np.dtype) -> np.ndarray:
    x = np.array(x, dtype=dtype, order="C")  # always a copy
    x.setflags(write=False)
    return x


def _check_cast(model: LoRAModel, converted: LoRAModel, dtype: np.dtype) -> None:
    """Refuses values the cast to a narrower bank dtype turned into Inf (1e5 in float16)."""
    top = jnp.finfo(dtype).max
    for name, w in model.loras.items():
        new = converted.loras[name]
        pairs = zip(
            w.slices if isinstance(w, PackedLoRALayerWeights) else (w,),
            new.slices if isinstance(new, PackedLoRALayerWeights) else (new,),
            strict=True,
        )
        for old_layer, new_layer in pairs:
            if old_layer is None:
                continue
            for role in ("lora_a", "lora_b"):
                old = getattr(old_layer, role)
                if jnp.finfo(old.dtype).max <= top:
                    continue
                bad = count_nonfinite(getattr(new_layer, role)) - count_nonfinite(np.asarray(old))
                if bad:
                    raise AdapterWeightsError(
                        f"adapter {model.name!r} (id {model.id}), module {name!r}: {role} has "
                        f"{bad} values beyond the bank dtype {np.dtype(dtype).name}'s range (max "
                        f"{top}); set LoRAConfig.lora_dtype to a wider dtype"
                    )


def _placements(layout: _Layout, model: LoRAModel, name: str, weights):
    """The ((target, slice), layer) pairs a module of ``model`` writes."""
    if isinstance(weights, PackedLoRALayerWeights):
        i = layout.by_name.get(name)
        if i is not None:
            target = layout.targets[i]
            if len(weights.slices) != len(target.out_dims):
                raise AdapterMismatchError(
                    f"adapter {model.name!r} (id {model.id}), packed module {name!r}: "
                    f"{len(weights.slices)} slices, but target {target.name!r} has "
                    f"{len(target.out_dims)} (widths {list(target.out_dims)}); give one "
                    "slice, or None, per fused projection"
                )
            return [((i, j), s) for j, s in enumerate(weights.slices) if s is not None]
    elif isinstance(weights, LoRALayerWeights):
        loc = layout.index.get(name)
        if loc is not None:
            return [(loc, weights)]
        i = layout.by_name.get(name)
        if i is not None:  # trained on the whole fused layer: served as its slices
            try:
                slices = split_whole_layer(weights, layout.targets[i])
            except AdapterMismatchError as e:
                raise AdapterMismatchError(f"adapter {model.name!r} (id {model.id}), {e}") from None
            return [((i, j), s) for j, s in enumerate(slices)]
    else:
        raise AdapterMismatchError(
            f"adapter {model.name!r} (id {model.id}), module {name!r}: expected "
            f"LoRALayerWeights, got {type(weights).__name__}"
        )
    known = sorted(layout.index)
    hint = ", ".join(repr(k) for k in known[:4]) + (", ..." if len(known) > 4 else "")
    tied = (
        "; if the model ties its word embeddings it has no lm_head layer (its logits reuse "
        "embed_tokens): serve this adapter on an untied model, or train it without lm_head"
        if name.rsplit(".", 1)[-1] == "lm_head" and name not in layout.by_name
        else ""
    )
    raise AdapterMismatchError(
        f"adapter {model.name!r} (id {model.id}) targets module {name!r}, which the model has no "
        f"LoRA target for (it serves {len(known)} PEFT modules: {hint}); the adapter was trained "
        f"for another model, or the model was wrapped with fewer targets{tied}"
    )


def _is_host_ready(x, dtype: np.dtype) -> bool:
    # Fortran order counts: a transposed view of PyTorch's [r, in] is a valid [in, r] lora_a,
    # and JAX lays it out during the host-to-device copy for less than a host transpose costs.
    flags = getattr(x, "flags", None)
    return (
        isinstance(x, np.ndarray)
        and x.dtype == dtype
        and (flags.c_contiguous or flags.f_contiguous)
    )


def _holds_the_same_weights(cached: LoRAModel, model: LoRAModel) -> bool:
    """Whether ``cached`` holds ``model``'s own (immutable) weight objects under the same
    names: then ``_fit`` kept its arrays, which nothing can write (``hostio.is_frozen``)."""
    return (
        (cached.name, cached.path) == (model.name, model.path)
        and cached.loras.keys() == model.loras.keys()
        and all(cached.loras[k] is w for k, w in model.loras.items())
    )


def _difference(a: LoRAModel, b: LoRAModel) -> str:
    """How adapter ``b`` differs from ``a`` ("" when it is the same adapter), for messages."""
    if a.name != b.name:
        return f"name {b.name!r}, not {a.name!r}"
    # A path is where a request reloads the id from: two paths, two adapters (None: in memory).
    if a.path is not None and b.path is not None and _norm(a.path) != _norm(b.path):
        return f"path {os.fspath(b.path)!r}, not {os.fspath(a.path)!r}"
    if set(a.loras) != set(b.loras):  # PEFT files list modules in any order
        extra, missing = sorted(set(b.loras) - set(a.loras)), sorted(set(a.loras) - set(b.loras))
        return f"modules: {len(extra)} more ({extra[:2]}), {len(missing)} fewer ({missing[:2]})"
    for name, wa in a.loras.items():
        wb = b.loras[name]
        la = wa.slices if isinstance(wa, PackedLoRALayerWeights) else (wa,)
        lb = wb.slices if isinstance(wb, PackedLoRALayerWeights) else (wb,)
        if type(wa) is not type(wb) or len(la) != len(lb):
            return f"module {name!r} is packed differently"
        for x, y in zip(la, lb, strict=True):
            if (x is None) != (y is None):
                return f"module {name!r} targets other slices"
            if x is None:
                continue
            if (x.scaling, x.is_embedding) != (y.scaling, y.is_embedding):
                return f"module {name!r}: scaling {y.scaling}, not {x.scaling}"
            for u, v in ((x.lora_a, y.lora_a), (x.lora_b, y.lora_b)):
                if u.dtype != v.dtype or not np.array_equal(np.asarray(u), np.asarray(v)):
                    return f"module {name!r} has other weights"
    return ""


def _slot_values(layout: _Layout, model: LoRAModel):
    """Per bank, the rows one slot holds for ``model``: padded A, padded B (host numpy, bank
    dtype, zeros where the adapter does not target a slice), a float32 scale vector, and
    whether A and B are given in PyTorch's order (``[R, in]``, ``[out, R]``: see ``_write_slot``).

    PyTorch's order is used when every array is a transposed view of a C-ordered one, as a PEFT
    load hands out: those base arrays reach the device without a host copy (aligned buffers are
    aliased), and padding them to the bank rank is a contiguous copy."""
    placed: dict[tuple[int, int], LoRALayerWeights] = {}
    for name, weights in model.loras.items():
        placed.update(_placements(layout, model, name, weights))
    rank, dtype = layout.config.max_lora_rank, layout.dtype
    torch_order = bool(placed) and all(
        _is_transposed_view(x, dtype) for w in placed.values() for x in (w.lora_a, w.lora_b)
    )
    a_vals, b_vals, scales = [], [], []
    for i, target in enumerate(layout.targets):
        a_row, b_row = [], []
        for j, out in enumerate(target.out_dims):
            layer = placed.get((i, j))
            if layer is None:
                a, b = _zero_slice(rank, target.in_dim, out, dtype, torch_order)
                a_row.append(a)
                b_row.append(b)
                scales.append(0.0)
                continue
            if torch_order:
                a, b = layer.lora_a.T, layer.lora_b.T
                if layer.rank != rank:
                    a = np.concatenate([a, _zeros((rank - layer.rank, a.shape[1]), dtype)])
                    b = np.concatenate([b, _zeros((b.shape[0], rank - layer.rank), dtype)], 1)
            elif layer.rank == rank and _is_host_ready(layer.lora_a, dtype):
                a, b = layer.lora_a, layer.lora_b
            else:
                a, b = pad_to_rank(layer, rank, dtype)
            a_row.append(a)
            b_row.append(b)
            scales.append(layer.scaling)
        a_vals.append(tuple(a_row))
        b_vals.append(tuple(b_row))
    return tuple(a_vals), tuple(b_vals), np.asarray(scales, np.float32), torch_order


def _base_slot_values(layout: _Layout, torch_order: bool):
    """``_slot_values`` of the base slot (zeros, scale 0) in either source order."""
    rank, dtype = layout.config.max_lora_rank, layout.dtype
    a_vals, b_vals = [], []
    for target in layout.targets:
        zeros = [
            _zero_slice(rank, target.in_dim, out, dtype, torch_order) for out in target.out_dims
        ]
        a_vals.append(tuple(a for a, _ in zeros))
        b_vals.append(tuple(b for _, b in zeros))
    n = sum(len(t.out_dims) for t in layout.targets)
    return tuple(a_vals), tuple(b_vals), np.zeros(n, np.float32), torch_order


def _zero_slice(rank: int, in_dim: int, out: int, dtype: np.dtype, torch_order: bool):
    """A and B of a slice an adapter does not target: ``[in, R]``/``[R, out]`` zeros, or
    ``[R, in]``/``[out, R]`` in PyTorch's order (read-only, shared)."""
    if torch_order:
        return _zeros((rank, in_dim), dtype), _zeros((out, rank), dtype)
    return _zeros((in_dim, rank), dtype), _zeros((rank, out), dtype)


def _is_transposed_view(x, dtype: np.dtype) -> bool:
    flags = getattr(x, "flags", None)
    # A rank-1 [in, 1] or [1, out] is C- and F-contiguous at once: its transpose is free too.
    return (
        isinstance(x, np.ndarray)
        and x.dtype == dtype
        and flags.f_contiguous
        and (not flags.c_contiguous or 1 in x.shape)
    )


@functools.lru_cache(maxsize=256)
def _zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    z = np.zeros(shape, dtype)
    z.setflags(write=False)
    return z


# ---------------------------------------------------------------------------------------------
# Device writes: one program per bank layout (and donate flag), whatever the slot.


def _write_slot(bank_list, slot, a_vals, b_vals, scales, torch_order=False):
    """Copies one adapter into ``slot`` of every bank (``slot`` traced int32).

    ``torch_order`` (static): A and B come as ``[R, in]`` and ``[out, R]`` and are transposed
    here, on the device. For a PEFT load (80 MB, 224 banks) that took the write from 17.5 ms,
    when JAX re-laid the transposed views out on the host, to 14.2 ms (BENCHMARKS.md)."""
    if torch_order:
        a_vals, b_vals = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (a_vals, b_vals))
    out, k = [], 0
    for banks, a_row, b_row in zip(bank_list, a_vals, b_vals, strict=True):
        row = []
        for bank, a, b in zip(banks, a_row, b_row, strict=True):
            row.append(
                bank.replace(
                    a=jax.lax.dynamic_update_index_in_dim(bank.a, a, slot, 0),
                    b=jax.lax.dynamic_update_index_in_dim(bank.b, b, slot, 0),
                    scale=jax.lax.dynamic_update_index_in_dim(bank.scale, scales[k], slot, 0),
                )
            )
            k += 1
        out.append(tuple(row))
    return tuple(out)


def _clear_slots(bank_list, keep):
    """Zeroes the scale of every slot where ``keep`` (bool ``[slots]``) is False."""
    return jax.tree.map(
        lambda bank: bank.replace(scale=jnp.where(keep, bank.scale, 0.0)),
        bank_list,
        is_leaf=lambda x: isinstance(x, LoRABank),
    )


_WRITE = {
    True: jax.jit(_write_slot, donate_argnums=0, static_argnums=5),
    False: jax.jit(_write_slot, static_argnums=5),
}
_CLEAR = {True: jax.jit(_clear_slots, donate_argnums=0), False: jax.jit(_clear_slots)}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _is_id(v) -> bool:
    return is_int(v) and v >= 1


def _request_id(entry: BatchEntry) -> int:
    if entry is None:
        return BASE_ID
    if isinstance(entry, LoRARequest):
        return entry.adapter_id
    message = (
        "a batch entry must be a LoRARequest, an adapter id (int >= 1) or None / 0 for the "
        "base model, got "
    )
    if not is_int(entry):
        raise TypeError(message + type(entry).__name__)
    if entry < 0:
        raise UnknownAdapterError(message + str(entry))
    return int(entry)


def _one_adapter(adapter: int | LoRARequest) -> int | LoRARequest:
    # resolve() reads None as the base model, which no slot can be given.
    if not isinstance(adapter, LoRARequest) and not is_int(adapter):
        raise TypeError(f"takes a LoRARequest or an adapter id, got {type(adapter).__name__}")
    return adapter


def _distinct_adapters(ids: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(a for a in ids if a != BASE_ID))


def _check_batch_fits(state: AdapterManagerState, needed: Sequence[int]) -> None:
    n = state.config.max_loras
    pinned_elsewhere = state.pinned - set(needed)
    room = n - len(pinned_elsewhere)
    if len(needed) > room:
        pinned_note = (
            f", {len(pinned_elsewhere)} of them pinned by adapters outside the batch"
            if pinned_elsewhere
            else ""
        )
        raise CapacityError(
            f"the batch needs {len(needed)} distinct adapters but only {room} device slots are "
            f"available (max_loras={n}{pinned_note}); split it with "
            "jlora.manager.split_batch(state, requests) or raise max_loras"
        )


def _norm(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _absolute(request: LoRARequest) -> LoRARequest:
    """``request`` with its path made absolute now: a relative one would be reloaded from
    wherever the working directory is at the time of an eviction's reload. Joined, not
    normalized: ``link/..`` must stay what the filesystem makes of it (``_norm`` compares)."""
    if os.path.isabs(request.path):
        return request
    return dataclasses.replace(request, lora_path=os.path.join(os.getcwd(), request.path))


_UNREAD = object()  # sources.get default: the id's files were never read


def _source_stamp(path: str) -> tuple:
    """(name, inode, device, size, mtime_ns) of each file ``load_from_disk`` reads at
    ``path`` (a PEFT adapter's two files, or a checkpoint's items): a reload that finds other
    files would serve other weights under the same id. Missing files are left out (the load
    itself says what is missing)."""
    from jlora import checkpoint, loader, peft

    names = [peft.CONFIG_NAME, loader.WEIGHTS_NAME]
    for item in (checkpoint.META_ITEM, checkpoint.ARRAYS_ITEM):
        if os.path.isdir(folder := os.path.join(path, item)):
            names += sorted(os.path.join(item, n) for n in os.listdir(folder))
    stamp = []
    for name in names:
        try:
            st = os.stat(os.path.join(path, name))
        except OSError:
            continue
        stamp.append((name, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


__all__ = [
    "AdapterInfo",
    "AdapterManagerState",
    "DonatedStateError",
    "activate_adapter",
    "add_adapter",
    "add_adapters",
    "deactivate_adapter",
    "init_state",
    "list_adapters",
    "load_from_disk",
    "pin_adapter",
    "prepare_batch",
    "reload_error",
    "remove_adapter",
    "split_batch",
    "unpin_adapter",
    "warmup",
]
