"""Segment metadata for the segmented (prefill) kernels: which slot owns each block of tokens.

Tokens are sorted by slot on the host (`sorted_token_ids`, stable), so each slot's tokens form
one contiguous segment of the sorted order. The kernels cut every segment into blocks of
`block_t` sorted positions; a block never straddles two slots, so a program reads its slot's
A or B tile once for the whole block. The number of blocks depends on the data, so the grid is
sized by a static upper bound and the blocks past the real ones have `length == 0` and exit.

Worked example, `slot_counts = [3, 0, 5, 1]`, `block_t = 4`, `num_tokens = 9`::

    slot_starts     = [0, 3, 3, 8]          (exclusive cumsum of the counts)
    blocks per slot = [1, 0, 2, 1]          (ceil(count / block_t))
    block  0: slot 0, start 0, length 3     sorted positions 0..2
    block  1: slot 2, start 3, length 4     sorted positions 3..6
    block  2: slot 2, start 7, length 1     sorted position  7
    block  3: slot 3, start 8, length 1     sorted position  8
    blocks 4, 5: length 0                   (grid bound cdiv(9, 4) + min(4, 9) - 1 = 6)

The bound: sum_s ceil(c_s / b) <= ceil(sum_s c_s / b) + (#non-empty slots) - 1, because
ceil(p) + ceil(q) <= ceil(p + q) + 1.

This metadata is a function of the batch mapping only; compute it once per step and it is
shared by every layer (inside one jit, XLA deduplicates the identical computations).

Must not import jlora.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SegmentBlocks", "num_blocks_bound", "segment_blocks", "slots_of_sorted_positions"]


class SegmentBlocks(NamedTuple):
    """Per-block metadata, each int32 `[num_blocks]` (a static upper bound)."""

    slot: jax.Array  # slot owning the block; 0 for empty blocks
    start: jax.Array  # first sorted position of the block
    length: jax.Array  # valid rows in the block, 0 < length <= block_t; 0 = empty, exit


def num_blocks_bound(num_tokens: int, num_slots: int, block_t: int) -> int:
    """Static grid bound on the number of non-empty blocks (see the module docstring)."""
    if num_tokens <= 0:
        return 0
    return -(-num_tokens // block_t) + min(num_slots, num_tokens) - 1


def segment_blocks(
    slot_counts: jax.Array, slot_starts: jax.Array, *, num_tokens: int, block_t: int
) -> SegmentBlocks:
    """Cuts each slot's segment of the sorted tokens into blocks of `block_t` positions.

    Args:
      slot_counts: int32 `[slots]`, tokens per slot; sums to `num_tokens`.
      slot_starts: int32 `[slots]`, exclusive cumsum of `slot_counts`.
      num_tokens: static T.
      block_t: static block size.

    Returns:
      `SegmentBlocks` with `num_blocks_bound(num_tokens, slots, block_t)` entries, real blocks
      first in sorted order, empty blocks (`length == 0`, `slot == 0`) after them.
    """
    num_slots = slot_counts.shape[0]
    num_blocks = num_blocks_bound(num_tokens, num_slots, block_t)
    # jnp, not `.astype`: a host mapping's numpy arrays must not meet traced indices below.
    counts = jnp.asarray(slot_counts, jnp.int32)
    blocks_per_slot = (counts + block_t - 1) // block_t
    block_end = jnp.cumsum(blocks_per_slot)
    block_begin = block_end - blocks_per_slot
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    # compare_all: one fused comparison of [num_blocks, slots], no sequential binary search.
    slot = jnp.searchsorted(block_end, b, side="right", method="compare_all").astype(jnp.int32)
    real = slot < num_slots
    slot = jnp.where(real, slot, 0)
    first = (b - block_begin[slot]) * block_t
    start = jnp.asarray(slot_starts, jnp.int32)[slot] + first
    length = jnp.where(real, jnp.minimum(block_t, counts[slot] - first), 0)
    start = jnp.where(real, start, 0)
    return SegmentBlocks(slot=slot, start=start, length=length.astype(jnp.int32))


def slots_of_sorted_positions(slot_counts: jax.Array, num_tokens: int) -> jax.Array:
    """int32 `[num_tokens]`: the slot of each sorted position (for references and tests)."""
    ends = jnp.cumsum(slot_counts.astype(jnp.int32))
    pos = jnp.arange(num_tokens, dtype=jnp.int32)
    return jnp.searchsorted(ends, pos, side="right", method="compare_all").astype(jnp.int32)
