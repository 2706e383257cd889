"""jlora.apply on small Flax models written without jlora in mind (NNX and Linen): a LoRA served
through the wrapper equals the model with the LoRA merged into its weights (W + scale * A @ B),
per row of a mixed batch; no active adapter gives exactly the base output; bad targets raise."""

import dataclasses
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counter import CompileCounter
from flax import nnx
from test_reference import random_banks

import jlora.manager as mgr
from jlora.apply import LoRALinenModel, apply, find_targets, linen_path_to_name
from jlora.config import LoRAConfig
from jlora.context import einsum_kernel_view, lora_context, padded_batch_mapping
from jlora.errors import AdapterMismatchError, LoRAConfigError, MappingError
from jlora.merge import merge_adapter
from jlora.targets import TargetModule, split_packed
from jlora.weights import LoRABank, LoRALayerWeights, LoRAModel, PackedLoRALayerWeights

# --------------------------------------------------------------------------------------------
# Models "written the usual Flax way"
# --------------------------------------------------------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(12, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, 12, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class NNXTinyLM(nnx.Module):
    """Embedding, one pre-norm transformer block (nnx.MultiHeadAttention: LinearGeneral q/k/v
    and a two-axis LinearGeneral out), an Einsum MLP with a non-leading contracted kernel axis,
    and a Linear LM head."""

    def __init__(self, rngs: nnx.Rngs, vocab=29, dim=16, heads=2):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Einsum("btd,ndh->btnh", (3, dim, 8), rngs=rngs)
        self.down = nnx.LinearGeneral((3, 8), dim, axis=(-2, -1), rngs=rngs)
        self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        mask = nnx.make_causal_mask(ids)
        x = x + self.attn(self.ln1(x), mask=mask)
        x = x + self.down(nnx.relu(self.up(self.ln2(x))))
        return self.lm_head(x)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(20, name="fc1")(x))
        return nn.Dense(7, name="fc2")(x)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
            nn.LayerNorm()(x), mask=mask
        )
        h = nn.Dense(32, name="fc1")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(h))


class LinenTinyLM(nn.Module):
    vocab: int = 31

    def setup(self):
        self.embed = nn.Embed(self.vocab, 16)
        self.layers = [LinenBlock() for _ in range(2)]
        self.lm_head = nn.Dense(self.vocab, use_bias=False)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class NNXScanned(nnx.Module):
    """Three blocks built with nnx.vmap and run with nnx.scan: ``blocks`` is one Linear whose
    kernel is [3, 8, 8]; ``head`` is an ordinary Linear."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return nnx.Linear(8, 8, rngs=rngs)

        self.blocks = blocks(rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return jnp.tanh(block(x))

        return self.head(run(x, self.blocks))


class LinenScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(8, name="fc")(x)), None


class LinenStacked(nn.Module):
    """``pre``, then ``blocks``: three Dense layers under nn.scan, or one under nn.vmap."""

    how: str

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="pre")(x)
        if self.how == "scan":
            blocks = nn.scan(
                LinenScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return blocks(name="blocks")(x, None)[0]
        dense = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True})
        return dense(8, name="blocks")(x)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def random_adapter(rng, targets, adapter_id, rank=3, skip=()) -> LoRAModel:
    """A LoRA for every slice of ``targets`` (but ``skip``), with per-module scalings."""
    loras = {}
    for t in targets:
        for peft_name, out in zip(t.peft_names, t.out_dims, strict=True):
            if any(s in peft_name for s in skip):
                continue
            std_a = 1.0 if t.is_embedding else 1.0 / np.sqrt(t.in_dim)
            loras[peft_name] = LoRALayerWeights(
                lora_a=(std_a * rng.standard_normal((t.in_dim, rank))).astype(np.float32),
                lora_b=(0.3 * rng.standard_normal((rank, out))).astype(np.float32),
                module_name=peft_name,
                scaling=float(rng.uniform(0.5, 2.0)),
                is_embedding=t.is_embedding,
            )
    return LoRAModel(loras=loras, id=adapter_id, name=f"adapter{adapter_id}")


def manager_with(targets, adapters, max_loras=3, rank=4):
    state = mgr.init_state(LoRAConfig(max_loras=max_loras, max_lora_rank=rank), targets)
    for adapter in adapters:
        state = mgr.add_adapter(state, adapter)
    return state


def serve(state, requests, seq_len):
    """Activates the adapters of ``requests`` (ids or None), mapping for a [B, seq_len] batch."""
    b = len(requests)
    return mgr.prepare_batch(state, requests, [seq_len] * b, num_tokens=b * seq_len, num_seqs=b)


def delta(adapter: LoRAModel, peft_name: str) -> np.ndarray | None:
    w = adapter.get_lora(peft_name)
    return None if w is None else np.asarray(w.delta_weight())


def merged_nnx(model, adapter: LoRAModel):
    """A copy of the NNX ``model`` with ``adapter`` merged into its kernels/embeddings."""
    merged = nnx.clone(model)
    modules = {".".join(map(str, p)): m for p, m in nnx.iter_modules(merged)}
    for name, m in modules.items():
        d = delta(adapter, name)
        if d is None:
            continue
        if isinstance(m, nnx.Embed):
            m.embedding[...] = m.embedding[...] + d
        elif isinstance(m, nnx.Einsum):
            rhs = m.einsum_str.split("->")[0].split(",")[1]
            view = einsum_kernel_view(m.einsum_str, m.kernel[...])
            assert view.shape == d.shape
            # back from [contracted..., out...] order to the kernel's own axis order
            contracted = "".join(c for c in rhs if c in m.einsum_str.split(",")[0])
            outs = "".join(c for c in rhs if c not in contracted)
            size = dict(zip(rhs, m.kernel.shape, strict=True))
            d_full = d.reshape([size[c] for c in contracted + outs])
            m.kernel[...] = m.kernel[...] + jnp.einsum(f"{contracted}{outs}->{rhs}", d_full)
        else:
            m.kernel[...] = m.kernel[...] + d.reshape(m.kernel.shape)
    return merged


def merged_linen(variables, adapter: LoRAModel, path_to_name=linen_path_to_name):
    """``variables`` with ``adapter`` merged (Dense/DenseGeneral kernels, Embed tables)."""

    def merge(path, leaf):
        keys = tuple(p.key for p in path)
        d = delta(adapter, path_to_name(keys[:-1]))
        if d is None or keys[-1] not in ("kernel", "embedding"):
            return leaf
        return leaf + d.reshape(leaf.shape)

    return {**variables, "params": jax.tree_util.tree_map_with_path(merge, variables["params"])}


def assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5 * scale)


def assert_base_row(actual, expected):
    """A slot-0 row of a mixed batch against the unwrapped model on the same batch. Every wrapped
    layer returns its slot-0 rows bit for bit (test_wrapped_layers_keep_slot0_rows_bitwise), but
    the LoRA ops change the compiled program around them, and XLA may then fuse the base model's
    own reductions (LayerNorm, softmax) differently: last-bit differences, nothing more."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))


def nnx_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, banks, mapping, x):
        model = nnx.merge(graphdef, state)
        if banks is None:
            return model(x)
        with lora_context(banks, mapping):
            return model(x)

    return lambda x, banks=None, mapping=None: forward(state, banks, mapping, x)


