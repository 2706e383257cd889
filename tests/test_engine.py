"""The serving engine: mixed-adapter greedy generation equals each adapter merged into the weights
and generated alone; continuous batching with more adapters than slots; no recompiles."""

import functools
import os
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTERS_DIR, FIXTURES
from flax import nnx
from safetensors.numpy import load_file, save_file

import jlora
from jlora import manager
from jlora.engine import Engine
from jlora.merge import merge_adapter
from jlora.models import llama
from jlora.sampling import SamplingParams

ADAPTERS = ["attn_r8", "mlp_r4_rslora", "all_r16_patterns", "all_r8_bf16", "embed_lmhead_r4"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def base_model():
    return llama.from_pretrained(FIXTURES / "tiny_llama")


@pytest.fixture(scope="module")
def requests():
    return {
        name: jlora.LoRARequest(lora_name=name, lora_int_id=i + 1, lora_path=ADAPTERS_DIR / name)
        for i, name in enumerate(ADAPTERS)
    }


@pytest.fixture(scope="module")
def engine(base_model):
    # 2 slots for 5 adapters: the scheduler must swap adapters between steps.
    return Engine(
        base_model, jlora.LoRAConfig(max_loras=2, max_lora_rank=16), max_batch=4, max_seq_len=48
    )


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, state, ids, last):
    return nnx.merge(graphdef, state)(ids, logits_index=last)


def greedy_alone(model, prompt, max_tokens=MAX_TOKENS):
    """Greedy decoding by full recomputation, no KV cache: an independent reference. Ids are
    padded to a fixed length (causal attention ignores what follows), so it compiles once."""
    graphdef, state = nnx.split(model)
    ids = np.zeros((1, 32), np.int32)
    ids[0, : len(prompt)] = prompt
    n = len(prompt)
    for _ in range(max_tokens):
        logits = _last_logits(graphdef, state, jnp.asarray(ids), jnp.asarray([n - 1]))
        ids[0, n] = int(jnp.argmax(logits[0]))
        n += 1
    return tuple(int(t) for t in ids[0, len(prompt) : n])


def prompts_for(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128, int(rng.integers(3, 16))).tolist() for _ in range(n)]


def test_mixed_batch_equals_merged_adapters_alone(engine, base_model, requests):
    names = [*ADAPTERS, None, ADAPTERS[0], None]
    prompts = prompts_for(len(names))
    outs = engine.generate(
        prompts, [requests[n] if n else None for n in names], SamplingParams(max_tokens=MAX_TOKENS)
    )
    assert [o.index for o in outs] == list(range(len(names)))
    for out, name, prompt in zip(outs, names, prompts, strict=True):
        model = (
            base_model
            if name is None
            else merge_adapter(base_model, jlora.load_adapter(ADAPTERS_DIR / name))
        )
        assert out.tokens == greedy_alone(model, prompt), name
        assert out.finish_reason == "length" and out.adapter == name
    # The adapters really change the output (the comparison above could fail).
    changed = [
        out.tokens != greedy_alone(base_model, prompt)
        for out, name, prompt in zip(outs, names, prompts, strict=True)
        if name is not None
    ]
    assert sum(changed) >= 3, changed
    assert engine.stats.generated_tokens == MAX_TOKENS * len(names)
    assert engine.stats.tokens_per_s > 0


def test_adapter_churn_never_recompiles_after_warmup(engine, requests):
    params = SamplingParams(max_tokens=3)
    # Warm-up compiles the decode step and every prefill rows bucket at prompt bucket 16.
    assert engine.warmup([3, 15]) > 0
    compiled = engine.num_compiled()
    rng = np.random.default_rng(1)
    for step in range(6):
        names = rng.choice([*ADAPTERS, None], size=int(rng.integers(1, 7)))
        engine.generate(
            prompts_for(len(names), seed=10 + step),
            [requests[n] if n else None for n in names],
            params,
        )
    assert engine.num_compiled() == compiled
    assert len({i.id for i in engine.list_loras()}) == len(ADAPTERS)


