"""Segmented (prefill) Pallas kernels against their float32 references.

On a GPU the kernels run compiled; elsewhere they run in Pallas interpret mode, where outputs
start as NaN, so a row the kernel forgets to write fails the comparison.
"""

import dataclasses

import jax
import pytest
from kernel_cases import KERNEL_CASES, assert_expand_close, assert_shrink_close, make_inputs

import pallas_kernels as pk

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_segmented_shrink(case, rng):
    inp = make_inputs(case, rng)
    seg = (inp["sorted_token_ids"], inp["slot_counts"], inp["slot_starts"])
    out = pk.segmented_shrink(inp["x"], inp["a"], *seg, interpret=INTERPRET)
    ref = pk.segmented_shrink_reference(inp["x"], inp["a"], *seg)
    assert_shrink_close(out, ref, case, inp)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_segmented_expand(case, rng):
    inp = make_inputs(case, rng)
    seg = (inp["sorted_token_ids"], inp["slot_counts"], inp["slot_starts"])
    args = (inp["y"], inp["h"], inp["b"], inp["scale"], *seg)
    out = pk.segmented_expand(*args, offset=case.offset, interpret=INTERPRET)
    ref = pk.segmented_expand_reference(*args, offset=case.offset)
    assert_expand_close(out, ref, case, inp)


@pytest.mark.parametrize("block_t", [16, 64])
def test_segmented_block_sizes(block_t, rng):
    """Blocks smaller and larger than the segments give the same result."""
    case = KERNEL_CASES[0]
    inp = make_inputs(case, rng)
    seg = (inp["sorted_token_ids"], inp["slot_counts"], inp["slot_starts"])
    config = pk.SegmentedConfig(block_t=block_t, block_k=32, block_r=16, block_n=32)
    h = pk.segmented_shrink(inp["x"], inp["a"], *seg, config=config, interpret=INTERPRET)
    assert_shrink_close(h, pk.segmented_shrink_reference(inp["x"], inp["a"], *seg), case, inp)
    args = (inp["y"], inp["h"], inp["b"], inp["scale"], *seg)
    out = pk.segmented_expand(*args, config=config, interpret=INTERPRET)
    assert_expand_close(out, pk.segmented_expand_reference(*args), case, inp)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_segmented_shrink_keeps_float32_x_against_a_narrower_bank(dtype, rng):
    """float32 activations with bf16/f16 banks: the shrink multiplies in float32 (as the
    gathered kernel and the XLA path do), so its error is float32's, not the bank dtype's."""
    case = next(c for c in KERNEL_CASES if c.name == f"{dtype}_qkv")
    inp = make_inputs(case, rng)
    x = jax.numpy.asarray(rng.standard_normal(inp["x"].shape) * 4, jax.numpy.float32)
    seg = (inp["sorted_token_ids"], inp["slot_counts"], inp["slot_starts"])
    out = pk.segmented_shrink(x, inp["a"], *seg, interpret=INTERPRET)
    ref = pk.segmented_shrink_reference(x, inp["a"], *seg)
    assert_shrink_close(out, ref, dataclasses.replace(case, dtype="float32"), inp)