# --------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_cls", [NNXMLP, NNXTinyLM])
def test_nnx_lora_equals_merged_weights_in_a_mixed_batch(model_cls, rng):
    model = model_cls(nnx.Rngs(int(rng.integers(1 << 30))))
    wrapped = apply(model)
    targets = find_targets(wrapped)
    a1, a2 = random_adapter(rng, targets, 1), random_adapter(rng, targets, 2, rank=4, skip=("fc2",))
    state, mapping = serve(manager_with(targets, [a1, a2]), [2, None, 1, 2, 1], seq_len=6)
    if model_cls is NNXMLP:
        x = jnp.asarray(rng.standard_normal((5, 6, 12)), jnp.float32)
    else:
        x = jnp.asarray(rng.integers(0, 29, (5, 6)), jnp.int32)
    y = nnx_forward(wrapped)(x, state.banks, mapping)
    base = nnx_forward(model)(x)
    for row, adapter in enumerate([a2, None, a1, a2, a1]):
        if adapter is None:
            assert_base_row(y[row], base[row])
        else:
            assert_close(y[row], merged_nnx(model, adapter)(x[row : row + 1])[0])
            assert np.abs(np.asarray(y[row] - base[row])).max() > 1e-3


def test_nnx_targets_cover_linear_general_einsum_and_embed():
    wrapped = apply(NNXTinyLM(nnx.Rngs(0)))
    targets = {t.name: t for t in find_targets(wrapped)}
    assert sorted(targets) == [
        "attn.key",
        "attn.out",
        "attn.query",
        "attn.value",
        "down",
        "embed",
        "lm_head",
        "up",
    ]
    assert (targets["attn.query"].in_dim, targets["attn.query"].out_dims) == (16, (16,))
    assert (targets["attn.out"].in_dim, targets["attn.out"].out_dims) == (16, (16,))
    assert (targets["up"].in_dim, targets["up"].out_dims) == (16, (24,))
    assert (targets["down"].in_dim, targets["down"].out_dims) == (24, (16,))
    assert targets["embed"].is_embedding and targets["embed"].in_dim == 29
    assert type(wrapped.attn.query).__name__ == "LoRALinearGeneral"


def test_nnx_base_params_unchanged_and_input_model_untouched(rng):
    model = NNXTinyLM(nnx.Rngs(3))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    wrapped = apply(model, target_modules=["query", "lm_head"])
    after = nnx.state(wrapped, nnx.Param)
    assert jax.tree.structure(after) == jax.tree.structure(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)
    # The input keeps its classes; only the wrapped copy's targeted layers changed class.
    assert type(model.attn.query) is nnx.LinearGeneral and type(model.lm_head) is nnx.Linear
    assert type(wrapped.attn.key) is nnx.LinearGeneral
    assert [t.name for t in find_targets(wrapped)] == ["attn.query", "lm_head"]
    # No LoRA variables live in the model: the full state is the original's.
    full = jax.tree.structure(nnx.state(wrapped))
    assert full == jax.tree.structure(nnx.state(model))


def test_nnx_no_adapter_active_is_identical(rng):
    model = NNXTinyLM(nnx.Rngs(5))
    wrapped = apply(model)
    targets = find_targets(wrapped)
    state = manager_with(targets, [random_adapter(rng, targets, 1)])
    ids = jnp.asarray(rng.integers(0, 29, (4, 7)), jnp.int32)
    base = nnx_forward(model)(ids)
    np.testing.assert_array_equal(nnx_forward(wrapped)(ids), base)  # no context: base model
    np.testing.assert_array_equal(wrapped(ids), model(ids))  # eager too
    state, mapping = serve(state, [None] * 4, seq_len=7)  # a context with every row on slot 0
    assert_base_row(nnx_forward(wrapped)(ids, state.banks, mapping), base)


@pytest.mark.parametrize("layer", ["linear", "linear_general", "einsum", "embed"])
def test_wrapped_layers_keep_slot0_rows_bitwise(layer, rng):
    rngs = nnx.Rngs(int(rng.integers(1 << 30)))
    base, x = {
        "linear": (nnx.Linear(10, 6, rngs=rngs), rng.standard_normal((3, 5, 10))),
        "linear_general": (
            nnx.LinearGeneral((2, 5), (3, 2), axis=(-2, -1), rngs=rngs),
            rng.standard_normal((3, 5, 2, 5)),
        ),
        "einsum": (
            nnx.Einsum("btd,ndh->btnh", (2, 10, 3), rngs=rngs),
            rng.standard_normal((3, 5, 10)),
        ),
        "embed": (nnx.Embed(11, 6, rngs=rngs), rng.integers(0, 11, (3, 5))),
    }[layer]
    x = jnp.asarray(x, jnp.int32 if layer == "embed" else jnp.float32)
    wrapped = apply(base)
    (target,) = find_targets(wrapped)
    state = manager_with([target], [random_adapter(rng, [target], 1)])
    expected = nnx_forward(base)(x)
    for rows in ([None, None, None], [1, None, 1]):
        state, mapping = serve(state, rows, seq_len=5)
        y = nnx_forward(wrapped)(x, state.banks, mapping)
        np.testing.assert_array_equal(y[1], expected[1])
        assert (np.asarray(y[0]) != np.asarray(expected[0])).any() == (rows[0] == 1)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_general_layer_with_axes_out_of_order_equals_merged(framework, rng):
    """Flax contracts ``axis`` in sorted order whatever order it is given in: (-1, -2) is
    (-2, -1), and the LoRA must read the input features in that same order."""
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)), jnp.float32)
    if framework == "nnx":
        model = nnx.LinearGeneral((4, 5), 6, axis=(-1, -2), rngs=nnx.Rngs(0))
        wrapped = apply(model)
        targets = find_targets(wrapped)
    else:
        model = nn.DenseGeneral(6, axis=(-1, -2))
        variables = model.init(jax.random.key(0), x)
        wrapped = apply(model, sample_args=(x,))
        targets = wrapped.targets
    adapter = random_adapter(rng, targets, 1)
    state, mapping = serve(manager_with(targets, [adapter]), [1, None], seq_len=3)
    if framework == "nnx":
        y, base = nnx_forward(wrapped)(x, state.banks, mapping), model(x)
        merged = merged_nnx(model, adapter)(x)
    else:
        y = linen_forward(wrapped, variables)(x, state.banks, mapping)
        base, merged = model.apply(variables, x), model.apply(merged_linen(variables, adapter), x)
    assert_close(y[0], merged[0])
    assert_base_row(y[1], base[1])
    assert np.abs(np.asarray(y[0] - base[0])).max() > 1e-3


def test_nnx_adapter_churn_does_not_retrace(rng):
    model = NNXMLP(nnx.Rngs(1))
    wrapped = apply(model)
    targets = find_targets(wrapped)
    graphdef, params = nnx.split(wrapped)
    traces = []

    @jax.jit
    def forward(params, banks, mapping, x):
        traces.append(1)
        with lora_context(banks, mapping):
            return nnx.merge(graphdef, params)(x)

    state = manager_with(targets, [], max_loras=2)
    x = jnp.asarray(rng.standard_normal((3, 4, 12)), jnp.float32)
    outs = []
    for i in range(1, 5):  # four adapters through two slots: evictions and slot reuse
        state = mgr.add_adapter(state, random_adapter(rng, targets, i))
        state, mapping = serve(state, [i, None, i], seq_len=4)
        outs.append(forward(params, state.banks, mapping, x))
    assert len(traces) == 1
    assert not np.allclose(outs[0][0], outs[1][0])


