"""The reference NNX Llama: HF checkpoint loading (single file, sharded, fused projections), logits
equal to PEFT's for the committed mixed batch, the KV cache with rows at different lengths, and
errors naming the tensor for bad checkpoints."""

import contextlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTERS_DIR, FIXTURES
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import jlora.manager as mgr
import jlora.models.llama as llama
from jlora.apply import apply, find_targets
from jlora.config import LoRAConfig
from jlora.context import lora_context, padded_batch_mapping
from jlora.errors import AdapterMismatchError, CheckpointError, LoRAConfigError
from jlora.loader import load_adapter
from jlora.models.llama import (
    KVCache,
    LlamaConfig,
    LlamaForCausalLM,
    from_pretrained,
    rope_inv_freq,
)

BASE = FIXTURES / "tiny_llama"
SHARDED = FIXTURES / "tiny_llama_sharded"
MIXED = load_file(str(FIXTURES / "mixed_batch.safetensors"))
MIXED_META = json.loads((FIXTURES / "mixed_batch.json").read_text())
ADAPTERS = MIXED_META["adapters_loaded"]  # adapter id = index + 1
VOCAB = 128


_FORWARDS: dict[int, tuple] = {}


def forward_fn(model):
    """A jitted ``(ids, banks=None, mapping=None, positions=None, cache=None, logits_index=None)``
    for ``model``; banks and mapping enter through ``lora_context`` inside the jit. One per model
    (kept alive here), so tests sharing a model and shapes share compiled programs."""
    if id(model) in _FORWARDS:
        return _FORWARDS[id(model)][1]
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, banks, mapping, ids, positions, cache, logits_index):
        m = nnx.merge(graphdef, state)
        ctx = contextlib.nullcontext() if banks is None else lora_context(banks, mapping)
        with ctx:
            return m(ids, positions, kv_cache=cache, logits_index=logits_index)

    def call(ids, banks=None, mapping=None, positions=None, cache=None, logits_index=None):
        return forward(state, banks, mapping, ids, positions, cache, logits_index)

    _FORWARDS[id(model)] = (model, call)
    return call