def test_sampling_is_reproducible_whatever_the_batch(engine, requests):
    sampled = SamplingParams(max_tokens=5, temperature=0.8, top_k=20, seed=1234, logprobs=True)
    prompts = prompts_for(4, seed=5)
    alone = engine.generate([prompts[1]], [requests["attn_r8"]], sampled)[0]
    mixed = engine.generate(
        prompts,
        [None, requests["attn_r8"], requests["mlp_r4_rslora"], None],
        [SamplingParams(max_tokens=4), sampled, SamplingParams(max_tokens=2), sampled],
    )
    assert mixed[1].tokens == alone.tokens
    np.testing.assert_allclose(mixed[1].logprobs, alone.logprobs, rtol=1e-4)
    assert len(alone.logprobs) == 5 and all(lp <= 0 for lp in alone.logprobs)
    assert mixed[0].logprobs is None and len(mixed[2].tokens) == 2


def test_stop_tokens_and_streaming(engine):
    prompt = prompts_for(1, seed=9)[0]
    full = engine.generate([prompt], None, SamplingParams(max_tokens=6))[0].tokens
    stop = full[2]
    seen = []
    out = engine.generate(
        [prompt],
        None,
        SamplingParams(max_tokens=6, stop_token_ids=(stop,)),
        on_token=lambda i, t: seen.append((i, t)),
    )[0]
    assert out.tokens == full[: full.index(stop) + 1] and out.finish_reason == "stop"
    assert seen == [(0, t) for t in out.tokens]


@pytest.mark.parametrize(
    "prompts,kwargs,fragment",
    [
        ([[]], {}, "non-empty"),
        ([[1.7, 2.9]], {}, "int token ids"),
        ([[[1, 2], [3]]], {}, "int token ids"),  # ragged
        ([["a", "b"]], {}, "int token ids"),
        ([[1, 2**31]], {}, "outside"),
        ([[1, 999]], {}, "outside"),
        ([[1] * 40], {"sampling_params": SamplingParams(max_tokens=20)}, "max_seq_len"),
        ([[1], [2]], {"lora_requests": [None]}, "one of each"),
        (
            [[1]],
            {"lora_requests": jlora.LoRARequest(lora_name="a", lora_int_id=1, lora_path="a")},
            "single",
        ),
        ([[1]], {"sampling_params": SamplingParams(stop_token_ids=(3, 999))}, "stop_token_ids"),
    ],
)
def test_bad_requests(engine, prompts, kwargs, fragment):
    with pytest.raises(jlora.LoRAError, match=fragment):
        engine.generate(prompts, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_batch=2.0),
        dict(max_batch=3),
        dict(max_seq_len=-4),
        dict(max_seq_len=16),
        dict(max_seq_len=129),  # the fixture's max_position_embeddings is 128
    ],
)
def test_bad_engine_settings(base_model, kwargs):
    with pytest.raises(jlora.LoRAConfigError, match=next(iter(kwargs))):
        Engine(base_model, jlora.LoRAConfig(max_loras=1, max_lora_rank=16), **kwargs)


def test_engine_type_checks(base_model, engine):
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16)
    with pytest.raises(TypeError, match="NNX causal LM"):
        Engine(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config)
    with pytest.raises(TypeError, match="on_token must be None or a callable"):
        engine.generate([[1, 2]], on_token=5)
    for lengths in ([3.5], [0], [-3]):
        with pytest.raises(jlora.LoRAConfigError, match="prompt_lengths must be ints >= 1"):
            engine.warmup(lengths)
    # Not sequences at all: once raw TypeErrors ("'int' object is not iterable", "no len()").
    with pytest.raises(jlora.LoRAConfigError, match="prompt_lengths must be a sequence"):
        engine.warmup(8)
    with pytest.raises(jlora.LoRAConfigError, match="lora_requests must be a sequence"):
        engine.generate([[1, 2]], 5)
    with pytest.raises(jlora.LoRAConfigError, match="sampling_params must be a sequence"):
        engine.generate([[1, 2]], None, 5)
    with pytest.raises(jlora.LoRAConfigError, match="prompts must be a sequence"):
        engine.generate(7)


def test_generate_reads_generators_once(engine):
    params = SamplingParams(max_tokens=2)
    want = engine.generate([[1, 2], [3]], None, params)
    got = engine.generate(
        (p for p in [[1, 2], [3]]), (r for r in [None, None]), (s for s in [params, params])
    )
    assert [o.tokens for o in got] == [o.tokens for o in want]


