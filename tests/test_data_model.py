"""LoRAConfig, weights, LoRAModel, LoRARequest, PEFTConfig: construction checks and behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTERS_DIR

import jlora
from jlora.errors import AdapterWeightsError, LoRAConfigError, UnknownAdapterError
from jlora.peft import PEFTConfig, matches_target
from jlora.weights import LoRABank, LoRALayerWeights, LoRAModel, PackedLoRALayerWeights


def layer(rng, name="m", i=16, r=4, o=8, dtype=np.float32, scaling=2.0):
    return LoRALayerWeights(
        lora_a=rng.standard_normal((i, r)).astype(dtype),
        lora_b=rng.standard_normal((r, o)).astype(dtype),
        module_name=name,
        scaling=scaling,
    )


class TestLoRAConfig:
    def test_defaults(self):
        c = jlora.LoRAConfig(max_loras=3, max_lora_rank=8)
        assert c.max_cpu_loras == 3 and c.lora_dtype == "auto"
        assert jax.tree_util.tree_leaves(c) == []  # all static: usable as a jit static arg
        assert hash(c) == hash(jlora.LoRAConfig(max_loras=3, max_lora_rank=8))

    @pytest.mark.parametrize(
        "kwargs,fragment",
        [
            (dict(max_loras=0), "max_loras"),
            (dict(max_loras=2.5), "max_loras"),
            (dict(max_loras=True), "max_loras"),
            (dict(max_lora_rank=0), "max_lora_rank"),
            (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras"),
            (dict(lora_dtype="int8"), "lora_dtype"),
            (dict(target_modules="(unclosed"), "regex"),
            (dict(target_modules=[1, 2]), "target_modules"),
        ],
    )
    def test_invalid(self, kwargs, fragment):
        with pytest.raises(LoRAConfigError, match=fragment):
            jlora.LoRAConfig(**kwargs)

    def test_numpy_ints_are_ints(self):
        c = jlora.LoRAConfig(max_loras=np.int64(3), max_lora_rank=np.int32(8))
        assert c == jlora.LoRAConfig(max_loras=3, max_lora_rank=8)

    def test_dtype(self):
        assert jlora.LoRAConfig(lora_dtype="bfloat16").jnp_dtype() == jnp.bfloat16
        assert jlora.LoRAConfig().jnp_dtype(jnp.float16) == jnp.float16


class TestWeights:
    def test_layer_shapes(self, rng):
        w = layer(rng, i=10, r=3, o=7)
        assert (w.input_dim, w.rank, w.output_dim) == (10, 3, 7)
        want = 2.0 * w.lora_a.astype(np.float64) @ w.lora_b
        np.testing.assert_allclose(w.delta_weight(), want, atol=1e-6 * np.abs(want).max())

    def test_layer_rejects_mismatch(self, rng):
        with pytest.raises(AdapterWeightsError, match="do not chain"):
            LoRALayerWeights(lora_a=np.ones((4, 3)), lora_b=np.ones((2, 5)), module_name="x.q_proj")
        with pytest.raises(AdapterWeightsError, match="bias"):
            LoRALayerWeights(lora_a=np.ones((4, 3)), lora_b=np.ones((3, 5)), bias=np.ones(4))

    @pytest.mark.parametrize("scaling", [np.inf, -np.inf, np.nan, None, "2", True, 1e39, -4e38])
    def test_layer_rejects_a_scaling_that_is_not_a_finite_number(self, rng, scaling):
        with pytest.raises(AdapterWeightsError, match="'m': scaling must be a finite number"):
            layer(rng, scaling=scaling)
        assert layer(rng, scaling=np.float32(0.5)).scaling == 0.5  # numpy scalars are fine

    def test_layer_is_pytree(self, rng):
        w = layer(rng)
        leaves, tree = jax.tree_util.tree_flatten(w)
        assert len(leaves) == 2
        w2 = jax.tree_util.tree_unflatten(tree, [x * 2 for x in leaves])
        assert w2.scaling == w.scaling and w2.module_name == "m"
        np.testing.assert_array_equal(w2.lora_a, w.lora_a * 2)

    def test_packed_rank(self, rng):
        p = PackedLoRALayerWeights(slices=(layer(rng, r=2), None, layer(rng, r=6)))
        assert p.rank == 6

    def test_model_api(self, rng):
        m = LoRAModel(
            loras={"a.q_proj": layer(rng, "a.q_proj"), "a.v_proj": layer(rng, "a.v_proj", r=2)},
            id=3,
            name="sql",
        )
        assert m.rank == 4 and m.check_lora_name("a.q_proj") and not m.check_lora_name("x")
        assert m.get_lora("x") is None and m.get_lora("a.v_proj").rank == 2
        assert m.num_parameters == 16 * 4 + 4 * 8 + 16 * 2 + 2 * 8
        assert m.num_bytes == 4 * m.num_parameters
        with pytest.raises(UnknownAdapterError, match="sql"):
            m["nope"]
        c = m.clone(7)
        assert (c.id, c.name, m.id) == (7, "sql", 3)
        assert c.loras["a.q_proj"].lora_a is m.loras["a.q_proj"].lora_a
        with pytest.raises(jlora.LoRAError):
            m.clone(0)

    def test_clone_takes_numpy_ints_not_bools(self, rng):
        m = LoRAModel(loras={"m": layer(rng)}, id=1, name="sql")
        c = m.clone(np.int64(4))
        assert c.id == 4 and type(c.id) is int
        for bad in (True, 2.0):
            with pytest.raises(jlora.LoRAError, match=r"'sql'.*ints >= 1"):
                m.clone(bad)

    def test_optimize_returns_new_contiguous_value(self, rng):
        w = layer(rng)
        w = w.replace(lora_a=np.asfortranarray(w.lora_a))
        m = LoRAModel(loras={"m": w}, id=1, name="x")
        o = m.optimize(jnp.bfloat16)
        assert o is not m and m.loras["m"].lora_a.dtype == np.float32
        assert o.loras["m"].lora_a.dtype == jnp.bfloat16
        assert o.loras["m"].lora_a.flags["C_CONTIGUOUS"]
        assert o.num_bytes == m.num_bytes // 2

    def test_optimize_refuses_non_float_dtypes_and_overflow(self, rng):
        w = layer(rng)
        m = LoRAModel(loras={"m": w.replace(lora_a=np.full_like(w.lora_a, 1e5))}, id=1, name="x")
        with pytest.raises(AdapterWeightsError, match=r"'x': .*lora_a.* overflows float16"):
            m.optimize(jnp.float16)
        with pytest.raises(AdapterWeightsError, match=r"optimize\(dtype=<class 'numpy.int8'>\)"):
            m.optimize(np.int8)  # would wrap silently
        assert m.optimize(jnp.bfloat16).loras["m"].lora_a.dtype == jnp.bfloat16  # in range

    def test_bank(self):
        bank = LoRABank.zeros(5, 12, 7, 4, jnp.bfloat16)
        assert (bank.num_slots, bank.input_dim, bank.max_rank, bank.output_dim) == (5, 12, 4, 7)
        assert bank.scale.dtype == jnp.float32
        with pytest.raises(AdapterWeightsError):
            LoRABank(a=bank.a, b=bank.b[:, :2], scale=bank.scale)

    def test_bank_rejects_arrays_of_the_wrong_rank(self):
        a, b, scale = jnp.zeros((3, 8, 2)), jnp.zeros((3, 2, 4)), jnp.zeros(3)
        for bad in (
            dict(a=a[..., 0], b=b, scale=scale),
            dict(a=a, b=b[..., 0], scale=scale),
            dict(a=a, b=b, scale=scale[:, None]),
        ):
            shapes = r"\(3, 8(, 2)?\).*\(3, 2(, 4)?\).*\(3,( 1)?\)"
            with pytest.raises(AdapterWeightsError, match=rf"LoRABank.*{shapes}"):
                LoRABank(**bad)


class TestLoRARequest:
    def test_accessors_and_identity(self):
        r = jlora.LoRARequest(lora_name="sql", lora_int_id=5, lora_path=ADAPTERS_DIR / "attn_r8")
        assert (r.adapter_id, r.name) == (5, "sql") and isinstance(r.path, str)
        same = jlora.LoRARequest(lora_name="other", lora_int_id=5, lora_path="/x")
        assert r == same and hash(r) == hash(same)
        with pytest.raises(AttributeError):
            r.lora_int_id = 6  # frozen

    def test_numpy_int_ids_are_ints(self):
        r = jlora.LoRARequest(lora_name="sql", lora_int_id=np.int64(5), lora_path="/x")
        assert type(r.lora_int_id) is int and r.adapter_id == 5
        same = jlora.LoRARequest(lora_name="sql", lora_int_id=5, lora_path="/x")
        assert r == same and hash(r) == hash(same)
        for bad in (True, 5.0, np.int64(0)):
            with pytest.raises(LoRAConfigError, match="lora_int_id must be an int >= 1"):
                jlora.LoRARequest(lora_name="sql", lora_int_id=bad, lora_path="/x")


class TestPEFTConfig:
    def test_suffix_and_layers(self):
        assert matches_target("model.layers.0.self_attn.q_proj", ("q_proj",))
        assert not matches_target("model.layers.0.self_attn.xq_proj", ("q_proj",))
        assert matches_target("lm_head", ("lm_head",))
        assert matches_target("model.layers.1.self_attn.q_proj", ("q_proj",), (1,))
        assert not matches_target("model.layers.0.self_attn.q_proj", ("q_proj",), (1,))

    def test_layers_pattern_follows_a_dot_and_takes_the_first_index(self):
        # as PEFT 0.21's check_target_module_exists: rf"(?:^|.*?\.){pattern}\.(\d+)\."
        q = ("q_proj",)
        assert matches_target("model.layers.1.self_attn.q_proj", q, (1,), ("layers",))
        assert matches_target("transformer.h.2.attn.q_proj", q, (2,), ("layers", "h"))
        assert not matches_target("transformer.h.2.attn.q_proj", q, (2,), ("layers",))
        # a name may start with the pattern
        assert matches_target("layers.1.self_attn.q_proj", q, (1,), ("layers",))
        assert not matches_target("layers.1.self_attn.q_proj", q, (2,), ("layers",))
        # as PEFT 0.21: no pattern (None, [] or "") means any; [""] is a pattern matching nothing
        name = "model.layers.1.self_attn.q_proj"
        for none in (None, ()):
            assert matches_target(name, q, (1,), none)
            assert not matches_target(name, q, (2,), none)
        assert not matches_target(name, q, (1,), ("",))
        base = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": [1]}
        assert PEFTConfig.from_dict({**base, "layers_pattern": ""}).targets(name)
        assert PEFTConfig.from_dict({**base, "layers_pattern": []}).targets(name)
        assert not PEFTConfig.from_dict({**base, "layers_pattern": [""]}).targets(name)
        # the layer index, not an expert index nested inside the layer
        moe = "model.layers.1.experts.0.q_proj"
        assert matches_target(moe, q, (1,), ("layers",)) and not matches_target(moe, q, (0,))

    def test_exact_name_ignores_layer_filter_and_exclude_wins(self):
        # as peft.tuners.tuners_utils.check_target_module_exists (PEFT 0.21)
        name = "model.layers.0.self_attn.q_proj"
        assert matches_target(name, (name,), (1,))
        cfg = PEFTConfig.from_dict(
            {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}
        )
        assert not cfg.targets(name)
        cfg = PEFTConfig.from_dict(
            {"r": 4, "lora_alpha": 8, "target_modules": ".*proj", "exclude_modules": r".*\.0\..*"}
        )
        assert not cfg.targets(name) and cfg.targets(name.replace(".0.", ".1."))

    def test_regex_is_full_match(self):
        rx = r".*\.(q_proj|v_proj)$"
        assert matches_target("model.layers.3.self_attn.v_proj", rx)
        assert not matches_target("model.layers.3.self_attn.o_proj", rx)
        assert not matches_target("x.q_proj", "q_proj")  # fullmatch, not search

    def test_scaling_rules(self):
        cfg = PEFTConfig.from_dict(
            {
                "r": 16,
                "lora_alpha": 32,
                "target_modules": ["q_proj", "down_proj"],
                "rank_pattern": {"down_proj": 4},
                "alpha_pattern": {"model.layers.1.self_attn.q_proj": 8},
                "some_future_key": {"ignored": True},
            }
        )
        assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
        assert cfg.scaling_for("model.layers.1.self_attn.q_proj") == 0.5
        assert cfg.rank_for("model.layers.0.mlp.down_proj") == 4
        assert cfg.scaling_for("model.layers.0.mlp.down_proj") == 8.0
        rs = PEFTConfig.from_dict(
            {"r": 16, "lora_alpha": 8, "target_modules": "q_proj", "use_rslora": True}
        )
        assert rs.scaling_for("q_proj") == 8 / math.sqrt(16)

    def test_from_dir_matches_loader(self):
        cfg = PEFTConfig.from_dir(ADAPTERS_DIR / "mlp_r4_rslora")
        assert cfg.use_rslora and cfg.r == 4 and cfg.source.endswith("adapter_config.json")
        cfg.validate_legal(jlora.LoRAConfig(max_lora_rank=4))


def test_loaded_adapter_layout_and_defaults():
    path = ADAPTERS_DIR / "attn_r8"
    m = jlora.load_adapter(path)
    assert m.name == "attn_r8" and m.id >= 1 and m.id == jlora.load_adapter(path).id
    q = m["model.layers.0.self_attn.q_proj"]
    k = m["model.layers.0.self_attn.k_proj"]
    assert q.lora_a.shape == (64, 8) and q.lora_b.shape == (8, 64)  # [in, r], [r, out]
    assert k.lora_b.shape == (8, 32)  # GQA: 2 KV heads x 16
    m2 = jlora.load_adapter(path, adapter_id=9, name="x", dtype="float16")
    assert (m2.id, m2.name) == (9, "x") and q.lora_a.dtype == np.float32
    assert m2["model.layers.0.self_attn.q_proj"].lora_a.dtype == np.float16
    cfg = jlora.LoRAConfig(max_lora_rank=8, lora_dtype="bfloat16")
    loaded = jlora.load_adapter(path, config=cfg)
    assert loaded["model.layers.0.self_attn.q_proj"].lora_a.dtype == jnp.bfloat16


def test_embedding_adapter_layout():
    m = jlora.load_adapter(ADAPTERS_DIR / "embed_lmhead_r4")
    emb = m["model.embed_tokens"]
    assert emb.is_embedding and emb.lora_a.shape == (128, 4) and emb.lora_b.shape == (4, 64)
    head = m["lm_head"]
    assert not head.is_embedding and head.lora_a.shape == (64, 4) and head.lora_b.shape == (4, 128)