def within(actual, expected, rel: float) -> float:
    """Max abs difference, asserted <= rel * max |expected|; returned for reporting."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * float(np.abs(expected).max()), (err, rel * np.abs(expected).max())
    return err


@pytest.fixture(scope="module")
def adapters():
    return [load_adapter(ADAPTERS_DIR / n, adapter_id=i + 1) for i, n in enumerate(ADAPTERS)]


@pytest.fixture(scope="module", params=[0, 1, 4], ids=["separate", "fused", "grouped"])
def served(request, adapters):
    """(base model, wrapped model, manager state with all seven adapters active); fused q/k/v
    and gate/up with their columns one slice after the other, or in 4 groups."""
    fuse = request.param > 0
    base = from_pretrained(BASE, fuse_qkv=fuse, fuse_gate_up=fuse, fused_groups=request.param or 1)
    wrapped = apply(base)
    config = LoRAConfig(max_loras=len(adapters), max_lora_rank=16)
    state = mgr.init_state(config, find_targets(wrapped))
    for adapter in adapters:
        state = mgr.add_adapter(state, adapter, donate=False)
    state, _ = mgr.prepare_batch(state, [a.id for a in adapters], [1] * len(adapters), donate=False)
    return base, wrapped, state


def slots_for(state, names):
    return [0 if n == "__base__" else state.slot_of(ADAPTERS.index(n) + 1) for n in names]


# --------------------------------------------------------------------------------------------
# Ground truth: PEFT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, fuse, groups",
    [(BASE, False, 1), (SHARDED, False, 1), (SHARDED, True, 1), (SHARDED, True, 8)],
    ids=["one", "shards", "fused", "grouped"],
)
def test_base_logits_match_transformers(path, fuse, groups):
    model = from_pretrained(path, fuse_qkv=fuse, fuse_gate_up=fuse, fused_groups=groups)
    logits = forward_fn(model)(jnp.asarray(MIXED["input_ids"]))
    within(logits, MIXED["base_logits"], 1e-5)


def test_mixed_batch_matches_peft(served):
    """PEFT's ``model(input_ids, adapter_names=[...])`` for seven adapters (attention, MLP,
    rsLoRA, rank/alpha patterns, BF16, regex, layers_to_transform, embedding + lm_head) and two
    base rows, against one jlora forward; with fused q/k/v and gate/up too."""
    base, wrapped, state = served
    names = MIXED_META["adapter_names"]
    ids = jnp.asarray(MIXED["input_ids"])
    b, seq = ids.shape
    state, mapping = mgr.prepare_batch(
        state,
        [None if n == "__base__" else ADAPTERS.index(n) + 1 for n in names],
        [seq] * b,
        num_tokens=b * seq,
        num_seqs=b,
        donate=False,
    )
    logits = np.asarray(forward_fn(wrapped)(ids, state.banks, mapping))
    within(logits, MIXED["logits"], 1e-4)  # the bound; measured: about 1.2e-6
    unwrapped = np.asarray(forward_fn(base)(ids))
    for row, name in enumerate(names):
        if name == "__base__":
            # same batch through the unwrapped model; last-bit slack: see test_apply
            within(logits[row], unwrapped[row], 1e-6)
        else:
            assert np.abs(logits[row] - unwrapped[row]).max() > 1e-2, name


def test_no_adapter_active_is_identical(served):
    base, wrapped, _ = served
    ids = jnp.asarray(MIXED["input_ids"])
    np.testing.assert_array_equal(forward_fn(wrapped)(ids), forward_fn(base)(ids))


def test_fused_targets_have_peft_slices(served):
    base, wrapped, _ = served
    targets = {t.name: t for t in find_targets(wrapped)}
    if not base.config.fuse_qkv:
        assert "model.layers.1.self_attn.v_proj" in targets and len(targets) == 2 + 2 * 7
        return
    qkv = targets["model.layers.0.self_attn.qkv_proj"]
    assert qkv.peft_names == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert qkv.out_dims == (64, 32, 32) and qkv.in_dim == 64
    assert qkv.groups == base.config.fused_groups
    gate_up = targets["model.layers.1.mlp.gate_up_proj"]
    assert gate_up.groups == base.config.fused_groups
    assert gate_up.peft_names == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert len(targets) == 2 + 2 * 4


# --------------------------------------------------------------------------------------------
# KV cache: prefill + decode, rows at different lengths, LoRA per row
# --------------------------------------------------------------------------------------------


def test_kv_cache_ragged_rows_match_full_forward(served, rng):
    """Three rows with prompts of 5, 2 and 4 tokens in one padded prefill chunk (padding has
    position -1), then three decode steps at per-row positions; each row on its own adapter.
    Every real token's logits equal a cache-free forward of that row alone."""
    base, wrapped, state = served
    lengths, names, steps = [5, 2, 4], ["embed_lmhead_r4", "__base__", "all_r16_patterns"], 3
    slots = slots_for(state, names)
    b, chunk = len(lengths), max(lengths)
    seqs = [rng.integers(0, VOCAB, n + steps) for n in lengths]
    forward = forward_fn(wrapped)

    ids = np.zeros((b, chunk), np.int32)
    positions = np.full((b, chunk), -1, np.int32)
    for r, n in enumerate(lengths):
        ids[r, :n], positions[r, :n] = seqs[r][:n], np.arange(n)
    cache = KVCache.zeros(base.config, batch_size=b, max_len=16)
    mapping = padded_batch_mapping(slots, chunk, num_slots=state.num_slots)
    logits, cache = forward(jnp.asarray(ids), state.banks, mapping, jnp.asarray(positions), cache)
    got = [[np.asarray(logits[r, :n])] for r, n in enumerate(lengths)]

    decode_mapping = padded_batch_mapping(slots, 1, num_slots=state.num_slots, is_prefill=False)
    for step in range(steps):
        pos = np.asarray([n + step for n in lengths], np.int32)[:, None]
        tok = np.asarray([s[n + step] for s, n in zip(seqs, lengths, strict=True)], np.int32)
        logits, cache = forward(
            jnp.asarray(tok[:, None]), state.banks, decode_mapping, jnp.asarray(pos), cache
        )
        for r in range(b):
            got[r].append(np.asarray(logits[r]))

    # Reference: one cache-free forward of all rows, right-padded (causal: padding after a
    # row's last token cannot change its logits).
    full = np.zeros((b, max(map(len, seqs))), np.int32)
    for r, seq in enumerate(seqs):
        full[r, : len(seq)] = seq
    mapping = padded_batch_mapping(slots, full.shape[1], num_slots=state.num_slots)
    expected = np.asarray(forward(jnp.asarray(full), state.banks, mapping))
    for r, seq in enumerate(seqs):
        within(np.concatenate(got[r]), expected[r, : len(seq)], 1e-5)


