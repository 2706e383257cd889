"""Loader + reference math reproduce PEFT's own per-module outputs (fixtures written by PEFT)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTER_NAMES, ADAPTERS_DIR
from safetensors.numpy import load_file

import jlora
from jlora import reference
from jlora.weights import LoRABank, pad_to_rank

# max |ours - PEFT| / max |PEFT output|, per stored adapter dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def bank_with(layer, slot: int, num_slots: int, max_rank: int) -> LoRABank:
    """A bank whose ``slot`` holds ``layer`` (padded to ``max_rank``), every other slot zero."""
    a, b = pad_to_rank(layer, max_rank, np.float32)
    bank_a = np.zeros((num_slots, *a.shape), np.float32)
    bank_b = np.zeros((num_slots, *b.shape), np.float32)
    scale = np.zeros(num_slots, np.float32)
    bank_a[slot], bank_b[slot], scale[slot] = a, b, layer.scaling
    return LoRABank(a=jnp.asarray(bank_a), b=jnp.asarray(bank_b), scale=jnp.asarray(scale))


def module_cases():
    for name in ADAPTER_NAMES:
        resolved = json.loads((ADAPTERS_DIR / name / "resolved_modules.json").read_text())
        for module in sorted(resolved):
            yield pytest.param(name, module, id=f"{name}:{module}")


@pytest.fixture(scope="module")
def adapters():
    return {n: jlora.load_adapter(ADAPTERS_DIR / n) for n in ADAPTER_NAMES}


@pytest.fixture(scope="module")
def outputs():
    return {n: load_file(ADAPTERS_DIR / n / "module_outputs.safetensors") for n in ADAPTER_NAMES}


@pytest.mark.parametrize("name,module", list(module_cases()))
def test_module_output_matches_peft(adapters, outputs, name, module):
    layer = adapters[name][module]
    stored = str(layer.lora_a.dtype)
    x = outputs[name][f"{module}.input"]
    base = outputs[name][f"{module}.base_output"]
    want = outputs[name][f"{module}.output"]
    # Slot 2 serves the adapter; the rows on slot 0 must come back untouched.
    slots = jnp.asarray([2, 0, 2, 2][: len(x)], jnp.int32)
    bank = bank_with(layer, slot=2, num_slots=4, max_rank=32)
    y = jnp.asarray(base)
    if layer.is_embedding:
        got = reference.add_lora_embedding(y, jnp.asarray(x), bank, slots)
    else:
        got = reference.add_lora(y, jnp.asarray(x), [bank], slots)
    got = np.asarray(got)
    lora_rows = np.asarray(slots) != 0
    err = np.abs(got[lora_rows] - want[lora_rows]).max() / np.abs(want).max()
    assert err <= TOLERANCE[stored], f"{name}:{module} relative error {err:.2e} ({stored})"
    np.testing.assert_array_equal(got[~lora_rows], base[~lora_rows])
    # The LoRA delta is visible, so the comparison above could fail.
    assert np.abs(want - base).max() > 10 * TOLERANCE[stored] * np.abs(want).max()


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_scaling_and_rank_match_peft(adapters, name):
    resolved = json.loads((ADAPTERS_DIR / name / "resolved_modules.json").read_text())
    model = adapters[name]
    assert set(model.loras) == set(resolved)
    for module, peft in resolved.items():
        assert model[module].rank == peft["r"], module
        assert model[module].scaling == pytest.approx(peft["scaling"], rel=1e-12), module


def test_bf16_conversion_of_fp32_adapter(outputs):
    model = jlora.load_adapter(ADAPTERS_DIR / "attn_r8", dtype="bfloat16")
    module = "model.layers.1.self_attn.v_proj"
    layer = model[module]
    assert layer.lora_a.dtype == jnp.bfloat16 and layer.lora_b.dtype == jnp.bfloat16
    x = outputs["attn_r8"][f"{module}.input"]
    want = outputs["attn_r8"][f"{module}.output"]
    slots = jnp.ones(len(x), jnp.int32)
    got = reference.add_lora(
        jnp.asarray(outputs["attn_r8"][f"{module}.base_output"]),
        jnp.asarray(x),
        [bank_with(layer, 1, 2, 8)],
        slots,
    )
    assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() <= TOLERANCE["bfloat16"]