def test_a_target_filter_narrower_than_an_already_wrapped_model_is_refused(base_model):
    """It would be ignored: the layers were chosen when jlora.apply wrapped the model."""
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16)
    wrapped = jlora.apply(base_model, config)
    Engine(wrapped, config, max_batch=1, max_seq_len=32)  # no filter: fine
    with pytest.raises(jlora.LoRAConfigError, match="leaves out .* layers jlora.apply already"):
        Engine(
            wrapped,
            jlora.LoRAConfig(max_loras=1, max_lora_rank=16, target_modules=["q_proj"]),
            max_batch=1,
            max_seq_len=32,
        )


@pytest.mark.parametrize(
    "wrap_with, engine_with",
    [
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),  # the same config passed to both
        (["q_proj"], ["q_proj", "v_proj"]),  # wider: nothing wrapped is left out
        (r".*\.self_attn\.(q|v)_proj", ["q_proj", "v_proj"]),
        ("all-linear", "all-linear"),
    ],
)
def test_a_target_filter_covering_an_already_wrapped_model_is_accepted(
    base_model, wrap_with, engine_with
):
    wrapped = jlora.apply(base_model, jlora.LoRAConfig(max_lora_rank=16, target_modules=wrap_with))
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16, target_modules=engine_with)
    engine = Engine(wrapped, config, max_batch=1, max_seq_len=32)
    assert engine.state.targets == jlora.find_targets(wrapped)


def test_all_linear_on_a_model_wrapped_with_embedding_and_lm_head_is_refused(base_model):
    wrapped = jlora.apply(base_model, jlora.LoRAConfig(max_lora_rank=16))  # default: embed too
    assert any(t.is_embedding for t in jlora.find_targets(wrapped))
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16, target_modules="all-linear")
    with pytest.raises(jlora.LoRAConfigError, match="leaves out 2 of .*'lm_head'"):
        Engine(wrapped, config, max_batch=1, max_seq_len=32)


def test_warmup_takes_numpy_prompt_lengths(engine):
    engine.warmup(np.array([4]))
    engine.warmup([np.int64(3)])


@pytest.mark.parametrize("unordered", [{(1, 2), (3,)}, {"a": [1, 2]}])
def test_unordered_prompts_are_refused(engine, unordered):
    with pytest.raises(jlora.LoRAConfigError, match="prompts must be a sequence"):
        engine.generate(unordered)


def test_slots_pinned_by_unused_adapters_raise_instead_of_waiting_forever(base_model, requests):
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=2)
    engine = Engine(base_model, config, max_batch=2, max_seq_len=32)
    a, b = requests[ADAPTERS[0]], requests[ADAPTERS[1]]
    engine.add_lora(a)
    engine.state = manager.pin_adapter(engine.state, a.adapter_id)
    with pytest.raises(jlora.CapacityError, match=f"pinned by \\[{a.adapter_id}\\]"):
        engine.generate([[1, 2]], [b], SamplingParams(max_tokens=2))
    # A pinned adapter the batch uses holds its one slot: admitted together, in one prefill.
    engine = Engine(
        base_model, jlora.LoRAConfig(max_loras=2, max_lora_rank=16), max_batch=2, max_seq_len=32
    )
    engine.add_lora(a)
    engine.state = manager.pin_adapter(engine.state, a.adapter_id)
    engine.generate([[1, 2], [3, 4]], [a, b], SamplingParams(max_tokens=2))
    assert engine.stats.prefill_calls == 1


