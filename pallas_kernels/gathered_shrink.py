"""Gathered LoRA shrink (decode): `h_i[t] = x[t] @ A_i[slot[t]]` in float32, Pallas/Triton.

Decode batches hold one or a few tokens per sequence, each with its own slot, so there is no
block of tokens to share an A tile: each program takes one token and `block_r` rank columns of
one slice and streams its slot's A in chunks of `block_k` rows (Punica's BGMV shrink). The
products are vector-matrix, so the kernel multiplies and reduces in float32 instead of calling
`tl.dot` (which needs 16 rows). Tokens of slot 0 store zeros without reading A.

Layout: x `[T, in]`, A_i `[slots, in, R_i]`, token_slots int32 `[T]`, h_i `[T, R_i]` float32.

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
    check_int_vector,
    pow2_at_least,
    reduction_trips,
    slice_blocks,
)
from pallas_kernels.config import GatheredConfig

__all__ = ["gathered_shrink", "gathered_shrink_reference"]


def _gathered_shrink_kernel(
    # inputs
    token_slots_ref,  # [T] int32
    x_ref,  # [T, in]
    *refs,  # a_refs: n x [slots, in, R_i]; then outputs h_refs: n x [T, R_i] float32
    slices: tuple[tuple[int, int], ...],  # (first rank block, number of rank blocks) per slice
    ranks: tuple[int, ...],
    in_features: int,
    block_k: int,
    block_r: int,
):
    n = len(ranks)
    a_refs, h_refs = refs[:n], refs[n:]
    t, j = pl.program_id(0), pl.program_id(1)
    slot = token_slots_ref[t]

    for i, ((first, count), rank) in enumerate(zip(slices, ranks, strict=True)):
        a_ref, h_ref = a_refs[i], h_refs[i]

        @pl.when((j >= first) & (j < first + count))
        def _slice(a_ref=a_ref, h_ref=h_ref, first=first, rank=rank):
            r0 = (j - first) * block_r
            r_ok = r0 + jnp.arange(block_r) < rank  # [block_r]

            def body(k, acc):
                k_ok = k * block_k + jnp.arange(block_k) < in_features
                xk = plgpu.load(
                    x_ref.at[t, pl.ds(k * block_k, block_k)], mask=k_ok, other=0
                )  # [block_k]
                ak = plgpu.load(
                    a_ref.at[slot, pl.ds(k * block_k, block_k), pl.ds(r0, block_r)],
                    mask=k_ok[:, None] & r_ok[None, :],
                    other=0,
                )  # [block_k, block_r]
                prod = xk.astype(jnp.float32)[:, None] * ak.astype(jnp.float32)
                return acc + jnp.sum(prod, axis=0)

            acc = jnp.zeros((block_r,), jnp.float32)
            # Slot 0 ("no adapter") skips the reduction and stores zeros.
            acc = lax.fori_loop(0, reduction_trips(slot, in_features, block_k), body, acc)
            plgpu.store(h_ref.at[t, pl.ds(r0, block_r)], acc, mask=r_ok)


def _gathered_shrink_call(token_slots, x, a, *, config: GatheredConfig, interpret: bool):
    num_tokens, in_features = x.shape
    ranks = tuple(ai.shape[2] for ai in a)
    block_r = min(config.block_r, pow2_at_least(max(ranks)))
    block_k = min(config.block_k, pow2_at_least(in_features))
    slices = slice_blocks(ranks, block_r)
    grid = (num_tokens, sum(count for _, count in slices))

    def whole(shape):
        return pl.BlockSpec(shape, lambda t, j: (0,) * len(shape))

    kernel = functools.partial(
        _gathered_shrink_kernel,
        slices=slices,
        ranks=ranks,
        in_features=in_features,
        block_k=block_k,
        block_r=block_r,
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            whole(token_slots.shape),  # token_slots
            whole(x.shape),  # x
            *(whole(ai.shape) for ai in a),  # a, one per slice
        ],
        out_specs=[whole((num_tokens, r)) for r in ranks],  # h, one per slice
        out_shape=[jax.ShapeDtypeStruct((num_tokens, r), jnp.float32) for r in ranks],
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name=f"lora_gathered_shrink_{len(ranks)}slices",
    )(token_slots, x, *a)


def _check(x, a, token_slots):
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
    check_int_vector("token_slots", token_slots, num_tokens)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def gathered_shrink(
    x: jax.Array,
    a: jax.Array | Sequence[jax.Array],
    token_slots: jax.Array,
    *,
    config: GatheredConfig | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """Gathered shrink: `h_i[t] = x[t] @ a_i[token_slots[t]]`, accumulated in float32.

    Args:
      x: `[T, in]` activations.
      a: one `[slots, in, R]` array, or one per output slice (ranks may differ).
      token_slots: int32 `[T]`, the slot of each token (0 = no adapter), validated on the host.
      config: block sizes and launch parameters; `GatheredConfig()` when None.
      interpret: run the kernel in Pallas interpret mode (CPU).

    Returns:
      float32 `[T, R]` (or a tuple, one per slice); rows of slot 0 are zeros.
    """
    config = GatheredConfig() if config is None else config
    a_tuple = as_slices("a", a)
    _check(x, a_tuple, token_slots)
    if x.shape[0] == 0:
        hs = tuple(jnp.zeros((0, ai.shape[2]), jnp.float32) for ai in a_tuple)
    else:
        hs = tuple(
            _gathered_shrink_call(
                token_slots.astype(jnp.int32), x, a_tuple, config=config, interpret=interpret
            )
        )
    return hs if isinstance(a, Sequence) else hs[0]


def gathered_shrink_reference(
    x: jax.Array, a: jax.Array | Sequence[jax.Array], token_slots: jax.Array
) -> jax.Array | tuple[jax.Array, ...]:
    """Plain-jnp float32 reference of `gathered_shrink` (per-token gather, HIGHEST precision)."""
    hs = tuple(
        jnp.einsum(
            "ti,tir->tr",
            x.astype(jnp.float32),
            ai[token_slots].astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )
        * (token_slots != 0)[:, None]  # the kernels' contract, whatever slot 0 of A holds
        for ai in as_slices("a", a)
    )
    return hs if isinstance(a, Sequence) else hs[0]
