"""Every kind of bad adapter input gets a clear ``jlora.LoRAError`` naming the file or module."""

import json
import os
import shutil
import struct
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTERS_DIR
from safetensors.numpy import load_file, save_file

import jlora
import jlora.manager as mgr
from jlora import ops
from jlora.errors import (
    AdapterConfigError,
    AdapterMismatchError,
    AdapterWeightsError,
    LoRAConfigError,
    LoRAError,
    MappingError,
    UnsafeFormatError,
)
from jlora.targets import TargetModule

SOURCE = ADAPTERS_DIR / "attn_r8"
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def adapter(tmp_path):
    """A writable copy of a real PEFT adapter (config + safetensors only)."""
    d = tmp_path / "adapter"
    d.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(SOURCE / f, d / f)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    tensors = load_file(d / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, d / "adapter_model.safetensors")


def expect(error, d, *fragments, **kwargs):
    with pytest.raises(error) as info:
        jlora.load_adapter(d, **kwargs)
    assert isinstance(info.value, LoRAError) and isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


def test_good_copy_loads(adapter):
    assert jlora.load_adapter(adapter).rank == 8  # the fixture below is sound before mutation


def test_missing_config(adapter):
    (adapter / "adapter_config.json").unlink()
    expect(AdapterConfigError, adapter, "adapter_config.json", "not found")


def test_missing_safetensors(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    expect(AdapterWeightsError, adapter, "adapter_model.safetensors", "not found")


def test_empty_safetensors(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    expect(AdapterWeightsError, adapter, "adapter_model.safetensors", "empty")


@pytest.mark.parametrize("text", ["{ r: 8,", "[" * 100_000])  # the second nests too deep
def test_invalid_json(adapter, text):
    (adapter / "adapter_config.json").write_text(text)
    expect(AdapterConfigError, adapter, "adapter_config.json", "invalid JSON")


@pytest.mark.parametrize("field", ["r", "lora_alpha", "target_modules"])
def test_missing_required_field(adapter, field):
    edit_config(adapter, **{field: ...})
    expect(AdapterConfigError, adapter, "adapter_config.json", f"missing required field {field!r}")


def test_all_missing_fields_reported_at_once(adapter):
    edit_config(adapter, r=..., lora_alpha=...)
    expect(AdapterConfigError, adapter, "'r'", "'lora_alpha'")


@pytest.mark.parametrize("r", [0, -2])
def test_nonpositive_rank(adapter, r):
    edit_config(adapter, r=r)
    expect(AdapterConfigError, adapter, f"r must be a positive int, got {r}")


def test_rank_above_max_lora_rank(adapter):
    config = jlora.LoRAConfig(max_loras=2, max_lora_rank=4)
    expect(
        AdapterMismatchError, adapter, "module ", "rank 8 exceeds max_lora_rank=4", config=config
    )


def test_unused_default_rank_above_max_lora_rank_is_no_obstacle(adapter):
    """Every module's rank comes from rank_pattern: the default r applies to none of them."""
    edit_config(adapter, r=64, rank_pattern={f"{p}_proj": 8 for p in "qkvo"})
    config = jlora.LoRAConfig(max_loras=2, max_lora_rank=8)
    assert jlora.load_adapter(adapter, config=config).rank == 8


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_invalid_pattern_regex(adapter, field):
    edit_config(adapter, **{field: {"q_[proj": 8}})
    expect(AdapterConfigError, adapter, "adapter_config.json", f"{field} key 'q_[proj'", "regex")


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_infinite_alpha(adapter, field):
    (adapter / "adapter_config.json").write_text(
        (adapter / "adapter_config.json")
        .read_text()
        .replace('"lora_alpha": 16', '"lora_alpha": Infinity')
        .replace('"alpha_pattern": {}', '"alpha_pattern": {"q_proj": Infinity}')
    )
    if field == "alpha_pattern":
        edit_config(adapter, lora_alpha=16)
    expect(AdapterConfigError, adapter, "positive finite number, got inf")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
        ("layer_replication", [[0, 2], [1, 2]], "deeper model"),
        ("target_parameters", ["mlp.experts.down_proj"], "nn.Parameters"),
        ("kasa_config", {"foo": 1}, "KaSA"),
    ],
)
def test_peft_options_that_change_inference_are_refused(adapter, field, value, fragment):
    edit_config(adapter, **{field: value})
    expect(AdapterConfigError, adapter, "adapter_config.json", field, fragment)


