"""The per-row sampler: greedy, top-k, top-p, seeds independent of batch mates."""

import jax.numpy as jnp
import numpy as np
import pytest

from jlora.errors import LoRAConfigError
from jlora.sampling import SamplingParams, sample


def run(logits, temperature=0.0, top_k=0, top_p=1.0, seeds=0, steps=0):
    b = logits.shape[0]

    def full(v, dtype):
        return jnp.full((b,), v, dtype) if np.isscalar(v) else jnp.asarray(v, dtype)

    return sample(
        jnp.asarray(logits),
        full(temperature, jnp.float32),
        full(top_k, jnp.int32),
        full(top_p, jnp.float32),
        full(seeds, jnp.uint32),
        full(steps, jnp.int32),
    )


def test_greedy_and_logprobs(rng):
    logits = rng.standard_normal((5, 50)).astype(np.float32)
    tokens, logprobs = run(logits)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(logprobs, logits.max(-1) - lse, rtol=1e-5)


def test_top_k_one_is_greedy_and_top_k_bounds_choices(rng):
    logits = rng.standard_normal((64, 30)).astype(np.float32)
    tokens, _ = run(logits, temperature=5.0, top_k=1, seeds=np.arange(64))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    tokens, _ = run(logits, temperature=5.0, top_k=3, seeds=np.arange(64))
    top3 = np.argsort(-logits, -1)[:, :3]
    assert all(t in row for t, row in zip(np.asarray(tokens), top3, strict=True))
    assert len(set(np.asarray(tokens) == logits.argmax(-1))) == 2  # really sampled


def test_top_k_ranks_by_the_logits_at_any_temperature(rng):
    # At 3e38 every logit / temperature rounds to 0; the ranking must not see that tie.
    logits = rng.standard_normal((8, 30)).astype(np.float32)
    logits[:, 0] = -5.0
    tokens, _ = run(logits, temperature=3e38, top_k=1, seeds=np.arange(8))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_keeps_every_token_tied_with_the_kth(rng):
    # As HF's TopKLogitsWarper and vLLM: tokens 1, 2 and 3 tie for 2nd, so top_k=2 keeps all
    # three (a cut at rank 2 would never draw 2 or 3), and none of the lower ones.
    logits = np.array([[3.0, 1.0, 1.0, 1.0, 0.5, -1.0]] * 600, np.float32)
    tokens, _ = run(logits, temperature=1.0, top_k=2, seeds=np.arange(600))
    assert set(np.asarray(tokens).tolist()) == {0, 1, 2, 3}
    # top_k past the vocabulary keeps everything.
    tokens, _ = run(logits[:300], temperature=50.0, top_k=1000, seeds=np.arange(300))
    assert set(np.asarray(tokens).tolist()) == set(range(6))


def test_top_p_keeps_nucleus():
    logits = np.log(np.array([[0.6, 0.3, 0.05, 0.05]] * 200, np.float32))
    tokens, _ = run(logits, temperature=1.0, top_p=0.8, seeds=np.arange(200))
    assert set(np.asarray(tokens).tolist()) == {0, 1}


def test_a_top_p_that_rounds_to_zero_keeps_the_top_token(rng):
    # 1e-40 is a float32 subnormal (0 where the CPU flushes them), 1e-50 is 0: either way the
    # top token stays, as for any top_p > 0, and sampling is then greedy (never token 0).
    logits = rng.standard_normal((8, 30)).astype(np.float32)
    logits[:, 0] = -5.0
    for top_p in (1e-40, 1e-50):
        SamplingParams(temperature=1.0, top_p=top_p)  # a valid request
        tokens, _ = run(logits, temperature=1.0, top_p=top_p, seeds=np.arange(8))
        np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_seed_stream_independent_of_batch_mates(rng):
    logits = rng.standard_normal((4, 100)).astype(np.float32)
    alone, _ = run(logits[2:3], temperature=1.0, seeds=[7], steps=[3])
    mixed, _ = run(logits, temperature=[0.0, 1.0, 1.0, 0.5], seeds=[1, 2, 7, 9], steps=[0, 1, 3, 2])
    assert int(alone[0]) == int(mixed[2])
    other_step, _ = run(
        np.repeat(logits[2:3], 32, 0), temperature=1.0, seeds=7, steps=np.arange(32)
    )
    assert len(set(np.asarray(other_step).tolist())) > 1  # steps advance the stream


