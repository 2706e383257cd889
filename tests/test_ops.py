"""jlora.ops: the XLA (CPU) path and the impl dispatch against jlora.reference."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counter import CompileCounter
from kernel_cases import BENCH_CASES, KERNEL_CASES, TOLERANCES, make_inputs

from jlora import ops, reference
from jlora.errors import MappingError
from jlora.mapping import LoRAMapping
from jlora.weights import LoRABank

CASES = {c.name: c for c in KERNEL_CASES + BENCH_CASES}


def layer_inputs(case, rng, *, is_prefill=True, token_slots=None):
    """(y, x, banks, mapping) for `case`; y covers exactly the slices' columns."""
    inp = make_inputs(case, rng, token_slots)
    banks = tuple(
        LoRABank(a=a, b=b, scale=s)
        for a, b, s in zip(inp["a"], inp["b"], inp["scale"], strict=True)
    )
    mapping = LoRAMapping(
        token_slots=inp["token_slots"],
        seq_slots=jnp.zeros(1, jnp.int32),
        sorted_token_ids=inp["sorted_token_ids"],
        slot_counts=inp["slot_counts"],
        slot_starts=inp["slot_starts"],
        is_prefill=is_prefill,
    )
    y = inp["y"][:, case.offset : case.offset + sum(case.widths)]
    return y, inp["x"], banks, mapping


def assert_matches_reference(out, y, x, banks, mapping, dtype):
    expected = reference.add_lora(y, x, banks, mapping.token_slots)
    assert out.shape == y.shape and out.dtype == y.dtype
    base = np.asarray(mapping.token_slots) == 0
    np.testing.assert_array_equal(np.asarray(out)[base], np.asarray(y)[base])
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=atol
    )


def run_jitted(y, x, banks, mapping, **kw):
    return jax.jit(lambda y, x, banks, m: ops.add_lora(y, x, banks, m, **kw))(y, x, banks, mapping)


@pytest.mark.parametrize("case", KERNEL_CASES + BENCH_CASES, ids=str)
def test_xla_path_matches_reference(case, rng):
    y, x, banks, mapping = layer_inputs(case, rng)
    out = run_jitted(y, x, banks, mapping, impl="xla")
    assert_matches_reference(out, y, x, banks, mapping, case.dtype)


@pytest.mark.parametrize("strategy", ops.XLA_STRATEGIES)
@pytest.mark.parametrize("block_t", [1, 3, 16, 64])
@pytest.mark.parametrize("name", ["pattern_empty_segments", "bfloat16_qkv", "slots33_random"])
def test_xla_strategies_and_blocks(name, block_t, strategy, rng):
    """Both ways of moving rows, with blocks smaller and larger than the segments."""
    case = CASES[name]
    y, x, banks, mapping = layer_inputs(case, rng)
    config = ops.OpsConfig(xla_strategy=strategy, xla_block_t=block_t)
    out = run_jitted(y, x, banks, mapping, impl="xla", config=config)
    assert_matches_reference(out, y, x, banks, mapping, case.dtype)


