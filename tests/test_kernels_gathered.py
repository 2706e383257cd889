"""Gathered (decode) Pallas kernels against their float32 references.

On a GPU the kernels run compiled; elsewhere they run in Pallas interpret mode, where outputs
start as NaN, so a row the kernel forgets to write fails the comparison.
"""

import jax
import pytest
from kernel_cases import KERNEL_CASES, assert_expand_close, assert_shrink_close, make_inputs

import pallas_kernels as pk

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_gathered_shrink(case, rng):
    inp = make_inputs(case, rng)
    out = pk.gathered_shrink(inp["x"], inp["a"], inp["token_slots"], interpret=INTERPRET)
    ref = pk.gathered_shrink_reference(inp["x"], inp["a"], inp["token_slots"])
    assert_shrink_close(out, ref, case, inp)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_gathered_expand(case, rng):
    inp = make_inputs(case, rng)
    args = (inp["y"], inp["h"], inp["b"], inp["scale"], inp["token_slots"])
    out = pk.gathered_expand(*args, offset=case.offset, interpret=INTERPRET)
    ref = pk.gathered_expand_reference(*args, offset=case.offset)
    assert_expand_close(out, ref, case, inp)