def test_logits_index_uses_each_rows_adapter_at_the_lm_head(served, rng):
    """With ``logits_index`` the LM head sees one row per sequence: its LoRA uses seq_slots."""
    _, wrapped, state = served
    names = ["embed_lmhead_r4", "__base__", "embed_lmhead_r4", "attn_r8"]
    ids = jnp.asarray(rng.integers(0, VOCAB, (4, 6)), jnp.int32)
    mapping = padded_batch_mapping(slots_for(state, names), 6, num_slots=state.num_slots)
    forward = forward_fn(wrapped)
    full = np.asarray(forward(ids, state.banks, mapping))
    last = jnp.asarray([5, 2, 0, 4], jnp.int32)
    picked = forward(ids, state.banks, mapping, logits_index=last)
    within(picked, full[np.arange(4), np.asarray(last)], 1e-6)


def test_kv_cache_shapes_and_padding_writes_nothing():
    c = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    cache = KVCache.zeros(c, batch_size=2, max_len=6)
    assert len(cache.k) == len(cache.v) == 2 and cache.max_len == 6
    assert cache.k[0].shape == cache.v[1].shape == (2, 1, 6, 4)
    ids = jnp.asarray([[3, 4, 5], [6, 0, 0]], jnp.int32)
    positions = jnp.asarray([[0, 1, 2], [0, -1, -1]], jnp.int32)
    logits, new = forward_fn(model)(ids, positions=positions, cache=cache)
    assert logits.shape == (2, 3, 16) and np.isfinite(np.asarray(logits)).all()
    written = np.abs(np.stack(new.k)).sum(axis=(0, 2, 4)) > 0  # [batch, max_len]
    np.testing.assert_array_equal(written, [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])


# --------------------------------------------------------------------------------------------
# Config and RoPE
# --------------------------------------------------------------------------------------------


