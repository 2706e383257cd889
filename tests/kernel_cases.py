"""Named LoRA kernel cases shared by the kernel, ops and lowering tests.

A case fixes the shapes, dtype, slot count and the pattern of tokens over slots; `make_inputs`
draws fresh non-zero inputs for it from the test's generator. Shapes are deliberately ragged
(37 tokens, 344 or 2049 features, q/k/v slices of unequal widths). The two benchmark shapes
(`BENCH_CASES`) are the ones `python -m benchmarks.ops` times; the CPU-path tests run them too.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

PATTERNS = ("random", "empty_segments", "one_token_segments", "all_slot0", "one_slot")

# Kernel-vs-reference tolerance per dtype (rtol, atol) on outputs of magnitude ~1-10.
# bf16/fp16 rows also carry one rounding of y to the dtype, and the segmented expand feeds h to
# the MXU in the weights' dtype (as vLLM does), so they get a few ulps of slack.
TOLERANCES = {
    "float32": (2e-5, 2e-5),
    "bfloat16": (2e-2, 6e-2),
    "float16": (2e-3, 8e-3),
}
# Shrink outputs are float32 whatever the input dtype: products of bf16/fp16 values are exact in
# float32, so only the summation order differs from the reference.
SHRINK_TOLERANCES = {"float32": (2e-5, 2e-5), "bfloat16": (1e-4, 1e-4), "float16": (1e-4, 1e-4)}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    in_features: int
    widths: tuple[int, ...]  # output slices, concatenated in order from `offset`
    ranks: tuple[int, ...]  # max rank of each slice's bank (slots use ranks 1..max, padded)
    num_slots: int  # max_loras + 1, slot 0 = no adapter
    pattern: str = "random"
    dtype: str = "float32"
    offset: int = 0  # first column of slice 0 in y
    extra_cols: int = 0  # columns of y after the last slice, which must stay untouched

    @property
    def out_features(self) -> int:
        return self.offset + sum(self.widths) + self.extra_cols

    def __str__(self) -> str:
        return self.name


def _case(name, t, d, widths, ranks, slots, pattern="random", dtype="float32", **kw) -> Case:
    return Case(name, t, d, tuple(widths), tuple(ranks), slots, pattern, dtype, **kw)


# Interpret-mode sweep: small shapes, every pattern, dtype, rank and slot count of the issue.
KERNEL_CASES = (
    *(_case(f"pattern_{p}", 37, 344, (96,), (8,), 8, p) for p in PATTERNS),
    *(_case(f"{dt}_random", 37, 344, (96,), (8,), 8, "random", dt) for dt in ("bfloat16",)),
    *(_case(f"{dt}_qkv", 21, 96, (64, 32, 48), (16, 8, 16), 8, "random", dt, offset=5,
            extra_cols=3) for dt in ("float32", "bfloat16", "float16")),
    *(_case(f"rank{r}", 29, 128, (80,), (r,), 8) for r in (1, 4, 16, 64)),
    _case("slots1", 16, 64, (48,), (4,), 1),
    _case("slots33_one_token", 40, 64, (40,), (8,), 33, "one_token_segments"),
    _case("slots33_random", 64, 200, (72,), (8,), 33),
    _case("gate_up_fp16_empty", 24, 160, (88, 88), (4, 4), 8, "empty_segments", "float16"),
    _case("hidden2049", 7, 2049, (130,), (8,), 4),
    _case("hidden5120_qkv", 5, 5120, (4096, 512, 512), (4, 4, 4), 3),
)  # fmt: skip

# The benchmark's layer: fp32, in = out = 2048, rank 16, 32 adapters plus slot 0.
BENCH_CASES = (
    _case("decode_64", 64, 2048, (2048,), (16,), 33),
    _case("prefill_2k", 2048, 2048, (2048,), (16,), 33),
)


def make_slots(pattern: str, num_tokens: int, num_slots: int, rng) -> np.ndarray:
    """int32 `[T]` token -> slot for one of `PATTERNS`."""
    if pattern == "random" or num_slots == 1:
        slots = rng.integers(0, num_slots, num_tokens)
    elif pattern == "empty_segments":  # odd slots never used, runs of equal slots
        used = np.arange(0, num_slots, 2)
        slots = np.repeat(rng.choice(used, num_tokens), rng.integers(1, 4, num_tokens))
        slots = slots[:num_tokens]
    elif pattern == "one_token_segments":  # every adapter slot owns exactly one token
        slots = np.zeros(num_tokens, np.int64)
        k = min(num_slots - 1, num_tokens)
        slots[:k] = np.arange(1, k + 1)
        rng.shuffle(slots)
    elif pattern == "all_slot0":
        slots = np.zeros(num_tokens, np.int64)
    elif pattern == "one_slot":
        slots = np.full(num_tokens, num_slots - 1)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    return slots.astype(np.int32)


def segment_arrays(token_slots: np.ndarray, num_slots: int):
    """(sorted_token_ids, slot_counts, slot_starts) as `jlora.LoRAMapping.build` makes them."""
    sorted_ids = np.argsort(token_slots, kind="stable").astype(np.int32)
    counts = np.bincount(token_slots, minlength=num_slots).astype(np.int32)
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    return sorted_ids, counts, starts


def _bank_arrays(rng, num_slots, rows, max_rank, cols, dtype, *, a_side: bool):
    """A `[S, rows, R]` (a_side) or B `[S, R, cols]`: slot s >= 1 of rank r_s <= R with the rest
    zero-padded, entries scaled so products stay of order one. Slot 0 is random too, where the
    manager keeps zeros: a kernel must skip slot 0, not rely on its zeros."""
    shape = (num_slots, rows, max_rank) if a_side else (num_slots, max_rank, cols)
    w = rng.standard_normal(shape).astype(np.float32)
    w /= np.sqrt(rows if a_side else max_rank)
    for s in range(1, num_slots):
        r = rng.integers(1, max_rank + 1)
        if a_side:
            w[s, :, r:] = 0
        else:
            w[s, r:, :] = 0
    return jnp.asarray(w, dtype)


def make_inputs(case: Case, rng, token_slots: np.ndarray | None = None) -> dict:
    """Fresh random inputs for `case` (non-zero everywhere that matters); `token_slots`, when
    given, replaces the case's pattern (int32 `[T]`)."""
    dtype = jnp.dtype(case.dtype)
    t, s = case.num_tokens, case.num_slots
    if token_slots is None:
        token_slots = make_slots(case.pattern, t, s, rng)
    sorted_ids, counts, starts = segment_arrays(token_slots, s)
    x = jnp.asarray(rng.standard_normal((t, case.in_features)), dtype)
    a = tuple(
        _bank_arrays(rng, s, case.in_features, r, None, dtype, a_side=True) for r in case.ranks
    )
    b = tuple(
        _bank_arrays(rng, s, None, r, w, dtype, a_side=False)
        for r, w in zip(case.ranks, case.widths, strict=True)
    )
    scale = tuple(
        jnp.asarray(rng.uniform(0.5, 2.0, s), jnp.float32)  # slot 0's too: see _bank_arrays
        for _ in case.ranks
    )
    # y is poisoned: random values everywhere, and a large sentinel on slot-0 rows, which the
    # kernels must leave bit-identical (as they must the columns outside the slices).
    y = rng.standard_normal((t, case.out_features)) * 2.0
    y[token_slots == 0] = 4096.0 + np.arange(case.out_features)
    # h is non-zero on slot-0 rows too: the expand must skip those rows, not rely on zeros.
    h = tuple(jnp.asarray(rng.standard_normal((t, r)), jnp.float32) for r in case.ranks)
    return dict(
        x=x,
        a=a,
        b=b,
        scale=scale,
        h=h,
        y=jnp.asarray(y, dtype),
        token_slots=jnp.asarray(token_slots),
        sorted_token_ids=jnp.asarray(sorted_ids),
        slot_counts=jnp.asarray(counts),
        slot_starts=jnp.asarray(starts),
    )