def test_dtype_auto_keeps_stored_dtype_and_bad_dtype_is_named(adapter):
    stored = jlora.load_adapter(adapter)
    auto = jlora.load_adapter(adapter, dtype="auto")
    assert auto.get_lora(MODULE).lora_a.dtype == stored.get_lora(MODULE).lora_a.dtype
    expect(AdapterConfigError, adapter, "dtype='floaty'", dtype="floaty")


def test_cast_to_a_narrower_dtype_that_overflows_names_the_tensor(adapter):
    def overflow(t):
        t[A_KEY] = t[A_KEY].astype(np.float32)
        t[A_KEY][0, 0] = 1e5  # finite in float32, inf in float16

    edit_tensors(adapter, overflow)
    expect(AdapterWeightsError, adapter, MODULE, A_KEY, "float16's range", dtype="float16")
    assert jlora.load_adapter(adapter, dtype="float32").get_lora(MODULE).lora_a[0, 0] == 1e5


def test_duplicate_module_tensors_refused(adapter):
    def duplicate(t):
        t[A_KEY.replace(".weight", ".other.weight")] = t[A_KEY]

    edit_tensors(adapter, duplicate)
    expect(AdapterWeightsError, adapter, MODULE, "two lora_A tensors")


@pytest.mark.parametrize(
    "field,value",
    [
        ("layers_pattern", 3),
        ("layers_pattern", ["layers", 3]),
        ("rank_pattern", [1]),
        ("modules_to_save", 5),
        ("exclude_modules", 5),
        ("exclude_modules", ["q_proj", None]),
        ("layers_to_transform", "1"),  # never equal to a layer index: it would match none
        ("layers_to_transform", [1.5]),
        ("layers_to_transform", True),
    ],
)
def test_mistyped_field_is_named(adapter, field, value):
    edit_config(adapter, **{field: value})
    expect(AdapterConfigError, adapter, f"field {field!r} is malformed", "adapter_config.json")


def test_target_modules_must_hold_names(adapter):
    edit_config(adapter, target_modules=["q_proj", None])  # was read as a module named "None"
    expect(AdapterConfigError, adapter, "target_modules must be a list of names")


def test_an_int_too_long_for_python_is_a_config_error(adapter):
    # json raises a plain ValueError (Python's int digit limit), not a JSONDecodeError.
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("{", '{"lora_dropout": ' + "1" * 5000 + ", ", 1))
    expect(AdapterConfigError, adapter, "adapter_config.json", "invalid JSON")


def test_a_lone_layer_index_zero_is_a_layer():
    cfg = jlora.PEFTConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    assert cfg.layers_to_transform is None
    cfg = jlora.PEFTConfig.from_dict(
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": 0}
    )
    assert cfg.layers_to_transform == (0,)
    assert cfg.targets("model.layers.0.self_attn.q_proj")
    assert not cfg.targets("model.layers.1.self_attn.q_proj")


@pytest.mark.parametrize("alpha", [0, -1.5])
def test_nonpositive_alpha(adapter, alpha):
    edit_config(adapter, lora_alpha=alpha)
    expect(AdapterConfigError, adapter, "lora_alpha must be a positive finite number")


def test_a_scaling_beyond_float32_is_refused_with_the_module_named(adapter):
    edit_config(adapter, lora_alpha=1e40)  # finite in float64, Inf in the float32 scale bank
    expect(LoRAError, adapter, "model.layers.0.", "within float32's range", "lora_alpha")


def test_every_config_problem_reported_at_once(adapter):
    edit_config(adapter, r=0, lora_alpha=-1, use_dora=True, modules_to_save=["lm_head"])
    err = expect(AdapterConfigError, adapter)
    for fragment in ("r must be", "lora_alpha must be", "use_dora", "modules_to_save"):
        assert fragment in str(err)


