"""SamplingParams and a jittable per-row sampler (greedy, temperature, top-k, top-p, seeds).

Every row carries its own parameters as arrays, so one compiled step serves a batch that mixes
greedy and sampled requests. A row's random stream depends only on its own seed and how many
tokens it has generated, never on which other requests share the batch. Imports jlora.errors
and jlora.config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.config import FLOAT32_MAX, is_int
from jlora.errors import LoRAConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token of one request.

    Attributes:
      max_tokens: tokens to generate at most (>= 1).
      temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature).
      top_k: keep the k most likely tokens (0 = all).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
      seed: seed of this request's random stream: a sampled request with a seed is
        reproducible; with None (the default, as in vLLM) the engine draws a fresh seed for
        each request, so requests sharing these params sample independently.
      stop_token_ids: generation ends after any of these tokens (it is included in the output).
        The model's EOS is not added for you (vLLM adds it unless ``ignore_eos``): list it here.
      logprobs: also return the log-probability of each generated token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False

    def __post_init__(self):
        problems = []
        stops = self.stop_token_ids
        # Listed once: a generator or iterator given here would be empty on a second pass.
        items = [None] if isinstance(stops, int | str | bytes) else _iter(stops)
        if not all(is_int(t) and t >= 0 for t in items):
            problems.append(f"stop_token_ids must be a sequence of ints >= 0, got {stops!r}")
        else:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in items))
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        # The step holds it in float32, where a larger one is Inf (and samples uniformly).
        # float(): a float16 temperature compared with FLOAT32_MAX would overflow (a warning).
        if not _is_real(self.temperature) or not 0 <= float(self.temperature) <= FLOAT32_MAX:
            problems.append(
                f"temperature must be a finite float32 number >= 0, got {self.temperature!r}"
            )
        if not is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            problems.append(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**32):
            problems.append(f"seed must be None or an int in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.logprobs, bool | np.bool_):
            problems.append(
                f"logprobs must be True or False (the sampled token's log-probability), "
                f"got {self.logprobs!r}"
            )
        else:
            object.__setattr__(self, "logprobs", bool(self.logprobs))
        if problems:
            raise LoRAConfigError("Invalid SamplingParams: " + "; ".join(problems))


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    steps: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row.

    Args:
      logits: ``[B, V]``.
      temperature: ``f32 [B]`` (0 = greedy). top_k: ``i32 [B]`` (0 = off). top_p: ``f32 [B]``.
      seeds: ``u32 [B]`` per-request seeds. steps: ``i32 [B]`` tokens generated so far.

    Returns:
      ``(tokens i32 [B], logprobs f32 [B])``: logprobs are of the model's unprocessed
      distribution (log_softmax of the logits), as vLLM reports them.
    """
    logits = logits.astype(jnp.float32)
    logprobs_all = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    sampling = temperature > 0
    # Branches run only when a row needs them: an all-greedy batch (the common serving case)
    # skips the vocabulary sort, which costs more than the whole decode forward on a CPU.
    sampled = lax.cond(
        jnp.any(sampling),
        lambda: _draw(logits, temperature, top_k, top_p, seeds, steps),
        lambda: greedy,
    )
    tokens = jnp.where(sampling, sampled, greedy).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]


def _draw(logits, temperature, top_k, top_p, seeds, steps) -> jax.Array:
    """One categorical draw per row from ``logits / temperature`` restricted to the row's top-k /
    top-p set. The draw is over the vocabulary order whatever the batch, so a row's token depends
    on its own seed, step and parameters only."""
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    truncating = (temperature > 0) & ((top_k > 0) | (top_p < 1))
    allowed = lax.cond(
        jnp.any(truncating),
        lambda: _top_k_top_p(logits, scaled, top_k, top_p),
        lambda: jnp.ones(scaled.shape, bool),
    )
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
    return jax.vmap(jax.random.categorical)(keys, jnp.where(allowed, scaled, -jnp.inf))


def _top_k_top_p(
    logits: jax.Array, scaled: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """bool ``[B, V]``: the tokens each row's top-k and top-p keep (all of them when both are
    off). As in vLLM and HF, top-p measures the mass of the top-k set renormalized."""
    batch, vocab = scaled.shape
    # Ranked by the raw logits: a huge temperature rounds every scaled logit to 0, a tie that
    # would rank token 0 first.
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    # Every token tied with the k-th logit stays, as in HF and vLLM (a cut at rank k would
    # always drop the higher ids of a tie, which bfloat16 logits make common).
    sorted_raw = jnp.take_along_axis(logits, order, axis=-1)
    in_top_k = sorted_raw >= jnp.take_along_axis(sorted_raw, k - 1, axis=-1)
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    # Keep a token while the mass before it is below top_p: the top token always survives.
    # top_p = 1 keeps everything, also where rounding lets the running mass reach 1.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # rank 0 by name: a top_p that rounds to 0 in float32 (1e-40) would keep nothing.
    keep = in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1) | (rank == 0))
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, vocab), bool).at[rows, order].set(keep)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _iter(v):
    try:
        return list(v)
    except TypeError:
        return [None]  # not iterable: fails the int check
