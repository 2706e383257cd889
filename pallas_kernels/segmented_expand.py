"""Segmented LoRA expand (prefill): `y[t, cols_i] += scale_i[slot] * h_i[t] @ B_i[slot]`, Pallas.

Tokens are sorted by slot (see `segments.py`); each program owns one block of up to `block_t`
sorted tokens of a single slot and `block_n` output columns of one slice, so it reads its B
tile once per block (Punica's SGMV expand). Rows are gathered and scattered by token id inside
the kernel, and `y` is updated in place (`input_output_aliases`): blocks of slot 0 and the empty
blocks past the real ones exit at once and leave their rows untouched.

Slices: slice i is written into columns `[offset_i, offset_i + width_i)` of `y`, where the
slices follow each other from `offset` in order (fused qkv: q, k, v with unequal widths). The
second grid axis enumerates the column blocks of all slices one after another.

Layout: y `[T, out]`, h_i `[T, R_i]` float32, B_i `[slots, R_i, width_i]`, scale_i float32
`[slots]`. The expand dot runs in B's dtype (h is cast to it, as in vLLM) with float32
accumulation; the sum `y + delta` is formed in float32 and cast to y's dtype.

Must not import jlora.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    EXACT_DOT,
    as_slices,
    cdiv,
    check_expand_args,
    check_int_vector,
    expand_reference,
    pow2_at_least,
    slice_blocks,
)
from pallas_kernels.config import SegmentedConfig
from pallas_kernels.segments import segment_blocks, slots_of_sorted_positions

__all__ = ["segmented_expand", "segmented_expand_reference"]


def _segmented_expand_kernel(
    # inputs
    block_slot_ref,  # [num_blocks] int32
    block_start_ref,  # [num_blocks] int32, first sorted position of the block
    block_len_ref,  # [num_blocks] int32, 0 = empty block
    sorted_ids_ref,  # [T] int32, token ids in slot order
    *refs,  # h_refs: n x [T, R_i]; b_refs: n x [slots, R_i, width_i]; scale_refs: n x [slots];
    # y_in_ref [T, out] (aliased to the output); outputs: y_ref [T, out]
    slices: tuple[tuple[int, int], ...],  # (first column block, number of blocks) per slice
    ranks: tuple[int, ...],
    widths: tuple[int, ...],
    offsets: tuple[int, ...],
    num_tokens: int,
    block_t: int,
    block_r: int,
    block_n: int,
):
    n = len(ranks)
    h_refs, b_refs, scale_refs = refs[:n], refs[n : 2 * n], refs[2 * n : 3 * n]
    y_ref = refs[-1]
    b, j = pl.program_id(0), pl.program_id(1)
    length = block_len_ref[b]
    slot = block_slot_ref[b]
    start = block_start_ref[b]

    t = jnp.arange(block_t)
    row_ok = t < length  # [block_t]
    rows = plgpu.load(sorted_ids_ref.at[pl.ds(start, block_t)], mask=row_ok, other=0)
    # Masked-out rows point past the end: never dereferenced, and dropped by interpret mode.
    rows = jnp.where(row_ok, rows, num_tokens)  # [block_t]

    for i in range(n):
        first, count = slices[i]

        @pl.when((length > 0) & (slot != 0) & (j >= first) & (j < first + count))
        def _slice(i=i, first=first):
            h_ref, b_ref, rank = h_refs[i], b_refs[i], ranks[i]
            c0 = (j - first) * block_n
            cols = c0 + jnp.arange(block_n)  # [block_n], within the slice
            col_ok = cols < widths[i]

            def body(r, acc):
                rr = r * block_r + jnp.arange(block_r)
                r_ok = rr < rank
                ht = plgpu.load(
                    h_ref.at[rows[:, None], rr[None, :]],
                    mask=row_ok[:, None] & r_ok[None, :],
                    other=0,
                )  # [block_t, block_r]
                bt = plgpu.load(
                    b_ref.at[slot, pl.ds(r * block_r, block_r), pl.ds(c0, block_n)],
                    mask=r_ok[:, None] & col_ok[None, :],
                    other=0,
                )  # [block_r, block_n]
                return acc + plgpu.dot(ht.astype(bt.dtype), bt, precision=EXACT_DOT)

            acc = jnp.zeros((block_t, block_n), jnp.float32)
            acc = lax.fori_loop(0, cdiv(rank, block_r), body, acc)
            delta = acc * scale_refs[i][slot].astype(jnp.float32)
            y_at = y_ref.at[rows[:, None], (offsets[i] + cols)[None, :]]
            mask = row_ok[:, None] & col_ok[None, :]
            yt = plgpu.load(y_at, mask=mask, other=0)  # [block_t, block_n]
            plgpu.store(y_at, (yt.astype(jnp.float32) + delta).astype(yt.dtype), mask=mask)


def _segmented_expand_call(
    blocks,
    sorted_token_ids,
    y,
    h,
    b,
    scale,
    *,
    offset: int,
    config: SegmentedConfig,
    interpret: bool,
):
    num_tokens = y.shape[0]
    ranks = tuple(bi.shape[1] for bi in b)
    widths = tuple(bi.shape[2] for bi in b)
    offsets = tuple(offset + sum(widths[:i]) for i in range(len(widths)))
    num_blocks = blocks.slot.shape[0]
    block_r = min(config.block_r, pow2_at_least(max(ranks)))
    block_n = min(config.block_n, pow2_at_least(max(widths)))
    slices = slice_blocks(widths, block_n)
    grid = (num_blocks, sum(count for _, count in slices))

    def whole(shape):
        return pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))

    kernel = functools.partial(
        _segmented_expand_kernel,
        slices=slices,
        ranks=ranks,
        widths=widths,
        offsets=offsets,
        num_tokens=num_tokens,
        block_t=config.block_t,
        block_r=block_r,
        block_n=block_n,
    )
    operands = (blocks.slot, blocks.start, blocks.length, sorted_token_ids, *h, *b, *scale, y)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            whole(blocks.slot.shape),  # block_slot
            whole(blocks.start.shape),  # block_start
            whole(blocks.length.shape),  # block_len
            whole(sorted_token_ids.shape),  # sorted_token_ids
            *(whole(hi.shape) for hi in h),  # h, one per slice
            *(whole(bi.shape) for bi in b),  # b, one per slice
            *(whole(si.shape) for si in scale),  # scale, one per slice
            whole(y.shape),  # y (aliased to the output)
        ],
        out_specs=whole(y.shape),  # y
        out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        input_output_aliases={len(operands) - 1: 0},
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name=f"lora_segmented_expand_{len(ranks)}slices",
    )(*operands)


@functools.partial(jax.jit, static_argnames=("offset", "config", "interpret"))
def segmented_expand(
    y: jax.Array,
    h: jax.Array | Sequence[jax.Array],
    b: jax.Array | Sequence[jax.Array],
    scale: jax.Array | Sequence[jax.Array],
    sorted_token_ids: jax.Array,
    slot_counts: jax.Array,
    slot_starts: jax.Array,
    *,
    offset: int = 0,
    config: SegmentedConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Segmented expand: adds `scale_i[slot] * h_i @ b_i[slot]` into slice i's columns of `y`.

    Args:
      y: `[T, out]` in token order; returned updated (donate it to update in place).
      h: `[T, R]` (float32, from `segmented_shrink`), or one per slice.
      b: `[slots, R, width]`, or one per slice; slice i lands in columns
        `[offset + sum(widths[:i]), ... + widths[i])`.
      scale: float32 `[slots]`, or one per slice.
      sorted_token_ids, slot_counts, slot_starts: the segment metadata (see `segments.py`).
      offset: first output column of slice 0.
      config: block sizes and launch parameters; `SegmentedConfig()` when None.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      `y` plus the LoRA delta, same shape and dtype; rows of slot 0 unchanged.
    """
    config = SegmentedConfig() if config is None else config
    h, b, scale = as_slices("h", h), as_slices("b", b), as_slices("scale", scale)
    check_expand_args(y, h, b, scale, offset, "sorted_token_ids", sorted_token_ids)
    check_int_vector("slot_counts", slot_counts, b[0].shape[0])
    check_int_vector("slot_starts", slot_starts, b[0].shape[0])
    num_tokens = y.shape[0]
    if num_tokens == 0:
        return y
    blocks = segment_blocks(slot_counts, slot_starts, num_tokens=num_tokens, block_t=config.block_t)
    return _segmented_expand_call(
        blocks,
        sorted_token_ids.astype(jnp.int32),
        y,
        h,
        b,
        tuple(s.astype(jnp.float32) for s in scale),
        offset=offset,
        config=config,
        interpret=interpret,
    )


def segmented_expand_reference(
    y: jax.Array,
    h: jax.Array | Sequence[jax.Array],
    b: jax.Array | Sequence[jax.Array],
    scale: jax.Array | Sequence[jax.Array],
    sorted_token_ids: jax.Array,
    slot_counts: jax.Array,
    slot_starts: jax.Array,
    *,
    offset: int = 0,
) -> jax.Array:
    """Plain-jnp float32 reference of `segmented_expand`."""
    del slot_starts  # implied by slot_counts
    num_tokens = y.shape[0]
    slot_of_pos = slots_of_sorted_positions(slot_counts, num_tokens)
    token_slots = jnp.zeros(num_tokens, jnp.int32).at[sorted_token_ids].set(slot_of_pos)
    return expand_reference(y, h, b, scale, token_slots, offset)
