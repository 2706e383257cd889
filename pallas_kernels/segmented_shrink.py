"""Segmented LoRA shrink (prefill): `h_i[t] = x[t] @ A_i[slot(t)]` in float32, Pallas/Triton.

Tokens are sorted by slot (see `segments.py`); each program owns one block of up to `block_t`
sorted tokens of a single slot, so it reads its A tile once for the whole block instead of once
per token (Punica's SGMV shrink). The rows of a block are gathered from `x` by token id inside
the kernel; `x` itself is never permuted. Several slices (the q/k/v or gate/up parts of a
packed projection, each with its own A and rank) are served by one launch: the second grid axis
enumerates the rank blocks of all slices one after another.

Layout: x `[T, in]`, A_i `[slots, in, R_i]`, h_i `[T, R_i]` float32 (rows of slot 0 are zeros).

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
    check_int_vector,
    pow2_at_least,
    reduction_trips,
    slice_blocks,
)
from pallas_kernels.config import SegmentedConfig
from pallas_kernels.segments import num_blocks_bound, segment_blocks, slots_of_sorted_positions

__all__ = ["segmented_shrink", "segmented_shrink_reference"]


def _segmented_shrink_kernel(
    # inputs
    block_slot_ref,  # [num_blocks] int32
    block_start_ref,  # [num_blocks] int32, first sorted position of the block
    block_len_ref,  # [num_blocks] int32, 0 = empty block
    sorted_ids_ref,  # [T] int32, token ids in slot order
    x_ref,  # [T, in]
    *refs,  # a_refs: n x [slots, in, R_i]; then outputs h_refs: n x [T, R_i] float32
    slices: tuple[tuple[int, int], ...],  # (first rank block, number of rank blocks) per slice
    ranks: tuple[int, ...],
    num_tokens: int,
    in_features: int,
    block_t: int,
    block_k: int,
    block_r: int,
):
    n = len(ranks)
    a_refs, h_refs = refs[:n], refs[n:]
    b, j = pl.program_id(0), pl.program_id(1)
    length = block_len_ref[b]
    slot = block_slot_ref[b]
    start = block_start_ref[b]

    t = jnp.arange(block_t)
    row_ok = t < length  # [block_t]
    rows = plgpu.load(sorted_ids_ref.at[pl.ds(start, block_t)], mask=row_ok, other=0)
    # Masked-out rows point past the end: never dereferenced, and dropped by interpret mode.
    rows = jnp.where(row_ok, rows, num_tokens)  # [block_t]

    for i, ((first, count), rank) in enumerate(zip(slices, ranks, strict=True)):
        a_ref, h_ref = a_refs[i], h_refs[i]

        @pl.when((length > 0) & (j >= first) & (j < first + count))
        def _slice(a_ref=a_ref, h_ref=h_ref, first=first, rank=rank):
            r0 = (j - first) * block_r
            cols = r0 + jnp.arange(block_r)
            out_mask = row_ok[:, None] & (cols < rank)[None, :]  # [block_t, block_r]

            def body(k, acc):
                kk = k * block_k + jnp.arange(block_k)
                k_ok = kk < in_features
                xt = plgpu.load(
                    x_ref.at[rows[:, None], kk[None, :]],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0,
                )  # [block_t, block_k]
                at = plgpu.load(
                    a_ref.at[slot, pl.ds(k * block_k, block_k), pl.ds(r0, block_r)],
                    mask=k_ok[:, None] & (cols < rank)[None, :],
                    other=0,
                )  # [block_k, block_r]
                # The wider of the two dtypes (static): float32 x keeps its precision against
                # a bf16/f16 bank, as the gathered kernel and the XLA path do.
                dt = jnp.promote_types(xt.dtype, at.dtype)
                return acc + plgpu.dot(xt.astype(dt), at.astype(dt), precision=EXACT_DOT)

            acc = jnp.zeros((block_t, block_r), jnp.float32)
            # Slot 0 ("no adapter") skips the reduction and stores zeros.
            acc = lax.fori_loop(0, reduction_trips(slot, in_features, block_k), body, acc)
            plgpu.store(h_ref.at[rows[:, None], cols[None, :]], acc, mask=out_mask)


def _segmented_shrink_call(
    blocks, sorted_token_ids, x, a, *, config: SegmentedConfig, interpret: bool
):
    num_tokens, in_features = x.shape
    ranks = tuple(ai.shape[2] for ai in a)
    num_blocks = blocks.slot.shape[0]
    block_r = min(config.block_r, pow2_at_least(max(ranks)))
    block_k = min(config.block_k, pow2_at_least(in_features))
    slices = slice_blocks(ranks, block_r)
    grid = (num_blocks, sum(count for _, count in slices))

    def whole(shape):
        return pl.BlockSpec(shape, lambda b, j: (0,) * len(shape))

    kernel = functools.partial(
        _segmented_shrink_kernel,
        slices=slices,
        ranks=ranks,
        num_tokens=num_tokens,
        in_features=in_features,
        block_t=config.block_t,
        block_k=block_k,
        block_r=block_r,
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            whole(blocks.slot.shape),  # block_slot
            whole(blocks.start.shape),  # block_start
            whole(blocks.length.shape),  # block_len
            whole(sorted_token_ids.shape),  # sorted_token_ids
            whole(x.shape),  # x
            *(whole(ai.shape) for ai in a),  # a, one per slice
        ],
        out_specs=[whole((num_tokens, r)) for r in ranks],  # h, one per slice
        out_shape=[jax.ShapeDtypeStruct((num_tokens, r), jnp.float32) for r in ranks],
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name=f"lora_segmented_shrink_{len(ranks)}slices",
    )(blocks.slot, blocks.start, blocks.length, sorted_token_ids, x, *a)


def _check(x, a, sorted_token_ids, slot_counts, slot_starts):
    if x.ndim != 2:
        raise ValueError(f"x must be [T, in], got shape {x.shape}")
    num_tokens, in_features = x.shape
    num_slots = a[0].shape[0] if a[0].ndim == 3 else None
    for i, ai in enumerate(a):
        if ai.ndim != 3 or ai.shape[0] != num_slots or ai.shape[1] != in_features:
            raise ValueError(
                f"a[{i}] must be [slots, in={in_features}, rank] with {num_slots} slots, "
                f"got shape {ai.shape}"
            )
    check_int_vector("sorted_token_ids", sorted_token_ids, num_tokens)
    check_int_vector("slot_counts", slot_counts, num_slots)
    check_int_vector("slot_starts", slot_starts, num_slots)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def segmented_shrink(
    x: jax.Array,
    a: jax.Array | Sequence[jax.Array],
    sorted_token_ids: jax.Array,
    slot_counts: jax.Array,
    slot_starts: jax.Array,
    *,
    config: SegmentedConfig | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """Segmented shrink: `h_i[t] = x[t] @ a_i[slot(t)]`, accumulated in float32.

    Args:
      x: `[T, in]` activations in token order.
      a: one `[slots, in, R]` array, or one per output slice (ranks may differ).
      sorted_token_ids: int32 `[T]`, token ids ordered by slot (stable).
      slot_counts: int32 `[slots]`, tokens per slot.
      slot_starts: int32 `[slots]`, exclusive cumsum of `slot_counts`.
      config: block sizes and launch parameters; `SegmentedConfig()` when None.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      float32 `[T, R]` (or a tuple, one per slice); rows of slot 0 are zeros.
    """
    config = SegmentedConfig() if config is None else config
    a_tuple = as_slices("a", a)
    _check(x, a_tuple, sorted_token_ids, slot_counts, slot_starts)
    num_tokens = x.shape[0]
    if num_tokens == 0:
        hs = tuple(jnp.zeros((0, ai.shape[2]), jnp.float32) for ai in a_tuple)
    else:
        blocks = segment_blocks(
            slot_counts, slot_starts, num_tokens=num_tokens, block_t=config.block_t
        )
        assert blocks.slot.shape[0] == num_blocks_bound(
            num_tokens, slot_counts.shape[0], config.block_t
        )
        hs = tuple(
            _segmented_shrink_call(
                blocks,
                sorted_token_ids.astype(jnp.int32),
                x,
                a_tuple,
                config=config,
                interpret=interpret,
            )
        )
    return hs if isinstance(a, Sequence) else hs[0]


def segmented_shrink_reference(
    x: jax.Array,
    a: jax.Array | Sequence[jax.Array],
    sorted_token_ids: jax.Array,
    slot_counts: jax.Array,
    slot_starts: jax.Array,
) -> jax.Array | tuple[jax.Array, ...]:
    """Plain-jnp float32 reference of `segmented_shrink` (per-token gather, HIGHEST precision)."""
    del slot_starts  # implied by slot_counts
    a_tuple = as_slices("a", a)
    num_tokens = x.shape[0]
    slot_of_pos = slots_of_sorted_positions(slot_counts, num_tokens)
    token_slots = jnp.zeros(num_tokens, jnp.int32).at[sorted_token_ids].set(slot_of_pos)
    hs = tuple(
        jnp.einsum(
            "ti,tir->tr",
            x.astype(jnp.float32),
            ai[token_slots].astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )
        * (token_slots != 0)[:, None]  # the kernels' contract, whatever slot 0 of A holds
        for ai in a_tuple
    )
    return hs if isinstance(a, Sequence) else hs[0]