def test_shape_inconsistent_with_config_rank(adapter):
    edit_config(adapter, r=4)
    expect(AdapterWeightsError, adapter, "module 'model.layers.0.self_attn.", "rank 8", "r=4")


def test_shape_inconsistent_between_a_and_b(adapter):
    edit_tensors(adapter, lambda t: t.__setitem__(B_KEY, t[B_KEY][:, :6].copy()))
    expect(AdapterWeightsError, adapter, MODULE, "do not belong together")


def test_lora_a_without_lora_b(adapter):
    edit_tensors(adapter, lambda t: t.pop(B_KEY))
    expect(AdapterWeightsError, adapter, MODULE, "has lora_A but no lora_B")


@pytest.mark.parametrize("value", [["score"], "score"])  # PEFT takes a lone name unlisted
def test_modules_to_save(adapter, value):
    edit_config(adapter, modules_to_save=value)
    expect(AdapterConfigError, adapter, "modules_to_save=['score']", "merge")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_an_init_that_rewrote_the_base_model_is_refused(adapter, init):
    # PiSSA and friends train against a base PEFT changed at init: on the original base, wrong.
    edit_config(adapter, init_lora_weights=init)
    expect(
        AdapterConfigError,
        adapter,
        f"init_lora_weights={init!r}",
        "path_initial_model_for_weight_conversion",
        "set init_lora_weights to true",
    )


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica", ...])
def test_an_init_that_only_seeds_a_and_b_loads(adapter, init):
    edit_config(adapter, init_lora_weights=init)  # ...: the field left out
    assert jlora.load_adapter(adapter).rank == 8


def test_an_unknown_init_is_refused_and_a_mistyped_one_named(adapter):
    edit_config(adapter, init_lora_weights="fancy")
    expect(AdapterConfigError, adapter, "'fancy' is not an init method", "to true")
    edit_config(adapter, init_lora_weights=5)
    expect(AdapterConfigError, adapter, "field 'init_lora_weights' is malformed")


def test_use_dora(adapter):
    edit_config(adapter, use_dora=True)
    expect(AdapterConfigError, adapter, "DoRA")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_base_biases_refused_and_none_saved_is_fine(adapter, bias):
    """bias='all'/'lora_only' retrain the base model's biases; a model without any (Llama)
    saves none, and then there is nothing to refuse."""
    edit_config(adapter, bias=bias)
    assert jlora.load_adapter(adapter).rank == 8
    key = A_KEY.replace("lora_A.weight", "base_layer.bias")

    def add_bias(t):
        t[key] = np.ones(t[B_KEY].shape[0], t[B_KEY].dtype)

    edit_tensors(adapter, add_bias)
    config = jlora.LoRAConfig(max_loras=2, max_lora_rank=8, bias_enabled=True)
    expect(AdapterWeightsError, adapter, key, f"bias={bias!r}", "merge", config=config)


def test_lora_bias_loads_for_merging_only(adapter):
    key = B_KEY.replace(".weight", ".bias")

    def add_bias(t):
        t[key] = np.full(t[B_KEY].shape[0], 0.5, t[B_KEY].dtype)

    edit_tensors(adapter, add_bias)
    edit_config(adapter, lora_bias=True)
    expect(AdapterConfigError, adapter, "lora_bias=True", "bias_enabled=True")
    edit_config(adapter, lora_bias=False)  # a config that hides it: the tensor still counts
    expect(AdapterWeightsError, adapter, MODULE, "LoRA bias", "bias_enabled=True")
    edit_config(adapter, lora_bias=True)
    config = jlora.LoRAConfig(max_loras=2, max_lora_rank=8, bias_enabled=True)
    layer = jlora.load_adapter(adapter, config=config).get_lora(MODULE)
    np.testing.assert_array_equal(layer.bias, 0.5)


