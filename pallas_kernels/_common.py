"""Helpers shared by the kernel files: slice layout, block arithmetic, argument checks.

Must not import jlora.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# plgpu.dot's default lets float32 operands go through TF32 (10 mantissa bits: ~1e-3 relative
# error against the float32 reference); HIGHEST lowers to Triton's "ieee" for float32 and leaves
# 16-bit operands as they are.
EXACT_DOT = lax.Precision.HIGHEST


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reduction_trips(slot: jax.Array, in_features: int, block_k: int) -> jax.Array:
    """Trip count of a shrink's loop over `in_features`: none for slot 0 ("no adapter").

    The operands are int32 on purpose: Pallas's Triton lowering of `select_n` gives weak-typed
    literals the predicate's type, so `jnp.where(slot == 0, 0, n)` became an i1 loop bound that
    Triton refuses to compile (seen only when compiling for a GPU, not in interpret mode).
    """
    return jnp.where(slot == 0, jnp.int32(0), jnp.int32(cdiv(in_features, block_k)))


def pow2_at_least(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): Triton tensor dims are powers of two >= 16."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def as_slices(name: str, value) -> tuple[jax.Array, ...]:
    """Normalises one array or a sequence of per-slice arrays into a non-empty tuple."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = tuple(value)
    else:
        value = (value,)
    if not value:
        raise ValueError(f"{name} must hold at least one slice, got an empty sequence")
    return value


def slice_blocks(sizes: Sequence[int], block: int) -> tuple[tuple[int, int], ...]:
    """`(first_block, num_blocks)` per slice when the slices' blocks are numbered one after
    another along one grid axis: slice i owns grid indices [first_i, first_i + num_i)."""
    out, first = [], 0
    for size in sizes:
        n = cdiv(size, block)
        out.append((first, n))
        first += n
    return tuple(out)


def check_int_vector(name: str, value: jax.Array, length: int | None = None) -> None:
    if value.ndim != 1 or not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {value.dtype}{value.shape}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"{name} has {value.shape[0]} entries, expected {length}")


def check_expand_args(y, h, b, scale, offset: int, token_index_name: str, token_index) -> None:
    """Shape checks shared by the segmented and gathered expand."""
    if y.ndim != 2:
        raise ValueError(f"y must be [T, out], got shape {y.shape}")
    if not (len(h) == len(b) == len(scale)):
        raise ValueError(
            f"h, b and scale need one entry per slice, got {len(h)}, {len(b)}, {len(scale)}"
        )
    num_tokens, out_features = y.shape
    num_slots = b[0].shape[0] if b[0].ndim == 3 else None
    for i, (hi, bi, si) in enumerate(zip(h, b, scale, strict=True)):
        if bi.ndim != 3 or bi.shape[0] != num_slots:
            raise ValueError(
                f"b[{i}] must be [slots={num_slots}, rank, width], got shape {bi.shape}"
            )
        if hi.shape != (num_tokens, bi.shape[1]):
            raise ValueError(
                f"h[{i}] must be [T={num_tokens}, rank={bi.shape[1]}], got shape {hi.shape}"
            )
        if si.shape != (num_slots,):
            raise ValueError(f"scale[{i}] must be [slots={num_slots}], got shape {si.shape}")
    total = sum(bi.shape[2] for bi in b)
    if offset < 0 or offset + total > out_features:
        raise ValueError(
            f"slices of total width {total} at {offset=} do not fit in y's {out_features=}"
        )
    check_int_vector(token_index_name, token_index, num_tokens)


def expand_reference(y, h, b, scale, token_slots, offset: int) -> jax.Array:
    """Per-token float32 expand at HIGHEST precision (shared by both expand references)."""
    h, b, scale = as_slices("h", h), as_slices("b", b), as_slices("scale", scale)
    out = y.astype(jnp.float32)
    col = offset
    for hi, bi, si in zip(h, b, scale, strict=True):
        delta = jnp.einsum(
            "tr,tro->to",
            hi.astype(jnp.float32),
            bi[token_slots].astype(jnp.float32),
            precision=lax.Precision.HIGHEST,
        )
        delta = delta * si.astype(jnp.float32)[token_slots][:, None]
        out = out.at[:, col : col + bi.shape[2]].add(delta)
        col += bi.shape[2]
    # Slot-0 rows are copied, not recomputed, so they stay bit-identical.
    return jnp.where((token_slots == 0)[:, None], y, out.astype(y.dtype))