def test_nnx_reapply_rewraps_without_stacking(rng):
    model = NNXMLP(nnx.Rngs(2))
    once = apply(model, target_modules=["fc1"])
    twice = apply(once, target_modules=["fc2"])
    assert [t.name for t in find_targets(twice)] == ["fc2"]
    assert type(twice.fc1) is nnx.Linear
    assert type(twice.fc2) is type(once.fc1)  # the cached LoRALinear class


def test_target_matching_follows_peft():
    model = NNXTinyLM(nnx.Rngs(0))
    names = lambda **kw: [t.name for t in find_targets(apply(model, **kw))]  # noqa: E731
    assert names(target_modules=["query", "value"]) == ["attn.query", "attn.value"]
    assert names(target_modules=["attn.out", "embed"]) == ["attn.out", "embed"]
    assert names(target_modules=r"attn\.(key|value)") == ["attn.key", "attn.value"]
    assert "lm_head" not in names(target_modules="all-linear")
    assert "embed" not in names(target_modules="all-linear")
    assert names(config=LoRAConfig(target_modules=("lm_head",))) == ["lm_head"]


def test_packed_modules_serve_separate_peft_modules(rng):
    """A fused Linear declared in packed_modules is one target with a slice per PEFT module, and
    equals the unfused model with the same per-module LoRAs merged."""

    class Fused(nnx.Module):
        def __init__(self, rngs):
            self.qkv_proj = nnx.Linear(8, 6 + 4 + 4, rngs=rngs)

        def __call__(self, x):
            return self.qkv_proj(x)

    model = Fused(nnx.Rngs(0))
    packed = {"qkv_proj": (("q_proj", 6), ("k_proj", 4), ("v_proj", 4))}
    wrapped = apply(model, target_modules=["q_proj", "v_proj"], packed_modules=packed)
    (target,) = find_targets(wrapped)
    assert target.peft_names == ("q_proj", "k_proj", "v_proj") and target.out_dims == (6, 4, 4)
    adapter = random_adapter(rng, [target], 1, skip=("k_proj",))
    state, mapping = serve(manager_with([target], [adapter]), [1, None], seq_len=3)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    y = nnx_forward(wrapped)(x, state.banks, mapping)
    full = np.concatenate([delta(adapter, "q_proj"), np.zeros((8, 4)), delta(adapter, "v_proj")], 1)
    expected = x[0] @ (model.qkv_proj.kernel[...] + full) + model.qkv_proj.bias[...]
    assert_close(y[0], expected)
    np.testing.assert_array_equal(y[1], model(x[1]))
    np.testing.assert_array_equal(y[0, :, 6:10], model(x[0])[:, 6:10])  # k untouched

    with pytest.raises(AdapterMismatchError, match=r"qkv_proj.*14 output features.*add up to 13"):
        apply(model, packed_modules={"qkv_proj": (("q_proj", 6), ("k_proj", 4), ("v_proj", 3))})


