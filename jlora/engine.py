"""Engine: training-free generation where every request may use a different LoRA adapter.

Continuous batching over a fixed number of decode rows. Each step the scheduler admits waiting
requests into free rows (as many distinct adapters as the device slots allow), prefills them in
one bucketed ``[n, L]`` call whose K/V are scattered into their rows of the shared KV cache, then
runs one decode step for every row. A request leaves its row at a stop token or ``max_tokens``,
and the row is free for the next request at once. Between steps the adapter manager activates
and evicts adapters (``jlora.manager``); only fixed-shape banks and mappings enter the jitted
steps, so adapter churn never recompiles.

Compiled programs: one decode step per engine (shape ``[max_batch, 1]``) and one prefill per
(prefill rows bucket, prompt length bucket) pair: rows pad to powers of two up to ``max_batch``,
prompt lengths to ``jlora.mapping.token_bucket`` capped at ``max_seq_len`` (so any prompt that
leaves room for its new tokens is served). ``Engine.num_compiled()`` counts them.

Layout: the KV cache holds ``[max_batch, kv_heads, max_seq_len, head_dim]`` per layer; a row's
tokens sit at their absolute positions. Rows without a request decode at position -1, which writes
nothing (see ``jlora.models.llama``). Imports jlora modules only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence, Set

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import manager
from jlora.apply import apply, find_targets
from jlora.config import LoRAConfig, is_int
from jlora.context import lora_context, padded_batch_mapping
from jlora.errors import CapacityError, EngineBusyError, LoRAConfigError, LoRAError
from jlora.mapping import token_bucket
from jlora.models.llama import KVCache
from jlora.peft import matches_target
from jlora.request import LoRARequest
from jlora.sampling import SamplingParams, sample
from jlora.targets import TargetModule

BASE = 0  # adapter id of the base model


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What ``Engine.generate`` returns per prompt, in the order the prompts were given."""

    index: int
    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    # "stop" (a stop token), "length" (max_tokens), or "error": its adapter, evicted from the
    # host cache earlier, could not be reloaded when the request was admitted (``error`` says
    # why); the other requests of the call are served.
    finish_reason: str
    adapter: str | None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters of the last ``generate`` call. ``wall_s`` includes any compile that call
    triggered: run ``Engine.warmup`` first to time serving alone."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_calls: int = 0
    decode_steps: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens processed per second, prompt tokens included."""
        total = self.prompt_tokens + self.generated_tokens
        return total / self.wall_s if self.wall_s > 0 else 0.0


@dataclasses.dataclass
class _Seq:
    """A request on its way through the engine (host-side, mutable)."""

    index: int
    prompt: np.ndarray
    params: SamplingParams
    adapter_id: int
    adapter_name: str | None
    seed: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def position(self) -> int:
        """Position of the next token to feed (the last sampled one)."""
        return len(self.prompt) + len(self.tokens) - 1

    def accept(self, token: int, logprob: float) -> None:
        self.tokens.append(token)
        if self.params.logprobs:
            self.logprobs.append(logprob)
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"

    def output(self) -> RequestOutput:
        return RequestOutput(
            index=self.index,
            prompt=tuple(int(t) for t in self.prompt),
            tokens=tuple(self.tokens),
            logprobs=tuple(self.logprobs) if self.params.logprobs else None,
            finish_reason=self.finish_reason or "length",
            adapter=self.adapter_name,
            error=self.error,
        )


class Engine:
    """Serves one base model with many LoRA adapters.

    Args:
      model: an NNX causal LM with the ``jlora.models.llama`` calling convention
        (``model(ids, positions, kv_cache=..., logits_index=...)``), plain or already returned by
        ``jlora.apply``.
      lora_config: slots, ranks, host cache size, target modules (a plain model is wrapped
        with them; a model already wrapped keeps its layers, and a filter here must cover them all).
      max_batch: decode rows (requests in flight at once).
      max_seq_len: prompt plus generated tokens, per request; at most the model's
        ``max_position_embeddings``.

    >>> # engine = Engine(model, LoRAConfig(max_loras=4, max_lora_rank=16))
    >>> # engine.add_lora(LoRARequest(lora_name="sql", lora_int_id=1, lora_path=path))
    >>> # outs = engine.generate([[1, 2, 3]], [None], SamplingParams(max_tokens=8))
    """

    def __init__(
        self,
        model: nnx.Module,
        lora_config: LoRAConfig,
        *,
        max_batch: int = 32,
        max_seq_len: int = 256,
    ):
        if not isinstance(lora_config, LoRAConfig):
            raise TypeError(f"lora_config must be a LoRAConfig, got {type(lora_config).__name__}")
        if not isinstance(model, nnx.Module) or not hasattr(model, "config"):
            raise TypeError(
                "Engine needs an NNX causal LM with a .config and jlora.models.llama's calling "
                f"convention (ids, positions, kv cache), got {type(model).__name__}"
            )
        if not is_int(max_batch) or max_batch < 1 or max_batch & (max_batch - 1):
            raise LoRAConfigError(f"max_batch must be a power of two >= 1, got {max_batch!r}")
        if not is_int(max_seq_len) or max_seq_len < token_bucket(1) + 1:
            raise LoRAConfigError(
                f"max_seq_len must be an int >= {token_bucket(1) + 1} (the smallest prompt bucket "
                f"plus one new token), got {max_seq_len!r}"
            )
        self.config = lora_config
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        if not find_targets_safe(model):
            model = apply(model, lora_config)
        else:
            _check_filter_covers(find_targets(model), lora_config.target_modules)
        self.model = model
        model_config = model.config
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit is not None and max_seq_len > limit:
            # As vLLM refuses a max_model_len past it: RoPE would run, silently, at positions
            # the model never saw in training.
            raise LoRAConfigError(
                f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit}; "
                "lower max_seq_len, or raise max_position_embeddings in the model's config if "
                "its RoPE scaling supports longer sequences"
            )
        self.state = manager.init_state(lora_config, find_targets(model), dtype=model_config.dtype)
        graphdef, self._params = nnx.split(model)
        self._cache = KVCache.zeros(model_config, batch_size=max_batch, max_len=max_seq_len)
        self._prefill = jax.jit(
            functools.partial(_prefill_step, graphdef), donate_argnames=("cache",)
        )
        self._decode = jax.jit(
            functools.partial(_decode_step, graphdef), donate_argnames=("cache",)
        )
        self.stats = EngineStats()
        self._seeds = np.random.default_rng()  # for requests without a seed of their own
        # Held by generate() and by adapter changes: a change made while generate() runs (from
        # on_token or another thread) would free a slot that its rows' mapping still reads.
        self._busy = threading.Lock()

    # Adapters ------------------------------------------------------------------------------

    def add_lora(self, request: LoRARequest) -> None:
        """Registers an adapter (loaded now into the host cache, later into a slot on demand).
        Raises ``EngineBusyError`` while a ``generate`` call is running."""
        with self._exclusive("add_lora"):
            self.state = manager.add_adapter(self.state, request)

    def remove_lora(self, adapter_id: int) -> None:
        """Forgets an adapter (its slot is freed). Raises ``EngineBusyError`` while a
        ``generate`` call is running."""
        with self._exclusive("remove_lora"):
            self.state = manager.remove_adapter(self.state, adapter_id)

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise EngineBusyError(
                f"Engine.{what} was called while a generate() call is running (from on_token or "
                "another thread); call it between generate() calls"
            )
        try:
            yield
        finally:
            self._busy.release()

    def list_loras(self) -> tuple[manager.AdapterInfo, ...]:
        return manager.list_adapters(self.state)

    def warmup(self, prompt_lengths: Sequence[int] = (1,)) -> float:
        """Compiles every program ``generate`` can need for prompts of these lengths: the decode
        step and one prefill per rows bucket (1, 2, 4, ..., ``max_batch``) per prompt-length
        bucket, and the adapter manager's slot writers. Returns the seconds it took. Serving
        loops call it once, before traffic."""
        prompt_lengths = _as_list("prompt_lengths", prompt_lengths, "ints >= 1")
        if not all(is_int(n) and n >= 1 for n in prompt_lengths):
            raise LoRAConfigError(f"prompt_lengths must be ints >= 1, got {prompt_lengths}")
        prompt_lengths = [int(n) for n in prompt_lengths]  # NumPy ints: no bit_length
        start = time.perf_counter()
        with self._exclusive("warmup"):
            self.state = manager.warmup(self.state)
        servable = [n for n in prompt_lengths if n < self.max_seq_len]  # others are refused
        for bucket in sorted({self._bucket(n) for n in servable}):
            # The bucket's shortest prompt, so that its new tokens (2: a decode step) fit.
            length = next(n for n in range(1, bucket + 1) if self._bucket(n) == bucket)
            params = SamplingParams(max_tokens=min(2, self.max_seq_len - length))
            rows = 1
            while rows <= self.max_batch:
                self.generate([[0] * length] * rows, None, params)
                rows *= 2
        return time.perf_counter() - start

    def num_compiled(self) -> int:
        """Programs compiled so far by the prefill and decode steps."""
        return self._prefill._cache_size() + self._decode._cache_size()

    # Generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        lora_requests: Sequence[LoRARequest | None] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; request ``i`` uses adapter ``lora_requests[i]`` (None =
        the base model). ``on_token(i, token)`` is called as each token is accepted (streaming);
        it must not change the engine's adapters or call ``generate`` (``EngineBusyError``).

        Every request is checked before any is served: a bad prompt, parameter or adapter, or an
        adapter that cannot get a slot because pinned adapters hold them all, raises at once
        and registers nothing. An adapter known from before and since evicted from the host
        cache is reloaded when its requests are admitted; if that fails (its files are gone or
        changed), those requests finish with ``finish_reason="error"`` and the reason in
        ``error``, and the others are served.
        """
        with self._exclusive("generate"):
            return self._generate(prompts, lora_requests, sampling_params, on_token)

    def _generate(self, prompts, lora_requests, sampling_params, on_token) -> list[RequestOutput]:
        if on_token is not None and not callable(on_token):
            raise TypeError(f"on_token must be None or a callable, got {type(on_token).__name__}")
        prompts = _as_list("prompts", prompts, "token-id lists")
        n = len(prompts)
        if isinstance(lora_requests, LoRARequest):
            raise LoRAConfigError(
                "lora_requests must be a sequence with one LoRARequest or None per prompt, got "
                "a single LoRARequest; pass [request] * len(prompts) to use it for all of them"
            )
        lora_requests = (
            [None] * n
            if lora_requests is None
            else _as_list("lora_requests", lora_requests, "LoRARequests or None, one per prompt")
        )
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            sampling_params = [sampling_params or SamplingParams()] * n
        else:
            sampling_params = _as_list(
                "sampling_params", sampling_params, "SamplingParams, one per prompt (or one)"
            )
        if not len(lora_requests) == len(sampling_params) == n:
            raise LoRAConfigError(
                f"{n} prompts, {len(lora_requests)} lora_requests and {len(sampling_params)} "
                "sampling_params: give one of each per prompt"
            )
        seqs = [
            self._new_seq(i, *args)
            for i, args in enumerate(zip(prompts, lora_requests, sampling_params, strict=True))
        ]
        requests = [r for r in lora_requests if r is not None]
        manager.check_requests(self.state, requests)  # a known id for another adapter
        pinned = self.state.pinned
        if len(pinned) >= self.config.max_loras:
            blocked = sorted({r.adapter_id for r in requests} - pinned)
            if blocked:
                raise CapacityError(
                    f"requests for adapters {blocked} cannot run: all max_loras="
                    f"{self.config.max_loras} slots are pinned by {sorted(pinned)}; unpin one "
                    "(or raise max_loras)"
                )
        # Every new adapter is loaded now, in one operation: a bad one fails before serving and
        # registers none of them.
        # (An id cached from a bare LoRAModel is compared with its request's files here too.)
        # Loaded in reverse order of first use: with more of them than max_cpu_loras, the host
        # cache keeps those the FIFO admission serves first, and only the rest are read again.
        first_use = list({r.adapter_id: r for r in requests}.items())  # a repeat loads once
        unseen = [r for a, r in reversed(first_use) if a not in self.state.requests]
        if unseen:
            self.state = manager.add_adapters(self.state, unseen)

        start = time.perf_counter()
        stats = dict(
            prompt_tokens=sum(len(s.prompt) for s in seqs),
            generated_tokens=0,
            prefill_calls=0,
            decode_steps=0,
        )
        waiting: deque[_Seq] = deque(seqs)
        rows: list[_Seq | None] = [None] * self.max_batch
        requests_by_id = {r.adapter_id: r for r in lora_requests if r is not None}
        while waiting or any(rows):
            admitted = self._admit(waiting, rows)
            if not admitted and not any(rows):  # ruled out by the pinned check above
                raise RuntimeError(f"jlora bug: no waiting request fits the free slots ({waiting})")
            row_adapters = [s.adapter_id if s else BASE for s in rows]
            try:
                self.state, decode_mapping = manager.prepare_batch(
                    self.state,
                    [requests_by_id.get(a, a) if a else None for a in row_adapters],
                    [1] * self.max_batch,
                    is_prefill=False,
                    num_tokens=self.max_batch,
                    num_seqs=self.max_batch,
                )
            except LoRAError:
                failed = self._reload_failures(row_adapters)
                if not failed:
                    raise
                # Undo this step's admissions (nothing of them ran); fail the requests of the
                # adapters that cannot be reloaded (a running one keeps its tokens), and go on
                # with the others.
                for row, _ in admitted:
                    rows[row] = None
                waiting.extendleft(reversed([seq for _, seq in admitted]))
                marked = 0
                for r, seq in enumerate(rows):
                    if seq is not None and seq.adapter_id in failed:
                        seq.finish_reason, seq.error = "error", failed[seq.adapter_id]
                        rows[r] = None
                        marked += 1
                for seq in waiting:
                    if seq.adapter_id in failed:
                        seq.finish_reason, seq.error = "error", failed[seq.adapter_id]
                        marked += 1
                if not marked:  # the next step would fail the same way, forever
                    raise RuntimeError(f"jlora bug: no request of {sorted(failed)}") from None
                waiting = deque(seq for seq in waiting if seq.finish_reason is None)
                continue
            if admitted:
                self._run_prefill(admitted, rows, on_token)
                stats["prefill_calls"] += 1
            if any(s is not None and s.finish_reason is None for s in rows):
                self._run_decode(rows, decode_mapping, on_token)
                stats["decode_steps"] += 1
            for r, s in enumerate(rows):
                if s is not None and s.finish_reason is not None:
                    rows[r] = None
        stats["generated_tokens"] = sum(len(s.tokens) for s in seqs)
        self.stats = EngineStats(**stats, wall_s=time.perf_counter() - start)
        return [s.output() for s in seqs]

    def _reload_failures(self, adapter_ids) -> dict[int, str]:
        """Adapter id -> why it cannot be reloaded, for those of ``adapter_ids`` that are out
        of the host cache and fail to load. Changes nothing (a load that succeeded here and
        were kept could evict a running row's adapter)."""
        failed = {}
        for a in dict.fromkeys(adapter_ids):
            if a == BASE or a in self.state.cache or a not in self.state.requests:
                continue
            if (e := manager.reload_error(self.state, a)) is not None:
                failed[a] = f"{type(e).__name__}: {e}"
        return failed

    def _new_seq(self, i, prompt, request, params) -> _Seq:
        try:
            prompt = np.asarray(prompt)
        except (ValueError, TypeError):  # ragged: NumPy refuses it
            prompt = np.zeros((0,))
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise LoRAConfigError(f"prompt {i} must be a non-empty list of int token ids")
        vocab = self.model.config.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise LoRAConfigError(f"prompt {i} has token ids outside [0, {vocab})")
        prompt = prompt.astype(np.int32)
        if params is None or not isinstance(params, SamplingParams):
            raise LoRAConfigError(f"sampling_params[{i}] must be a SamplingParams")
        if any(t >= vocab for t in params.stop_token_ids):
            raise LoRAConfigError(
                f"sampling_params[{i}].stop_token_ids {params.stop_token_ids} has ids outside "
                f"[0, {vocab}), which no step can generate"
            )
        if prompt.size + params.max_tokens > self.max_seq_len:
            raise LoRAConfigError(
                f"prompt {i}: {prompt.size} prompt tokens + max_tokens={params.max_tokens} exceed "
                f"max_seq_len={self.max_seq_len}"
            )
        if request is not None and not isinstance(request, LoRARequest):
            raise LoRAConfigError(f"lora_requests[{i}] must be a LoRARequest or None")
        adapter_id = BASE if request is None else request.adapter_id
        seed = int(self._seeds.integers(2**32)) if params.seed is None else params.seed
        name = None if request is None else request.name
        return _Seq(i, prompt, params, adapter_id, name, seed)

    def _bucket(self, prompt_len: int) -> int:
        """Padded prompt length of a prefill: the token bucket, capped at the cache length."""
        return min(token_bucket(prompt_len), self.max_seq_len)

    def _admit(self, waiting: deque[_Seq], rows: list[_Seq | None]) -> list[tuple[int, _Seq]]:
        """Moves waiting requests into free rows while their adapters fit the device slots.

        A request whose adapter would exceed the slots stays waiting (later ones may pass it);
        it runs once rows using other adapters finish.
        """
        pinned = self.state.pinned
        in_use = {s.adapter_id for s in rows if s is not None} - {BASE}
        free = [r for r, s in enumerate(rows) if s is None]
        admitted, skipped = [], []
        while waiting and free:
            seq = waiting.popleft()
            a = seq.adapter_id
            # Slots held: adapters of running or admitted rows, and pinned ones (counted once).
            held = in_use | pinned
            if a != BASE and a not in held and len(held) >= self.config.max_loras:
                skipped.append(seq)
                continue
            if a != BASE:
                in_use.add(a)
            row = free.pop(0)
            rows[row] = seq
            admitted.append((row, seq))
        waiting.extendleft(reversed(skipped))
        return admitted

    def _run_prefill(self, admitted, rows, on_token) -> None:
        n = len(admitted)
        nb = min(1 << (n - 1).bit_length(), self.max_batch)
        length = self._bucket(max(s.prompt.size for _, s in admitted))
        ids = np.zeros((nb, length), np.int32)
        positions = np.full((nb, length), -1, np.int32)
        last = np.zeros(nb, np.int32)
        row_ids = np.full(nb, self.max_batch, np.int32)  # out of range: dropped on scatter
        slots = [0] * nb
        for k, (row, s) in enumerate(admitted):
            ids[k, : s.prompt.size] = s.prompt
            positions[k, : s.prompt.size] = np.arange(s.prompt.size)
            last[k] = s.prompt.size - 1
            row_ids[k] = row
            if s.adapter_id != BASE:
                slots[k] = self.state.slot_of(s.adapter_id)
        mapping = padded_batch_mapping(slots, length, num_slots=self.state.num_slots, num_seqs=nb)
        sampling = _sampling_arrays([s for _, s in admitted], nb, steps=0)
        tokens, logprobs, self._cache = self._prefill(
            self._params,
            self.state.banks,
            mapping,
            self._cache,
            jnp.asarray(ids),
            jnp.asarray(positions),
            jnp.asarray(last),
            jnp.asarray(row_ids),
            *sampling,
        )
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for k, (_, s) in enumerate(admitted):
            s.accept(int(tokens[k]), float(logprobs[k]))
            if on_token:
                on_token(s.index, int(tokens[k]))

    def _run_decode(self, rows, mapping, on_token) -> None:
        live = [s if s is not None and s.finish_reason is None else None for s in rows]
        ids = np.array([s.tokens[-1] if s else 0 for s in live], np.int32)
        positions = np.array([s.position if s else -1 for s in live], np.int32)
        steps = np.array([len(s.tokens) if s else 0 for s in live], np.int32)
        sampling = _sampling_arrays(live, self.max_batch, steps=steps)
        tokens, logprobs, self._cache = self._decode(
            self._params,
            self.state.banks,
            mapping,
            self._cache,
            jnp.asarray(ids),
            jnp.asarray(positions),
            *sampling,
        )
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for r, s in enumerate(live):
            if s is not None:
                s.accept(int(tokens[r]), float(logprobs[r]))
                if on_token:
                    on_token(s.index, int(tokens[r]))


