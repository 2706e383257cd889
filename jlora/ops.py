"""The multi-LoRA layer op: `y + scale_i[slot] * (x @ A_i[slot]) @ B_i[slot]` per output slice.

`add_lora` dispatches on `impl`:

- `"pallas"`: the Punica-style Pallas/Triton kernels of `pallas_kernels` (segmented shrink and
  expand for prefill batches, gathered ones for decode);
- `"xla"`: plain XLA tuned for CPU (below);
- `"auto"`: Pallas on GPU, XLA elsewhere. When the Pallas path cannot serve a call (no GPU, a
  dtype Triton lacks) it raises `NotImplementedError`; `add_lora` then runs the XLA path and
  logs the reason once.

The XLA path. A per-token gather of A and B (`A[token_slots]`) moves `T * in * R` weights per
layer, and a one-hot over all slots multiplies every token by every adapter; both cost more
than the base matmul on a CPU. Instead tokens are taken in slot order (the mapping's
`sorted_token_ids`), cut into blocks of `block_t` sorted positions each owned by one slot
(slot 0 skipped), and `fori_loop`s whose trip counts are the numbers of real blocks run, per
block, `x_blk @ A[s]` and `(h * scale[s]) @ B[s]` with the adapter's A and B sliced once for the
whole block, never per token. Four ways to move rows, chosen by T (and decode-sized steps also
by their adapter mix, at run time; measurements in BENCHMARKS.md):

- `"token"` (T <= 32: decode steps): one row at a time in slot order, slot-0 rows skipped, the
  loop body unrolled 4 times. With many adapters a decode step has about one token per adapter,
  so blocks would mostly hold padding; what costs there is XLA:CPU's per-iteration overhead
  (microseconds per trip), which the unrolling divides. Unless the strategy is forced, the step's
  adapter mix picks one of three other ways at run time (`_decode_plan`): few rows per adapter
  (>= 4 per used slot) take `"sorted"` blocks of 8; many adapters spread thin over float32
  banks (at most k = 1 or 2 rows per slot, filling >= 3/4 of the `[S, k]` places) take `"slots"`.
- `"slots"`: every row is placed at (its slot, its rank in the slot) of a `[S, k, in]` buffer
  and one batched product (`vmap` over the banks' slot axis) runs every slot's A and B once, no
  loop at all. It reads every slot, used or not, so it pays only when nearly all are used.
  Forced, `xla_block_t` is k, and a step with a fuller slot runs the row loop instead.
- `"sorted"` (32 < T <= 1024: larger decode batches, small prefills): x is permuted into slot
  order once, blocks are contiguous slices, the deltas land in a slot-ordered buffer that is
  permuted back and added to y at the end. Cheap per block, two extra passes over `[T, *]`.
- `"scatter"` (T > 1024, prefill): an outer loop over the non-empty adapter slots slices each
  slot's A and B once; an inner loop over the slot's blocks gathers the block's rows of x by
  token id and scatter-adds its delta straight into y (a loop-carried buffer XLA updates in
  place): no permuted copies of x or of the output.

Rows of slot 0 keep their values under all three: slot 0 owns no blocks and no token trips, so
nothing is added to them.

On a `jlora.sharding` mesh both paths run each device's shard inside a `shard_map`: over
`model` when the banks' static `model_split` is one of `MODEL_SPLITS` (`_per_model_shard`: the
layout's collective once, between shrink and expand), and over `data` when it splits the rows,
each shard sorting its own tokens by slot (the mapping's host-sorted order is global and would
make every shard gather the whole batch). Other layouts are left to XLA's partitioner.

Imports jlora.weights, jlora.mapping and pallas_kernels.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from jlora.config import is_int
from jlora.errors import AdapterMismatchError, LoRAConfigError, MappingError
from jlora.mapping import LoRAMapping, check_arrays, check_in_range
from jlora.targets import join_packed, split_packed
from jlora.weights import DATA, MODEL, MODEL_SPLITS, LoRABank

# Full float32 products, as in the kernels: a GPU's default would take TF32 for float32 operands.
_EXACT = lax.Precision.HIGHEST

__all__ = ["IMPLS", "OpsConfig", "add_lora", "add_lora_embedding"]

IMPLS = ("auto", "pallas", "xla")
XLA_STRATEGIES = ("token", "sorted", "scatter", "slots")
_PALLAS_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

logger = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OpsConfig:
    """Tunables of `add_lora`.

    Attributes:
      segmented: block sizes and launch parameters of the prefill kernels.
      gathered: block sizes and launch parameters of the decode kernels.
      xla_block_t: tokens per block on the XLA path (rows per loop iteration for `"token"`);
        None picks by T (see `_xla_plan`).
      xla_strategy: `"token"`, `"sorted"`, `"scatter"` or `"slots"` on the XLA path; None picks
        by T and the batch's mix of adapters.
      interpret: run the Pallas kernels in interpret mode (CPU debugging and tests).
    """

    segmented: pk.SegmentedConfig = pk.SegmentedConfig()
    gathered: pk.GatheredConfig = pk.GatheredConfig()
    xla_block_t: int | None = None
    xla_strategy: str | None = None
    interpret: bool = False

    def __post_init__(self):
        if self.xla_block_t is not None and (not is_int(self.xla_block_t) or self.xla_block_t < 1):
            raise LoRAConfigError(
                f"OpsConfig: xla_block_t={self.xla_block_t!r} must be a positive int or None"
            )
        if self.xla_block_t is not None:
            object.__setattr__(self, "xla_block_t", int(self.xla_block_t))  # hashable, plain
        if self.xla_strategy not in (None, *XLA_STRATEGIES):
            raise LoRAConfigError(
                f"OpsConfig: xla_strategy={self.xla_strategy!r} must be None or one of "
                f"{XLA_STRATEGIES}"
            )


# Measured on a 2-core CPU with 33 slots (`python -m benchmarks.ops --breakdown`, BENCHMARKS.md):
# the sorted buffer wins up to T = 1024 (at 1024 the two are within noise), the per-slot scatter
# wins at T = 2048 (1.08-1.10x against 1.21-1.26x). Sorted blocks grow with the tokens per slot.
_SCATTER_MIN_TOKENS = 1025
# Decode-sized batches: one row per loop trip, 4 trips unrolled per iteration. On the decode step
# of `jlora bench` (32 rows, 32 distinct adapters, 56 LoRA'd projections, 300 MB of adapter
# weights) this took the LoRA time from 38 ms (sorted blocks of 4) to 18 ms; unrolling 8 or 16
# was no better, a fully unrolled Python loop 5x worse. At T = 64 (`benchmarks.ops`, 33 slots,
# weights in L3) sorted blocks stay ahead: 1.13-1.19x against 1.27x for "token".
_TOKEN_MAX_TOKENS = 32
_TOKEN_UNROLL = 4
# ... but only when the adapters are many. When they are few (on average this many adapter rows
# or more per used slot) the same step runs sorted blocks of `_FEW_BLOCK_T`, chosen at run time
# (`lax.cond`: no recompile as the batch mix changes). 56 projections of that decode step, T=32:
# one adapter 12.4 ms per token vs 4.9 ms in blocks of 8; four adapters 15.9 vs 7.0; eight 16.5
# vs 12.2 (blocks of 4) / 14.0 (blocks of 8); 32 distinct 22.9 vs 40.6 (blocks of 4).
_FEW_ROWS_PER_SLOT = 4
_FEW_BLOCK_T = 8
# ... and when they are many and spread thin (at most k <= 2 rows per used slot, filling at least
# 3/4 of an [S, k] grid of places), one batched product over every slot (`"slots"`): it reads
# each bank once with no per-row loop overhead. Its cost follows S * k, the loop's the rows. Same
# 56 projections chained as in a model, T=32: 33 slots, 32 distinct: 23 ms with the row loop vs
# 16 ms; 17 slots, 16 adapters x 2 rows: 19 vs 12.7 ms; 33 slots, 16 x 2 (half the places
# empty): 18 with the loop vs 23.6, so that mix keeps the loop. Float32 banks only: XLA:CPU's
# batched bf16/f16 product was 4x slower than the loop.
_SLOTS_MAX_ROWS = 2
_SLOTS_MIN_FILL = 0.75


def _xla_plan(num_tokens: int, config: OpsConfig) -> tuple[str, int]:
    """(strategy, block_t) of the XLA path for `num_tokens` rows."""
    strategy = config.xla_strategy
    if strategy is None:
        if num_tokens <= _TOKEN_MAX_TOKENS:
            strategy = "token"
        elif num_tokens >= _SCATTER_MIN_TOKENS:
            strategy = "scatter"
        else:
            strategy = "sorted"
    block_t = config.xla_block_t
    if strategy == "token":
        block_t = _TOKEN_UNROLL if block_t is None else block_t  # rows per loop iteration
    elif strategy == "slots":
        block_t = _SLOTS_MAX_ROWS if block_t is None else block_t  # rows per slot
    elif block_t is None:
        block_t = 32 if strategy == "scatter" else min(16, max(4, num_tokens // 32))
    return strategy, max(1, min(block_t, num_tokens))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def add_lora(
    y: jax.Array,
    x: jax.Array,
    banks: LoRABank | Sequence[LoRABank],
    mapping: LoRAMapping,
    *,
    impl: str = "auto",
    config: OpsConfig | None = None,
    groups: int = 1,
) -> jax.Array:
    """`y` plus each slice's LoRA: `y[:, cols_i] += scale_i[slot] * (x @ A_i[slot]) @ B_i[slot]`.

    Args:
      y: `[T, out]`, the base layer's output; `out` is the sum of the slices' widths.
      x: `[T, in]`, the layer's input.
      banks: one `LoRABank`, or one per output slice of a packed projection (q/k/v, gate/up),
        in the order the slices are concatenated along `out`.
      mapping: the step's `LoRAMapping`; `T` is its token count, or its sequence count (rows of
        last tokens, e.g. an LM head), for which the slot order is derived on device.
      impl: `"auto"` (Pallas on GPU, XLA elsewhere), `"pallas"` or `"xla"`. `"pallas"` where the
        kernels cannot run (no GPU and no `interpret`, another dtype) takes the XLA path and logs
        a warning once per reason.
      config: tunables; `OpsConfig()` when None.
      groups: the packed columns' layout, `jlora.targets.TargetModule.groups`: the slices one
        after the other (1), or in `groups` groups of every slice's next `1 / groups`. When the
        columns are split over a `model` axis whose size divides `groups`, each device serves
        its own whole groups (no column moves between devices).

    Returns:
      `[T, out]` in `y`'s dtype, computed with float32 accumulation; rows on slot 0 unchanged.

    >>> import jax.numpy as jnp
    >>> from jlora.weights import DATA, MODEL, MODEL_SPLITS, LoRABank
    >>> bank = LoRABank.zeros(num_slots=3, in_dim=8, out_dim=4, max_rank=2)
    >>> mapping = LoRAMapping.build([1, 0], [2, 1], num_slots=3, num_tokens=3)
    >>> add_lora(jnp.ones((3, 4)), jnp.ones((3, 8)), bank, mapping).shape
    (3, 4)
    """
    if impl not in IMPLS:
        raise LoRAConfigError(f"add_lora: impl={impl!r} is not one of {IMPLS}")
    config = _check_config("add_lora", config)
    # Checked before the eager call jits: jit would reject a list as an unhashable static arg.
    if not is_int(groups) or groups < 1:
        raise LoRAConfigError(f"add_lora: groups={groups!r} must be an int >= 1")
    groups = int(groups)
    banks = _as_banks(banks)
    _check_num_slots("add_lora", mapping, banks[0])
    if _is_eager(y, x, banks, mapping):
        # One compiled program per shape (and mesh: sharded arrays keep theirs in the trace):
        # traced eagerly, the loops' and branches' fresh closures, and a sharded call's
        # shard_map, would compile again on every call (and hold on to each program).
        return _add_lora_jit(y, x, banks, mapping, impl=impl, config=config, groups=groups)
    # jnp arrays: host (numpy) operands of an eager call would meet traced indices in the loops.
    y, x, banks = jnp.asarray(y), jnp.asarray(x), jax.tree.map(jnp.asarray, banks)
    _check_linear_args(y, x, banks)
    widths = [bank.output_dim for bank in banks]
    if any(w % groups for w in widths):
        raise LoRAConfigError(
            f"add_lora: groups={groups} must be a divisor of every slice width {widths}"
        )
    token_slots, sorted_ids, counts, starts = _segments_for_rows(mapping, y.shape[0])
    if y.shape[0] == 0:
        return y
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"

    def run(y, x, banks, token_slots, sorted_ids, counts, starts):
        if impl == "pallas":
            try:
                return _add_lora_pallas(
                    y, x, banks, token_slots, sorted_ids, counts, starts, mapping.is_prefill, config
                )
            except NotImplementedError as e:
                _log_fallback_once(str(e))
        return _add_lora_xla(y, x, banks, token_slots, sorted_ids, counts, starts, config)

    mesh = _mesh_of(y, banks[0].a)
    split = _model_split(mesh, banks)
    parts = _Parts(impl, mapping.is_prefill, config)
    if split is not None and "out" in split and groups % mesh.shape[MODEL] == 0:
        local_groups = groups // mesh.shape[MODEL]  # each device's block: whole groups
        return _per_model_shard(
            run, parts, mesh, split, y, x, banks, token_slots, mapping.num_slots, local_groups
        )
    y = _ungroup(y, widths, groups)
    if split is not None:
        y = _per_model_shard(run, parts, mesh, split, y, x, banks, token_slots, mapping.num_slots)
    elif (data_mesh := _data_mesh(mesh, y)) is None:
        y = run(y, x, banks, token_slots, sorted_ids, counts, starts)
    else:
        y = _per_data_shard(run, data_mesh, y, x, banks, token_slots, mapping.num_slots)
    return _regroup(y, widths, groups)


_add_lora_jit = jax.jit(add_lora, static_argnames=("impl", "config", "groups"))


def _ungroup(y: jax.Array, widths: Sequence[int], groups: int) -> jax.Array:
    """A grouped packed output (`jlora.targets.split_packed`), its slices one after another."""
    return y if groups == 1 else jnp.concatenate(split_packed(y, widths, groups), axis=-1)


def _regroup(y: jax.Array, widths: Sequence[int], groups: int) -> jax.Array:
    return y if groups == 1 else join_packed(_split(y, widths), groups)


def add_lora_embedding(
    y: jax.Array,
    token_ids: jax.Array,
    bank: LoRABank,
    mapping: LoRAMapping,
    *,
    config: OpsConfig | None = None,
) -> jax.Array:
    """Embedding LoRA: `y[t] += scale[slot] * a[slot, token_ids[t]] @ b[slot]` (XLA path).

    Args:
      y: `[T, hidden]`, the base embedding's output.
      token_ids: int `[T]`, each in `[0, vocab)`. An eager call checks them on the host
        (`MappingError`); under `jit` they cannot be checked, and `jnp` indexing wraps a
        negative id (-1 reads the last row) and clamps one >= vocab.
      bank: `a [slots, vocab, R]`, `b [slots, R, hidden]`, `scale [slots]`.
      mapping: the step's `LoRAMapping`.
      config: tunables of the XLA path; `OpsConfig()` when None.
    """
    config = _check_config("add_lora_embedding", config)
    if not isinstance(bank, LoRABank):
        raise AdapterMismatchError(f"add_lora_embedding takes one LoRABank, got {type(bank)}")
    _check_num_slots("add_lora_embedding", mapping, bank)
    if _is_eager(y, token_ids, bank, mapping):
        _check_token_ids(np.asarray(token_ids), vocab=bank.a.shape[1])
        return _add_lora_embedding_jit(y, token_ids, bank, mapping, config=config)
    y, token_ids, bank = jnp.asarray(y), jnp.asarray(token_ids), jax.tree.map(jnp.asarray, bank)
    if y.ndim != 2 or token_ids.shape != (y.shape[0],):
        raise AdapterMismatchError(
            f"y must be [T, hidden] and token_ids [T], got {y.shape} and {token_ids.shape}"
        )
    if bank.b.shape[2] != y.shape[1]:
        raise AdapterMismatchError(
            f"bank's output dim {bank.b.shape[2]} != y's {y.shape[1]} columns"
        )
    token_slots, sorted_ids, counts, starts = _segments_for_rows(mapping, y.shape[0])
    if y.shape[0] == 0:
        return y

    def run(y, token_ids, banks, token_slots, sorted_ids, counts, starts):
        (bank,) = banks
        h = bank.a[token_slots, token_ids].astype(jnp.float32)  # [T, R]
        return _xla_blocks(
            y, h, None, ((bank.b, bank.scale),), token_slots, sorted_ids, counts, starts, config
        )

    data_mesh = _data_mesh(_mesh_of(y, bank.a), y)
    if data_mesh is None:
        return run(y, token_ids, (bank,), token_slots, sorted_ids, counts, starts)
    return _per_data_shard(run, data_mesh, y, token_ids, (bank,), token_slots, mapping.num_slots)


_add_lora_embedding_jit = jax.jit(add_lora_embedding, static_argnames=("config",))


# --------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------


def _is_eager(*trees) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _check_num_slots(where: str, mapping: LoRAMapping, bank: LoRABank) -> None:
    # A slot index past the banks would be clamped by the gathers: another adapter, silently.
    if not isinstance(mapping, LoRAMapping):
        raise MappingError(f"{where} needs a LoRAMapping, got {type(mapping).__name__}")
    check_arrays(where, mapping)
    if mapping.num_slots != bank.num_slots:
        raise MappingError(
            f"{where}: the mapping was built for num_slots={mapping.num_slots} but the banks "
            f"have {bank.num_slots} slots; build both from the same max_loras + 1"
        )


def _check_config(where: str, config) -> OpsConfig:
    if config is None:
        return OpsConfig()
    if not isinstance(config, OpsConfig):
        raise LoRAConfigError(f"{where}: config must be an OpsConfig or None, got {config!r}")
    return config


def _check_token_ids(ids: np.ndarray, vocab: int) -> None:
    if not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise MappingError(f"add_lora_embedding: token_ids must be ints, got {ids.dtype}")
    check_in_range(
        "token", "id", ids, vocab, where="add_lora_embedding: ", hint=": the bank's vocabulary"
    )


def _as_banks(banks) -> tuple[LoRABank, ...]:
    if isinstance(banks, LoRABank):
        return (banks,)
    if isinstance(banks, str) or not isinstance(banks, Iterable):
        raise AdapterMismatchError(
            f"banks must be a LoRABank or a non-empty sequence of them, got {type(banks).__name__}"
        )
    banks = tuple(banks)
    if not banks or not all(isinstance(b, LoRABank) for b in banks):
        raise AdapterMismatchError(
            f"banks must be a LoRABank or a non-empty sequence of them, got {banks}"
        )
    return banks


def _check_linear_args(y, x, banks) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise AdapterMismatchError(f"x must be [T, in] and y [T, out], got {x.shape} and {y.shape}")
    num_slots = banks[0].num_slots
    for i, bank in enumerate(banks):
        if bank.input_dim != x.shape[1] or bank.num_slots != num_slots:
            raise AdapterMismatchError(
                f"banks[{i}] is [slots={bank.num_slots}, in={bank.input_dim}], expected "
                f"[slots={num_slots}, in={x.shape[1]}] to match x {x.shape}"
            )
    total = sum(bank.output_dim for bank in banks)
    if total != y.shape[1]:
        raise AdapterMismatchError(
            f"the slices' output dims sum to {total}, but y has {y.shape[1]} columns"
        )


def _segments_for_rows(mapping: LoRAMapping, rows: int):
    """(token_slots, sorted_ids, slot_counts, slot_starts) for `rows` rows of activations."""
    if rows == mapping.token_slots.shape[0]:
        return tuple(
            jnp.asarray(v)
            for v in (
                mapping.token_slots,
                mapping.sorted_token_ids,
                mapping.slot_counts,
                mapping.slot_starts,
            )
        )
    if rows == mapping.seq_slots.shape[0]:
        # One row per sequence (last tokens): the mapping's segments are per token, so sort the
        # few sequence rows here. B is small; this is not the per-token hot path.
        slots = mapping.seq_slots.astype(jnp.int32)
        return slots, *_slot_segments(slots, mapping.num_slots)
    raise MappingError(
        f"activations have {rows} rows, but the mapping has {mapping.token_slots.shape[0]} "
        f"tokens and {mapping.seq_slots.shape[0]} sequences"
    )


def _mesh_of(*arrays):
    """The (abstract) mesh the first of `arrays` laid out on one has; None when none is."""
    for x in arrays:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if mesh is not None and mesh.axis_names:
            return mesh
    return None


def _splittable(mesh, axis: str) -> bool:
    """Whether `mesh` has `axis` over more than one device, not already manual (inside a
    caller's own `shard_map`, whose body sees its shard only)."""
    if mesh is None or axis not in mesh.axis_names or axis in mesh.manual_axes:
        return False
    return mesh.shape[axis] > 1


def _data_rows(mesh, y: jax.Array) -> bool:
    """Whether `mesh` has a `data` axis (`_splittable`) that divides `y`'s rows. Under a jit an
    Auto axis shows no split, so this cannot see whether the rows are split on it: jlora's
    convention (`jlora.sharding.shard_batch`) is that they are. Rows that are not still get
    the right result, at the cost of being split on entry (and gathered where asked for)."""
    return _splittable(mesh, DATA) and y.shape[0] % mesh.shape[DATA] == 0


def _data_mesh(mesh, y: jax.Array):
    """`mesh` when its `data` axis divides `y`'s rows (`_data_rows`); else None."""
    return mesh if _data_rows(mesh, y) else None


def _model_split(mesh, banks: tuple[LoRABank, ...]) -> tuple[str, ...] | None:
    """The banks' split over a `model` axis of more than one device, when every slice has the
    same one of `MODEL_SPLITS`; else None (the partitioner then places the op)."""
    if not _splittable(mesh, MODEL):
        return None
    splits = {bank.model_split for bank in banks}
    split = splits.pop() if len(splits) == 1 else None
    return split if split in MODEL_SPLITS else None


def _per_data_shard(run, mesh, y, x, banks, token_slots, num_slots: int):
    """`run` on each `data` shard's rows, with segments sorted within the shard.

    The mapping's slot order is global: under XLA's partitioner alone, every data shard gathers
    the whole batch's rows of `x` (an all-reduce of `[T, in]` per layer) and loops over every
    block of the batch. Here each shard sorts its own `T / data` token slots (a few int ops per
    layer) and touches only its rows; the `model` axis stays with the partitioner (`axis_names`),
    so the banks' tensor-parallel layouts are untouched. Rows are split as the batch is
    (`jlora.sharding.batch_sharding`: tokens row after row, batch rows on `data`).
    """

    def local(y, x, banks, token_slots):
        sorted_ids, counts, starts = _slot_segments(token_slots, num_slots)
        return run(y, x, banks, token_slots, sorted_ids, counts, starts)

    rows = P(DATA)
    # Under jit even when called eagerly: an eager shard_map cannot take the abstract mesh.
    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(rows, rows, P(), rows),
            out_specs=rows,
            axis_names=frozenset({DATA}),
            check_vma=False,  # Pallas calls carry no varying-axes annotations
        )
    )(y, x, banks, token_slots)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Shrink and expand apart, for layouts whose collective sits between them."""

    impl: str
    is_prefill: bool
    config: OpsConfig

    def _pallas(self, *arrays) -> bool:
        if self.impl != "pallas":
            return False
        reason = _pallas_unavailable(arrays, self.config)
        if reason:
            _log_fallback_once(reason)
        return not reason

    def shrink(self, x, a, token_slots, segs) -> tuple[jax.Array, ...]:
        """float32 `h_i [T, R_i]` per slice."""
        cfg, interpret = self.config, self.config.interpret
        if self._pallas(x, *a):
            if self.is_prefill:
                return tuple(pk.segmented_shrink(x, a, *segs, config=cfg.segmented,
                                                 interpret=interpret))  # fmt: skip
            return tuple(pk.gathered_shrink(x, a, token_slots, config=cfg.gathered,
                                            interpret=interpret))  # fmt: skip
        # The XLA block loop with an identity for B: its `h` comes out exact (float32).
        num_slots, ranks = a[0].shape[0], [ai.shape[2] for ai in a]
        eye = tuple(
            (jnp.broadcast_to(jnp.eye(r, dtype=jnp.float32), (num_slots, r, r)),
             jnp.ones(num_slots, jnp.float32))
            for r in ranks
        )  # fmt: skip
        h = jnp.zeros((x.shape[0], sum(ranks)), jnp.float32)
        h = _xla_blocks(h, x, a, eye, token_slots, *segs, cfg)
        return tuple(jnp.split(h, list(itertools.accumulate(ranks))[:-1], axis=1))

    def expand(self, y, hs, b, scale, token_slots, segs) -> jax.Array:
        cfg, interpret = self.config, self.config.interpret
        if self._pallas(y, *b):
            if self.is_prefill:
                return pk.segmented_expand(y, hs, b, scale, *segs, config=cfg.segmented,
                                           interpret=interpret)  # fmt: skip
            return pk.gathered_expand(y, hs, b, scale, token_slots, config=cfg.gathered,
                                      interpret=interpret)  # fmt: skip
        h = jnp.concatenate(hs, axis=1) if len(hs) > 1 else hs[0]
        return _xla_blocks(y, h, None, tuple(zip(b, scale, strict=True)), token_slots, *segs, cfg)


def _per_model_shard(
    run, parts, mesh, split, y, x, banks, token_slots, num_slots: int, local_groups=None
):
    """The op on each device's shard of a tensor-parallel layer, its collective explicit, once.

    XLA's partitioner alone puts the LoRA collective inside the XLA path's block loop (one per
    block), and cannot split the Pallas kernels' custom calls at all, so it gathers their inputs.
    Here, manual over `model` (and over `data` when it splits the rows), per `split`:

    - `("out",)`, column-parallel: each device adds its B columns' share into its columns of y;
      no collective.
    - `("rank", "out")`: each device shrinks to its rank columns, one all-gather of `h [T, R]`,
      then as above.
    - `("in",)`, row-parallel: each device shrinks its share of x's columns, one all-reduce of
      `h [T, R]`, then every device adds the whole delta into y (replicated, as the base output).
    - `("in", "out")`: the all-reduce, then each device adds into its columns of y.

    A packed projection's slices one after the other are split apart first, so that each device
    holds its share of every slice's columns (the base layer splits their concatenation
    instead). Grouped columns (`local_groups` whole groups on each device) need no such split:
    each device ungroups its own block.
    """
    data = _data_rows(mesh, y)
    rows = DATA if data else None
    split_in, split_rank, split_out = ("in" in split), ("rank" in split), ("out" in split)
    widths = [bank.output_dim for bank in banks]
    ys = tuple(_split(y, widths)) if split_out and local_groups is None else (y,)
    y_spec = P(rows, MODEL if split_out else None)
    # (a, b, scale) triples, not LoRABanks: a rank-split shard's A and B disagree on the rank.
    weight_spec = (
        P(None, MODEL if split_in else None, MODEL if split_rank else None),
        P(None, None, MODEL if split_out else None),
        P(),
    )

    def local(ys, x, weights, token_slots):  # on one device: its shards of every operand
        segs = _slot_segments(token_slots, num_slots)
        local_widths = [b.shape[2] for _, b, _ in weights]
        y = _ungroup(_concat(ys), local_widths, local_groups or 1)
        if split == ("out",):
            banks = tuple(LoRABank(a=a, b=b, scale=scale) for a, b, scale in weights)
            y = run(y, x, banks, token_slots, *segs)
        else:
            a, b, scale = zip(*weights, strict=True)
            ranks = [ai.shape[2] for ai in a]  # this device's shares of the ranks
            h = _concat(parts.shrink(x, a, token_slots, segs))
            if split_in:  # partial sums over this device's share of x's columns
                hs = _split(lax.psum(h, MODEL), ranks)
            else:  # rank shares: gathered as [T, model, sum_i R_i / model], each slice rebuilt
                gathered = lax.all_gather(h, MODEL, axis=1)
                hs = [g.reshape(g.shape[0], -1) for g in _split(gathered, ranks, axis=2)]
            y = parts.expand(y, tuple(hs), b, scale, token_slots, segs)
        y = _regroup(y, local_widths, local_groups or 1)
        return tuple(_split(y, [part.shape[1] for part in ys]))

    axes = frozenset({MODEL, DATA} if data else {MODEL})
    out = jax.jit(
        jax.shard_map(  # jit: see _per_data_shard
            local,
            mesh=mesh,
            in_specs=(
                tuple(y_spec for _ in ys),
                P(rows, MODEL if split_in else None),
                tuple(weight_spec for _ in banks),
                P(rows),
            ),
            out_specs=tuple(y_spec for _ in ys),
            axis_names=axes,
            check_vma=False,  # Pallas calls carry no varying-axes annotations
        )
    )(ys, x, tuple((bank.a, bank.b, bank.scale) for bank in banks), token_slots)
    return _concat(out)


def _concat(parts: Sequence[jax.Array]) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _split(x: jax.Array, widths: Sequence[int], axis: int = 1) -> list[jax.Array]:
    """`x` cut along `axis` into consecutive parts of `widths` (which sum to its size)."""
    return jnp.split(x, list(itertools.accumulate(widths))[:-1], axis=axis)


def _slot_segments(slots: jax.Array, num_slots: int):
    """(sorted_ids, counts, starts) of int `slots [T]`: a stable sort by slot."""
    slots = slots.astype(jnp.int32)
    counts = jnp.zeros(num_slots, jnp.int32).at[slots].add(1)
    starts = jnp.cumsum(counts) - counts
    return jnp.argsort(slots, stable=True).astype(jnp.int32), counts, starts


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logger.warning("jlora.ops: Pallas path unavailable (%s); using the XLA path", reason)


# --------------------------------------------------------------------------------------------
# Pallas path
# --------------------------------------------------------------------------------------------


def _pallas_unavailable(arrays, config: OpsConfig) -> str:
    """Why the Pallas kernels cannot take `arrays` here; "" when they can."""
    backend = jax.default_backend()
    if backend != "gpu" and not config.interpret:
        return f"the Pallas Triton kernels need a GPU, backend is {backend!r}"
    for arr in arrays:
        if arr.dtype not in _PALLAS_DTYPES:
            return f"an operand has dtype {arr.dtype}; the kernels take f32/bf16/f16"
    return ""


def _add_lora_pallas(y, x, banks, token_slots, sorted_ids, counts, starts, is_prefill, config):
    reason = _pallas_unavailable((x, y, *(b.a for b in banks)), config)
    if reason:
        raise NotImplementedError(reason)
    a = tuple(bank.a for bank in banks)
    b = tuple(bank.b for bank in banks)
    scale = tuple(bank.scale for bank in banks)
    if is_prefill:
        seg = (sorted_ids, counts, starts)
        cfg = config.segmented
        h = pk.segmented_shrink(x, a, *seg, config=cfg, interpret=config.interpret)
        return pk.segmented_expand(y, h, b, scale, *seg, config=cfg, interpret=config.interpret)
    cfg = config.gathered
    h = pk.gathered_shrink(x, a, token_slots, config=cfg, interpret=config.interpret)
    return pk.gathered_expand(y, h, b, scale, token_slots, config=cfg, interpret=config.interpret)


# --------------------------------------------------------------------------------------------
# XLA path (CPU)
# --------------------------------------------------------------------------------------------


def _add_lora_xla(y, x, banks, token_slots, sorted_ids, counts, starts, config):
    a = tuple(bank.a for bank in banks)
    expand = tuple((bank.b, bank.scale) for bank in banks)
    return _xla_blocks(y, x, a, expand, token_slots, sorted_ids, counts, starts, config)


def _xla_blocks(
    y: jax.Array,
    source: jax.Array,
    a: tuple[jax.Array, ...] | None,
    expand: tuple[tuple[jax.Array, jax.Array], ...],
    token_slots: jax.Array,
    sorted_ids: jax.Array,
    counts: jax.Array,
    starts: jax.Array,
    config: OpsConfig,
) -> jax.Array:
    """Adds, block by block, `concat_i(scale_i[s] * (rows @ a_i[s]) @ b_i[s])` into y.

    `source` is `[T, F]` in token order: x for a linear layer (`a` holds one `[S, in, R_i]` per
    slice), or an already computed float32 `h` (`a` is None: an embedding's gathered rows, or a
    sharded layer's reduced shrink), the slices' `h_i` side by side.
    `expand` holds `(b_i, scale_i)` per slice; the slices' widths sum to y's columns.
    """
    num_tokens = y.shape[0]
    strategy, block_t = _xla_plan(num_tokens, config)
    sorted_ids = sorted_ids.astype(jnp.int32)
    # Slot 0 needs no work: with its count zeroed it owns no blocks and its rows stay as they are.
    counts = counts.astype(jnp.int32).at[0].set(0)
    starts = starts.astype(jnp.int32)

    def weights(slot):  # one slot's A_i, B_i and scale_i, sliced once for all its rows
        a_s = None if a is None else tuple(ai[slot] for ai in a)
        return a_s, tuple((bi[slot], si[slot]) for bi, si in expand)

    def shrink_of(rows, a_s):  # [block_t, in] -> float32 h_i [block_t, R_i] per slice
        return tuple(
            jnp.matmul(rows, ai, precision=_EXACT, preferred_element_type=jnp.float32) for ai in a_s
        )

    def expand_of(hs, b_s):  # h_i per slice -> float32 [block_t, out]
        parts = [
            jnp.matmul(
                (h * si).astype(bi.dtype), bi, precision=_EXACT, preferred_element_type=jnp.float32
            )
            for h, (bi, si) in zip(hs, b_s, strict=True)
        ]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    ranks = tuple(b.shape[1] for b, _ in expand)
    h_cuts = list(itertools.accumulate(ranks))[:-1]

    def delta_of(rows, w):  # [block_t, F] -> float32 [block_t, out]
        a_s, b_s = w
        return expand_of(
            jnp.split(rows, h_cuts, axis=1) if a_s is None else shrink_of(rows, a_s), b_s
        )

    def per_token(unroll=block_t):
        slots = token_slots.astype(jnp.int32)
        return _xla_per_token(y, source, weights, delta_of, slots, sorted_ids, counts, unroll)

    def by_slot(rows_per_slot):
        return lambda: _xla_slots(
            y, source, delta_of, (a, expand), token_slots, sorted_ids, starts, rows_per_slot
        )

    if strategy == "slots":  # forced: a slot with more rows than block_t takes the row loop
        return lax.cond(
            jnp.max(counts) <= block_t, by_slot(block_t), lambda: per_token(_TOKEN_UNROLL)
        )
    if strategy == "token":
        if config.xla_strategy is not None:
            return per_token()
        block = min(_FEW_BLOCK_T, num_tokens)
        f32 = all(w.dtype == jnp.float32 for w in (*(a or ()), *(b for b, _ in expand)))
        branches = [
            per_token,
            lambda: _xla_sorted(y, source, weights, delta_of, sorted_ids, counts, starts, block),
            *(by_slot(k) for k in range(1, _SLOTS_MAX_ROWS + 1) if f32),
        ]
        return lax.switch(_decode_plan(counts, by_slot=f32), branches)
    if strategy == "sorted":
        return _xla_sorted(y, source, weights, delta_of, sorted_ids, counts, starts, block_t)
    return _xla_scatter(
        y,
        source,
        a is not None,
        ranks,
        weights,
        shrink_of,
        expand_of,
        sorted_ids,
        counts,
        starts,
        block_t,
    )


def _decode_plan(counts: jax.Array, *, by_slot: bool) -> jax.Array:
    """Branch of a decode-sized step, from its slot counts (slot 0 zeroed): 0 the row loop,
    1 sorted blocks (few adapters), 1 + k one product over all slots with k rows per slot
    (many adapters spread thin; only offered when `by_slot`)."""
    rows, used, most = jnp.sum(counts), jnp.sum(counts > 0), jnp.max(counts)
    choice = jnp.where((rows > 0) & (rows >= _FEW_ROWS_PER_SLOT * used), 1, 0)
    if by_slot:
        for k in range(_SLOTS_MAX_ROWS, 0, -1):  # the smallest k that fits wins
            fits = (most <= k) & (rows >= _SLOTS_MIN_FILL * k * counts.shape[0])
            choice = jnp.where(fits & (choice != 1), 1 + k, choice)
    return choice.astype(jnp.int32)


def _xla_per_token(y, source, weights, delta_of, token_slots, sorted_ids, counts, unroll):
    """A loop over the adapter rows (slot order, slot-0 rows skipped: `sorted_ids` from
    position `T - sum(counts)` on, counts with slot 0 zeroed), `unroll` rows per iteration; each
    row's A and B are sliced for that row alone and its delta added in place into y."""
    num_tokens = y.shape[0]
    first = num_tokens - jnp.sum(counts)
    pad_ids = jnp.concatenate([sorted_ids, jnp.zeros(unroll, jnp.int32)])

    def body(i, out):
        for u in range(unroll):  # unrolled by hand: the trip count is dynamic
            k = first + i * unroll + u
            t = pad_ids[k]
            slot = token_slots[t]
            old = lax.dynamic_slice_in_dim(out, t, 1)
            delta = delta_of(lax.dynamic_slice_in_dim(source, t, 1), weights(slot))
            new = (old.astype(jnp.float32) + delta).astype(out.dtype)
            # Past the last adapter row: padding, which must write nothing.
            out = lax.dynamic_update_slice_in_dim(out, jnp.where(k < num_tokens, new, old), t, 0)
        return out

    return lax.fori_loop(0, (num_tokens - first + unroll - 1) // unroll, body, y)


def _xla_slots(y, source, delta_of, bank_weights, token_slots, sorted_ids, starts, rows_per_slot):
    """One batched product over every slot. Row t goes to place (its slot, its rank among the
    slot's rows) of a zeroed `[S, rows_per_slot, F]` buffer, each slot's places run through that
    slot's A and B (`vmap` over the banks' slot axis: one read of every bank, no loop), and
    each row takes its place's delta back. Ranks must be below `rows_per_slot` (the caller checks
    the slot counts); slot-0 rows are sent out of bounds, so they neither go in nor change."""
    num_slots = starts.shape[0]
    slots = token_slots.astype(jnp.int32)
    rank = _positions(sorted_ids) - starts[slots]
    place = jnp.where(slots > 0, slots, num_slots)
    buffer = jnp.zeros((num_slots, rows_per_slot, source.shape[1]), source.dtype)
    buffer = buffer.at[place, rank].set(source, mode="drop")
    delta = jax.vmap(delta_of)(buffer, bank_weights)  # float32 [S, rows_per_slot, out]
    delta = delta.at[place, rank].get(mode="fill", fill_value=0)
    new = (y.astype(jnp.float32) + delta).astype(y.dtype)
    return jnp.where((slots > 0)[:, None], new, y)


def _positions(sorted_ids: jax.Array) -> jax.Array:
    """Each token's position in slot order: the inverse of the `sorted_ids` permutation."""
    num_tokens = sorted_ids.shape[0]
    order = jnp.arange(num_tokens, dtype=jnp.int32)
    return jnp.zeros(num_tokens, jnp.int32).at[sorted_ids].set(order)


def _xla_sorted(y, source, weights, delta_of, sorted_ids, counts, starts, block_t):
    """One loop over the blocks; rows moved by one permutation of `source` before the loop and
    one of the delta after it (cheap for the few rows of a decode step)."""
    num_tokens = y.shape[0]
    blocks = pk.segment_blocks(counts, starts, num_tokens=num_tokens, block_t=block_t)
    # Sorted copy of the source with block_t rows of slack, so the last block's slice stays in
    # bounds. A block may run past its segment into the next slot's rows: those rows of `delta`
    # are overwritten by the next slot's first block (blocks run in sorted order), and slot 0's
    # rows, first in the order, are never written.
    pad_ids = jnp.concatenate([sorted_ids, jnp.zeros(block_t, jnp.int32)])
    source_sorted = source[pad_ids]  # [T + block_t, F]

    def body(i, delta):
        rows = lax.dynamic_slice_in_dim(source_sorted, blocks.start[i], block_t)
        update = delta_of(rows, weights(blocks.slot[i]))
        return lax.dynamic_update_slice_in_dim(delta, update, blocks.start[i], 0)

    delta = jnp.zeros((num_tokens + block_t, y.shape[1]), jnp.float32)
    delta = lax.fori_loop(0, jnp.sum(blocks.length > 0), body, delta)[_positions(sorted_ids)]
    # Where the delta is zero (slot 0's rows) y stays as it is, bit for bit: -0.0 + 0.0 is +0.0.
    return jnp.where(delta == 0, y, (y.astype(jnp.float32) + delta).astype(y.dtype))


def _xla_scatter(
    y, source, shrink, widths, weights, shrink_of, expand_of, sorted_ids, counts, starts, block_t
):
    """Two passes over the non-empty adapter slots, each slicing a slot's weights once and
    walking its blocks of rows by token id: the shrink pass gathers a block's rows of `source`
    and stores `rows @ A_i` into a small float32 `h [T, sum R_i]`; the expand pass gathers the
    block's rows of h and scatter-adds their delta straight into y, which XLA updates in place.
    No permuted copies of x or of the output. (Shrink and expand in one pass per block measured
    3-9% of the base matmul slower at T=2048.) `widths` are the slices' ranks; without
    `shrink`, `source` already is h (the slices' side by side)."""
    num_tokens, num_slots = y.shape[0], counts.shape[0]
    used = jnp.nonzero(counts > 0, size=num_slots, fill_value=0)[0].astype(jnp.int32)
    num_used = jnp.sum(counts > 0)
    # Rows past the segment get index num_tokens, out of bounds: the gathers fill them with
    # zeros and the scatters drop them.
    pad_ids = jnp.concatenate([sorted_ids, jnp.full(block_t, num_tokens, jnp.int32)])
    lane = jnp.arange(block_t, dtype=jnp.int32)

    def over_blocks(body, carry):  # body(slot, ids, carry) for every block of every used slot
        def per_slot(k, carry):
            slot = used[k]

            def per_block(j, carry):
                first = j * block_t
                ids = lax.dynamic_slice_in_dim(pad_ids, starts[slot] + first, block_t)
                ids = jnp.where(lane < counts[slot] - first, ids, num_tokens)
                return body(slot, ids, carry)

            trips = (counts[slot] + block_t - 1) // block_t
            return lax.fori_loop(0, trips, per_block, carry)

        return lax.fori_loop(0, num_used, per_slot, carry)

    if not shrink:
        h = source
    else:

        def shrink(slot, ids, h):
            rows = source.at[ids].get(mode="fill", fill_value=0)
            hs = shrink_of(rows, weights(slot)[0])
            return h.at[ids].set(jnp.concatenate(hs, axis=1), mode="drop")

        h = over_blocks(shrink, jnp.zeros((num_tokens, sum(widths)), jnp.float32))
    cuts = list(itertools.accumulate(widths))[:-1]

    def add_delta(slot, ids, out):
        hs = jnp.split(h.at[ids].get(mode="fill", fill_value=0), cuts, axis=1)
        delta = expand_of(hs, weights(slot)[1])
        if out.dtype == jnp.float32:
            return out.at[ids].add(delta, mode="drop")
        # Narrow dtypes: add in float32 and round once, as the reference does.
        old = out.at[ids].get(mode="fill", fill_value=0).astype(jnp.float32)
        return out.at[ids].set((old + delta).astype(out.dtype), mode="drop")

    return over_blocks(add_delta, y)