def assert_expand_close(out, ref, case: Case, inputs: dict) -> None:
    """Slot-0 rows and the columns outside the slices equal y exactly; the rest match `ref`."""
    assert out.shape == inputs["y"].shape and out.dtype == inputs["y"].dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    y = np.asarray(inputs["y"], np.float32)
    base = np.asarray(inputs["token_slots"]) == 0
    np.testing.assert_array_equal(out[base], y[base], err_msg="slot-0 rows changed")
    lo, hi = case.offset, case.offset + sum(case.widths)
    np.testing.assert_array_equal(out[:, :lo], y[:, :lo], err_msg="columns before slices")
    np.testing.assert_array_equal(out[:, hi:], y[:, hi:], err_msg="columns after slices")
    rtol, atol = TOLERANCES[case.dtype]
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)


def assert_shrink_close(out, ref, case: Case, inputs: dict) -> None:
    """float32 `[T, R]` per slice; rows of slot 0 exactly zero."""
    base = np.asarray(inputs["token_slots"]) == 0
    rtol, atol = SHRINK_TOLERANCES[case.dtype]
    assert len(out) == len(ref) == len(case.ranks)
    for o, r, rank in zip(out, ref, case.ranks, strict=True):
        assert o.dtype == jnp.float32 and o.shape == (case.num_tokens, rank)
        o = np.asarray(o)
        np.testing.assert_array_equal(o[base], 0.0, err_msg="slot-0 rows must be zero")
        np.testing.assert_allclose(o, np.asarray(r), rtol=rtol, atol=atol)
