"""LoRAMapping: host-built token/sequence -> slot tables, sorted segments and buckets."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jlora.errors import MappingError
from jlora.mapping import LoRAMapping, batch_bucket, token_bucket


def test_worked_example_from_docstring():
    m = LoRAMapping.build([2, 0, 2, 1], [3, 1, 2, 2], num_slots=3)
    np.testing.assert_array_equal(m.token_slots, [2, 2, 2, 0, 2, 2, 1, 1] + [0] * 8)
    np.testing.assert_array_equal(
        m.sorted_token_ids, [3, 8, 9, 10, 11, 12, 13, 14, 15, 6, 7, 0, 1, 2, 4, 5]
    )
    np.testing.assert_array_equal(m.slot_counts, [9, 2, 5])
    np.testing.assert_array_equal(m.slot_starts, [0, 9, 11])
    np.testing.assert_array_equal(m.seq_slots, [2, 0, 2, 1])
    assert m.is_prefill and m.num_tokens == 16 and m.num_slots == 3


def test_buckets():
    assert [token_bucket(n) for n in (0, 1, 16, 17, 100, 512, 513, 2048)] == [
        16, 16, 16, 32, 128, 512, 1024, 2048,
    ]  # fmt: skip
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 32, 33)] == [1, 2, 4, 8, 32, 64]


def test_explicit_padding_and_overflow():
    m = LoRAMapping.build([1, 1], [1, 1], num_slots=2, is_prefill=False, num_tokens=8, num_seqs=4)
    assert m.num_tokens == 8 and m.seq_slots.shape == (4,) and not m.is_prefill
    with pytest.raises(MappingError, match="do not fit"):
        LoRAMapping.build([1, 1], [5, 5], num_slots=2, num_tokens=8)
    with pytest.raises(MappingError, match="do not fit"):
        LoRAMapping.build([1, 1, 1], [1, 1, 1], num_slots=2, num_seqs=2)


@pytest.mark.parametrize(
    "slots,lengths,fragment",
    [
        ([0, 1], [1], "entries"),
        ([0, 1], [1, -1], ">= 0"),
        ([0.5], [1], "ints"),
        ([[0]], [[1]], "1-D"),
    ],
)
def test_bad_input(slots, lengths, fragment):
    with pytest.raises(MappingError, match=fragment):
        LoRAMapping.build(slots, lengths, num_slots=4)


def test_bad_num_slots():
    with pytest.raises(MappingError, match="num_slots"):
        LoRAMapping.build([0], [1], num_slots=0)
    with pytest.raises(MappingError, match="num_slots"):
        LoRAMapping.build([0], [1], num_slots=True)  # a bool is not a slot count


@pytest.mark.parametrize("field", ["num_tokens", "num_seqs"])
@pytest.mark.parametrize("bad", [3.9, True, "16"])
def test_bucket_sizes_must_be_ints(field, bad):
    # int() would take each: 3.9 as 3, True as 1, "16" as 16
    with pytest.raises(MappingError, match=f"{field} must be an int or None"):
        LoRAMapping.build([1], [1], num_slots=4, **{field: bad})
    assert LoRAMapping.build([1], [1], num_slots=4, **{field: np.int64(16)}) is not None


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9).flatmap(
        lambda s: st.tuples(
            st.just(s),
            st.lists(st.tuples(st.integers(0, s - 1), st.integers(0, 40)), max_size=12),
        )
    )
)
def test_invariants(case):
    num_slots, seqs = case
    slots = np.array([s for s, _ in seqs], np.int64)
    lengths = np.array([n for _, n in seqs], np.int64)
    t, b = token_bucket(int(lengths.sum())), batch_bucket(slots.size)
    tokens, seqs = np.zeros(t, int), np.zeros(b, int)
    tokens[: lengths.sum()], seqs[: slots.size] = np.repeat(slots, lengths), slots
    if t == b and not np.array_equal(tokens, seqs):  # token i is not sequence i
        with pytest.raises(MappingError, match=f"{t} tokens and {b} sequences"):
            LoRAMapping.build(slots, lengths, num_slots=num_slots)
        b *= 2
    m = LoRAMapping.build(slots, lengths, num_slots=num_slots, num_seqs=b)
    assert m.seq_slots.shape == (b,)
    tok = np.asarray(m.token_slots)
    order = np.asarray(m.sorted_token_ids)
    counts, starts = np.asarray(m.slot_counts), np.asarray(m.slot_starts)
    assert tok.shape == (token_bucket(int(lengths.sum())),)
    np.testing.assert_array_equal(np.sort(order), np.arange(tok.size))  # a permutation
    assert (np.diff(tok[order]) >= 0).all()  # sorted by slot
    for s in range(num_slots):
        seg = order[starts[s] : starts[s] + counts[s]]
        assert (tok[seg] == s).all() and (np.diff(seg) > 0).all()  # stable within the segment
    assert counts.sum() == tok.size
    expected = np.repeat(slots, lengths) if slots.size else np.zeros(0, int)
    np.testing.assert_array_equal(tok[: expected.size], expected)
    assert (tok[expected.size :] == 0).all()


def test_equal_token_and_sequence_counts_need_token_i_to_be_sequence_i():
    # 12 sequences, 16 tokens: both pad to 16 rows, and a layer tells per-token rows from
    # per-sequence rows (the LM head on last tokens) by their count alone.
    slots, lengths = [1, 2] * 6, [1] * 10 + [3, 3]  # token 11 is on slot 1, sequence 11 on 2
    with pytest.raises(MappingError, match="16 tokens and 16 sequences.*num_seqs=32"):
        LoRAMapping.build(slots, lengths, num_slots=3)
    with pytest.raises(MappingError, match="16 tokens and 16 sequences"):
        LoRAMapping.build(slots, lengths, num_slots=3, num_tokens=16, num_seqs=16)
    assert LoRAMapping.build(slots, lengths, num_slots=3, num_seqs=32).seq_slots.shape == (32,)
    assert LoRAMapping.build(slots, lengths, num_slots=3, num_tokens=32).num_tokens == 32
    # Token i is sequence i (decode, or zero-length base sequences at the end): accepted.
    decode = LoRAMapping.build([1, 2, 0], [1, 1, 0], num_slots=3, num_tokens=4, num_seqs=4)
    np.testing.assert_array_equal(decode.token_slots, decode.seq_slots)
    # Only the real sequences must match: padding rows' outputs are unused.
    for slots, lengths, kw in (([3, 3], [8, 8], {"num_seqs": 16}), ([1], [16], {"num_seqs": 16})):
        m = LoRAMapping.build(slots, lengths, num_slots=4, **kw)
        assert m.num_tokens == m.seq_slots.shape[0] == 16
    assert LoRAMapping.build([2] * 9, [1] * 9, num_slots=3).num_tokens == 16
    # A pytree map of a mapping to other leaves (shapes, lists) is plain pytree use.
    shapes = jax.tree.map(lambda x: x.shape, decode)
    assert shapes.token_slots == (4,)


def _host_mapping(token_slots, num_slots, *, slot_starts_on_device=False, **replace):
    slots = np.asarray(token_slots, np.int32)
    counts = np.bincount(slots[slots >= 0], minlength=num_slots)[:num_slots].astype(np.int32)
    fields = dict(
        token_slots=slots,
        seq_slots=np.zeros(1, np.int32),
        sorted_token_ids=np.argsort(slots, kind="stable").astype(np.int32),
        slot_counts=counts,
        slot_starts=(np.cumsum(counts) - counts).astype(np.int32),
    )
    fields.update(replace)
    if slot_starts_on_device:
        fields["slot_starts"] = jax.device_put(fields["slot_starts"])
    return LoRAMapping(**fields)


@pytest.mark.parametrize("kind", [list, tuple])
def test_a_mapping_of_python_sequences_is_refused_where_it_is_used(kind):
    from jlora.context import lora_context
    from jlora.ops import add_lora
    from jlora.weights import LoRABank

    mapping = jax.tree.map(lambda x: kind(np.asarray(x).tolist()), _host_mapping([1, 0], 2))
    bank = LoRABank.zeros(2, 4, 4, 2)
    with pytest.raises(
        MappingError, match=f"add_lora: LoRAMapping.token_slots is a {kind.__name__}"
    ):
        add_lora(jax.numpy.zeros((2, 4)), jax.numpy.zeros((2, 4)), (bank,), mapping)
    with pytest.raises(MappingError, match="lora_context: LoRAMapping.token_slots is a"):
        with lora_context({"t": bank}, mapping):
            pass


@pytest.mark.parametrize(
    "slots, replace, fragment",
    [
        ([1, 2, 9, 0], {}, r"token_slots holds slots outside \[0, 4\)"),
        ([1, 2, -1, 0], {}, "token_slots holds slots outside"),
        ([1, 2, 3, 0], {"seq_slots": np.asarray([5], np.int32)}, "seq_slots holds slots"),
        ([1, 2, 3, 0], {"slot_counts": np.asarray([1, 1, 1, 0], np.int32)}, "not the tokens"),
        ([1, 2, 3, 0], {"sorted_token_ids": np.arange(4, dtype=np.int32)}, "not the stable sort"),
        ([1, 2, 3, 0], {"slot_starts": np.zeros(4, np.int32)}, "exclusive cumulative sum"),
        ([1, 2, 3, 0], {"sorted_token_ids": np.arange(3, dtype=np.int32)}, "3 entries for 4"),
        ([1, 2, 3, 0], {"slot_starts": np.zeros(3, np.int32)}, "have 4 and 3 entries"),
    ],
)
def test_a_mapping_assembled_from_host_arrays_is_checked(slots, replace, fragment):
    with pytest.raises(MappingError, match=fragment):
        _host_mapping(slots, 4, **replace)
    # With the other fields on the device it is still read back and checked.
    with pytest.raises(MappingError, match=fragment):
        _host_mapping(slots, 4, **replace, slot_starts_on_device=True)
    good = _host_mapping([1, 2, 3, 0, 1], 4)  # consistent fields: accepted as they are
    assert good.num_slots == 4 and good.num_tokens == 5