def test_requests_that_cannot_run_fail_before_any_is_served(base_model, requests, tmp_path):
    # Each bad request comes after servable ones that would take the rows first.
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=2)
    engine = Engine(base_model, config, max_batch=2, max_seq_len=32)
    a, b = requests[ADAPTERS[0]], requests[ADAPTERS[1]]
    engine.add_lora(a)
    other = jlora.LoRARequest(lora_name="other", lora_int_id=a.adapter_id, lora_path=b.path)
    seen = []
    with pytest.raises(jlora.AdapterMismatchError, match=f"adapter id {a.adapter_id} is"):
        engine.generate([[1], [2], [3]], [None, None, other], on_token=lambda *t: seen.append(t))
    engine.state = manager.pin_adapter(engine.state, a.adapter_id)
    with pytest.raises(jlora.CapacityError, match=f"adapters \\[{b.adapter_id}\\] cannot run"):
        engine.generate([[1], [2]], [None, b], on_token=lambda *t: seen.append(t))
    assert seen == [] and [i.id for i in engine.list_loras()] == [a.adapter_id]


def test_adapter_changes_while_generating_are_refused(base_model, requests):
    engine = Engine(
        base_model, jlora.LoRAConfig(max_loras=2, max_lora_rank=16), max_batch=2, max_seq_len=32
    )
    a, b = requests[ADAPTERS[0]], requests[ADAPTERS[1]]
    engine.add_lora(a)
    prompts, params = prompts_for(2, seed=5), SamplingParams(max_tokens=4)
    want = engine.generate(prompts, [a, None], params)
    # Freeing a's slot mid-call would run a's row on the base model: refused, from this thread
    # (on_token) and from another one alike.
    changes = {
        "remove_lora": lambda: engine.remove_lora(a.adapter_id),
        "add_lora": lambda: engine.add_lora(b),
        "generate": lambda: engine.generate([[1]]),
    }
    for what, change in changes.items():
        with pytest.raises(jlora.EngineBusyError, match=f"Engine.{what} was called while"):
            engine.generate(prompts, [a, None], params, on_token=lambda i, t, f=change: f())
        errors = []

        def from_thread(i, t, change=change, errors=errors):
            worker = threading.Thread(target=lambda: _record(errors, change))
            worker.start()
            worker.join()

        engine.generate(prompts, [a, None], params, on_token=from_thread)
        assert [type(e) for e in errors] == [jlora.EngineBusyError] * 8
    assert [i.id for i in engine.list_loras()] == [a.adapter_id]
    assert engine.generate(prompts, [a, None], params) == want


def _record(errors, change):
    try:
        change()
    except jlora.LoRAError as e:
        errors.append(e)


def test_warmup_fits_prompts_of_any_bucket_under_max_seq_len(base_model):
    engine = Engine(
        base_model, jlora.LoRAConfig(max_loras=1, max_lora_rank=16), max_batch=1, max_seq_len=33
    )
    engine.warmup([1, 20, 40])  # 40 lands in bucket 64 > max_seq_len: skipped
    compiled = engine.num_compiled()
    assert compiled == 3  # decode + prefill buckets 16 and 32
    engine.generate([[1] * 20], None, SamplingParams(max_tokens=13))
    assert engine.num_compiled() == compiled


def test_warmup_compiles_the_slot_writers_too(base_model, requests, tmp_path):
    from compile_counter import CompileCounter

    # A bank layout (rank 24) no other test uses, so that nothing is compiled beforehand.
    engine = Engine(
        base_model, jlora.LoRAConfig(max_loras=2, max_lora_rank=24), max_batch=2, max_seq_len=32
    )
    engine.warmup([4])
    checkpoint = jlora.save_adapter(jlora.load_adapter(ADAPTERS_DIR / ADAPTERS[1]), tmp_path / "c")
    restored = jlora.LoRARequest(lora_name="restored", lora_int_id=9, lora_path=checkpoint)
    prompts = prompts_for(4, seed=3)
    with CompileCounter() as counter:
        # PEFT loads (PyTorch order), a restored checkpoint (bank order), slot evictions.
        engine.generate(prompts, [requests[ADAPTERS[0]], None, requests[ADAPTERS[3]], restored])
        engine.generate(prompts[:2], [requests[ADAPTERS[2]], restored])
    assert counter.counts == {}
    assert {i.id for i in engine.list_loras() if i.slot is not None} == {3, 9}


