"""The reference math against a plain numpy float64 loop, on fresh random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from jlora import reference
from jlora.weights import LoRABank

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}


def random_banks(rng, num_slots, in_dim, out_dims, rank, dtype):
    banks = []
    for out in out_dims:
        a = rng.standard_normal((num_slots, in_dim, rank)) / np.sqrt(in_dim)
        b = rng.standard_normal((num_slots, rank, out)) / np.sqrt(rank)
        scale = rng.uniform(0.5, 2.0, num_slots)
        a[0], b[0], scale[0] = 0, 0, 0  # slot 0: the base model
        banks.append(
            LoRABank(
                a=jnp.asarray(a, dtype),
                b=jnp.asarray(b, dtype),
                scale=jnp.asarray(scale, jnp.float32),
            )
        )
    return banks


def loop_reference(y, x, banks, slots):
    y = np.asarray(y, np.float64).copy()
    x = np.asarray(x, np.float64)
    offset = 0
    for bank in banks:
        a, b = np.asarray(bank.a, np.float64), np.asarray(bank.b, np.float64)
        scale = np.asarray(bank.scale, np.float64)
        out = b.shape[-1]
        for t, s in enumerate(slots):
            if s:
                y[t, offset : offset + out] += scale[s] * (x[t] @ a[s]) @ b[s]
        offset += out
    return y


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("out_dims", [(24,), (16, 8, 8)])
def test_add_lora_matches_loop(rng, dtype, out_dims):
    num_slots, in_dim, rank, tokens = 5, 20, 4, 13
    banks = random_banks(rng, num_slots, in_dim, out_dims, rank, dtype)
    x = jnp.asarray(rng.standard_normal((tokens, in_dim)), dtype)
    y = jnp.asarray(rng.standard_normal((tokens, sum(out_dims))) * 3, dtype)
    slots = rng.integers(0, num_slots, tokens)
    slots[:2] = 0
    got = reference.add_lora(y, x, banks, jnp.asarray(slots, jnp.int32))
    assert got.dtype == dtype
    want = loop_reference(y, x, banks, slots)
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err < TOLERANCE[dtype]
    np.testing.assert_array_equal(np.asarray(got)[slots == 0], np.asarray(y)[slots == 0])
    assert np.abs(want - np.asarray(y, np.float64)).max() > 0.05  # LoRA changed something


def test_slice_widths_must_sum_to_output(rng):
    banks = random_banks(rng, 2, 4, (3, 3), 2, jnp.float32)
    with pytest.raises(ValueError, match="sum to 6"):
        reference.add_lora(jnp.zeros((2, 7)), jnp.ones((2, 4)), banks, jnp.ones(2, jnp.int32))


def test_embedding(rng):
    vocab, dim, rank, slots_n = 11, 6, 3, 3
    a = rng.standard_normal((slots_n, vocab, rank))
    b = rng.standard_normal((slots_n, rank, dim))
    a[0], b[0] = 0, 0
    bank = LoRABank(
        a=jnp.asarray(a, jnp.float32),
        b=jnp.asarray(b, jnp.float32),
        scale=jnp.asarray([0.0, 1.5, 0.5], jnp.float32),
    )
    ids = rng.integers(0, vocab, 7)
    slots = np.array([1, 2, 0, 1, 2, 2, 0])
    y = rng.standard_normal((7, dim)).astype(np.float32)
    got = np.asarray(
        reference.add_lora_embedding(
            jnp.asarray(y), jnp.asarray(ids), bank, jnp.asarray(slots, jnp.int32)
        )
    )
    for t, (i, s) in enumerate(zip(ids, slots, strict=True)):
        want = y[t] + (np.asarray(bank.scale)[s] * a[s, i] @ b[s] if s else 0)
        np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-5)


def test_a_single_bank_is_one_slice(rng):
    (bank,) = random_banks(rng, 3, 8, (5,), 2, jnp.float32)
    y, x = rng.standard_normal((4, 5)), rng.standard_normal((4, 8))
    slots = np.array([1, 0, 2, 2])
    got = reference.add_lora(jnp.asarray(y), jnp.asarray(x), bank, jnp.asarray(slots))
    np.testing.assert_allclose(got, loop_reference(y, x, [bank], slots), rtol=1e-5, atol=1e-5)


def test_out_of_range_slots_and_ids_are_refused_not_clamped(rng):
    from jlora.errors import MappingError

    (bank,) = random_banks(rng, 3, 8, (5,), 2, jnp.float32)
    y, x = jnp.ones((2, 5)), jnp.ones((2, 8))
    with pytest.raises(MappingError, match=r"reference: token 1 has slot 3, outside \[0, 3\)"):
        reference.add_lora(y, x, [bank], jnp.asarray([1, 3]))
    with pytest.raises(MappingError, match=r"reference: token 0 has id 8, outside \[0, 8\)"):
        reference.add_lora_embedding(y, jnp.asarray([8, 0]), bank, jnp.asarray([1, 1]))