def test_a_lora_under_a_base_layer_path_is_kept(adapter):
    """Only PEFT's base-weight copies (".base_layer.weight") are skipped, not a LoRA module
    whose path happens to contain "base_layer"."""
    a_key = A_KEY.replace("self_attn.q_proj", "base_layer.k_proj")

    def add(t):
        t[a_key] = t[A_KEY]
        t[a_key.replace("lora_A", "lora_B")] = t[B_KEY]

    edit_tensors(adapter, add)
    lora = jlora.load_adapter(adapter)
    assert "model.layers.0.base_layer.k_proj" in lora.loras


@pytest.mark.parametrize(
    "new_key, fragment",
    [
        (A_KEY.replace(".weight", ".bias"), "is a bias on lora_A"),
        # the module's A replaced by one of another named adapter, or by an embedding's A
        (A_KEY.replace("lora_A.weight", "lora_A.other.weight"), "mixes tensors of different"),
        (A_KEY.replace("lora_A", "lora_embedding_A"), "mixes tensors of different"),
    ],
)
def test_tensors_that_do_not_belong_together_are_refused(adapter, new_key, fragment):
    def swap(t):
        if new_key.endswith(".bias"):
            t[new_key] = np.ones(8, t[A_KEY].dtype)
        else:
            t[new_key] = t.pop(A_KEY)

    edit_tensors(adapter, swap)
    expect(AdapterWeightsError, adapter, fragment)


def test_truncated_safetensors(adapter):
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect(AdapterWeightsError, adapter, "adapter_model.safetensors", "truncated or corrupt")


def test_garbage_safetensors(adapter):
    (adapter / "adapter_model.safetensors").write_bytes(b"\x07" * 64)
    expect(AdapterWeightsError, adapter, "truncated or corrupt")


def test_header_declaring_huge_tensors_fails_before_allocating(adapter):
    f = adapter / "adapter_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[A_KEY]["shape"] = [8, 400_000_000]  # 12.8 GB of float32 in a file of a few KB
    header[A_KEY]["data_offsets"] = [0, 8 * 400_000_000 * 4]
    blob = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    tracemalloc.start()
    try:
        expect(AdapterWeightsError, adapter, "truncated or corrupt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.0f} MiB: something was allocated"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_names_module(adapter, bad):
    def poison(t):
        t[B_KEY] = t[B_KEY].copy()
        t[B_KEY][3, 1] = bad

    edit_tensors(adapter, poison)
    expect(AdapterWeightsError, adapter, MODULE, "NaN/Inf")


def test_non_lora_tensor_refused(adapter):
    edit_tensors(adapter, lambda t: t.__setitem__("base_model.model.score.weight", np.ones(3)))
    expect(AdapterWeightsError, adapter, "score.weight", "not a LoRA weight")


def test_integer_tensor_refused(adapter):
    edit_tensors(adapter, lambda t: t.__setitem__(A_KEY, t[A_KEY].astype(np.int32)))
    expect(AdapterWeightsError, adapter, A_KEY, "expected a float")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_directory_refused_without_opening(adapter, name):
    (adapter / "adapter_model.safetensors").unlink()
    # Were this file unpickled, it would raise something else entirely (it is not a pickle).
    (adapter / name).write_bytes(b"\x80\x04 not really a pickle")
    expect(UnsafeFormatError, adapter, name, "never unpickles", "safetensors")


def test_pickle_file_path_refused(tmp_path):
    f = tmp_path / "adapter_model.bin"
    f.write_bytes(b"\x80\x04")
    expect(UnsafeFormatError, f, "adapter_model.bin", "never unpickles")


def test_target_modules_filter(adapter):
    # target_modules select the model's layers (jlora.apply): the loader reads every module, and
    # the manager refuses one the wrapped model has no target for, naming it.
    config = jlora.LoRAConfig(max_loras=2, max_lora_rank=8, target_modules=["q_proj"])
    model = jlora.load_adapter(adapter, config=config)
    assert any(name.endswith("k_proj") for name in model.loras)
    targets = [
        TargetModule(name=n, in_dim=w.input_dim, out_dims=(w.output_dim,), peft_names=(n,))
        for n, w in model.loras.items()
        if n.endswith("q_proj")
    ]
    state = mgr.init_state(config, targets)
    with pytest.raises(AdapterMismatchError, match=r"targets module 'model\.layers\.0\..*k_proj'"):
        mgr.add_adapter(state, model)


def test_failed_load_leaves_files_untouched(adapter):
    edit_config(adapter, r=0)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    expect(AdapterConfigError, adapter)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


class _BytesPath:
    """A PathLike over bytes: os.fspath gives b"/x", which the loaders cannot name."""

    def __fspath__(self):
        return b"/x"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(lora_name="a", lora_int_id=0, lora_path="/x"), "lora_int_id must be an int >= 1"),
        (dict(lora_name="a", lora_int_id=-3, lora_path="/x"), "lora_int_id must be an int >= 1"),
        (dict(lora_name="a", lora_int_id=True, lora_path="/x"), "lora_int_id"),
        (dict(lora_name="a", lora_int_id=1, lora_path=""), "lora_path must be a non-empty"),
        (dict(lora_name="", lora_int_id=1, lora_path="/x"), "lora_name must be"),
        (dict(lora_name="a", lora_int_id=1, lora_path=b"/x"), "lora_path must be"),
        (dict(lora_name="a", lora_int_id=1, lora_path=_BytesPath()), "lora_path must be"),
        (
            dict(lora_name="a", lora_int_id=1, lora_path="/x", base_model_name=3),
            "base_model_name must be a string or None",
        ),
    ],
)
def test_bad_lora_request(kwargs, fragment):
    with pytest.raises(LoRAConfigError, match=fragment):
        jlora.LoRARequest(**kwargs)


