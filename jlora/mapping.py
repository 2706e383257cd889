"""LoRAMapping: which device slot every token and every sequence of a batch uses, plus the
slot-sorted token order that segmented kernels consume. Built once per step on the host and shared
by every LoRA layer. Imports jlora.errors and jlora.config only.

Worked example (4 sequences, slots [2, 0, 2, 1], lengths [3, 1, 2, 2], 3 slots, padded to T=16)::

    token_slots      = [2 2 2 0 2 2 1 1 | 0 0 0 0 0 0 0 0]    8 real tokens, 8 padding (slot 0)
    sorted_token_ids = [3 8 9 10 11 12 13 14 15 6 7 0 1 2 4 5]  stable sort of tokens by slot
    slot_counts      = [9 2 5]     slot 0 owns the base token 3 and the padding
    slot_starts      = [0 9 11]    exclusive cumulative sum of slot_counts
    seq_slots        = [2 0 2 1]   (padded to the batch bucket with slot 0)

A segmented kernel walks ``sorted_token_ids[slot_starts[s] : slot_starts[s] + slot_counts[s]]``
for each slot ``s`` and reads that slot's A/B once per block of tokens.

Buckets: token counts pad to the next power of two from 16 up to 512, then to the next multiple
of 512; batch rows pad to the next power of two from 1. So a serving loop compiles one program
per bucket, not per batch shape. Every index is checked here, on the host: JAX gathers clamp
out-of-range indices silently on device, so a bad slot must raise before it gets there.
A layer tells per-token rows from per-sequence rows (the LM head) by their count, so when both
pad to the same size, token i must be on real sequence i's slot (a decode step); build refuses
the other layouts and names a ``num_seqs`` that separates them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import struct

from jlora.config import is_int
from jlora.errors import MappingError

MIN_TOKEN_BUCKET = 16
TOKEN_BUCKET_STEP = 512


def token_bucket(num_tokens: int) -> int:
    """The padded token count for ``num_tokens``: 16, 32, ..., 512, then multiples of 512."""
    if num_tokens <= TOKEN_BUCKET_STEP:
        return max(MIN_TOKEN_BUCKET, 1 << max(0, num_tokens - 1).bit_length())
    return -(-num_tokens // TOKEN_BUCKET_STEP) * TOKEN_BUCKET_STEP


def batch_bucket(num_seqs: int) -> int:
    """The padded number of sequence rows: the next power of two (at least 1)."""
    return 1 << max(0, num_seqs - 1).bit_length()


@struct.dataclass
class LoRAMapping:
    """Token -> slot and sequence -> slot for one step, with the slot-sorted token order.

    Attributes (arrays are int32 leaves; see the module docstring for an example):
      token_slots: ``[T]`` slot of every token, padding tokens on slot 0.
      seq_slots: ``[B]`` slot of every sequence (for sampling / the LM head on last tokens).
      sorted_token_ids: ``[T]`` permutation of ``0..T-1`` ordering tokens by slot (stable).
      slot_counts: ``[num_slots]`` tokens per slot, padding included in slot 0.
      slot_starts: ``[num_slots]`` start of each slot's segment in ``sorted_token_ids``.
      is_prefill: static; prefill batches favour segmented kernels, decode gathered ones.
    """

    token_slots: jax.Array
    seq_slots: jax.Array
    sorted_token_ids: jax.Array
    slot_counts: jax.Array
    slot_starts: jax.Array
    is_prefill: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        # build() checks its inputs and hands device arrays, which are trusted (reading them
        # back would sync every step). A mapping assembled by hand with NumPy arrays (the rest
        # concrete device arrays) is checked here as build would: the gathers on device clamp a
        # bad index silently. Other leaves (tracers, shardings, specs) are pytree plumbing.
        leaves = dict(
            token_slots=self.token_slots,
            seq_slots=self.seq_slots,
            sorted_token_ids=self.sorted_token_ids,
            slot_counts=self.slot_counts,
            slot_starts=self.slot_starts,
        )
        values = leaves.values()
        if any(isinstance(v, np.ndarray) for v in values) and all(
            isinstance(v, np.ndarray)
            or (isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer))
            for v in values
        ):
            _check_host_mapping(*(np.asarray(v) for v in values))

    @property
    def num_tokens(self) -> int:
        return int(self.token_slots.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.slot_counts.shape[0])

    @classmethod
    def build(
        cls,
        seq_slots: Sequence[int] | np.ndarray,
        seq_lengths: Sequence[int] | np.ndarray,
        *,
        num_slots: int,
        is_prefill: bool = True,
        num_tokens: int | None = None,
        num_seqs: int | None = None,
    ) -> LoRAMapping:
        """Builds the mapping on the host; every index is validated before any device transfer.

        Args:
          seq_slots: slot of each sequence, in ``[0, num_slots)`` (0 = base model).
          seq_lengths: tokens of each sequence in this step (>= 0); tokens are laid out sequence
            after sequence, as in a packed prefill or a decode step.
          num_slots: ``max_loras + 1``.
          is_prefill: kept as static metadata for kernel choice.
          num_tokens / num_seqs: padded sizes; default to ``token_bucket`` / ``batch_bucket``.
        """
        slots = np.asarray(seq_slots)
        lengths = np.asarray(seq_lengths)
        _check_int_vector("seq_slots", slots)
        _check_int_vector("seq_lengths", lengths)
        # Checked above; an empty list is float64 to numpy, which np.repeat refuses.
        slots, lengths = slots.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)
        if slots.shape != lengths.shape:
            raise MappingError(
                f"seq_slots has {slots.size} entries but seq_lengths has {lengths.size}: "
                "give one slot and one length per sequence"
            )
        if not isinstance(is_prefill, bool | np.bool_):  # "no" would be truthy
            raise MappingError(f"is_prefill must be a bool, got {is_prefill!r}")
        if not is_int(num_slots) or num_slots < 1:
            raise MappingError(f"num_slots must be an int >= 1 (max_loras + 1), got {num_slots!r}")
        check_in_range(
            "sequence",
            "slot",
            slots,
            num_slots,
            hint="; activate the adapter first so it has a device slot",
        )
        if (lengths < 0).any():
            raise MappingError(f"seq_lengths must be >= 0, got {lengths.tolist()}")
        for name, n in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
            if n is not None and not is_int(n):  # int(3.9) would silently be 3
                raise MappingError(f"{name} must be an int or None (a bucket), got {n!r}")
        total = int(lengths.sum())
        t = token_bucket(total) if num_tokens is None else int(num_tokens)
        b = batch_bucket(slots.size) if num_seqs is None else int(num_seqs)
        if total > t:
            raise MappingError(f"{total} tokens do not fit the requested num_tokens={t}")
        if slots.size > b:
            raise MappingError(f"{slots.size} sequences do not fit the requested num_seqs={b}")

        token_slots = np.zeros(t, np.int32)
        token_slots[:total] = np.repeat(slots, lengths)
        sorted_ids = np.argsort(token_slots, kind="stable").astype(np.int32)
        counts = np.bincount(token_slots, minlength=num_slots).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
        padded_seq_slots = np.zeros(b, np.int32)
        padded_seq_slots[: slots.size] = slots
        if t == b and not np.array_equal(token_slots[: slots.size], slots):
            # A layer tells per-token rows from per-sequence rows (the LM head on last tokens)
            # by their count: with T == B it would read token slots for sequence rows (for the
            # padding rows past the real sequences that is harmless: their outputs are unused).
            raise MappingError(
                f"the mapping would have {t} tokens and {b} sequences, but token i is not "
                "sequence i (lengths are not all 1), so a layer could not tell per-token rows "
                "from per-sequence rows; pass num_tokens or num_seqs so that they differ, "
                f"e.g. num_seqs={2 * b}"
            )
        # device_put, not jnp.asarray: the latter compiles a small program per new shape.
        return cls(
            token_slots=jax.device_put(token_slots),
            seq_slots=jax.device_put(padded_seq_slots),
            sorted_token_ids=jax.device_put(sorted_ids),
            slot_counts=jax.device_put(counts),
            slot_starts=jax.device_put(starts),
            is_prefill=bool(is_prefill),
        )


def _check_host_mapping(token_slots, seq_slots, sorted_ids, counts, starts) -> None:
    names = ("token_slots", "seq_slots", "sorted_token_ids", "slot_counts", "slot_starts")
    for name, v in zip(names, (token_slots, seq_slots, sorted_ids, counts, starts), strict=True):
        _check_int_vector(name, v)
    num_slots, t = counts.size, token_slots.size
    problems = []
    if sorted_ids.size != t:
        problems.append(f"sorted_token_ids has {sorted_ids.size} entries for {t} tokens")
    if starts.size != num_slots or num_slots == 0:
        problems.append(f"slot_counts and slot_starts have {num_slots} and {starts.size} entries")
    for name, v in (("token_slots", token_slots), ("seq_slots", seq_slots)):
        if v.size and (v.min() < 0 or v.max() >= num_slots):
            problems.append(f"{name} holds slots outside [0, {num_slots})")
    if not problems:
        want = np.argsort(token_slots, kind="stable")
        if not np.array_equal(sorted_ids, want):
            problems.append("sorted_token_ids is not the stable sort of the tokens by slot")
        bins = np.bincount(token_slots, minlength=num_slots)
        if not np.array_equal(counts, bins):
            problems.append(f"slot_counts {counts.tolist()} are not the tokens per slot")
        elif not np.array_equal(starts, np.cumsum(counts) - counts):
            problems.append("slot_starts is not the exclusive cumulative sum of slot_counts")
    if problems:
        raise MappingError(
            "LoRAMapping: " + "; ".join(problems) + "; build it with LoRAMapping.build"
        )


def check_arrays(where: str, mapping: LoRAMapping) -> None:
    """Raises ``MappingError`` unless the mapping's fields are arrays (a hand-built one of
    Python lists would fail deep inside a layer)."""
    for name in ("token_slots", "seq_slots", "sorted_token_ids", "slot_counts", "slot_starts"):
        v = getattr(mapping, name)
        if not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise MappingError(
                f"{where}: LoRAMapping.{name} is a {type(v).__name__}; give NumPy or JAX "
                "arrays, or build the mapping with LoRAMapping.build"
            )


def check_in_range(
    item: str, what: str, values: np.ndarray, size: int, *, where: str = "", hint: str = ""
) -> None:
    """A ``MappingError`` naming the first of ``values`` outside ``[0, size)``: checked on the
    host, because a gather on the device would clamp it (another adapter or row, silently)."""
    bad = np.flatnonzero((values < 0) | (values >= size))
    if bad.size:
        raise MappingError(
            f"{where}{item} {int(bad[0])} has {what} {int(values.flat[bad[0]])}, outside "
            f"[0, {size}) ({bad.size} bad in all){hint}"
        )


def _check_int_vector(name: str, v: np.ndarray) -> None:
    if v.ndim != 1 or not (v.size == 0 or np.issubdtype(v.dtype, np.integer)):
        raise MappingError(f"{name} must be a 1-D sequence of ints, got {v!r}")
    # Checked before the int64 cast, which would wrap a uint64 past 2**63 to a negative index.
    if v.size and v.dtype == np.uint64 and v.max() > np.iinfo(np.int64).max:
        raise MappingError(f"{name} has {int(v.max())}, which no slot index or length can be")
