"""Reference math for a mixed batch, in plain jnp with float32 accumulation at highest precision.

Every kernel and fast path is tested against these. Slot-0 rows (no adapter) come out exactly
unchanged. Imports jlora.weights, jlora.mapping and jlora.errors only.

Shapes: ``x [T, in]``, ``y [T, out]``, ``token_slots int32 [T]``; a bank holds
``a [S, in, R]``, ``b [S, R, out_i]``, ``scale f32 [S]``. A packed projection passes one bank per
output slice; slice ``i`` owns columns ``offset_i : offset_i + out_i`` of ``y``. Concrete slots
(and token ids) out of range are a ``MappingError``; traced ones cannot be checked, and ``jnp``
indexing wraps a negative one and clamps one past the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import AdapterMismatchError
from jlora.mapping import check_in_range
from jlora.weights import LoRABank

_HIGHEST = jax.lax.Precision.HIGHEST


def shrink(x: jax.Array, a: jax.Array, token_slots: jax.Array) -> jax.Array:
    """``h[t] = x[t] @ a[slot[t]]`` -> float32 ``[T, R]``."""
    a_tok = a[token_slots].astype(jnp.float32)  # [T, in, R]
    return jnp.einsum("ti,tir->tr", x.astype(jnp.float32), a_tok, precision=_HIGHEST)


def expand(
    y: jax.Array,
    h: jax.Array,
    b: jax.Array,
    scale: jax.Array,
    token_slots: jax.Array,
    *,
    offset: int = 0,
) -> jax.Array:
    """``y[t, offset:offset+out] += scale[slot] * h[t] @ b[slot]``; slot-0 rows unchanged."""
    out = b.shape[-1]
    b_tok = b[token_slots].astype(jnp.float32)  # [T, R, out]
    delta = jnp.einsum("tr,tro->to", h.astype(jnp.float32), b_tok, precision=_HIGHEST)
    delta = delta * scale[token_slots][:, None]
    cols = y[:, offset : offset + out]
    new = (cols.astype(jnp.float32) + delta).astype(y.dtype)
    new = jnp.where((token_slots == 0)[:, None], cols, new)
    return y.at[:, offset : offset + out].set(new)


def add_lora(
    y: jax.Array, x: jax.Array, banks: LoRABank | Sequence[LoRABank], token_slots: jax.Array
) -> jax.Array:
    """``y`` plus every slice's LoRA, slices laid side by side along ``y``'s last dim."""
    banks = (banks,) if isinstance(banks, LoRABank) else tuple(banks)
    for bank in banks:
        _check_in_range("slot", token_slots, bank.num_slots)
    total = sum(bank.output_dim for bank in banks)
    if total != y.shape[-1]:
        raise AdapterMismatchError(
            f"slices' output dims sum to {total}, but y has {y.shape[-1]} columns"
        )
    offset = 0
    for bank in banks:
        h = shrink(x, bank.a, token_slots)
        y = expand(y, h, bank.b, bank.scale, token_slots, offset=offset)
        offset += bank.output_dim
    return y


def add_lora_embedding(
    y: jax.Array, token_ids: jax.Array, bank: LoRABank, token_slots: jax.Array
) -> jax.Array:
    """Embedding LoRA: ``y[t] += scale[slot] * a[slot, token_id[t]] @ b[slot]``."""
    _check_in_range("slot", token_slots, bank.num_slots)
    _check_in_range("id", token_ids, bank.a.shape[1])
    h = bank.a[token_slots, token_ids].astype(jnp.float32)  # [T, R]
    return expand(y, h, bank.b, bank.scale, token_slots)


def _check_in_range(what: str, index: jax.Array, size: int) -> None:
    if not isinstance(index, jax.core.Tracer):
        check_in_range("token", what, np.asarray(index), size, where="reference: ")