def test_grouped_packed_columns_are_served_and_merged_in_their_groups(rng):
    """With ``packed_groups`` the fused columns are ``[q_0 k_0 v_0 | q_1 k_1 v_1]`` (the
    tensor-parallel layout): each slice's LoRA lands in its share of every group, both served
    and merged, as a column permutation of the plain layout (built here by index, not by
    jlora's reshapes); a group count that does not divide the slices is refused."""

    packed = {"qkv_proj": (("q_proj", 6), ("k_proj", 4), ("v_proj", 4))}

    class Fused(nnx.Module):
        packed_modules_mapping = packed
        packed_modules_groups = {"qkv_proj": 2}

        def __init__(self, rngs):
            self.qkv_proj = nnx.Linear(8, 6 + 4 + 4, rngs=rngs)

        def __call__(self, x):
            return self.qkv_proj(x)

    class Ungrouped(Fused):  # the same layer, its layout given to apply by the caller
        packed_modules_groups = None

    class Unpacked(Ungrouped):  # the same layer, declared packed by the caller only
        packed_modules_mapping = None

    model = Fused(nnx.Rngs(0))
    wrapped = apply(model)
    ungrouped = Ungrouped(nnx.Rngs(0))
    assert find_targets(apply(ungrouped))[0].groups == 1
    assert find_targets(apply(ungrouped, packed_groups={"qkv_proj": 2}))[0].groups == 2
    # The model's own layout cannot be overridden; agreeing with it, or saying nothing, is fine.
    assert find_targets(apply(model, packed_groups={}))[0].groups == 2
    assert find_targets(apply(model, packed_groups={"qkv_proj": 2}))[0].groups == 2
    with pytest.raises(
        AdapterMismatchError,
        match=r"packed_groups \{'qkv_proj': 1\} contradicts the model's packed_modules_groups "
        r"\(\{'qkv_proj': 2\}\)",
    ):
        apply(model, packed_groups={"qkv_proj": 1})
    # Declared unpacked by the caller: wrapped whole, the model's groups do not apply.
    (whole,) = find_targets(apply(model, packed_modules={}))
    assert whole.groups == 1 and whole.out_dims == (14,)
    (target,) = find_targets(wrapped)
    assert target.groups == 2 and target.out_dims == (6, 4, 4)
    adapter = random_adapter(rng, [target], 1, skip=("k_proj",))
    state, mapping = serve(manager_with([target], [adapter]), [1, None], seq_len=3)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    y = nnx_forward(wrapped)(x, state.banks, mapping)
    plain = np.concatenate(
        [delta(adapter, "q_proj"), np.zeros((8, 4)), delta(adapter, "v_proj")], 1
    )
    # grouped column c of group j, slice i  <-  plain column offset_i + j * width_i / 2 + c
    order = [o + j * w // 2 + c for j in range(2) for o, w in ((0, 6), (6, 4), (10, 4))
             for c in range(w // 2)]  # fmt: skip
    assert sorted(order) == list(range(14)) and order[:7] == [0, 1, 2, 6, 7, 10, 11]
    expected = x[0] @ (model.qkv_proj.kernel[...] + plain[:, order]) + model.qkv_proj.bias[...]
    assert_close(y[0], expected)
    np.testing.assert_array_equal(y[1], model(x[1]))
    k_cols = [i for i, c in enumerate(order) if 6 <= c < 10]
    np.testing.assert_array_equal(y[0][:, k_cols], model(x[0])[:, k_cols])  # k untouched
    assert_close(merge_adapter(model, adapter)(x[0]), expected)
    # A layout the caller gave apply: the wrapped model merges into the layers it serves, a
    # plain one takes the same arguments as apply.
    served = apply(ungrouped, packed_groups={"qkv_proj": 2})
    assert_close(merge_adapter(served, adapter)(x[0]), expected)
    assert_close(merge_adapter(ungrouped, adapter, packed_groups={"qkv_proj": 2})(x[0]), expected)
    unpacked = Unpacked(nnx.Rngs(0))
    layout = dict(packed_modules=packed, packed_groups={"qkv_proj": 2})
    assert_close(merge_adapter(unpacked, adapter, **layout)(x[0]), expected)
    served = apply(unpacked, **layout)
    assert_close(merge_adapter(served, adapter)(x[0]), expected)
    with pytest.raises(TypeError, match="packed_modules / packed_groups are for a plain model"):
        merge_adapter(served, adapter, packed_groups={"qkv_proj": 2})
    # A LoRA bias (PEFT's lora_bias) merges into the same grouped columns of the layer's bias.
    v = adapter.get_lora("v_proj")
    v_bias = dataclasses.replace(v, bias=rng.standard_normal(4).astype(np.float32))
    with_bias = dataclasses.replace(adapter, loras={**adapter.loras, "v_proj": v_bias})
    plain_bias = np.concatenate([np.zeros(10), v.scaling * v_bias.bias])
    got = merge_adapter(model, with_bias).qkv_proj.bias[...]
    assert_close(got, model.qkv_proj.bias[...] + plain_bias[order])
    # Layout helpers and settings: numpy ints are ints; widths that do not fit are refused.
    assert (
        TargetModule(
            name="t", in_dim=2, out_dims=(4,), peft_names=("t",), groups=np.int64(2)
        ).groups
        == 2
    )
    with pytest.raises(
        AdapterMismatchError, match=r"widths \(3, 3\) must add up to the 6 .* groups=2"
    ):
        split_packed(jnp.arange(6), (3, 3), groups=2)

    with pytest.raises(AdapterMismatchError, match=r"groups=4 must be an int >= 1 dividing"):
        apply(ungrouped, packed_modules=packed, packed_groups={"qkv_proj": 4})
    with pytest.raises(AdapterMismatchError, match=r"packed_groups names \['qkv'\]"):
        apply(ungrouped, packed_modules=packed, packed_groups={"qkv": 2})
    with pytest.raises(LoRAConfigError, match=r"add_lora: groups=3 must be"):
        from jlora.ops import add_lora

        add_lora(y[0], x[0], state.banks[target.name], mapping, groups=3)


def test_merge_into_a_wrapped_model_names_what_it_cannot_merge(rng):
    model = NNXMLP(nnx.Rngs(0))
    adapter = random_adapter(rng, find_targets(apply(model)), 1)
    with pytest.raises(AdapterMismatchError, match=r"\['fc2'\] \(not among the 1 layers the"):
        merge_adapter(apply(model, target_modules=["fc1"]), adapter)

    class Outer(nnx.Module):
        def __init__(self, rngs):
            self.enc = apply(NNXMLP(rngs))  # a wrapped submodule: its names are its own
            self.head = nnx.Linear(12, 4, rngs=rngs)

    with pytest.raises(AdapterMismatchError, match=r"\['fc1', 'fc2'\], which are not module"):
        merge_adapter(Outer(nnx.Rngs(0)), adapter)
    with pytest.raises(TypeError, match="NNX only"):
        merge_adapter(apply(LinenMLP(), sample_args=(jnp.zeros((1, 9)),)), adapter)


def test_merge_folds_a_packed_adapter_like_serving_it(rng):
    """A PackedLoRALayerWeights keyed by the fused layer (as the manager serves it and
    restore_adapter returns it) merges each slice into its own columns."""

    class Fused(nnx.Module):
        packed_modules_mapping = {"qkv_proj": (("q_proj", 6), ("k_proj", 4), ("v_proj", 4))}

        def __init__(self, rngs):
            self.qkv_proj = nnx.Linear(8, 14, rngs=rngs)

        def __call__(self, x):
            return self.qkv_proj(x)

    model = Fused(nnx.Rngs(0))
    wrapped = apply(model)
    (target,) = find_targets(wrapped)
    separate = random_adapter(rng, [target], 1, skip=("k_proj",))
    slices = tuple(separate.get_lora(n) for n in target.peft_names)
    packed = PackedLoRALayerWeights(slices=slices, module_name="qkv_proj")
    adapter = LoRAModel(loras={"qkv_proj": packed}, id=1, name="packed")
    state, mapping = serve(manager_with([target], [adapter]), [1, None], seq_len=3)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    y = nnx_forward(wrapped)(x, state.banks, mapping)
    merged = merge_adapter(model, adapter)
    assert_close(y[0], merged(x[0]))
    assert_close(merged(x), merge_adapter(model, separate)(x))
    assert np.abs(np.asarray(y[0] - model(x[0]))).max() > 1e-3

    two = PackedLoRALayerWeights(slices=slices[:2], module_name="qkv_proj")
    with pytest.raises(AdapterMismatchError, match=r"'two' packed module 'qkv_proj' has 2 slices"):
        merge_adapter(model, LoRAModel(loras={"qkv_proj": two}, id=2, name="two"))
    with pytest.raises(AdapterMismatchError, match=r"'odd' module 'qkv_proj'.*got dict"):
        merge_adapter(model, LoRAModel(loras={"qkv_proj": {}}, id=3, name="odd"))


def test_wrapped_nnx_model_and_graphdef_pickle(rng):
    """LoRA classes are made at run time; pickle rebuilds them from their base class, in this
    process (the cached class) and in a fresh one."""
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    wrapped = apply(model, target_modules=["layers.1"])
    loaded = pickle.loads(pickle.dumps(wrapped))
    assert type(loaded.layers[1]) is type(wrapped.layers[1])
    assert type(loaded.layers[0]) is nnx.Linear
    assert find_targets(loaded) == find_targets(wrapped)
    graphdef = nnx.graphdef(wrapped)
    assert pickle.loads(pickle.dumps(graphdef)) == graphdef
    targets = find_targets(wrapped)
    state, mapping = serve(manager_with(targets, [random_adapter(rng, targets, 1)]), [1], seq_len=2)
    x = jnp.asarray(rng.standard_normal((1, 2, 4)), jnp.float32)
    np.testing.assert_array_equal(
        nnx_forward(loaded)(x, state.banks, mapping), nnx_forward(wrapped)(x, state.banks, mapping)
    )
    load = (
        "import pickle, sys; from jlora.apply import find_targets; "
        "m = pickle.load(sys.stdin.buffer); "
        "print(type(m.layers[1]).__name__, [t.name for t in find_targets(m)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", load], input=pickle.dumps(wrapped), capture_output=True, check=True
    )
    assert out.stdout.decode().split() == ["LoRALinear", "['layers.1']"]


# --------------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------------


def linen_forward(wrapped: LoRALinenModel, variables):
    @jax.jit
    def forward(variables, banks, mapping, x):
        if banks is None:
            return wrapped.apply(variables, x)
        with lora_context(banks, mapping):
            return wrapped.apply(variables, x)

    return lambda x, banks=None, mapping=None: forward(variables, banks, mapping, x)


@pytest.mark.parametrize("kind", ["mlp", "lm"])
def test_linen_lora_equals_merged_weights_in_a_mixed_batch(kind, rng):
    if kind == "mlp":
        module, x = LinenMLP(), jnp.asarray(rng.standard_normal((4, 5, 9)), jnp.float32)
    else:
        module, x = LinenTinyLM(), jnp.asarray(rng.integers(0, 31, (4, 5)), jnp.int32)
    variables = module.init(jax.random.key(int(rng.integers(1 << 30))), x)
    wrapped = apply(module, sample_args=(x,))
    # The parameter tree is the module's own: init through the wrapper gives the same tree.
    assert jax.tree.structure(wrapped.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    targets = wrapped.targets
    a1, a2 = random_adapter(rng, targets, 1), random_adapter(rng, targets, 2, skip=("query",))
    state, mapping = serve(manager_with(targets, [a1, a2]), [1, 2, None, 1], seq_len=5)
    y = linen_forward(wrapped, variables)(x, state.banks, mapping)
    base = jax.jit(module.apply)(variables, x)
    for row, adapter in enumerate([a1, a2, None, a1]):
        if adapter is None:
            assert_base_row(y[row], base[row])
        else:
            assert_close(
                y[row], module.apply(merged_linen(variables, adapter), x[row : row + 1])[0]
            )
            assert np.abs(np.asarray(y[row] - base[row])).max() > 1e-3


def test_linen_dense_subclass_calling_super_gets_its_lora_once(rng):
    class LoggedDense(nn.Dense):  # a Dense with a hook: Linen intercepts both __call__s
        def __call__(self, x):
            return super().__call__(x)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            h = LoggedDense(7, name="fc")(x)
            return nn.Dropout(0.5, deterministic=not train)(h)

    x = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    module = Model()
    variables = module.init(jax.random.key(0), x, False)
    wrapped = apply(module, sample_args=(x, False))  # a positional Python flag is not traced
    adapter = random_adapter(rng, wrapped.targets, 1)
    state, mapping = serve(manager_with(wrapped.targets, [adapter]), [1, None], seq_len=3)

    @jax.jit
    def forward(variables, banks, mapping, x):
        with lora_context(banks, mapping):
            return wrapped.apply(variables, x, False)

    y = forward(variables, state.banks, mapping, x)
    base = module.apply(variables, x, False)
    assert_close(y[0], module.apply(merged_linen(variables, adapter), x[:1], False)[0])
    assert_base_row(y[1], base[1])


def test_linen_dense_subclass_with_a_child_module_is_served(rng):
    class NormDense(nn.Dense):  # owns a LayerNorm: its params hold the child's nested dict
        @nn.compact
        def __call__(self, x):
            return super().__call__(nn.LayerNorm(name="norm")(x))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return NormDense(4, name="proj")(x)

    x = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
    module = Model()
    variables = module.init(jax.random.key(0), x)
    wrapped = apply(module, sample_args=(x,))
    assert [t.name for t in wrapped.targets] == ["proj"]
    adapter = random_adapter(rng, wrapped.targets, 1)
    state, mapping = serve(manager_with(wrapped.targets, [adapter]), [1, None], seq_len=3)
    y = linen_forward(wrapped, variables)(x, state.banks, mapping)
    base = module.apply(variables, x)
    # As PEFT wraps a module's forward: LoRA reads the input the layer was called with.
    assert_close(y[0], base[0] + x[0] @ delta(adapter, "proj"))
    assert_base_row(y[1], base[1])


def test_linen_targets_and_names():
    module = LinenTinyLM()
    ids = jax.ShapeDtypeStruct((2, 3), jnp.int32)  # discovery is abstract: no arrays needed
    wrapped = apply(module, sample_args=(ids,))
    names = {t.name: t for t in wrapped.targets}
    assert "layers.1.attn.query" in names and "layers.0.fc2" in names
    assert names["layers.0.attn.query"].out_dims == (16,)  # DenseGeneral [16, 2, 8]
    assert names["layers.0.attn.out"].in_dim == 16  # DenseGeneral axis=(-2, -1)
    assert names["embed"].is_embedding and names["embed"].in_dim == 31
    assert find_targets(wrapped) == wrapped.targets
    only = apply(module, target_modules=["fc1"], sample_args=(ids,))
    assert [t.name for t in only.targets] == ["layers.0.fc1", "layers.1.fc1"]


class LinenGatedMLP(nn.Module):  # T5's gated MLP: attributes named wi_0 and wi_1
    def setup(self):
        self.wi_0, self.wi_1, self.wo = nn.Dense(12), nn.Dense(12), nn.Dense(6)

    def __call__(self, x):
        return self.wo(nn.gelu(self.wi_0(x)) * self.wi_1(x))


class LinenT5Like(nn.Module):
    def setup(self):
        self.layers = [LinenGatedMLP() for _ in range(2)]
        self.head = nn.Sequential([nn.Dense(5), nn.Dense(4)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_linen_names_keep_an_attribute_named_like_a_list_item(rng):
    x = jnp.asarray(rng.standard_normal((3, 2, 6)), jnp.float32)
    module = LinenT5Like()
    wrapped = apply(module, sample_args=(x,))
    # PEFT names T5's layers "...layers.0.wi_0": only items of a list or tuple become ".i".
    assert [t.name for t in wrapped.targets] == [
        *(f"layers.{i}.{leaf}" for i in range(2) for leaf in ("wi_0", "wi_1", "wo")),
        "head.layers.0",
        "head.layers.1",
    ]
    variables = module.init(jax.random.key(int(rng.integers(1 << 30))), x)
    adapter = random_adapter(rng, wrapped.targets, 1)
    state, mapping = serve(manager_with(wrapped.targets, [adapter]), [1, None, 1], seq_len=2)
    y = linen_forward(wrapped, variables)(x, state.banks, mapping)

    def param_name(path):  # the same rule on the parameter tree's paths
        *parents, leaf = path
        return ".".join(
            [linen_path_to_name(parents), leaf if leaf[:2] == "wi" else linen_path_to_name([leaf])]
        )

    merged = module.apply(merged_linen(variables, adapter, path_to_name=param_name), x[:1])
    assert_close(y[0], merged[0])
    assert_base_row(y[1], jax.jit(module.apply)(variables, x)[1])
    # A path_to_name of one's own still decides every name.
    mangled = apply(module, sample_args=(x,), path_to_name=linen_path_to_name)
    assert mangled.targets[0].name == "layers.0.wi.0"


def test_linen_no_adapter_active_is_identical(rng):
    module = LinenTinyLM()
    ids = jnp.asarray(rng.integers(0, 31, (3, 6)), jnp.int32)
    variables = module.init(jax.random.key(1), ids)
    wrapped = apply(module, sample_args=(ids,))
    state = manager_with(wrapped.targets, [random_adapter(rng, wrapped.targets, 1)])
    state, mapping = serve(state, [None] * 3, seq_len=6)
    base = jax.jit(module.apply)(variables, ids)
    np.testing.assert_array_equal(linen_forward(wrapped, variables)(ids), base)
    assert_base_row(linen_forward(wrapped, variables)(ids, state.banks, mapping), base)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_target_modules_matching_nothing_name_the_modules():
    model = NNXTinyLM(nnx.Rngs(0))
    with pytest.raises(AdapterMismatchError, match=r"\['q_proj', 'v_proj'\] match no layer.*"):
        apply(model, target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterMismatchError, match=r"\['nope'\] match no layer.*attn\.key"):
        apply(model, target_modules=["query", "nope"])
    with pytest.raises(AdapterMismatchError, match=r"no layer|match no layer"):
        apply(model, target_modules=r".*\.q_proj")
    with pytest.raises(AdapterMismatchError, match="match no layer"):
        apply(LinenMLP(), target_modules=["fc3"], sample_args=(jnp.zeros((1, 3)),))


def test_bad_target_regex_raises_config_error():
    with pytest.raises(LoRAConfigError, match=r"target_modules regex 'fc\(' does not compile"):
        apply(NNXMLP(nnx.Rngs(0)), target_modules="fc(")


@pytest.mark.parametrize("kind", ["linear", "linear_general", "einsum", "embed"])
def test_nnx_stacked_layers_are_refused(kind):
    """nnx.vmap stacks a layer's params along a leading axis (as nnx.scan runs them): one LoRA
    target cannot serve every layer of the stack."""
    make = {
        "linear": lambda rngs: nnx.Linear(8, 6, rngs=rngs),
        "linear_general": lambda rngs: nnx.LinearGeneral(8, (2, 3), rngs=rngs),
        "einsum": lambda rngs: nnx.Einsum("btd,dh->bth", (8, 6), rngs=rngs),
        "embed": lambda rngs: nnx.Embed(8, 6, rngs=rngs),
    }[kind]

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.split_rngs(splits=3)(nnx.vmap(make, in_axes=(0,), out_axes=0))(rngs)
            self.head = nnx.Linear(6, 4, rngs=rngs)

    model = Model(nnx.Rngs(0))
    with pytest.raises(AdapterMismatchError, match=r"'blocks'.*\(3, .*stacked.*unroll"):
        apply(model, target_modules=["blocks"])
    # The default selection skips the stack, as any layer jlora cannot wrap.
    assert [t.name for t in find_targets(apply(model))] == ["head"]


def test_nnx_scanned_model_is_refused_by_apply_and_merge():
    model = NNXScanned(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.float32)
    model(x)  # a working model: nnx.scan runs the stack
    with pytest.raises(AdapterMismatchError, match=r"'blocks'.*\(3, 8, 8\).*\(8, 8\).*unroll"):
        apply(model, target_modules=["blocks"])
    w = LoRALayerWeights(lora_a=np.ones((8, 2), np.float32), lora_b=np.ones((2, 8), np.float32))
    with pytest.raises(AdapterMismatchError, match=r"lacks: \['blocks'\].*\(3, 8, 8\).*unroll"):
        merge_adapter(model, LoRAModel(loras={"blocks": w}, id=1, name="a"))
    # An adapter of the model's other layers still merges.
    h = LoRALayerWeights(lora_a=np.ones((8, 2), np.float32), lora_b=np.ones((2, 4), np.float32))
    merged = merge_adapter(model, LoRAModel(loras={"head": h}, id=2, name="b"))
    np.testing.assert_allclose(
        merged.head.kernel.get_value() - model.head.kernel.get_value(), h.delta_weight(), rtol=1e-6
    )


@pytest.mark.parametrize("how,name", [("scan", "blocks.fc"), ("vmap", "blocks")])
def test_linen_stacked_layers_are_refused(how, name):
    module, x = LinenStacked(how), jnp.zeros((2, 8))
    with pytest.raises(AdapterMismatchError, match=rf"'{name}'.*\(\d, 8, 8\).*unroll"):
        apply(module, sample_args=(x,), target_modules=[name])
    for kwargs in ({}, {"target_modules": ["pre"]}):  # the default selection skips the stack
        assert [t.name for t in apply(module, sample_args=(x,), **kwargs).targets] == ["pre"]


def test_layer_dims_and_packed_widths_must_be_positive_ints():
    for bad in (dict(in_dim=-3), dict(in_dim=2.0), dict(out_dims=(2.7,)), dict(out_dims=(True,))):
        with pytest.raises(AdapterMismatchError, match="must be ints >= 1"):
            TargetModule(
                **{"name": "t", "in_dim": 4, "out_dims": (4,), "peft_names": ("t",), **bad}
            )
    model = NNXMLP(nnx.Rngs(0))
    width = model.fc1.out_features
    for widths in (
        (2.9, width - 2),
        (True, width - 1),
        ("2", width - 2),
        (-1, width + 1),
        (0, width),
    ):
        spec = {"fc1": (("a", widths[0]), ("b", widths[1]))}
        with pytest.raises(AdapterMismatchError, match=r"packed_modules\['fc1'\].*ints? >= 1"):
            apply(model, packed_modules=spec)
    embed = nnx.Embed(11, 4, rngs=nnx.Rngs(0))
    with pytest.raises(AdapterMismatchError, match="is an embedding, which cannot be packed"):
        apply(embed, packed_modules={"": (("a", 2), ("b", 2))})


def test_malformed_targets_packing_and_merge_arguments_are_named():
    """Each once a raw TypeError/ValueError naming nothing."""
    from jlora.merge import merge_adapter
    from jlora.targets import join_packed

    base = {"name": "t", "in_dim": 4, "out_dims": (4,), "peft_names": ("t",)}
    for bad, fragment in (
        (dict(out_dims=4), "out_dims=4 must be a sequence"),
        (dict(peft_names="t"), "peft_names='t' must be a sequence"),
        (dict(peft_names=(None,)), "must be strs"),
    ):
        with pytest.raises(AdapterMismatchError, match=fragment):
            TargetModule(**{**base, **bad})
    with pytest.raises(AdapterMismatchError, match="each dividing by groups=2"):
        join_packed([jnp.ones(3), jnp.ones(3)], groups=2)
    with pytest.raises(AdapterMismatchError, match="one or more"):
        join_packed([])
    model = NNXMLP(nnx.Rngs(0))
    with pytest.raises(AdapterMismatchError, match=r"give \(peft_name, width\) pairs"):
        apply(model, packed_modules={"fc1": ("a", "b")})  # vLLM's packed_modules_mapping shape
    with pytest.raises(TypeError, match="merge_adapter takes a LoRAModel, got str"):
        merge_adapter(model, "/some/adapter")


def test_targeting_a_layer_without_an_in_out_view_raises():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.batched = nnx.Einsum("bnd,ndh->bnh", (3, 4, 5), rngs=rngs)  # per-head kernels
            self.fine = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.batched(x)

    model = Odd(nnx.Rngs(0))
    assert [t.name for t in find_targets(apply(model))] == ["fine"]  # skipped by default
    with pytest.raises(AdapterMismatchError, match=r"'batched'.*shares a batch dim"):
        apply(model, target_modules=["batched"])
    # all-linear is a wildcard too: it skips what it cannot wrap rather than failing.
    assert [t.name for t in find_targets(apply(model, target_modules="all-linear"))] == ["fine"]


def test_adapter_that_does_not_fit_the_model_names_the_module(rng):
    wrapped = apply(NNXTinyLM(nnx.Rngs(0)), target_modules=["query", "lm_head"])
    targets = find_targets(wrapped)
    stray = LoRALayerWeights(
        lora_a=np.ones((16, 2), np.float32), lora_b=np.ones((2, 16), np.float32), module_name="x"
    )
    other = LoRAModel(loras={"attn.query": stray, "blocks.0.q_proj": stray}, id=1, name="other")
    with pytest.raises(AdapterMismatchError, match=r"'blocks\.0\.q_proj'.*no LoRA target"):
        manager_with(targets, [other])
    narrow = LoRALayerWeights(
        lora_a=np.ones((16, 2), np.float32),
        lora_b=np.ones((2, 8), np.float32),
        module_name="attn.query",
    )
    with pytest.raises(AdapterMismatchError, match=r"attn\.query.*16 -> 8.*16 -> 16"):
        manager_with(targets, [LoRAModel(loras={"attn.query": narrow}, id=2, name="narrow")])


def test_banks_or_mapping_that_do_not_fit_raise_at_trace_time(rng):
    wrapped = apply(NNXMLP(nnx.Rngs(0)))
    forward = nnx_forward(wrapped)
    x = jnp.zeros((2, 3, 12), jnp.float32)
    good = {
        "fc1": LoRABank.zeros(2, 12, 24, 4),
        "fc2": LoRABank.zeros(2, 24, 12, 4),
    }
    mapping = padded_batch_mapping([1, 0], 3, num_slots=2)
    forward(x, good, mapping)
    with pytest.raises(AdapterMismatchError, match=r"'fc2'.*\[in=24, out=11\].*\[in=24, out=12\]"):
        forward(x, {**good, "fc2": LoRABank.zeros(2, 24, 11, 4)}, mapping)
    with pytest.raises(AdapterMismatchError, match=r"'fc1' has 1 output slices.*2 banks"):
        forward(x, {**good, "fc1": (good["fc1"], good["fc1"])}, mapping)
    with pytest.raises(MappingError, match=r"'fc1' sees 6 token rows.*8 tokens and 2 sequences"):
        forward(x, good, padded_batch_mapping([1, 0], 4, num_slots=2))
    with pytest.raises(MappingError, match="4 slots but the mapping was built for num_slots=2"):
        forward(x, {**good, "fc1": LoRABank.zeros(4, 12, 24, 4)}, mapping)


def _run_fc(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _call_fc(fc, x):
    return fc(x)


# Module-level, so JAX's caches see the same function on every call (the case that reused traces).
_TRANSFORMED_FC = {
    "nnx.remat": nnx.remat(_call_fc),
    "nnx.jit": nnx.jit(_call_fc),
    "jax.checkpoint": jax.checkpoint(_run_fc, static_argnums=(0,)),
    "jax.jit": jax.jit(_run_fc, static_argnums=(0,)),
}
_LIFTED_DENSE = {"nn.remat": nn.remat(nn.Dense), "nn.jit": nn.jit(nn.Dense)}


class NNXTransformedBlock(nnx.Module):
    """``fc`` called under ``how`` (a remat or an inner jit), then ``head`` outside it."""

    def __init__(self, how: str, rngs: nnx.Rngs):
        self.how = how
        self.fc = nnx.Linear(12, 24, rngs=rngs)
        self.head = nnx.Linear(24, 12, rngs=rngs)

    def __call__(self, x):
        run = _TRANSFORMED_FC[self.how]
        h = run(*nnx.split(self.fc), x) if self.how.startswith("jax.") else run(self.fc, x)
        return self.head(jnp.tanh(h))


class LinenTransformedBlock(nn.Module):
    how: str

    @nn.compact
    def __call__(self, x):
        h = _LIFTED_DENSE[self.how](24, name="fc")(x)
        return nn.Dense(12, name="head")(jnp.tanh(h))


def random_bank(rng, in_dim, out_dim):
    return random_banks(rng, 3, in_dim, [out_dim], 4, jnp.float32)[0]


def _reference(params, banks, slots, x):
    """float64 ``tanh(fc + LoRA) -> head + LoRA`` of a [B, L, 12] batch, row b in slot slots[b]."""
    x = np.asarray(x, np.float64)
    s = np.repeat(np.asarray(slots), x.shape[1])
    x2 = x.reshape(-1, x.shape[-1])

    def layer(name, x2):
        kernel, bias = (np.asarray(params[name][k], np.float64) for k in ("kernel", "bias"))
        bank = banks[name]
        a, b, scale = (np.asarray(v, np.float64) for v in (bank.a, bank.b, bank.scale))
        lora = np.einsum("ti,tir,tro->to", x2, a[s], b[s]) * scale[s][:, None]
        return x2 @ kernel + bias + lora

    return layer("head", np.tanh(layer("fc", x2))).reshape(x.shape)


@pytest.mark.parametrize(
    "how", ["nnx.remat", "nnx.jit", "jax.checkpoint", "jax.jit", "nn.remat", "nn.jit"]
)
def test_layers_under_remat_or_an_inner_jit_are_served(how, rng):
    x = jnp.asarray(rng.standard_normal((3, 5, 12)), jnp.float32)
    if how.startswith("nn."):
        module = LinenTransformedBlock(how)
        variables = module.init(jax.random.key(0), x)
        wrapped = apply(module, sample_args=(x,))
        forward = linen_forward(wrapped, variables)
        params = variables["params"]
    else:
        wrapped = apply(NNXTransformedBlock(how, nnx.Rngs(int(rng.integers(1 << 30)))))
        forward = nnx_forward(wrapped)
        params = {
            n: {"kernel": m.kernel[...], "bias": m.bias[...]}
            for n, m in (("fc", wrapped.fc), ("head", wrapped.head))
        }
    assert {t.name for t in find_targets(wrapped)} == {"fc", "head"}
    # The trap: the transformed layer is first traced without a context, and JAX caches traces.
    base = forward(x)
    for seq_len, slots in [(5, [1, 0, 2]), (5, [2, 2, 1]), (2, [0, 1, 2])]:
        # Fresh bank values each call (no retrace), and a new outer trace for the new seq_len.
        banks = {"fc": random_bank(rng, 12, 24), "head": random_bank(rng, 24, 12)}
        xs = x[:, :seq_len]
        y = forward(xs, banks, padded_batch_mapping(slots, seq_len, num_slots=3))
        np.testing.assert_allclose(y, _reference(params, banks, slots, xs), rtol=1e-4, atol=1e-4)
    # Slot 0 rows stay the base model, and a call without a context is the base model again.
    np.testing.assert_allclose(y[0], forward(xs)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(forward(x), base)


def _loop_step(_, carry):
    # Module-level, so lax.fori_loop's cache of its body's trace sees one function.
    graphdef, state, x = carry
    return graphdef, state, nnx.merge(graphdef, state)(x)


def _three_steps(graphdef, state, x):
    return jax.lax.fori_loop(0, 3, _loop_step, (graphdef, state, x))[2]


def test_a_lax_loop_over_the_model_is_served(rng):
    model = apply(NNXMLP(nnx.Rngs(int(rng.integers(1 << 30)))))
    graphdef, state = nnx.split(model)

    @jax.jit
    def loop(state, banks, mapping, x):
        if banks is None:
            return _three_steps(graphdef, state, x)
        with lora_context(banks, mapping):
            return _three_steps(graphdef, state, x)

    x = jnp.asarray(rng.standard_normal((3, 4, 12)), jnp.float32)
    mapping = padded_batch_mapping([1, 0, 2], 4, num_slots=3)
    base = loop(state, None, mapping, x)  # the loop body is first traced without a context
    banks = {"fc1": random_bank(rng, 12, 24), "fc2": random_bank(rng, 24, 12)}
    forward, want = nnx_forward(model), x
    for _ in range(3):
        want = forward(want, banks, mapping)
    y = loop(state, banks, mapping, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[0], base[0], atol=1e-3)  # slot 1's rows got their LoRA


def test_eager_contexts_reuse_their_compiled_ops(rng):
    # Each traced context is a fresh key of JAX's trace context; eager ones must share one, or
    # every jitted jnp op a layer calls would compile again in every new context.
    model = apply(NNXMLP(nnx.Rngs(0)))
    x = jnp.asarray(rng.standard_normal((2, 3, 12)), jnp.float32)
    mapping = padded_batch_mapping([1, 0], 3, num_slots=3)

    def call():
        banks = {"fc1": random_bank(rng, 12, 24), "fc2": random_bank(rng, 24, 12)}
        with lora_context(banks, mapping):
            return model(x)

    call()
    with CompileCounter() as compiles:
        for _ in range(3):
            call()
    assert compiles.counts == {}


def test_context_entered_outside_jit_is_refused():
    model = apply(NNXMLP(nnx.Rngs(0)))
    banks = {"fc1": LoRABank.zeros(2, 12, 24, 4)}
    mapping = padded_batch_mapping([1], 2, num_slots=2)
    x = jnp.zeros((1, 2, 12))
    with lora_context(banks, mapping):
        model(x)  # eager: fine
        with pytest.raises(MappingError, match="Enter jlora.lora_context inside the transformed"):
            nnx.jit(lambda m, x: m(x))(model, x)
    # An embedding fed NumPy ids inside the jit: its input is concrete, its output traced.
    embed = apply(nnx.Embed(11, 4, rngs=nnx.Rngs(0)))
    ids = np.array([[1, 2, 3]])
    with lora_context({"": LoRABank.zeros(2, 11, 4, 4)}, padded_batch_mapping([1], 3, num_slots=2)):
        embed(ids)  # eager: fine
        with pytest.raises(MappingError, match="layer '' is called under a JAX"):
            nnx.jit(lambda m: m(ids))(embed)


def test_banks_no_layer_reads_are_an_error_when_the_context_exits(rng):
    bank = LoRABank.zeros(2, 12, 24, 4)
    bank = bank.replace(
        a=bank.a.at[1].set(1.0), b=bank.b.at[1].set(1.0), scale=bank.scale.at[1].set(1.0)
    )
    mapping = padded_batch_mapping([1], 2, num_slots=2)
    x = jnp.asarray(rng.standard_normal((1, 2, 12)), jnp.float32)
    forward = nnx_forward(apply(NNXMLP(nnx.Rngs(0))))
    with pytest.raises(
        AdapterMismatchError, match=r"banks of 'model.fc1' \(1 of 2\).*find_targets"
    ):
        forward(x, {"fc1": bank, "model.fc1": bank}, mapping)  # a key no layer has

    # strict=False: a call that runs part of the model (here fc1 alone) may leave banks unread.
    model = apply(NNXMLP(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    @jax.jit
    def first_layer(state, banks, mapping, x):
        with lora_context(banks, mapping, strict=False):
            return nnx.merge(graphdef, state).fc1(x)

    both = {"fc1": bank, "fc2": LoRABank.zeros(2, 24, 12, 4)}
    y = first_layer(state, both, mapping, x)
    want = model.fc1(x) + 1.0 * (x @ np.ones((12, 4))) @ np.ones((4, 24))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)


def test_padded_batch_mapping_layout():
    m = padded_batch_mapping([2, 1], 3, num_slots=3, num_seqs=4)
    assert m.token_slots.tolist() == [2, 2, 2, 1, 1, 1] + [0] * 6
    assert m.seq_slots.tolist() == [2, 1, 0, 0]
    with pytest.raises(MappingError, match="do not fit num_seqs=1"):
        padded_batch_mapping([2, 1], 3, num_slots=3, num_seqs=1)
    for bad in ([1.9, 0], [[1, 2]]):  # a float slot must not round down to another adapter
        with pytest.raises(MappingError, match="1-D sequence of int slot indices"):
            padded_batch_mapping(bad, 3, num_slots=3)
    for kwargs in (dict(seq_len=2.9), dict(seq_len=True), dict(seq_len=-1)):
        with pytest.raises(MappingError, match="seq_len must be an int >= 0"):
            padded_batch_mapping([1], num_slots=3, **kwargs)
    with pytest.raises(MappingError, match="num_seqs must be None or an int"):
        padded_batch_mapping([1], 3, num_slots=3, num_seqs=2.5)


def test_merge_adds_a_lora_bias_like_peft(rng):
    """PEFT's lora_bias merge: W += scaling * A @ B and bias += scaling * lora_B.bias."""
    layer = LoRALayerWeights(
        lora_a=rng.standard_normal((6, 2)).astype(np.float32),
        lora_b=rng.standard_normal((2, 4)).astype(np.float32),
        bias=rng.standard_normal(4).astype(np.float32),
        module_name="",
        scaling=1.5,
    )
    adapter = LoRAModel(loras={"": layer}, id=1, name="biased")
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    expected = model(x) + 1.5 * (x @ layer.lora_a @ layer.lora_b + layer.bias)
    assert_close(merge_adapter(model, adapter)(x), expected)
    with pytest.raises(AdapterMismatchError, match="no bias to merge"):
        merge_adapter(nnx.Linear(6, 4, use_bias=False, rngs=nnx.Rngs(0)), adapter)


def test_merge_takes_numpy_valued_params(rng):
    layer = LoRALayerWeights(
        lora_a=rng.standard_normal((6, 2)).astype(np.float32),
        lora_b=rng.standard_normal((2, 4)).astype(np.float32),
        bias=rng.standard_normal(4).astype(np.float32),
        scaling=0.5,
    )
    model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    model.kernel.set_value(np.asarray(model.kernel.get_value()))  # set from a NumPy checkpoint
    model.bias.set_value(np.asarray(model.bias.get_value()))
    x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    expected = model(x) + 0.5 * (x @ layer.lora_a @ layer.lora_b + layer.bias)
    assert_close(merge_adapter(model, LoRAModel(loras={"": layer}, id=1, name="np"))(x), expected)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("order", ["C", "F"])
def test_a_lora_over_a_whole_fused_layer_is_served_and_merged_as_its_slices(rng, groups, order):
    """A LoRA keyed by a packed layer's own name (trained on the fused layer, as PEFT does on
    Phi-3's qkv_proj) adds ``s * x A B`` to the layer's output columns as they are, grouped or
    not: served through the slot banks and merged, against the plain float32 product. Order
    "F": A and B as a PEFT load hands them over (transposed views of PyTorch's arrays)."""

    class Fused(nnx.Module):
        packed_modules_mapping = {"qkv_proj": (("q_proj", 6), ("k_proj", 4), ("v_proj", 4))}
        packed_modules_groups = {"qkv_proj": groups}

        def __init__(self, rngs):
            self.qkv_proj = nnx.Linear(8, 14, rngs=rngs)

        def __call__(self, x):
            return self.qkv_proj(x)

    model = Fused(nnx.Rngs(int(rng.integers(1 << 30))))
    whole = LoRALayerWeights(
        lora_a=(rng.standard_normal((8, 2)) / np.sqrt(8)).astype(np.float32, order=order),
        lora_b=(0.3 * rng.standard_normal((2, 14))).astype(np.float32, order=order),
        module_name="qkv_proj",
        scaling=0.75,
    )
    fused = LoRAModel(loras={"qkv_proj": whole}, id=2, name="fused")
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    kernel, bias = np.asarray(model.qkv_proj.kernel[...]), np.asarray(model.qkv_proj.bias[...])
    ab = np.asarray(whole.lora_a, np.float64) @ np.asarray(whole.lora_b, np.float64)
    expected = np.asarray(x, np.float64) @ (kernel + 0.75 * ab) + bias

    assert_close(merge_adapter(model, fused)(x), expected)
    wrapped = apply(model)
    (target,) = find_targets(wrapped)
    assert target.groups == groups
    state, mapping = serve(manager_with([target], [fused], rank=2), [2, None], seq_len=3)
    y = nnx_forward(wrapped)(x, state.banks, mapping)
    assert_close(y[0], expected[0])
    np.testing.assert_array_equal(y[1], model(x[1]))  # the base row is the plain model

    # The same slice given twice (whole and per module), or the wrong width, is refused.
    q = LoRALayerWeights(lora_a=whole.lora_a, lora_b=whole.lora_b[:, :6], module_name="q_proj")
    twice = LoRAModel(loras={"qkv_proj": whole, "q_proj": q}, id=3, name="twice")
    with pytest.raises(AdapterMismatchError, match=r"slice 0 of target 'qkv_proj' is also given"):
        mgr.add_adapter(state, twice)
    narrow = LoRAModel(
        loras={"qkv_proj": whole.replace(lora_b=whole.lora_b[:, :13])}, id=4, name="narrow"
    )
    match = r"'narrow'.*whole of packed layer 'qkv_proj' maps 8 -> 13, but the layer maps 8 -> 14"
    with pytest.raises(AdapterMismatchError, match=match):
        mgr.add_adapter(state, narrow)
    with pytest.raises(AdapterMismatchError, match=match):
        merge_adapter(model, narrow)