def test_config_reads_both_rope_forms_and_tied_models_run():
    hf = json.loads((BASE / "config.json").read_text())
    c5 = LlamaConfig.from_hf(hf)
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 500.0}
    c4 = LlamaConfig.from_hf(v4, fuse_qkv=True)
    assert (c5.rope_theta, c5.head_dim, c5.num_key_value_heads) == (10000.0, 16, 2)
    assert (c4.rope_theta, c4.fuse_qkv) == (500.0, True)
    tied = LlamaForCausalLM(
        LlamaConfig.from_hf(hf | {"tie_word_embeddings": True}), rngs=nnx.Rngs(0)
    )
    assert not hasattr(tied, "lm_head")
    assert forward_fn(tied)(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, VOCAB)
    assert "lm_head" not in [t.name for t in find_targets(apply(tied))]


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    base = dict(
        vocab_size=8,
        hidden_size=256,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_theta=500000.0,
    )
    plain = rope_inv_freq(LlamaConfig(**base))
    scaled = rope_inv_freq(
        LlamaConfig(
            **base, rope_type="llama3", rope_factor=8.0, rope_original_max_position_embeddings=8192
        )
    )
    wavelen = 2 * np.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_unsupported_config_raises():
    hf = json.loads((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model_type 'mistral'"):
        LlamaConfig.from_hf(hf | {"model_type": "mistral"})
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        LlamaConfig.from_hf(hf | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf(hf | {"hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="fused_groups=3 does not divide q_dim=64"):
        LlamaConfig.from_hf(hf, fuse_qkv=True, fused_groups=3)
    with pytest.raises(CheckpointError, match="fused_groups=32 does not divide inter"):
        LlamaConfig.from_hf(hf, fuse_gate_up=True, fused_groups=32)
    with pytest.raises(CheckpointError, match="fused_groups=2 needs fuse_qkv or fuse_gate_up"):
        LlamaConfig.from_hf(hf, fused_groups=2)
    with pytest.raises(CheckpointError, match="fused_groups must be an int >= 1, got 1.0"):
        LlamaConfig.from_hf(hf, fuse_qkv=True, fused_groups=1.0)
    assert LlamaConfig.from_hf(hf, fuse_qkv=True, fused_groups=np.int64(2)).fused_groups == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vocab_size", 0, "vocab_size must be an int >= 1, got 0"),
        ("hidden_size", "64", "hidden_size must be an int >= 1, got '64'"),
        ("intermediate_size", 176.0, "intermediate_size must be an int >= 1"),
        ("num_hidden_layers", True, "num_hidden_layers must be an int >= 1, got True"),
        ("max_position_embeddings", 0, "max_position_embeddings must be an int >= 1"),
        ("tie_word_embeddings", "false", "tie_word_embeddings must be a bool, got 'false'"),
        ("mlp_bias", 0, "mlp_bias must be a bool"),
        ("rms_norm_eps", -1e-6, "rms_norm_eps must be a finite number >= 0"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number >= 0"),
        ("dtype", "int8", "dtype 'int8' is not one of"),
    ],
)
def test_config_fields_out_of_range_are_named(field, value, message):
    hf = json.loads((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"Invalid LlamaConfig: .*{message}"):
        LlamaConfig.from_hf(hf, **{field: value})


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0, got 0.0"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite number > 0, got inf"),
        # A JSON int past float's range: once an OverflowError from math.isfinite.
        ({"rope_theta": 10**400}, "rope_theta must be a finite number > 0, got 1000"),
        ({"rope_type": "linear", "factor": 0}, "rope_factor must be a finite number > 0"),
        ({"rope_type": "linear"}, r"rope_parameters of rope_type 'linear' lacks \['factor'\]"),
        (
            {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
            r"rope_type 'llama3' lacks \['low_freq_factor', 'high_freq_factor'\]",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_high_freq_factor=4.0 must exceed rope_low_freq_factor=4.0",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64.5,
            },
            "rope_original_max_position_embeddings must be an int >= 1, got 64.5",
        ),
        ({"rope_type": ["llama3"]}, r"rope_type \['llama3'\] is not a string"),
    ],
)
def test_rope_parameters_out_of_range_are_named(rope, message):
    hf = json.loads((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        LlamaConfig.from_hf(hf | {"rope_parameters": {"rope_theta": 10000.0} | rope})


def test_llama3_rope_without_original_max_positions_takes_them_as_transformers_does():
    """transformers 5.x fills in original_max_position_embeddings: the top-level field, else
    max_position_embeddings."""
    hf = json.loads((BASE / "config.json").read_text())
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    hf = hf | {"rope_parameters": rope, "max_position_embeddings": 96}
    assert LlamaConfig.from_hf(hf).rope_original_max_position_embeddings == 96
    top = LlamaConfig.from_hf(hf | {"original_max_position_embeddings": 48})
    assert top.rope_original_max_position_embeddings == 48
    # The top-level field wins over the rope dict's too; with neither, 2048 (HF's default).
    both = hf | {"rope_parameters": rope | {"original_max_position_embeddings": 64}}
    assert LlamaConfig.from_hf(both).rope_original_max_position_embeddings == 64
    both |= {"original_max_position_embeddings": 48}
    assert LlamaConfig.from_hf(both).rope_original_max_position_embeddings == 48
    no_max = {k: v for k, v in hf.items() if k != "max_position_embeddings"}
    assert LlamaConfig.from_hf(no_max).rope_original_max_position_embeddings == 2048


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fuse_qkv=1), "fuse_qkv=1 must be a bool"),
        (dict(fuse_gate_up="yes"), "fuse_gate_up='yes' must be a bool"),
        (dict(fused_groups=0), "fused_groups=0 must be None or an int >= 1"),
        (dict(fused_groups=2), "fused_groups=2: .*needs fuse_qkv or fuse_gate_up"),
        (dict(fuse_qkv=True, fused_groups=7), "fused_groups=7: .*does not divide q_dim"),
    ],
)
def test_bad_from_pretrained_arguments_are_the_callers_not_config_json(kwargs, message):
    with pytest.raises(LoRAConfigError, match=f"^from_pretrained: {message}"):
        from_pretrained(BASE, **kwargs)