def test_untruncated_row_ignores_batch_mates_that_truncate(rng):
    # A batch mate with top-k or top-p sends the batch through the sorting branch; a row that
    # only uses temperature must draw the same token as without that mate.
    logits = rng.standard_normal((3, 200)).astype(np.float32)
    alone, _ = run(logits[2:3], temperature=1.3, seeds=[5], steps=[4])
    for top_k, top_p in (([4, 0, 0], [1.0, 1.0, 1.0]), ([0, 0, 0], [1.0, 0.3, 1.0])):
        mixed, _ = run(
            logits,
            temperature=[1.0, 0.7, 1.3],
            top_k=top_k,
            top_p=top_p,
            seeds=[1, 2, 5],
            steps=[0, 9, 4],
        )
        assert int(mixed[2]) == int(alone[0])


def test_top_p_measures_the_renormalized_top_k_set_as_vllm_does():
    probs = np.array([[0.45, 0.35, 0.12, 0.08]] * 300, np.float32)  # no ties: see above
    # Top-2 renormalized is (0.5625, 0.4375): token 1 starts past 0.55, so only token 0 stays
    # (on the full distribution it starts at 0.45 and would stay).
    tokens, _ = run(np.log(probs), temperature=1.0, top_k=2, top_p=0.55, seeds=np.arange(300))
    assert set(np.asarray(tokens).tolist()) == {0}
    tokens, _ = run(np.log(probs), temperature=1.0, top_k=2, top_p=0.6, seeds=np.arange(300))
    assert set(np.asarray(tokens).tolist()) == {0, 1}
    tokens, _ = run(np.log(probs), temperature=1.0, top_k=3, top_p=0.99, seeds=np.arange(300))
    assert set(np.asarray(tokens).tolist()) == {0, 1, 2}  # top-k bounds top-p


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_tokens=0),
        dict(max_tokens=True),
        dict(temperature=-1),
        dict(temperature=None),
        dict(temperature="1"),
        dict(temperature=float("inf")),
        dict(temperature=1e39),  # Inf in float32
        dict(top_k=-1),
        dict(top_k=2**31),
        dict(top_p=0.0),
        dict(top_p=None),
        dict(seed=-1),
        dict(seed=2**32),
        dict(seed=True),
        dict(seed=1.5),
        dict(stop_token_ids=5),
        dict(stop_token_ids=("a",)),
        dict(stop_token_ids=(-3,)),
        dict(stop_token_ids=(True,)),
        dict(logprobs=5),
        dict(logprobs="yes"),
    ],
    ids=str,
)
def test_bad_params(kwargs):
    with pytest.raises(LoRAConfigError):
        SamplingParams(**kwargs)


def test_stop_token_ids_take_any_iterable_once():
    # A generator is consumed by validation; the stored tuple must still hold its ids.
    assert SamplingParams(stop_token_ids=(t for t in (3, 5))).stop_token_ids == (3, 5)
    assert SamplingParams(stop_token_ids=iter([np.int64(9)])).stop_token_ids == (9,)
    assert SamplingParams(stop_token_ids=[]).stop_token_ids == ()


def test_seed_defaults_to_none_and_takes_numpy_ints():
    assert SamplingParams().seed is None
    assert SamplingParams(seed=np.uint32(7)).seed == 7


def test_numpy_float_params_are_taken_without_warnings():
    # pytest turns warnings into errors: a float16 compared with float32's max overflowed.
    for dtype in (np.float16, np.float32, np.float64):
        params = SamplingParams(temperature=dtype(0.5), top_p=dtype(0.5))
        assert params.temperature == 0.5 and params.top_p == 0.5
