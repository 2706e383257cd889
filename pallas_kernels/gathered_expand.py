"""Gathered LoRA expand (decode): `y[t, cols_i] += scale_i[slot[t]] * h_i[t] @ B_i[slot[t]]`.

One program per token and `block_n` output columns of one slice (Punica's BGMV expand): it
reads the token's `[R_i]` row of h and its slot's B tile and reduces over the rank in float32
(vector-matrix, no `tl.dot`). `y` is updated in place (`input_output_aliases`); tokens of slot 0
exit at once and leave their rows untouched.

Slices are written one after another from column `offset`, as in `segmented_expand`.

Layout: y `[T, out]`, h_i `[T, R_i]` float32, B_i `[slots, R_i, width_i]`, scale_i float32
`[slots]`, token_slots int32 `[T]`.

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
    as_slices,
    cdiv,
    check_expand_args,
    expand_reference,
    pow2_at_least,
    slice_blocks,
)
from pallas_kernels.config import GatheredConfig

__all__ = ["gathered_expand", "gathered_expand_reference"]


def _gathered_expand_kernel(
    # inputs
    token_slots_ref,  # [T] int32
    *refs,  # h_refs: n x [T, R_i]; b_refs: n x [slots, R_i, width_i]; scale_refs: n x [slots];
    # y_in_ref [T, out] (aliased to the output); outputs: y_ref [T, out]
    slices: tuple[tuple[int, int], ...],  # (first column block, number of blocks) per slice
    ranks: tuple[int, ...],
    widths: tuple[int, ...],
    offsets: tuple[int, ...],
    block_r: int,
    block_n: int,
):
    n = len(ranks)
    h_refs, b_refs, scale_refs = refs[:n], refs[n : 2 * n], refs[2 * n : 3 * n]
    y_ref = refs[-1]
    t, j = pl.program_id(0), pl.program_id(1)
    slot = token_slots_ref[t]

    for i in range(n):
        first, count = slices[i]

        @pl.when((slot != 0) & (j >= first) & (j < first + count))
        def _slice(i=i, first=first):
            h_ref, b_ref, rank = h_refs[i], b_refs[i], ranks[i]
            c0 = (j - first) * block_n
            col_ok = c0 + jnp.arange(block_n) < widths[i]  # [block_n]

            def body(r, acc):
                r_ok = r * block_r + jnp.arange(block_r) < rank
                hr = plgpu.load(
                    h_ref.at[t, pl.ds(r * block_r, block_r)], mask=r_ok, other=0
                )  # [block_r]
                br = plgpu.load(
                    b_ref.at[slot, pl.ds(r * block_r, block_r), pl.ds(c0, block_n)],
                    mask=r_ok[:, None] & col_ok[None, :],
                    other=0,
                )  # [block_r, block_n]
                prod = hr.astype(jnp.float32)[:, None] * br.astype(jnp.float32)
                return acc + jnp.sum(prod, axis=0)

            acc = jnp.zeros((block_n,), jnp.float32)
            acc = lax.fori_loop(0, cdiv(rank, block_r), body, acc)
            delta = acc * scale_refs[i][slot].astype(jnp.float32)
            y_at = y_ref.at[t, pl.ds(offsets[i] + c0, block_n)]
            yt = plgpu.load(y_at, mask=col_ok, other=0)  # [block_n]
            plgpu.store(y_at, (yt.astype(jnp.float32) + delta).astype(yt.dtype), mask=col_ok)


def _gathered_expand_call(
    token_slots, y, h, b, scale, *, offset: int, config: GatheredConfig, interpret: bool
):
    num_tokens = y.shape[0]
    ranks = tuple(bi.shape[1] for bi in b)
    widths = tuple(bi.shape[2] for bi in b)
    offsets = tuple(offset + sum(widths[:i]) for i in range(len(widths)))
    block_r = min(config.block_r, pow2_at_least(max(ranks)))
    block_n = min(config.block_n, pow2_at_least(max(widths)))
    slices = slice_blocks(widths, block_n)
    grid = (num_tokens, sum(count for _, count in slices))

    def whole(shape):
        return pl.BlockSpec(shape, lambda t, j: (0,) * len(shape))

    kernel = functools.partial(
        _gathered_expand_kernel,
        slices=slices,
        ranks=ranks,
        widths=widths,
        offsets=offsets,
        block_r=block_r,
        block_n=block_n,
    )
    operands = (token_slots, *h, *b, *scale, y)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            whole(token_slots.shape),  # token_slots
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
        name=f"lora_gathered_expand_{len(ranks)}slices",
    )(*operands)


@functools.partial(jax.jit, static_argnames=("offset", "config", "interpret"))
def gathered_expand(
    y: jax.Array,
    h: jax.Array | Sequence[jax.Array],
    b: jax.Array | Sequence[jax.Array],
    scale: jax.Array | Sequence[jax.Array],
    token_slots: jax.Array,
    *,
    offset: int = 0,
    config: GatheredConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Gathered expand: adds `scale_i[slot] * h_i @ b_i[slot]` into slice i's columns of `y`.

    Args:
      y: `[T, out]`; returned updated (donate it to update in place).
      h: `[T, R]` (float32, from `gathered_shrink`), or one per slice.
      b: `[slots, R, width]`, or one per slice; slice i lands in columns
        `[offset + sum(widths[:i]), ... + widths[i])`.
      scale: float32 `[slots]`, or one per slice.
      token_slots: int32 `[T]`, the slot of each token (0 = no adapter).
      offset: first output column of slice 0.
      config: block sizes and launch parameters; `GatheredConfig()` when None.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      `y` plus the LoRA delta, same shape and dtype; rows of slot 0 unchanged.
    """
    config = GatheredConfig() if config is None else config
    h, b, scale = as_slices("h", h), as_slices("b", b), as_slices("scale", scale)
    check_expand_args(y, h, b, scale, offset, "token_slots", token_slots)
    if y.shape[0] == 0:
        return y
    return _gathered_expand_call(
        token_slots.astype(jnp.int32),
        y,
        h,
        b,
        tuple(s.astype(jnp.float32) for s in scale),
        offset=offset,
        config=config,
        interpret=interpret,
    )


def gathered_expand_reference(
    y: jax.Array,
    h: jax.Array | Sequence[jax.Array],
    b: jax.Array | Sequence[jax.Array],
    scale: jax.Array | Sequence[jax.Array],
    token_slots: jax.Array,
    *,
    offset: int = 0,
) -> jax.Array:
    """Plain-jnp float32 reference of `gathered_expand`."""
    return expand_reference(y, h, b, scale, token_slots, offset)