@pytest.mark.parametrize("slots", [[0, 3], [-1, 0], [1, 99]])
def test_mapping_out_of_range_slot(slots):
    with pytest.raises(MappingError, match="outside"):
        jlora.LoRAMapping.build(slots, [2, 2], num_slots=3)


# ---------------------------------------------------------------------------------------------
# Ops and lora_context arguments: LoRAError subclasses too, not bare ValueErrors


def _one_bank(slots=3, in_dim=8, out=4, rank=2):
    return jlora.LoRABank.zeros(num_slots=slots, in_dim=in_dim, out_dim=out, max_rank=rank)


def _emb(slots=3, vocab=6, hidden=4, rank=2):  # a [slots, vocab, R] embedding bank
    return jlora.LoRABank.zeros(num_slots=slots, in_dim=vocab, out_dim=hidden, max_rank=rank)


def _add(mapping, **kwargs):
    return ops.add_lora(np.ones((3, 4)), np.ones((3, 8)), _one_bank(), mapping, **kwargs)


@pytest.mark.parametrize(
    "call,error,fragment",
    [
        (lambda m: ops.OpsConfig(xla_block_t=0), LoRAConfigError, "xla_block_t"),
        (lambda m: ops.OpsConfig(xla_strategy="x"), LoRAConfigError, "xla_strategy"),
        (
            lambda m: ops.add_lora(np.ones((3, 4)), np.ones((3, 8)), _one_bank(), m, impl="cuda"),
            LoRAConfigError,
            "impl='cuda'",
        ),
        (
            lambda m: ops.add_lora(np.ones((3, 5)), np.ones((3, 8)), _one_bank(), m),
            AdapterMismatchError,
            "5 columns",
        ),
        (
            lambda m: ops.add_lora(np.ones((5, 4)), np.ones((5, 8)), _one_bank(), m),
            MappingError,
            "5 rows",
        ),
        (lambda m: jlora.lora_context({}, m, impl="cuda").__enter__(), LoRAConfigError, "impl"),
        # Checked before an eager call jits (which gave JAX's unhashable-static error).
        (lambda m: _add(m, groups=[1]), LoRAConfigError, "groups=\\[1\\] must be an int"),
        (lambda m: _add(m, config={}), LoRAConfigError, "config must be an OpsConfig"),
        (lambda m: _add(m, config="xla"), LoRAConfigError, "config must be an OpsConfig"),
        (
            lambda m: ops.add_lora(np.ones((3, 4)), np.ones((3, 8)), None, m),
            AdapterMismatchError,
            "banks must be a LoRABank",
        ),
        (
            lambda m: ops.add_lora_embedding(np.ones((3, 4)), np.array([0, 7, 2]), _emb(), m),
            MappingError,
            "token 1 has id 7, outside \\[0, 6\\) .*: the bank's vocabulary",
        ),
        (
            lambda m: ops.add_lora_embedding(np.ones((3, 4)), np.array([0, -1, 2]), _emb(), m),
            MappingError,
            "id -1",
        ),
        (
            lambda m: jlora.lora_context({"x": 5}, m).__enter__(),
            AdapterMismatchError,
            "banks\\['x'\\] must be a LoRABank",
        ),
        (lambda m: jlora.lora_context({}, m, strict="no").__enter__(), LoRAConfigError, "strict"),
        (
            lambda m: jlora.LoRAMapping.build([1, 0], [2, 1], num_slots=3, is_prefill="no"),
            MappingError,
            "is_prefill must be a bool",
        ),
        (
            lambda m: jlora.padded_batch_mapping(np.array([2**63], np.uint64), 2, num_slots=3),
            MappingError,
            "seq_slots has 9223372036854775808",
        ),
    ],
)
def test_ops_and_context_arguments(call, error, fragment):
    mapping = jlora.LoRAMapping.build([1, 0], [2, 1], num_slots=3, num_tokens=3)
    with pytest.raises(error, match=fragment):
        call(mapping)