# Decode-sized steps (T = 32) and the branch `_decode_plan` must pick for them:
# 0 row loop, 1 sorted blocks, 2 one product over all slots with 1 row per slot, 3 with 2.
DECODE_MIXES = {
    "distinct": (33, list(range(1, 33)), 2),
    "distinct_and_base": (33, [0] * 6 + list(range(1, 27)), 2),
    "pairs_17_slots": (17, [1 + i // 2 for i in range(32)], 3),
    "pairs_33_slots": (33, [1 + i // 2 for i in range(32)], 0),  # half the places empty
    "few_distinct": (33, [1 + i % 8 for i in range(8)] + [0] * 24, 0),
    "one_adapter": (33, [5] * 32, 1),
}


def decode_inputs(num_slots, slots, dtype, rng):
    """layer_inputs for a qkv-like decode layer whose rows use `slots` (shuffled)."""
    case = dataclasses.replace(
        CASES["float32_qkv"], num_tokens=len(slots), num_slots=num_slots, dtype=dtype
    )
    token_slots = rng.permutation(np.asarray(slots, np.int32))
    return layer_inputs(case, rng, is_prefill=False, token_slots=token_slots)


@pytest.mark.parametrize("mix", DECODE_MIXES)
def test_decode_plan_picks_the_branch_for_the_mix(mix):
    num_slots, slots, branch = DECODE_MIXES[mix]
    counts = jnp.asarray(np.bincount(slots, minlength=num_slots)).at[0].set(0)
    assert int(ops._decode_plan(counts, by_slot=True)) == branch
    # Narrow banks never take the product over all slots (XLA:CPU runs it 4x slower).
    assert int(ops._decode_plan(counts, by_slot=False)) == (branch if branch < 2 else 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mix", DECODE_MIXES)
def test_decode_mixes_match_reference(mix, dtype, rng):
    """Every branch of a decode-sized step, through one jitted layer, against the reference."""
    num_slots, slots, _ = DECODE_MIXES[mix]
    y, x, banks, mapping = decode_inputs(num_slots, slots, dtype, rng)
    out = run_jitted(y, x, banks, mapping, impl="xla")
    assert_matches_reference(out, y, x, banks, mapping, dtype)


@pytest.mark.parametrize("is_prefill", [True, False], ids=["segmented", "gathered"])
@pytest.mark.parametrize("name", ["pattern_random", "float16_qkv"])
def test_pallas_path_in_interpret_mode(name, is_prefill, rng):
    """impl="pallas" runs the segmented kernels for prefill, the gathered ones for decode."""
    case = CASES[name]
    y, x, banks, mapping = layer_inputs(case, rng, is_prefill=is_prefill)
    config = ops.OpsConfig(interpret=True)
    out = run_jitted(y, x, banks, mapping, impl="pallas", config=config)
    assert_matches_reference(out, y, x, banks, mapping, case.dtype)


def test_auto_uses_xla_on_cpu_without_falling_back(rng, caplog):
    assert jax.default_backend() == "cpu"
    y, x, banks, mapping = layer_inputs(CASES["pattern_random"], rng)
    with caplog.at_level(logging.WARNING, logger="jlora.ops"):
        out = run_jitted(y, x, banks, mapping)
    assert caplog.records == []
    assert_matches_reference(out, y, x, banks, mapping, "float32")


def test_pallas_without_gpu_falls_back_and_logs_once(rng, caplog, monkeypatch):
    monkeypatch.setattr(ops, "_logged_fallbacks", set())
    y, x, banks, mapping = layer_inputs(CASES["pattern_random"], rng)
    with caplog.at_level(logging.WARNING, logger="jlora.ops"):
        out = ops.add_lora(y, x, banks, mapping, impl="pallas")
        again = ops.add_lora(y, x, banks, mapping, impl="pallas")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "need a GPU" in messages[0], messages
    assert_matches_reference(out, y, x, banks, mapping, "float32")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


def test_unknown_impl_names_the_choices(rng):
    y, x, banks, mapping = layer_inputs(CASES["pattern_random"], rng)
    with pytest.raises(ValueError, match=r"'auto', 'pallas', 'xla'"):
        ops.add_lora(y, x, banks, mapping, impl="triton")


def test_bad_shapes_raise(rng):
    y, x, banks, mapping = layer_inputs(CASES["float32_qkv"], rng)
    with pytest.raises(ValueError, match="sum to"):
        ops.add_lora(y[:, :-1], x, banks, mapping)
    with pytest.raises(ValueError, match="in="):
        ops.add_lora(y, x[:, :-1], banks, mapping)
    with pytest.raises(ValueError, match="rows"):
        ops.add_lora(y[:-1], x[:-1], banks, mapping)


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="xla_strategy"):
        ops.OpsConfig(xla_strategy="onehot")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="xla_block_t"):
            ops.OpsConfig(xla_block_t=bad)
    assert type(ops.OpsConfig(xla_block_t=np.int64(8)).xla_block_t) is int


def test_mapping_for_another_slot_count_is_refused(rng):
    """A gather clamps a slot past the banks to the last one: another adapter, silently."""
    y, x, banks, _ = layer_inputs(CASES["pattern_random"], rng)  # 8-slot banks
    wider = LoRAMapping.build([7, 1], [3, 2], num_slots=9, num_tokens=y.shape[0])
    with pytest.raises(MappingError, match="num_slots=9 but the banks have 8 slots"):
        ops.add_lora(y, x, banks, wider)
    with pytest.raises(MappingError, match="add_lora_embedding.*num_slots=9"):
        ops.add_lora_embedding(
            jnp.zeros((y.shape[0], 6)), jnp.zeros(y.shape[0], jnp.int32),
            LoRABank.zeros(8, 11, 6, 2), wider,
        )  # fmt: skip


@pytest.mark.parametrize("strategy", ops.XLA_STRATEGIES)
def test_eager_calls_compile_once_and_keep_slot0_rows_bitwise(strategy, rng):
    y, x, banks, mapping = layer_inputs(CASES["pattern_random"], rng)
    base = np.asarray(mapping.token_slots) == 0
    y = y.at[base].set(-0.0)  # -0.0 + 0.0 is +0.0: a zero delta added to them would show
    config = ops.OpsConfig(xla_strategy=strategy)
    ops.add_lora(y, x, banks, mapping, impl="xla", config=config)
    with CompileCounter() as compiles:
        for _ in range(3):
            out = ops.add_lora(y, x, banks, mapping, impl="xla", config=config)
    assert compiles.counts == {}
    assert np.signbit(np.asarray(out)[base]).all()
    assert_matches_reference(out, y, x, banks, mapping, "float32")


def test_all_slot0_batch_returns_y_exactly(rng):
    y, x, banks, mapping = layer_inputs(CASES["pattern_all_slot0"], rng)
    np.testing.assert_array_equal(np.asarray(run_jitted(y, x, banks, mapping)), np.asarray(y))


def test_new_mapping_does_not_retrace(rng):
    case = CASES["pattern_random"]
    y, x, banks, mapping = layer_inputs(case, rng)
    traces = []

    @jax.jit
    def layer(y, x, banks, m):
        traces.append(1)
        return ops.add_lora(y, x, banks, m)

    for _ in range(3):
        _, _, _, mapping = layer_inputs(case, rng)
        out = layer(y, x, banks, mapping)
        assert_matches_reference(out, y, x, banks, mapping, case.dtype)
    assert len(traces) == 1


def test_rows_per_sequence_use_seq_slots(rng):
    """An LM head sees one row per sequence: the slots come from `seq_slots`."""
    mapping = LoRAMapping.build([2, 0, 1, 2], [3, 1, 2, 2], num_slots=3, num_tokens=16)
    case = CASES["pattern_random"]
    inp = make_inputs(case, rng)
    bank = LoRABank(a=inp["a"][0][:3], b=inp["b"][0][:3], scale=inp["scale"][0][:3])
    x = jnp.asarray(rng.standard_normal((4, case.in_features)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, case.widths[0])), jnp.float32)
    out = run_jitted(y, x, (bank,), mapping)
    expected = reference.add_lora(y, x, (bank,), mapping.seq_slots)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("strategy", ops.XLA_STRATEGIES)
def test_eager_calls_take_host_arrays(strategy, rng):
    """Without a jit, numpy activations and a host-built mapping (what `LoRAMapping.build`
    returns) work on every XLA strategy, whose loops index them with traced values."""
    mapping = LoRAMapping.build([1, 0, 2, 1, 3], [5, 3, 4, 6, 6], num_slots=4, num_tokens=24)
    slots = np.asarray(mapping.token_slots)
    a = rng.standard_normal((4, 16, 4)).astype(np.float32)
    b = rng.standard_normal((4, 4, 8)).astype(np.float32)
    bank = LoRABank(a=a, b=b, scale=np.asarray([0.0, 1.0, 0.5, 2.0], np.float32))
    x = rng.standard_normal((24, 16)).astype(np.float32)
    y = rng.standard_normal((24, 8)).astype(np.float32)
    out = ops.add_lora(y, x, bank, mapping, impl="xla", config=ops.OpsConfig(xla_strategy=strategy))
    ref_bank = jax.tree.map(jnp.asarray, bank)
    expected = reference.add_lora(jnp.asarray(y), jnp.asarray(x), (ref_bank,), jnp.asarray(slots))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["pattern_random", "slots33_one_token", "bfloat16_random"])
def test_embedding_matches_reference(name, rng):
    case = CASES[name]
    inp = make_inputs(case, rng)
    vocab, rank, width, slots = 50, 8, case.widths[0], case.num_slots
    bank = LoRABank(
        a=jnp.asarray(rng.standard_normal((slots, vocab, rank)), case.dtype).at[0].set(0),
        b=jnp.asarray(rng.standard_normal((slots, rank, width)) / 3, case.dtype).at[0].set(0),
        scale=inp["scale"][0],
    )
    _, _, _, mapping = layer_inputs(case, rng)
    y = inp["y"][:, :width]
    token_ids = jnp.asarray(rng.integers(0, vocab, case.num_tokens), jnp.int32)
    out = jax.jit(ops.add_lora_embedding)(y, token_ids, bank, mapping)
    expected = reference.add_lora_embedding(y, token_ids, bank, mapping.token_slots)
    base = np.asarray(mapping.token_slots) == 0
    np.testing.assert_array_equal(np.asarray(out)[base], np.asarray(y)[base])
    rtol, atol = TOLERANCES[case.dtype]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_batches_of_few_or_many_adapters(dtype, rng):
    """Decode-sized batches pick per-token rows or sorted blocks at run time, by how many rows
    each adapter has: one compiled layer must match the reference for every mix."""
    num_slots, rank, in_dim, widths, tokens = 9, 8, 40, (24, 16), 24
    banks = tuple(
        LoRABank(
            a=jnp.asarray(rng.standard_normal((num_slots, in_dim, rank)), dtype).at[0].set(0),
            b=jnp.asarray(rng.standard_normal((num_slots, rank, w)) / 3, dtype).at[0].set(0),
            scale=jnp.asarray(rng.uniform(0.5, 2.0, num_slots), jnp.float32).at[0].set(0),
        )
        for w in widths
    )
    x = jnp.asarray(rng.standard_normal((tokens, in_dim)), dtype)
    y = jnp.asarray(rng.standard_normal((tokens, sum(widths))), dtype)
    traces = []

    @jax.jit
    def layer(y, x, banks, m):
        traces.append(1)
        return ops.add_lora(y, x, banks, m)

    mixes = {
        "one adapter": np.full(tokens, 3),
        "one adapter and base rows": np.where(np.arange(tokens) % 3 == 0, 0, 5),
        "four per adapter": np.repeat(np.arange(1, 7), 4),
        "all distinct": np.arange(tokens) % (num_slots - 1) + 1,
        "mostly distinct": np.concatenate([np.full(8, 2), np.arange(tokens - 8) % 8 + 1]),
        "all base": np.zeros(tokens, int),
    }
    for slots in mixes.values():
        slots = rng.permutation(slots)
        mapping = LoRAMapping.build(
            slots,
            np.ones(tokens, np.int64),
            num_slots=num_slots,
            is_prefill=False,
            num_tokens=tokens,
        )
        out = layer(y, x, banks, mapping)
        assert_matches_reference(out, y, x, banks, mapping, dtype)
    assert len(traces) == 1