def test_a_bad_adapter_in_generate_registers_none(base_model, requests, tmp_path):
    engine = Engine(
        base_model, jlora.LoRAConfig(max_loras=2, max_lora_rank=16), max_batch=2, max_seq_len=32
    )
    missing = jlora.LoRARequest(lora_name="missing", lora_int_id=77, lora_path=tmp_path / "nope")
    with pytest.raises(jlora.LoRAError, match="nope"):
        engine.generate([[1, 2], [3, 4]], [requests[ADAPTERS[0]], missing])
    assert engine.list_loras() == ()
    out = engine.generate([[1, 2]], [requests[ADAPTERS[0]]], SamplingParams(max_tokens=2))
    assert len(out[0].tokens) == 2 and [i.id for i in engine.list_loras()] == [1]


def test_a_prompt_whose_bucket_passes_max_seq_len_is_served(base_model, requests):
    # 35 tokens pad to bucket 64 > max_seq_len = 40, yet 35 + 5 new tokens fit: the prefill
    # pads to 40 instead. The same request in a roomier engine (bucket 64) is the reference.
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16)
    prompt = np.random.default_rng(4).integers(0, 128, 35).tolist()
    request, params = requests[ADAPTERS[0]], SamplingParams(max_tokens=5)
    tight = Engine(base_model, config, max_batch=2, max_seq_len=40)
    tight.warmup([35])
    compiled = tight.num_compiled()
    out = tight.generate([prompt, prompt[:3]], [request, None], params)
    assert tight.num_compiled() == compiled
    roomy = Engine(base_model, config, max_batch=2, max_seq_len=72)
    want = roomy.generate([prompt, prompt[:3]], [request, None], params)
    assert [o.tokens for o in out] == [o.tokens for o in want]
    assert len(out[0].tokens) == 5
    with pytest.raises(jlora.LoRAConfigError, match="35 prompt tokens \\+ max_tokens=6"):
        tight.generate([prompt], None, SamplingParams(max_tokens=6))


def test_requests_without_a_seed_sample_independently(engine):
    prompt = prompts_for(1, seed=11)[0]
    free = SamplingParams(max_tokens=8, temperature=2.0)
    outs = engine.generate([prompt] * 4, None, free)
    assert len({o.tokens for o in outs}) > 1  # 4 equal 8-token draws at T=2: vanishingly unlikely
    seeded = SamplingParams(max_tokens=8, temperature=2.0, seed=5)
    outs = engine.generate([prompt] * 2, None, seeded)
    assert outs[0].tokens == outs[1].tokens


def test_engine_takes_a_lora_config_only():
    from jlora.engine import Engine

    with pytest.raises(TypeError, match="lora_config must be a LoRAConfig, got str"):
        Engine(object(), "cfg")  # checked first: named, not an AttributeError deep inside


@pytest.mark.parametrize("change", ["removed", "rewritten"])
def test_an_adapter_that_cannot_be_reloaded_fails_only_its_requests(
    base_model, requests, tmp_path, change
):
    a_dir = shutil.copytree(requests[ADAPTERS[0]].path, tmp_path / "a")
    a = jlora.LoRARequest(lora_name="a", lora_int_id=101, lora_path=a_dir)
    b = requests[ADAPTERS[1]]
    # One slot and one host-cache entry: serving b evicts a from the host cache.
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=1)
    engine = Engine(base_model, config, max_batch=2, max_seq_len=32)
    prompts, adapters = prompts_for(4, seed=3), [None, a, b, None]
    params = SamplingParams(max_tokens=4)
    want = engine.generate(prompts, adapters, params)
    assert a.adapter_id not in engine.state.cache
    weights = a_dir / "adapter_model.safetensors"
    if change == "removed":
        shutil.rmtree(a_dir)
    else:
        save_file({k: 2 * v for k, v in load_file(weights).items()}, weights)
    got = engine.generate(prompts, adapters, params)
    assert got[1].finish_reason == "error" and got[1].tokens == ()
    why = "was evicted from the host cache" if change == "removed" else "changed since"
    assert why in got[1].error and "'a' (id 101)" in got[1].error
    for i in (0, 2, 3):
        assert got[i].tokens == want[i].tokens and got[i].error is None
    # Removed and added again, it serves (its new files, when rewritten).
    engine.remove_lora(a.adapter_id)
    if change == "rewritten":
        assert engine.generate(prompts[1:2], [a], params)[0].finish_reason != "error"