def test_from_pretrained_takes_numpy_bools():
    model = from_pretrained(BASE, fuse_qkv=np.True_, fuse_gate_up=np.False_)
    assert model.config.fuse_qkv and not model.config.fuse_gate_up


def test_config_that_is_not_an_object_or_derives_no_head_dim_is_refused():
    hf = json.loads((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match="config.json holds a list, not a JSON object"):
        LlamaConfig.from_hf([hf])
    with pytest.raises(CheckpointError, match="rope_scaling is a str, not a JSON object"):
        LlamaConfig.from_hf(
            {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_scaling": "llama3"}
        )
    no_head_dim = {k: v for k, v in hf.items() if k != "head_dim"} | {"hidden_size": 2}
    with pytest.raises(
        CheckpointError, match=r"head_dim = hidden_size // num_attention_heads = 2 // 4 is 0"
    ):
        LlamaConfig.from_hf(no_head_dim)
    # the checked numbers are floats afterwards, whichever JSON number HF wrote; a dtype object
    # is stored by name
    c = LlamaConfig.from_hf(hf | {"rope_parameters": {"rope_theta": 500000}}, dtype=jnp.bfloat16)
    assert type(c.rope_theta) is float and c.rope_theta == 500000.0 and c.dtype == "bfloat16"


@pytest.mark.parametrize("dtype", ["int8", "not-a-dtype", np.float64])
def test_load_dtype_other_than_a_model_dtype_is_refused(dtype):
    with pytest.raises(
        LoRAConfigError, match=r"from_pretrained: dtype .* is not one of \('float32'"
    ):
        from_pretrained(BASE, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Bad checkpoints and adapters that do not fit
# --------------------------------------------------------------------------------------------


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def rewrite(file, edit):
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    path = copy_checkpoint(BASE, tmp_path)
    rewrite(path / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj"):
        from_pretrained(path)


def test_mismatched_tensor_is_named(tmp_path):
    path = copy_checkpoint(BASE, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(path / "model.safetensors", lambda t: t.update({name: t[name][:16]}))
    with pytest.raises(CheckpointError, match=rf"{name}.*shape \[16, 64\].*implies \[32, 64\]"):
        from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = copy_checkpoint(BASE, tmp_path)
    name = "model.layers.2.self_attn.q_proj.weight"
    rewrite(path / "model.safetensors", lambda t: t.update({name: np.zeros((64, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor.*{name}"):
        from_pretrained(path)


def test_sharded_checkpoint_errors_name_the_shard_or_tensor(tmp_path):
    path = copy_checkpoint(SHARDED, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    (path / shard).rename(path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=rf"to shard '{shard}', which is missing"):
        from_pretrained(path)
    (path / "elsewhere.safetensors").rename(path / shard)
    rewrite(path / shard, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor 'model\.norm\.weight' is missing"):
        from_pretrained(path)


def test_checkpoint_without_weights_or_config(tmp_path):
    path = copy_checkpoint(BASE, tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: a pickle-based.*never unpickles"):
        from_pretrained(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        from_pretrained(path)
    with pytest.raises(CheckpointError, match="config.json: not found"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "field,value", [("num_attention_heads", 0), ("num_key_value_heads", 0), ("head_dim", -2)]
)
def test_bad_head_counts_name_the_config_file(tmp_path, field, value):
    path = copy_checkpoint(BASE, tmp_path)
    hf = json.loads((path / "config.json").read_text())
    hf[field] = value
    if field == "num_attention_heads":
        hf.pop("head_dim")  # head_dim is then hidden_size // num_attention_heads
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=rf"config\.json: .*{field} must be an int >= 1"):
        from_pretrained(path)


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ([], "weight_map is a list, not an object"),
        ({"model.norm.weight": "../model-00001-of-00002.safetensors"}, "to '../model-00001"),
        ({"model.norm.weight": "/etc/hosts"}, "to '/etc/hosts', not a file name inside"),
        ({"model.norm.weight": 3}, "maps 'model.norm.weight' to 3, not a file name"),
    ],
)
def test_index_weight_map_must_name_files_inside_the_directory(tmp_path, weight_map, message):
    path = copy_checkpoint(SHARDED, tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    if isinstance(weight_map, dict):
        weight_map = index["weight_map"] | weight_map
    index_file.write_text(json.dumps(index | {"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"index\.json: .*{message}"):
        from_pretrained(path)


def test_non_finite_weights_are_named_also_when_the_cast_overflows(tmp_path):
    path = copy_checkpoint(BASE, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"

    def poison(t):
        t[name] = t[name].copy()
        t[name][3, 5] = np.nan

    rewrite(path / "model.safetensors", poison)
    with pytest.raises(
        CheckpointError,
        match=rf"tensor {name} holds 1 NaN/Inf values as float32 \(in the file: corrupt\)",
    ):
        from_pretrained(path)
    path = copy_checkpoint(BASE, tmp_path / "big")

    def big(t):
        t[name] = t[name].copy()
        t[name][:2, :3] = 1e5  # finite in float32, Inf in float16

    rewrite(path / "model.safetensors", big)
    assert np.isfinite(
        np.asarray(from_pretrained(path).model.layers[1].self_attn.o_proj.kernel)
    ).all()
    with pytest.raises(
        CheckpointError,
        match=rf"{name} holds 6 NaN/Inf values as float16 .*load with another dtype",
    ):
        from_pretrained(path, dtype="float16")


def no_read(*args, **kwargs):
    raise AssertionError("a weight was read")


def test_integer_tensor_is_named_before_any_read(tmp_path, monkeypatch):
    path = copy_checkpoint(BASE, tmp_path)
    name = "model.layers.0.mlp.down_proj.weight"
    rewrite(path / "model.safetensors", lambda t: t.update({name: t[name].astype(np.int64)}))
    monkeypatch.setattr(llama._Checkpoint, "read", no_read)
    with pytest.raises(CheckpointError, match=rf"{name}' has dtype I64; expected one of"):
        from_pretrained(path)


@pytest.mark.parametrize("groups", [1, 8])
def test_blocks_read_across_fused_sources_match_the_whole_parameter(groups):
    """A shard of a fused projection may straddle q|k|v (or gate|up), or several column groups:
    each block read from the checkpoint equals the same block of the fully loaded parameter,
    wherever it starts; in 8 groups, group j holds the j-th eighth of q, k and v (checked by
    index against the separate projections)."""
    fused = from_pretrained(BASE, fuse_qkv=True, fuse_gate_up=True, fused_groups=groups)
    sources = llama._param_sources(fused.config)
    params = {
        ".".join(map(str, p)): v for p, v in nnx.iter_graph(fused) if isinstance(v, nnx.Param)
    }
    if groups > 1:
        attn = from_pretrained(BASE).model.layers[1].self_attn
        q, k, v = (np.asarray(m.kernel[...]) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        blocks = [(q[:, 8 * j : 8 * j + 8], k[:, 4 * j : 4 * j + 4], v[:, 4 * j : 4 * j + 4])
                  for j in range(8)]  # fmt: skip
        want = np.concatenate([b for group in blocks for b in group], axis=1)
        got = params["model.layers.1.self_attn.qkv_proj.kernel"][...]
        np.testing.assert_array_equal(got, want)
        # apply takes the layout from the model: naming one fused layer keeps the other's.
        targets = find_targets(apply(fused, packed_groups={"qkv_proj": groups}))
        assert {t.groups for t in targets if t.name.endswith(("qkv_proj", "gate_up_proj"))} == {8}
    with llama._Checkpoint(str(BASE), llama._tensor_files(str(BASE))) as checkpoint:
        for name, bounds in [
            ("model.layers.1.self_attn.qkv_proj.kernel", ((3, 41), (60, 100))),  # q|k|v
            ("model.layers.0.mlp.gate_up_proj.kernel", ((0, 64), (170, 181))),  # gate|up
            ("model.layers.0.self_attn.o_proj.kernel", ((16, 32), (5, 6))),
            ("model.embed_tokens.embedding", ((100, 128), (0, 64))),
            ("model.norm.weight", ((7, 9),)),
        ]:
            whole = np.asarray(params[name][...])
            want = whole[tuple(slice(a, b) for a, b in bounds)]
            got = checkpoint.read(sources[name], bounds)
            assert got.shape == want.shape and np.array_equal(got, want), name


def test_mesh_loading_errors_come_before_any_read(monkeypatch):
    from jax.sharding import AbstractMesh, AxisType

    from jlora import sharding as sh
    from jlora.errors import LoRAConfigError

    monkeypatch.setattr(llama._Checkpoint, "read", no_read)

    def mesh(data, model, axis_type=AxisType.Auto):
        return AbstractMesh((data, model), ("data", "model"), axis_types=(axis_type,) * 2)

    def specs_with(name, spec):  # the default specs, one replaced
        config = LlamaConfig.from_hf(json.loads((BASE / "config.json").read_text()))
        model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))

        def pick(path, default):
            key = ".".join(sh._key_name(k) for k in path if sh._key_name(k) != "value")
            return spec if key == name else default

        specs = sh.llama_param_specs(model)
        return jax.tree_util.tree_map_with_path(pick, specs, is_leaf=lambda x: isinstance(x, P))

    down = "model.layers.1.mlp.down_proj.kernel"
    for spec, message in [
        (P(None, None, "model"), "has 3 entries for 2 dims"),
        (P("x", None), r"names \['x'\], not axes of the mesh \['data', 'model'\]"),
        (P(("data", "model"), "model"), "uses a mesh axis twice"),
    ]:
        with pytest.raises(LoRAConfigError, match=rf"{down}: .*{message}"):
            from_pretrained(BASE, mesh=mesh(2, 4), specs=specs_with(down, spec))

    with pytest.raises(TypeError, match="specs needs a mesh"):
        from_pretrained(BASE, specs={})
    with pytest.raises(LoRAConfigError, match=r"lm_head\.kernel: dim 1 \(128\).*'model' of 3"):
        from_pretrained(BASE, mesh=mesh(1, 3))
    with pytest.raises(LoRAConfigError, match="AxisType.Auto"):
        from_pretrained(BASE, mesh=mesh(1, 1, AxisType.Explicit))
    with pytest.raises(LoRAConfigError, match=r"specs has no PartitionSpec for parameter 'lm_head"):
        from_pretrained(BASE, mesh=mesh(1, 1), specs={})
    with pytest.raises(LoRAConfigError, match="mesh is a AbstractMesh; loading needs the devices"):
        from_pretrained(BASE, mesh=mesh(1, 1))


def test_mesh_loading_on_one_device_equals_the_plain_load():
    """The 8-device cases are in test_sharding.py; one device: same values, on the mesh."""
    from jlora import sharding as sh

    mesh = sh.make_mesh(1, 1, devices=jax.devices()[:1])
    for kw in ({}, {"fuse_qkv": True, "fuse_gate_up": True, "dtype": "bfloat16"}):
        got = nnx.state(from_pretrained(SHARDED, mesh=mesh, **kw), nnx.Param)
        want = nnx.state(from_pretrained(SHARDED, **kw), nnx.Param)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
            assert g.sharding.mesh.shape == mesh.shape


def test_adapters_that_do_not_fit_the_llama_are_named(adapters):
    wrapped = apply(from_pretrained(BASE), target_modules=["q_proj", "v_proj"])
    state = mgr.init_state(LoRAConfig(max_loras=2, max_lora_rank=16), find_targets(wrapped))
    embed = adapters[ADAPTERS.index("embed_lmhead_r4")]
    with pytest.raises(
        AdapterMismatchError, match=r"targets module '(lm_head|model\.embed_tokens)'"
    ):
        mgr.add_adapter(state, embed)
    hf = json.loads((BASE / "config.json").read_text())
    tied = apply(
        LlamaForCausalLM(LlamaConfig.from_hf(hf | {"tie_word_embeddings": True}), rngs=nnx.Rngs(0))
    )
    state = mgr.init_state(LoRAConfig(max_loras=2, max_lora_rank=16), find_targets(tied))
    with pytest.raises(AdapterMismatchError, match=r"'lm_head'.*ties its word embeddings.*lm_head"):
        mgr.add_adapter(state, embed)
    small = LlamaConfig.from_hf(hf | {"hidden_size": 32, "head_dim": 8})
    narrow = apply(LlamaForCausalLM(small, rngs=nnx.Rngs(0)))
    state = mgr.init_state(LoRAConfig(max_loras=2, max_lora_rank=16), find_targets(narrow))
    attn = adapters[ADAPTERS.index("attn_r8")]
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.\d\.self_attn\.\w_proj.*64"):
        mgr.add_adapter(state, attn)