def test_vmap_over_the_batch_takes_per_example_mappings():
    """The documented way to vmap a LoRA'd model over its batch (docs/design.md)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jlora import manager
    from jlora.apply import find_targets

    layer = jlora.apply(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    targets = find_targets(layer)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 2)).astype(np.float32)
    b = rng.standard_normal((2, 4)).astype(np.float32)
    name = targets[0].peft_names[0]
    model = jlora.LoRAModel(
        loras={name: jlora.LoRALayerWeights(module_name=name, lora_a=a, lora_b=b, scaling=0.5)},
        id=1,
        name="one",
    )
    state = manager.init_state(jlora.LoRAConfig(max_loras=1, max_lora_rank=2), targets)
    state = manager.activate_adapter(manager.add_adapter(state, model), 1)
    # Two sequences of two tokens (an example's rows equal the batch size): seq 0 adapter 1.
    x = jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.float32)
    whole = jlora.padded_batch_mapping([1, 0], 2, num_slots=2)
    per_example = jax.tree.map(
        lambda *v: jnp.stack(v),
        *[jlora.padded_batch_mapping([s], 2, num_slots=2, num_seqs=1) for s in (1, 0)],
    )
    graphdef, params = nnx.split(layer)

    @jax.jit
    def batched(params, banks, mapping, x):
        with jlora.lora_context(banks, mapping):
            return nnx.merge(graphdef, params)(x)

    @jax.jit
    def vmapped_inside(params, banks, mappings, x):
        def one(mapping, xi):
            with jlora.lora_context(banks, mapping):
                return nnx.merge(graphdef, params)(xi[None])[0]

        return jax.vmap(one)(mappings, x)

    want = batched(params, state.banks, whole, x)
    base = nnx.merge(graphdef, params)(x)
    assert not np.allclose(want[0], base[0]) and np.allclose(want[1], base[1])
    np.testing.assert_allclose(vmapped_inside(params, state.banks, per_example, x), want, rtol=1e-6)


@pytest.mark.parametrize("field", ["use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"])
@pytest.mark.parametrize("value", ["false", "no", 0, 1, []])
def test_flags_must_be_json_booleans(adapter, field, value):
    edit_config(adapter, **{field: value})
    expect(AdapterConfigError, adapter, "adapter_config.json", repr(field), "true or false")


def test_flags_take_true_false_and_null(adapter):
    edit_config(adapter, use_rslora=None, fan_in_fan_out=False)
    scaling = jlora.load_adapter(adapter).get_lora(MODULE).scaling
    edit_config(adapter, use_rslora=True)
    assert jlora.load_adapter(adapter).get_lora(MODULE).scaling == pytest.approx(scaling * 8**0.5)


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_an_int_alpha_too_large_for_a_float_is_refused(adapter, field):
    if field == "lora_alpha":
        edit_config(adapter, lora_alpha=10**400)
    else:
        edit_config(adapter, alpha_pattern={"q_proj": 10**400})
    expect(AdapterConfigError, adapter, "adapter_config.json", field, "positive finite number")


@pytest.mark.parametrize(
    "dtype", ["int8", "bool", "complex64", "float8_e4m3fn", np.int32, jnp.float8_e5m2]
)
def test_dtype_argument_must_be_a_float_dtype_banks_hold(adapter, dtype):
    expect(AdapterConfigError, adapter, "dtype=", "float16, bfloat16, float32", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float16", np.float32, jnp.bfloat16, "float64", "auto", None])
def test_dtype_argument_takes_the_float_dtypes(adapter, dtype):
    got = jlora.load_adapter(adapter, dtype=dtype).get_lora(MODULE).lora_a.dtype
    assert got == (np.float32 if dtype in ("auto", None) else np.dtype(dtype))


@pytest.mark.parametrize("adapter_id", [0, -3, True, 2.5, "7", np.bool_(True), np.int64(0)])
def test_adapter_id_must_be_an_int_from_one(adapter, adapter_id):
    expect(LoRAConfigError, adapter, "adapter_id", repr(adapter_id), adapter_id=adapter_id)


def test_a_numpy_adapter_id_becomes_an_int(adapter):
    model = jlora.load_adapter(adapter, adapter_id=np.int64(5))
    assert type(model.id) is int and model.id == 5


@pytest.mark.parametrize("groups", [0, -1, 2.0, True, "2", None])
def test_split_and_join_packed_need_an_int_groups_from_one(groups):
    from jlora.targets import join_packed, split_packed

    y = jnp.arange(12.0).reshape(2, 6)
    with pytest.raises(AdapterMismatchError, match=rf"groups={groups!r} must be an int >= 1"):
        split_packed(y, (3, 3), groups=groups)
    with pytest.raises(AdapterMismatchError, match=rf"groups={groups!r} must be an int >= 1"):
        join_packed([y[:, :3], y[:, 3:]], groups=groups)


def test_split_packed_takes_numpy_int_groups():
    from jlora.targets import join_packed, split_packed

    y = jnp.arange(12.0).reshape(2, 6)
    parts = split_packed(y, (4, 2), groups=np.int64(2))
    assert [p.shape for p in parts] == [(2, 4), (2, 2)]
    np.testing.assert_array_equal(join_packed(parts, groups=np.int64(2)), y)


@pytest.mark.parametrize("rewrite", ["same size", "other size"])
def test_a_file_rewritten_during_the_load_is_refused(adapter, monkeypatch, rewrite):
    # A re-save into a path being loaded would mix two versions' header and bytes.
    from jlora import loader

    file = adapter / "adapter_model.safetensors"
    original = loader._read_header

    def read_then_rewrite(path):
        out = original(path)

        def edit(t):
            t[B_KEY] = t[B_KEY] + 1.0  # same size: only the bytes differ
            if rewrite == "other size":
                for key in (A_KEY, B_KEY):
                    t[key.replace("q_proj", "extra")] = t[key]

        edit_tensors(adapter, edit)
        st = os.stat(file)
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks
        return out

    monkeypatch.setattr(loader, "_read_header", read_then_rewrite)
    expect(AdapterWeightsError, adapter, "adapter_model.safetensors", "changed while")
    monkeypatch.undo()
    assert jlora.load_adapter(adapter).rank == 8  # the finished save loads


# ---------------------------------------------------------------------------------------------
# Synthetic adapters: a bad argument is refused before anything is written


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(r=0), "r=0 must be an int >= 1"),
        (dict(alpha=0), "alpha=0 must be a finite number > 0"),
        (dict(alpha=float("nan")), "alpha=nan"),
        (dict(delta_scale=-1.0), "delta_scale=-1.0"),
        (dict(dtype="int8"), "dtype='int8'"),
        (dict(module_shapes={"m.q_proj": (8, 0)}), "must be \\(in, out\\) pairs"),
        (dict(module_shapes={}), "non-empty dict"),
        (dict(dtype=np.int8), "dtype=<class 'numpy.int8'>"),
    ],
)
def test_write_peft_adapter_refuses_bad_arguments(tmp_path, kwargs, fragment):
    from jlora.synthetic import write_peft_adapter

    kwargs = {"module_shapes": {"m.q_proj": (8, 4)}, **kwargs}
    target = tmp_path / "adapter"
    with pytest.raises(LoRAConfigError, match=fragment):
        write_peft_adapter(target, kwargs.pop("module_shapes"), **kwargs)
    assert not target.exists()  # no empty directory left behind


def test_write_peft_adapter_delta_norm_is_as_documented(tmp_path):
    """|scaling * x A^T B^T| ~ delta_scale * sqrt(out / in) * |x| (the docstring's promise)."""
    from safetensors.numpy import load_file

    from jlora.synthetic import write_peft_adapter

    d_in, d_out, r, alpha = 256, 64, 16, 32
    path = write_peft_adapter(tmp_path / "a", {"m.q_proj": (d_in, d_out)}, r=r, alpha=alpha)
    w = load_file(f"{path}/adapter_model.safetensors")
    a, b = (
        w["base_model.model.m.q_proj.lora_A.weight"],
        w["base_model.model.m.q_proj.lora_B.weight"],
    )
    x = np.random.default_rng(1).standard_normal((512, d_in)).astype(np.float32)
    delta = (alpha / r) * (x @ a.T) @ b.T
    ratio = np.linalg.norm(delta, axis=1).mean() / np.linalg.norm(x, axis=1).mean()
    assert ratio == pytest.approx(0.5 * np.sqrt(d_out / d_in), rel=0.2)


def test_write_peft_adapter_takes_numpy_numbers_and_writes_plain_json(tmp_path):
    """NumPy ints, floats and dtypes are what a LlamaConfig or an array hands over; json.dump
    refuses NumPy scalars, which once left a half-written adapter_config.json."""
    from jlora.synthetic import write_peft_adapter

    shapes = {"m.q_proj": (np.int64(8), np.int64(4))}
    path = write_peft_adapter(
        tmp_path / "a", shapes, r=np.int64(2), alpha=np.float32(4), dtype=np.float16
    )
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 4.0)
    lora = jlora.load_adapter(path)
    assert lora.loras["m.q_proj"].lora_a.dtype == np.float16