def test_a_failed_reload_mid_run_does_not_evict_running_adapters(
    base_model, requests, tmp_path, monkeypatch
):
    def copy(name, i, src):
        path = shutil.copytree(ADAPTERS_DIR / src, tmp_path / name)
        return jlora.LoRARequest(lora_name=name, lora_int_id=i, lora_path=path)

    x, v1, v2 = (
        copy("x", 11, "attn_r8"),
        copy("v1", 12, "mlp_r4_rslora"),
        copy("v2", 13, "all_r8_bf16"),
    )
    y, z = copy("y", 14, "layers_r4"), copy("z", 15, "regex_r2")
    config = jlora.LoRAConfig(max_loras=3, max_lora_rank=16, max_cpu_loras=3)
    engine = Engine(base_model, config, max_batch=4, max_seq_len=48)
    engine.generate([[1, 2, 3]] * 2, [y, z], SamplingParams(max_tokens=1))  # y, z known
    probes = []
    real = engine._reload_failures
    monkeypatch.setattr(engine, "_reload_failures", lambda ids: probes.append(ids) or real(ids))

    def on_token(i, token):  # x's first token: x (running, cached) and z (evicted) lose files
        if i == 0 and os.path.exists(x.path):
            shutil.rmtree(x.path)
            shutil.rmtree(z.path)

    params = [SamplingParams(max_tokens=m) for m in (8, 1, 1, 2, 2)]
    outs = engine.generate([[5, 6, 7]] * 5, [x, v1, v2, y, z], params, on_token=on_token)
    assert [o.finish_reason for o in outs] == ["length"] * 4 + ["error"]
    assert len(outs[0].tokens) == 8 and "'z' (id 15) was evicted" in outs[4].error
    assert len(probes) == 1  # one failed step, then served to the end


def test_a_request_for_an_adapter_given_as_a_model_is_checked_before_serving(base_model):
    path = ADAPTERS_DIR / "attn_r8"
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16)
    engine = Engine(base_model, config, max_batch=1, max_seq_len=48)
    model = jlora.load_adapter(path, adapter_id=1, name="a")
    k, w = next(iter(model.loras.items()))
    edited = model.replace(loras={**model.loras, k: w.replace(lora_a=2 * w.lora_a)})
    engine.state = manager.add_adapter(engine.state, edited)  # not what its path holds
    request = jlora.LoRARequest(lora_name="a", lora_int_id=1, lora_path=path)
    served = []
    with pytest.raises(jlora.AdapterMismatchError, match="holds differs"):
        engine.generate(
            [[1, 2, 3]] * 3, [None, None, request], on_token=lambda i, t: served.append(i)
        )
    assert served == []


def test_more_new_adapters_than_the_host_cache_are_read_once_each_but_the_overflow(
    base_model, requests, monkeypatch
):
    # Every new adapter is validated by loading it before serving; those served first are
    # loaded last, so only the ones the full cache cannot hold are read again.
    reads = []
    real = manager.load_from_disk

    def counting(request, *args):
        reads.append(request.adapter_id)
        return real(request, *args)

    monkeypatch.setattr(manager, "load_from_disk", counting)
    config = jlora.LoRAConfig(max_loras=1, max_lora_rank=16, max_cpu_loras=2)
    engine = Engine(base_model, config, max_batch=1, max_seq_len=32)
    four = [requests[n] for n in ADAPTERS[:4]]
    outs = engine.generate(prompts_for(4, seed=3), four, SamplingParams(max_tokens=2))
    assert [o.finish_reason for o in outs] == ["length"] * 4
    assert sorted(reads[:4]) == sorted(r.adapter_id for r in four) and len(reads) == 4 + 2, reads
    # A repeated adapter is one upfront load: [a, b, c, a] reads the three once, then c and a
    # again (a reversed list with the repeat read a twice upfront: 6).
    reads.clear()
    engine = Engine(base_model, config, max_batch=1, max_seq_len=32)
    repeat = [four[0], four[1], four[2], four[0]]
    engine.generate(prompts_for(4, seed=4), repeat, SamplingParams(max_tokens=2))
    assert sorted(reads[:3]) == sorted(r.adapter_id for r in four[:3]) and len(reads) == 5, reads
