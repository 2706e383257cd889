"""Every kernel lowers for CUDA on this machine, GPU or not.

`jax.export` with `platforms=["cuda"]` runs the whole Pallas -> Triton IR lowering; the Triton
custom call is not export-stable, so exactly that one safety check is disabled.
"""

import functools

import jax
import pytest
from jax._src.lib.triton import dialect as tt  # Triton's InputPrecision enum
from jax.experimental import pallas as pl
from kernel_cases import KERNEL_CASES, make_inputs

import pallas_kernels as pk

TRITON_CALL = "__gpu$xla.gpu.triton"
TF32, IEEE = int(tt.InputPrecision.TF32), int(tt.InputPrecision.IEEE)
CASES = {c.name: c for c in KERNEL_CASES}
LOWERING_CASES = [
    CASES[name] for name in ("pattern_random", "bfloat16_qkv", "float16_qkv", "rank1", "rank64")
] + [CASES["hidden5120_qkv"]]
CONFIGS = {
    "default": (None, None),
    "tuned": (
        pk.SegmentedConfig(block_t=64, block_k=64, block_r=16, block_n=256, num_warps=8),
        pk.GatheredConfig(block_k=128, block_r=16, block_n=128, num_warps=2, num_stages=3),
    ),
}


def lower_for_cuda(fn, *args) -> str:
    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*args)
    return exported.mlir_module()


def kernel_calls(case, inp, seg_config, gat_config):
    seg = (inp["sorted_token_ids"], inp["slot_counts"], inp["slot_starts"])
    expand_args = (inp["y"], inp["h"], inp["b"], inp["scale"])
    return {
        "segmented_shrink": (
            functools.partial(pk.segmented_shrink, config=seg_config),
            (inp["x"], inp["a"], *seg),
        ),
        "segmented_expand": (
            functools.partial(pk.segmented_expand, offset=case.offset, config=seg_config),
            (*expand_args, *seg),
        ),
        "gathered_shrink": (
            functools.partial(pk.gathered_shrink, config=gat_config),
            (inp["x"], inp["a"], inp["token_slots"]),
        ),
        "gathered_expand": (
            functools.partial(pk.gathered_expand, offset=case.offset, config=gat_config),
            (*expand_args, inp["token_slots"]),
        ),
    }


KERNELS = ("segmented_shrink", "segmented_expand", "gathered_shrink", "gathered_expand")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("case", LOWERING_CASES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_lowers_for_cuda(kernel, case, config, rng):
    inp = make_inputs(case, rng)
    fn, args = kernel_calls(case, inp, *CONFIGS[config])[kernel]
    module = lower_for_cuda(fn, *args)
    assert module.count(TRITON_CALL) == 1, "expected exactly one Triton kernel launch"
    assert f"lora_{kernel}" in module  # the launcher's name= reaches the custom call


def test_expand_updates_y_in_place_when_lowered(rng):
    """y is aliased to the expand's output, so a donated y is updated without a copy."""
    inp = make_inputs(CASES["pattern_random"], rng)
    seg = (inp["sorted_token_ids"], inp["slot_counts"], inp["slot_starts"])
    module = lower_for_cuda(pk.segmented_expand, inp["y"], inp["h"], inp["b"], inp["scale"], *seg)
    assert "output_operand_aliases" in module or "operand_output_alias" in module


@pytest.mark.parametrize("kernel", ["segmented_shrink", "segmented_expand"])
@pytest.mark.parametrize("case_name", ["pattern_random", "bfloat16_qkv"])
def test_float32_dots_lower_exact_not_tf32(kernel, case_name, rng, monkeypatch, capsys):
    """plgpu.dot defaults to TF32 for float32 operands (~1e-3 off the float32 reference); the
    kernels ask for "ieee". The Triton IR is printed by pallas_call(debug=True). Lowered under
    the default matmul precision a user has, not conftest's "highest", which hid the TF32."""
    monkeypatch.setattr(pl, "pallas_call", functools.partial(pl.pallas_call, debug=True))
    case = CASES[case_name]
    inp = make_inputs(case, rng)
    fn, args = kernel_calls(case, inp, None, None)[kernel]
    with jax.default_matmul_precision("default"):
        lower_for_cuda(fn, *args)
    dots = [line for line in capsys.readouterr().out.splitlines() if "tt.dot" in line]
    assert dots, "no tt.dot in the printed Triton IR"
    for line in dots:
        # Printed as a name or as the enum's number, depending on the op's printer; the pretty
        # form leaves out the default, which is IEEE.
        assert "tf32" not in line and f"inputPrecision = {TF32} " not in line, line
        if case_name == "pattern_random":  # float32 operands
            assert "inputPrecision" not in line or f"inputPrecision = {IEEE} " in line, line