def _one_layer_llama_config():
    from jlora.models.llama import LlamaConfig

    return LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )


def test_llama_module_shapes_reads_a_generator_once():
    from jlora.synthetic import llama_module_shapes

    config = _one_layer_llama_config()
    shapes = llama_module_shapes(config, (p for p in ["q_proj"]))
    assert shapes == {"model.layers.0.self_attn.q_proj": (16, 16)}
    assert llama_module_shapes(config, "q_proj") == shapes  # one name, not its letters


@pytest.mark.parametrize("projections", ["qkv_proj", ["q_proj", "qkv_proj"]])
def test_llama_module_shapes_refuses_unknown_projections(projections):
    from jlora.synthetic import llama_module_shapes

    config = _one_layer_llama_config()
    with pytest.raises(LoRAConfigError, match="not Llama projections"):
        llama_module_shapes(config, projections)


def test_ops_and_context_take_any_iterable_of_banks_and_numpy_bools():
    """What worked before the argument checks still does: generators of banks, np.bool_."""
    mapping = jlora.LoRAMapping.build([1, 0], [2, 1], num_slots=3, num_tokens=3)
    y = np.ones((3, 4), np.float32)
    out = ops.add_lora(y, np.ones((3, 8), np.float32), (b for b in [_one_bank()]), mapping)
    np.testing.assert_array_equal(np.asarray(out), y)  # zero banks: the base output
    with jlora.lora_context({"q": (b for b in [_one_bank()])}, mapping, strict=np.False_) as ctx:
        assert len(ctx.banks["q"]) == 1