def _check_filter_covers(targets: Sequence[TargetModule], target_modules) -> None:
    """Refuses a ``target_modules`` filter that leaves out a layer ``jlora.apply`` already wrapped:
    the wrapped layers were chosen by that call, so such a filter would be silently ignored (an
    adapter for the left-out layers served on them all the same). The filter the model was
    wrapped with, or a wider one, passes."""
    if target_modules is None:
        return
    if target_modules == "all-linear":  # as jlora.apply's wildcard: no embeddings, no lm_head
        left_out = [t.name for t in targets if t.is_embedding or t.name.split(".")[-1] == "lm_head"]
    else:
        left_out = [
            t.name
            for t in targets
            if not any(matches_target(n, target_modules) for n in (t.name, *t.peft_names))
        ]
    if left_out:
        raise LoRAConfigError(
            f"lora_config.target_modules={target_modules!r} leaves out {len(left_out)} of the "
            f"{len(targets)} layers jlora.apply already wrapped (e.g. {left_out[0]!r}); it cannot "
            "narrow them: pass target_modules to jlora.apply, or give the Engine the plain model"
        )


def find_targets_safe(model) -> tuple:
    """The model's LoRA targets if ``jlora.apply`` already wrapped it, else ()."""
    try:
        return find_targets(model)
    except TypeError:
        return ()


