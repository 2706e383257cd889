"""Segmented (prefill) Pallas kernels against their float32 references.

On a GPU the kernels run compiled; elsewhere they run in Pallas interpret mode, where outputs
start as NaN, so a row the kernel forgets to write fails the comparison.
"""

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