def _sampling_arrays(seqs: Sequence[_Seq | None], size: int, steps) -> tuple[jax.Array, ...]:
    temperature = np.zeros(size, np.float32)
    top_k = np.zeros(size, np.int32)
    top_p = np.ones(size, np.float32)
    seeds = np.zeros(size, np.uint32)
    for k, s in enumerate(seqs):
        if s is not None:
            p = s.params
            temperature[k], top_k[k], top_p[k], seeds[k] = p.temperature, p.top_k, p.top_p, s.seed
    steps = np.broadcast_to(np.asarray(steps, np.int32), (size,))
    return tuple(jnp.asarray(a) for a in (temperature, top_k, top_p, seeds, steps))


def _prefill_step(
    graphdef,
    params,
    banks,
    mapping,
    cache,
    ids,
    positions,
    last,
    row_ids,
    temperature,
    top_k,
    top_p,
    seeds,
    steps,
):
    """Prefills ``n`` prompts into a cache of their own, samples each one's first token, and
    scatters their K/V into rows ``row_ids`` of the shared cache (out-of-range rows: dropped)."""
    model = nnx.merge(graphdef, params)
    n, length = ids.shape
    sub = KVCache.zeros(model.config, batch_size=n, max_len=length, dtype=cache.k[0].dtype)
    with lora_context(banks, mapping):
        logits, sub = model(ids, positions, kv_cache=sub, logits_index=last)
    tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, steps)

    def scatter(rows, new):  # one layer's [rows, K, S, D] <- the prompts' [n, K, length, D]
        return rows.at[row_ids, :, :length].set(new, mode="drop")

    cache = KVCache(
        k=tuple(map(scatter, cache.k, sub.k)),
        v=tuple(map(scatter, cache.v, sub.v)),
    )
    return tokens, logprobs, cache


def _decode_step(
    graphdef,
    params,
    banks,
    mapping,
    cache,
    ids,
    positions,
    temperature,
    top_k,
    top_p,
    seeds,
    steps,
):
    """One token for every row: ``ids [B]`` at ``positions [B]`` (-1: an empty row)."""
    model = nnx.merge(graphdef, params)
    with lora_context(banks, mapping):
        logits, cache = model(
            ids[:, None],
            positions[:, None],
            kv_cache=cache,
            logits_index=jnp.zeros(ids.shape[0], jnp.int32),
        )
    tokens, logprobs = sample(logits, temperature, top_k, top_p, seeds, steps)
    return tokens, logprobs, cache


def _as_list(name: str, value, what: str) -> list:
    """``value`` (any iterable: a generator is read once) as a list, or a LoRAConfigError."""
    # A set or a mapping has no order to pair its items with the other arguments' by.
    if isinstance(value, str | bytes | Set | Mapping) or not isinstance(value, Iterable):
        raise LoRAConfigError(f"{name} must be a sequence of {what}, got {type(value).__name__}")
    return list(value)
