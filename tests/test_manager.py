"""Adapter manager: slot contents, fit checks, LRU/pin rules, disk tier, donation, batches.

Also holds the small helpers (toy targets, random adapters, invariant checks) that
test_manager_properties.py and test_manager_runtime.py import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import ADAPTER_NAMES, ADAPTERS_DIR
from safetensors.numpy import load_file, save_file

import jlora
from jlora import manager as M
from jlora import reference
from jlora.checkpoint import META_FILE, META_ITEM, save_adapter
from jlora.errors import (
    AdapterMismatchError,
    AdapterWeightsError,
    CapacityError,
    MappingError,
    UnknownAdapterError,
)
from jlora.hostio import freeze
from jlora.request import LoRARequest
from jlora.targets import TargetModule
from jlora.weights import LoRALayerWeights, LoRAModel, PackedLoRALayerWeights

# ---------------------------------------------------------------------------------------------
# Helpers (imported by the other test_manager_* modules)

# A toy model: a packed 2-slice projection, a plain one with a ragged width, an embedding.
TOY_TARGETS = (
    TargetModule(name="attn.qk", in_dim=8, out_dims=(4, 3), peft_names=("attn.q", "attn.k")),
    TargetModule(name="mlp.down", in_dim=5, out_dims=(7,), peft_names=("mlp.down",)),
    TargetModule(name="embed", in_dim=11, out_dims=(6,), peft_names=("embed",), is_embedding=True),
)
TOY_MODULES = ("attn.q", "attn.k", "mlp.down", "embed")


def llama_targets() -> list[TargetModule]:
    """The fixtures' tiny Llama (hidden 64, intermediate 176, 2 layers, 4 heads / 2 KV heads,
    vocab 128) with fused qkv and gate_up projections."""
    hidden, inter, vocab = 64, 176, 128
    ts = [
        TargetModule(
            name="model.embed_tokens",
            in_dim=vocab,
            out_dims=(hidden,),
            peft_names=("model.embed_tokens",),
            is_embedding=True,
        )
    ]
    for layer in range(2):
        p = f"model.layers.{layer}"
        ts += [
            TargetModule(
                name=f"{p}.self_attn.qkv_proj",
                in_dim=hidden,
                out_dims=(64, 32, 32),
                peft_names=tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"),
            ),
            TargetModule(
                name=f"{p}.self_attn.o_proj",
                in_dim=hidden,
                out_dims=(hidden,),
                peft_names=(f"{p}.self_attn.o_proj",),
            ),
            TargetModule(
                name=f"{p}.mlp.gate_up_proj",
                in_dim=hidden,
                out_dims=(inter, inter),
                peft_names=(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
            ),
            TargetModule(
                name=f"{p}.mlp.down_proj",
                in_dim=inter,
                out_dims=(hidden,),
                peft_names=(f"{p}.mlp.down_proj",),
            ),
        ]
    ts.append(
        TargetModule(name="lm_head", in_dim=hidden, out_dims=(vocab,), peft_names=("lm_head",))
    )
    return ts


def _dims(targets, module):
    for t in targets:
        if module in t.peft_names:
            return t.in_dim, t.out_dims[t.peft_names.index(module)], t.is_embedding
    raise KeyError(module)


def make_adapter(
    adapter_id: int,
    *,
    rank: int = 2,
    modules=TOY_MODULES,
    targets=TOY_TARGETS,
    seed: int | None = None,
    dtype=np.float32,
    name: str | None = None,
    path: str | None = None,
) -> LoRAModel:
    """A random adapter whose weights depend only on (adapter_id, seed)."""
    rng = np.random.default_rng(adapter_id if seed is None else seed)
    loras = {}
    for k, module in enumerate(modules):
        d_in, d_out, emb = _dims(targets, module)
        loras[module] = LoRALayerWeights(
            lora_a=rng.standard_normal((d_in, rank)).astype(dtype),
            lora_b=rng.standard_normal((rank, d_out)).astype(dtype),
            module_name=module,
            scaling=0.5 + k + adapter_id / 8,
            is_embedding=emb,
        )
    return LoRAModel(loras=loras, id=adapter_id, name=name or f"a{adapter_id}", path=path)


def expected_slot(state, model):
    """Per target, per slice: (a, b, scale) a slot must hold for ``model`` (None = free)."""
    rank = state.config.max_lora_rank
    out = []
    for t in state.targets:
        row = []
        for name, d_out in zip(t.peft_names, t.out_dims, strict=True):
            a = np.zeros((t.in_dim, rank), np.float32)
            b = np.zeros((rank, d_out), np.float32)
            layer = None if model is None else model.loras.get(name)
            if layer is None:
                row.append((a, b, 0.0))
                continue
            a[:, : layer.rank] = np.asarray(layer.lora_a, np.float32)
            b[: layer.rank] = np.asarray(layer.lora_b, np.float32)
            row.append((a, b, layer.scaling))
        out.append(row)
    return out


def check_invariants(state, models: dict[int, LoRAModel] | None = None):
    """Bookkeeping consistency, plus device contents of every slot when ``models`` (id -> the
    adapter as added) is given. Free slots must have zero scales; slot 0 is all zeros."""
    cfg = state.config
    assert len(state.slots) == cfg.max_loras + 1 and state.slots[0] == 0
    active = [a for a in state.slots[1:] if a]
    assert len(active) == len(set(active))
    assert set(active) <= set(state.cache), "every active adapter is cached"
    assert state.pinned <= set(active), "pinned adapters hold a slot"
    assert sorted(state.lru) == sorted(state.cache) and len(state.lru) == len(state.cache)
    assert len(state.cache) <= cfg.max_cpu_loras
    for model in state.cache.values():
        for x in jax.tree.leaves(model):
            assert isinstance(x, np.ndarray) and x.dtype == state.dtype
    for bank in jax.tree.leaves(state.bank_list, is_leaf=lambda x: isinstance(x, jlora.LoRABank)):
        assert bank.a.dtype == state.dtype and bank.scale.dtype == jnp.float32
        assert not np.asarray(bank.a[0], np.float32).any()
        assert not np.asarray(bank.b[0], np.float32).any()
        assert float(bank.scale[0]) == 0.0
    if models is None:
        return
    host = [[jax.tree.map(np.asarray, bank) for bank in banks] for banks in state.bank_list]
    for slot, adapter_id in enumerate(state.slots):
        if slot == 0:
            continue
        want = expected_slot(state, models[adapter_id] if adapter_id else None)
        for banks, row in zip(host, want, strict=True):
            for bank, (a, b, s) in zip(banks, row, strict=True):
                if adapter_id == 0:
                    assert bank.scale[slot] == 0.0, f"free slot {slot} has a scale"
                    continue
                np.testing.assert_array_equal(np.asarray(bank.a[slot], np.float32), a)
                np.testing.assert_array_equal(np.asarray(bank.b[slot], np.float32), b)
                assert bank.scale[slot] == np.float32(s)


def bookkeeping(state):
    return (
        state.slots,
        dict(state.cache),
        dict(state.requests),
        state.lru,
        state.pinned,
    )


def snapshot(state):
    """Everything observable about a state: bookkeeping and a host copy of every bank array."""
    return bookkeeping(state), [np.array(x) for x in jax.tree.leaves(state)]


def assert_unchanged(state, snap):
    book, arrays = snap
    assert not state.is_donated
    assert bookkeeping(state) == book
    now = jax.tree.leaves(state)
    assert len(now) == len(arrays)
    for x, y in zip(now, arrays, strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


def toy_state(max_loras=2, max_cpu_loras=None, max_lora_rank=4, **kw):
    cfg = jlora.LoRAConfig(
        max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras
    )
    return M.init_state(cfg, TOY_TARGETS, **kw)


class MemoryDisk:
    """A disk tier in memory: ``load_fn`` that serves registered adapters and counts loads."""

    def __init__(self, models: dict[int, LoRAModel]):
        self.models, self.loads = models, []

    def request(self, adapter_id: int) -> LoRARequest:
        m = self.models[adapter_id]
        return LoRARequest(lora_name=m.name, lora_int_id=adapter_id, lora_path=m.path)

    def __call__(self, request, config, dtype):
        self.loads.append(request.adapter_id)
        return self.models[request.adapter_id]


# ---------------------------------------------------------------------------------------------
# Construction and slot contents


def test_init_state_shapes_dtype_and_empty_slots():
    cfg = jlora.LoRAConfig(max_loras=3, max_lora_rank=4)
    state = M.init_state(cfg, TOY_TARGETS)
    banks = state.banks
    assert list(banks) == [t.name for t in TOY_TARGETS]
    assert [b.a.shape for b in banks["attn.qk"]] == [(4, 8, 4), (4, 8, 4)]
    assert [b.b.shape for b in banks["attn.qk"]] == [(4, 4, 4), (4, 4, 3)]
    assert banks["embed"][0].a.shape == (4, 11, 4)
    assert state.dtype == np.float32 and state.slots == (0, 0, 0, 0)
    check_invariants(state, {})
    # "auto" follows the base model's dtype; an explicit lora_dtype wins.
    assert M.init_state(cfg, TOY_TARGETS, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    cfg16 = dataclasses.replace(cfg, lora_dtype="float16")
    assert M.init_state(cfg16, TOY_TARGETS, dtype=jnp.bfloat16).dtype == np.float16
    # A quantized base's dtype is no bank dtype (int8 banks would refuse every adapter later,
    # fp8 ones round it): refused up front unless lora_dtype names one.
    for base in (jnp.int8, jnp.float8_e4m3fn, jnp.float64):
        with pytest.raises(jlora.LoRAConfigError, match="set LoRAConfig.lora_dtype"):
            M.init_state(cfg, TOY_TARGETS, dtype=base)
    assert M.init_state(cfg16, TOY_TARGETS, dtype=jnp.int8).dtype == np.float16


def test_init_state_refuses_ambiguous_targets():
    dup = TargetModule(name="other", in_dim=8, out_dims=(4,), peft_names=("attn.q",))
    with pytest.raises(AdapterMismatchError, match="'attn.q' is served by both"):
        M.init_state(jlora.LoRAConfig(), [*TOY_TARGETS, dup])
    with pytest.raises(AdapterMismatchError, match="listed twice"):
        M.init_state(jlora.LoRAConfig(), [TOY_TARGETS[0], TOY_TARGETS[0]])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_activate_writes_padded_weights_scales_and_zero_slices(dtype):
    # Adapter 1 targets only k (second slice of the packed target) and the embedding.
    a1 = make_adapter(1, rank=3, modules=("attn.k", "embed"))
    a2 = make_adapter(2, rank=4)
    state = toy_state(dtype=dtype)
    for m in (a1, a2):
        state = M.activate_adapter(M.add_adapter(state, m), m.id)
    assert state.slots == (0, 1, 2)
    cached = {i: state.cache[i] for i in (1, 2)}
    check_invariants(state, cached)
    qk = state.banks["attn.qk"]
    assert float(qk[0].scale[1]) == 0.0 and float(qk[1].scale[1]) == np.float32(
        a1.loras["attn.k"].scaling
    )
    if dtype == np.float32:
        check_invariants(state, {1: a1, 2: a2})  # exact: no cast


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_peft_loads_take_the_torch_order_writer_and_fill_the_same_banks(name):
    """A PEFT load holds transposed views; the slot writer then takes PyTorch's order (padded
    to the bank rank on the host, transposed on the device; fixtures of rank 8 and 16 into rank
    16 banks). The banks must equal those written
    from C-ordered copies of the same adapter, which take the bank-order writer."""
    cfg = jlora.LoRAConfig(max_loras=2, max_lora_rank=16, max_cpu_loras=2)
    state = M.init_state(cfg, llama_targets())
    loaded = jlora.load_adapter(ADAPTERS_DIR / name, adapter_id=1)
    copied = loaded.clone(2).replace(
        loras={
            k: w.replace(
                lora_a=np.ascontiguousarray(w.lora_a), lora_b=np.ascontiguousarray(w.lora_b)
            )
            for k, w in loaded.loras.items()
        }
    )
    fitted = [M._fit(state.layout, m, checked=True) for m in (loaded, copied)]
    # (An adapter in another dtype than the banks is converted to contiguous arrays first.)
    same_dtype = next(iter(loaded.loras.values())).lora_a.dtype == state.dtype
    assert [M._slot_values(state.layout, m)[3] for m in fitted] == [same_dtype, False]
    for m in (loaded, copied):
        state = M.activate_adapter(M.add_adapter(state, m), m.id)
    s1, s2 = state.slot_of(1), state.slot_of(2)
    for target in state.targets:
        for bank in state.banks[target.name]:
            for leaf in (bank.a, bank.b, bank.scale):
                np.testing.assert_array_equal(np.asarray(leaf[s1]), np.asarray(leaf[s2]))


def test_mixed_batch_through_manager_matches_peft_outputs():
    """Every fixture adapter, loaded by request into packed qkv / gate_up banks, reproduces
    PEFT's per-module outputs; base rows stay untouched."""
    cfg = jlora.LoRAConfig(max_loras=3, max_lora_rank=16, max_cpu_loras=3)
    state = M.init_state(cfg, llama_targets())
    index = {n: (t, j) for t in state.targets for j, n in enumerate(t.peft_names)}
    for k, name in enumerate(ADAPTER_NAMES):
        request = LoRARequest(lora_name=name, lora_int_id=k + 1, lora_path=ADAPTERS_DIR / name)
        # A base sequence and the adapter's sequence in one batch: 1 + 3 tokens.
        state, mapping = M.prepare_batch(state, [None, request], [1, 3])
        slot = state.slot_of(k + 1)
        assert mapping.seq_slots.tolist()[:2] == [0, slot]
        outputs = load_file(ADAPTERS_DIR / name / "module_outputs.safetensors")
        modules = json.loads((ADAPTERS_DIR / name / "resolved_modules.json").read_text())
        tol = 1e-2 if "bf16" in name else 1e-5
        for module in modules:
            target, j = index[module]
            bank = state.banks[target.name][j]
            x = outputs[f"{module}.input"]
            base, want = outputs[f"{module}.base_output"], outputs[f"{module}.output"]
            token_slots = mapping.token_slots[: len(x)]
            if target.is_embedding:
                got = reference.add_lora_embedding(
                    jnp.asarray(base), jnp.asarray(x), bank, token_slots
                )
            else:
                got = reference.add_lora(jnp.asarray(base), jnp.asarray(x), [bank], token_slots)
            got = np.asarray(got)
            np.testing.assert_array_equal(got[0], base[0])  # the base-model token
            err = np.abs(got[1:] - want[1:]).max() / np.abs(want).max()
            assert err <= tol, f"{name}:{module} relative error {err:.2e}"
    check_invariants(state)


# ---------------------------------------------------------------------------------------------
# Adapters must fit the model


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            lambda m: {**m.loras, "attn.v": m.loras["attn.q"]},
            "targets module 'attn.v', which the model has no LoRA target",
        ),
        (
            lambda m: {
                **m.loras,
                "mlp.down": m.loras["mlp.down"].replace(lora_a=np.ones((6, 2), np.float32)),
            },
            r"module 'mlp.down': LoRA maps 6 -> 7 but target 'mlp.down' \(slice 0\) maps 5 -> 7",
        ),
        (
            lambda m: {**m.loras, "attn.k": make_adapter(9, rank=5).loras["attn.k"]},
            "module 'attn.k': rank 5 exceeds max_lora_rank=4",
        ),
        (
            lambda m: {**m.loras, "embed": m.loras["embed"].replace(is_embedding=False)},
            "module 'embed': a linear LoRA, but target 'embed' is an embedding layer",
        ),
        (
            lambda m: {
                **m.loras,
                "mlp.down": m.loras["mlp.down"].replace(bias=np.ones(7, np.float32)),
            },
            "module 'mlp.down': carries a LoRA bias",
        ),
        (
            lambda m: {
                **m.loras,
                "attn.qk": PackedLoRALayerWeights(slices=(m.loras["attn.q"], None)),
            },
            "slice 0 of target 'attn.qk' is also given by 'attn.q'",
        ),
        (
            lambda m: {
                **m.loras,
                "attn.qk": PackedLoRALayerWeights(slices=(m.loras["attn.q"], None, None)),
            },
            "packed module 'attn.qk': 3 slices, but target 'attn.qk' has 2",
        ),
    ],
    ids=[
        "unknown-module",
        "wrong-dim",
        "rank",
        "embedding-kind",
        "bias",
        "duplicate-slice",
        "slice-count",
    ],
)
def test_adapter_that_does_not_fit_is_refused_with_module_named(bad, match):
    good = make_adapter(1)
    model = good.replace(loras=bad(good))
    state = M.activate_adapter(M.add_adapter(toy_state(), make_adapter(2)), 2)
    snap = snapshot(state)
    with pytest.raises(AdapterMismatchError, match=match):
        M.add_adapter(state, model)
    assert_unchanged(state, snap)


def test_packed_layer_weights_are_accepted_by_target_name():
    m = make_adapter(1)
    packed = m.replace(
        loras={
            "attn.qk": PackedLoRALayerWeights(slices=(None, m.loras["attn.k"])),
            "mlp.down": m.loras["mlp.down"],
        }
    )
    state = M.activate_adapter(M.add_adapter(toy_state(), packed), 1)
    plain = m.replace(loras={k: m.loras[k] for k in ("attn.k", "mlp.down")})
    check_invariants(state, {1: plain})


def test_transposed_views_are_cached_without_a_copy_and_written_correctly():
    # PyTorch layout [r, in] / [out, r], viewed as [in, r] / [r, out] (Fortran order).
    a = make_adapter(1, rank=4)
    torch_layout = {
        k: w.replace(
            lora_a=np.ascontiguousarray(w.lora_a.T).T, lora_b=np.ascontiguousarray(w.lora_b.T).T
        )
        for k, w in a.loras.items()
    }
    model = a.replace(loras=torch_layout)
    for x in jax.tree.leaves(model):
        freeze(x)  # read-only down to the owner, as the loaders hand them out
    assert not model.loras["mlp.down"].lora_a.flags.c_contiguous
    state = M.add_adapter(toy_state(), model)
    assert _shares_arrays(state.cache[1], model)
    check_invariants(M.activate_adapter(state, 1), {1: a})


def test_rank_one_transposed_views_take_the_torch_order_writer():
    # [in, 1] and [1, out] are C- and F-contiguous at once; they once took the slower writer.
    a = make_adapter(1, rank=1)
    views = a.replace(
        loras={
            k: w.replace(
                lora_a=np.ascontiguousarray(w.lora_a.T).T,
                lora_b=np.ascontiguousarray(w.lora_b.T).T,
            )
            for k, w in a.loras.items()
        }
    )
    state = M.add_adapter(toy_state(), views)
    assert M._slot_values(state.layout, state.cache[1])[3] is True
    check_invariants(M.activate_adapter(state, 1), {1: a})
    plain = M.add_adapter(toy_state(), make_adapter(2, rank=1))  # C-ordered: same banks
    check_invariants(M.activate_adapter(plain, 2), {2: make_adapter(2, rank=1)})


def test_dtype_is_converted_on_add_and_fp32_adapter_fits_bf16_banks():
    state = M.add_adapter(toy_state(dtype=jnp.bfloat16), make_adapter(1))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.cache[1]))
    a = make_adapter(1)
    for x in jax.tree.leaves(a):
        x.setflags(write=False)
    assert _shares_arrays(M.add_adapter(toy_state(), a).cache[1], a)  # read-only: no copy


def _shares_arrays(cached, model) -> bool:
    pairs = zip(jax.tree.leaves(cached), jax.tree.leaves(model), strict=True)
    return cached.loras is not model.loras and all(x is y for x, y in pairs)


def test_the_cache_is_not_changed_through_the_callers_objects():
    a = make_adapter(1)
    for x in jax.tree.leaves(a):
        x.setflags(write=False)
    state = M.add_adapter(toy_state(), a)
    a.loras.pop("attn.q")  # the caller's dict: the cache keeps its own
    assert "attn.q" in state.cache[1].loras
    # A read-only view of memory the caller can still write is copied.
    b = make_adapter(2)
    writable = {k: w.lora_a for k, w in b.loras.items()}
    views = b.replace(loras={k: w.replace(lora_a=w.lora_a.view()) for k, w in b.loras.items()})
    for x in jax.tree.leaves(views):
        x.setflags(write=False)
    state = M.add_adapter(state, views)
    for k, x in writable.items():
        x[...] = 123.0
        assert not (state.cache[2].loras[k].lora_a == 123.0).any()
    check_invariants(M.activate_adapter(state, 2), {1: make_adapter(1), 2: make_adapter(2)})


# ---------------------------------------------------------------------------------------------
# Identity rules


def test_same_adapter_twice_is_a_noop_and_same_id_other_weights_is_refused():
    a = make_adapter(1)
    state = M.add_adapter(toy_state(), a)
    again = M.add_adapter(state, make_adapter(1))  # equal weights, another object
    assert bookkeeping(again) == bookkeeping(state)
    snap = snapshot(state)
    with pytest.raises(AdapterMismatchError, match="adapter id 1 is already registered as 'a1'"):
        M.add_adapter(state, make_adapter(1, seed=99))
    with pytest.raises(AdapterMismatchError, match="already registered"):
        M.add_adapter(state, make_adapter(1, name="other"))
    # Equal weights from another path: another adapter (a request would reload the first path).
    at_a = M.add_adapter(toy_state(), make_adapter(1, path="/a"))
    assert M.add_adapter(at_a, make_adapter(1, path="/a/../a")).cache[1].path == "/a"
    assert M.add_adapter(at_a, make_adapter(1)).cache[1].path == "/a"  # no path: same adapter
    with pytest.raises(AdapterMismatchError, match="differs \\(path '/b', not '/a'\\)"):
        M.add_adapter(at_a, make_adapter(1, path="/b"))
    assert_unchanged(state, snap)


def test_a_numpy_id_is_kept_as_a_python_int():
    state = M.add_adapter(toy_state(), make_adapter(1).replace(id=np.int64(1)))
    state = M.activate_adapter(state, 1)
    ids = [*state.lru, *state.cache, state.cache[1].id, *(i for i in state.slots if i)]
    assert ids and all(type(i) is int for i in ids)


def test_the_cache_keeps_its_own_copy_of_a_callers_arrays():
    a = make_adapter(1)
    original = make_adapter(1)
    state = M.add_adapter(toy_state(), a)
    for layer in a.loras.values():  # the caller reuses its buffers after add_adapter
        layer.lora_a[...] = 7.0
        layer.lora_b[...] = 7.0
    assert bookkeeping(M.add_adapter(state, original)) == bookkeeping(state)  # still the same
    check_invariants(M.activate_adapter(state, 1), {1: original})
    assert all(not x.flags.writeable for x in jax.tree.leaves(state.cache[1]))


def test_same_request_twice_is_a_noop_and_same_id_other_path_is_refused():
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1")})
    state = M.add_adapter(toy_state(load_fn=disk), disk.request(1))
    state = M.add_adapter(state, disk.request(1))
    assert disk.loads == [1]
    other = LoRARequest(lora_name="a1", lora_int_id=1, lora_path="/mem/elsewhere")
    with pytest.raises(AdapterMismatchError, match="adapter id 1 is registered for 'a1'"):
        M.add_adapter(state, other)
    with pytest.raises(AdapterMismatchError, match="needs its own id"):
        M.prepare_batch(state, [other], [1])


@pytest.mark.parametrize("via", ["add", "activate", "prepare_batch"])
def test_request_for_a_model_added_from_the_same_path_attaches_the_disk_tier(via):
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1")})
    state = M.add_adapter(
        toy_state(load_fn=disk, max_loras=1, max_cpu_loras=1), make_adapter(1, path="/mem/1")
    )
    if via == "add":
        state = M.add_adapter(state, disk.request(1))
    elif via == "activate":
        state = M.activate_adapter(state, disk.request(1))
    else:
        state, _ = M.prepare_batch(state, [disk.request(1)], [1])
    # Read once, to check that the model is what its path holds (an eviction reloads it).
    assert disk.loads == [1] and 1 in state.requests
    state = M.add_adapter(state, make_adapter(2))  # evicts 1 from the host cache
    state = M.activate_adapter(state, 1)  # known by its request: reloaded, not forgotten
    assert disk.loads == [1, 1] and state.slot_of(1) is not None


@pytest.mark.parametrize("via", ["add", "activate", "prepare_batch"])
def test_request_for_a_model_that_its_path_does_not_hold_is_refused(via):
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1")})
    state = M.add_adapter(toy_state(load_fn=disk), make_adapter(1, path="/mem/1", seed=7))
    snap = snapshot(state)
    with pytest.raises(AdapterMismatchError, match="what /mem/1 holds differs.*other weights"):
        if via == "add":
            M.add_adapter(state, disk.request(1))
        elif via == "activate":
            M.activate_adapter(state, disk.request(1))
        else:
            M.prepare_batch(state, [disk.request(1)], [1])
    assert_unchanged(state, snap)


def test_model_with_the_id_of_a_request_from_another_path_is_refused():
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1")})
    state = M.add_adapter(toy_state(load_fn=disk, max_loras=1, max_cpu_loras=1), disk.request(1))
    state = M.add_adapter(state, make_adapter(2))  # 1 now known by its request only
    snap = snapshot(state)
    with pytest.raises(AdapterMismatchError, match="registered for 'a1' at /mem/1"):
        M.add_adapter(state, make_adapter(1, path="/mem/other"))
    assert_unchanged(state, snap)
    state = M.add_adapter(state, make_adapter(1, path="/mem/1"))  # the same file: fine
    assert 1 in state.cache


def test_model_for_an_evicted_request_must_hold_what_its_path_holds():
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1")})
    state = M.add_adapter(toy_state(load_fn=disk, max_loras=1, max_cpu_loras=1), disk.request(1))
    state = M.add_adapter(state, make_adapter(2))  # 1 now known by its request only
    snap = snapshot(state)
    with pytest.raises(AdapterMismatchError, match="differs from what is there .*other weights"):
        M.add_adapter(state, make_adapter(1, seed=99))  # no path: read /mem/1 to compare
    assert_unchanged(state, snap)
    state = M.add_adapter(state, make_adapter(1))  # the same weights, no path: fine
    assert disk.loads == [1, 1, 1] and 1 in state.cache


def test_same_adapter_with_modules_in_another_order_is_a_noop_and_a_new_name_is_named():
    a = make_adapter(1)
    state = M.add_adapter(toy_state(), a)
    reordered = a.replace(loras=dict(reversed(a.loras.items())))
    assert bookkeeping(M.add_adapter(state, reordered)) == bookkeeping(state)
    with pytest.raises(AdapterMismatchError, match=r"differs \(name 'b', not 'a1'\)"):
        M.add_adapter(state, a.replace(name="b"))


def _with_value(model, module, role, value):
    layer = model.loras[module]
    x = getattr(layer, role).copy()
    x.flat[3] = value
    return model.replace(loras={**model.loras, module: layer.replace(**{role: x})})


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_weights_from_a_model_or_a_custom_load_fn_are_refused(value):
    bad = _with_value(make_adapter(1, path="/mem/1"), "attn.k", "lora_b", value)
    state = M.add_adapter(toy_state(load_fn=MemoryDisk({1: bad})), make_adapter(2))
    snap = snapshot(state)
    match = "adapter 'a1' \\(id 1\\), module 'attn.k': lora_b holds 1 NaN/Inf values"
    with pytest.raises(AdapterWeightsError, match=match):
        M.add_adapter(state, bad)
    with pytest.raises(AdapterWeightsError, match=match):
        M.activate_adapter(state, MemoryDisk({1: bad}).request(1))
    assert_unchanged(state, snap)


def test_integer_weights_are_refused_with_the_module_named():
    a = make_adapter(1)
    layer = a.loras["mlp.down"]
    bad = a.replace(
        loras={**a.loras, "mlp.down": layer.replace(lora_a=layer.lora_a.astype(np.int32))}
    )
    for dtype in (jnp.float32, jnp.float16):  # float16 banks cast, which once hit jnp.finfo
        with pytest.raises(AdapterWeightsError, match="module 'mlp.down': lora_a is int32"):
            M.add_adapter(toy_state(dtype=dtype), bad)


def test_cast_that_overflows_the_bank_dtype_is_refused_with_the_module_named():
    a = make_adapter(1)
    big = a.loras["mlp.down"].lora_b.copy()
    big[0, 0] = 1e5  # finite in float32, inf in float16
    a = a.replace(loras={**a.loras, "mlp.down": a.loras["mlp.down"].replace(lora_b=big)})
    state = toy_state(dtype=jnp.float16)
    snap = snapshot(state)
    with pytest.raises(AdapterWeightsError, match="module 'mlp.down': lora_b has 1 values beyond"):
        M.add_adapter(state, a)
    assert_unchanged(state, snap)
    assert M.add_adapter(toy_state(dtype=jnp.bfloat16), a).cache[1].loras["mlp.down"] is not None


# ---------------------------------------------------------------------------------------------
# LRU, pins, eviction, disk tier


def test_activate_evicts_least_recently_used_unpinned_slot():
    state = toy_state(max_loras=2, max_cpu_loras=4)
    for i in (1, 2, 3):
        state = M.add_adapter(state, make_adapter(i))
    state = M.activate_adapter(state, 1)
    state = M.activate_adapter(state, 2)
    state = M.activate_adapter(state, 1)  # touch: 2 is now the LRU active adapter
    state = M.activate_adapter(state, 3)
    assert state.slots == (0, 1, 3)
    state = M.pin_adapter(state, 1)
    state = M.activate_adapter(state, 2)  # 1 is pinned: 3 goes
    assert state.slots == (0, 1, 2)
    check_invariants(state, {i: make_adapter(i) for i in (1, 2, 3)})


def test_activating_when_every_slot_is_pinned_fails_and_changes_nothing():
    state = toy_state(max_loras=2, max_cpu_loras=3)
    for i in (1, 2, 3):
        state = M.add_adapter(state, make_adapter(i))
    state = M.pin_adapter(M.pin_adapter(state, 1), 2)
    snap = snapshot(state)
    with pytest.raises(CapacityError, match="all max_loras=2 slots hold pinned adapters"):
        M.activate_adapter(state, 3)
    with pytest.raises(CapacityError):
        M.pin_adapter(state, 3)
    assert_unchanged(state, snap)
    state = M.activate_adapter(M.unpin_adapter(state, 2), 3)
    assert state.slots == (0, 1, 3)


def test_host_cache_evicts_lru_unpinned_and_frees_its_slot():
    state = toy_state(max_loras=2, max_cpu_loras=2)
    state = M.pin_adapter(M.add_adapter(state, make_adapter(1)), 1)
    state = M.activate_adapter(M.add_adapter(state, make_adapter(2)), 2)
    state = M.add_adapter(state, make_adapter(3))  # full: 2 (active, unpinned) is evicted
    assert set(state.cache) == {1, 3} and state.slots == (0, 1, 0)
    assert float(state.banks["mlp.down"][0].scale[2]) == 0.0
    # A bare LoRAModel evicted from the host cache is forgotten.
    with pytest.raises(UnknownAdapterError, match="adapter id 2 is not registered"):
        M.activate_adapter(state, 2)
    check_invariants(state, {1: make_adapter(1), 3: make_adapter(3)})


def test_evicted_request_is_reloaded_from_disk_on_demand():
    disk = MemoryDisk({i: make_adapter(i, path=f"/mem/{i}") for i in (1, 2, 3)})
    state = toy_state(max_loras=1, max_cpu_loras=1, load_fn=disk)
    for i in (1, 2, 3):
        state = M.activate_adapter(state, disk.request(i))
    assert disk.loads == [1, 2, 3] and list(state.cache) == [3]
    state = M.activate_adapter(state, 1)  # known by request: reloaded
    assert disk.loads == [1, 2, 3, 1] and state.slots == (0, 1)
    info = {a.id: a for a in M.list_adapters(state)}
    assert info[1] == M.AdapterInfo(1, "a1", "/mem/1", slot=1, cached=True, pinned=False, rank=2)
    assert info[2].cached is False and info[2].slot is None and info[2].rank is None
    check_invariants(state, disk.models)


def test_remove_active_adapter_frees_its_slot_and_forgets_it():
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1")})
    state = M.pin_adapter(toy_state(load_fn=disk), disk.request(1))
    state = M.remove_adapter(state, 1)
    assert state.slots == (0, 0, 0) and not state.cache and not state.requests
    assert not state.pinned and M.list_adapters(state) == ()
    check_invariants(state, {})
    with pytest.raises(UnknownAdapterError, match="adapter id 1 is not registered"):
        M.remove_adapter(state, 1)


def test_deactivate_keeps_adapter_cached_and_stale_mapping_serves_base():
    state = M.activate_adapter(M.add_adapter(toy_state(), make_adapter(1)), 1)
    state, mapping = M.prepare_batch(state, [1], [4])
    state = M.deactivate_adapter(state, 1)
    assert state.slots == (0, 0, 0) and 1 in state.cache
    x = jnp.ones((mapping.num_tokens, 5))
    y = jnp.zeros((mapping.num_tokens, 7))
    out = reference.add_lora(y, x, state.banks["mlp.down"], mapping.token_slots)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert M.deactivate_adapter(state, 1).slots == state.slots  # not active: no-op


def test_unknown_ids_are_refused():
    state = toy_state()
    for op in (M.activate_adapter, M.deactivate_adapter, M.pin_adapter, M.remove_adapter):
        with pytest.raises(UnknownAdapterError, match="adapter id 7 is not registered"):
            op(state, 7)
    with pytest.raises(UnknownAdapterError, match="ints >= 1"):
        M.activate_adapter(state, 0)
    with pytest.raises(UnknownAdapterError, match="not registered"):
        M.prepare_batch(state, [None, 7], [1, 1])


# ---------------------------------------------------------------------------------------------
# Batches


def test_prepare_batch_maps_sequences_to_slots():
    state = toy_state(max_loras=2, max_cpu_loras=3)
    for i in (1, 2, 3):
        state = M.add_adapter(state, make_adapter(i))
    state, mapping = M.prepare_batch(state, [2, None, 3, 2], [2, 1, 3, 1], is_prefill=False)
    slot = {i: state.slot_of(i) for i in (2, 3)}
    assert mapping.seq_slots.tolist() == [slot[2], 0, slot[3], slot[2]]
    assert mapping.token_slots.tolist()[:7] == [slot[2]] * 2 + [0] + [slot[3]] * 3 + [slot[2]]
    assert mapping.num_tokens == 16 and mapping.is_prefill is False
    assert state.lru[-2:] == (2, 3)


def test_empty_batch_maps_nothing_and_changes_nothing():
    state = M.add_adapter(toy_state(), make_adapter(1))
    new, mapping = M.prepare_batch(state, [], [])
    assert bookkeeping(new) == bookkeeping(state)
    assert not np.asarray(mapping.token_slots).any() and not np.asarray(mapping.seq_slots).any()
    assert np.asarray(mapping.slot_counts)[0] == mapping.num_tokens


def test_batch_needing_more_adapters_than_slots_names_counts_and_splits():
    state = toy_state(max_loras=3, max_cpu_loras=6)
    for i in range(1, 7):
        state = M.add_adapter(state, make_adapter(i))
    state = M.pin_adapter(state, 6)
    snap = snapshot(state)
    with pytest.raises(
        CapacityError,
        match=r"needs 5 distinct adapters but only 2 device slots are available "
        r"\(max_loras=3, 1 of them pinned by adapters outside the batch\); split it",
    ):
        M.prepare_batch(state, [1, 2, None, 3, 1, 4, 5], [1] * 7)
    batch = [1, 2, None, 3, 1, 4, 6, 5]  # the pinned adapter 6 is served in every sub-batch
    with pytest.raises(CapacityError, match=r"needs 6 distinct adapters but only 3 device"):
        M.prepare_batch(state, batch, [1] * 8)
    assert_unchanged(state, snap)
    groups = M.split_batch(state, batch)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert len(groups) == 3  # 5 unpinned adapters, 2 free slots
    for group in groups:
        state, mapping = M.prepare_batch(state, [batch[i] for i in group], [1] * len(group))
        want = [state.slot_of(batch[i]) if batch[i] else 0 for i in group]
        assert mapping.seq_slots.tolist()[: len(group)] == want
    check_invariants(state, {i: make_adapter(i) for i in range(1, 7)})


def test_split_batch_with_every_slot_pinned():
    state = toy_state(max_loras=1, max_cpu_loras=2)
    state = M.pin_adapter(M.add_adapter(state, make_adapter(1)), 1)
    assert M.split_batch(state, [1, None, 1]) == [[0, 1, 2]]
    state = M.add_adapter(state, make_adapter(2))
    with pytest.raises(CapacityError, match="all max_loras=1 slots are pinned"):
        M.split_batch(state, [1, 2])


def test_bad_lengths_fail_before_any_device_write():
    state = M.add_adapter(toy_state(), make_adapter(1))
    snap = snapshot(state)
    with pytest.raises(MappingError):
        M.prepare_batch(state, [1, None], [3])
    with pytest.raises(MappingError):
        M.prepare_batch(state, [1], [-1])
    assert_unchanged(state, snap)


# ---------------------------------------------------------------------------------------------
# Functional state, donation, jit boundary


def test_donate_false_keeps_the_old_state_usable_and_unchanged():
    s0 = M.add_adapter(toy_state(), make_adapter(1))
    snap = snapshot(s0)
    s1 = M.activate_adapter(s0, 1, donate=False)
    assert_unchanged(s0, snap)
    s2 = M.activate_adapter(s0, 1, donate=False)  # branch again from s0
    check_invariants(s1, {1: make_adapter(1)})
    check_invariants(s2, {1: make_adapter(1)})


def test_donation_updates_banks_in_place_and_consumes_the_old_state():
    s0 = M.add_adapter(toy_state(), make_adapter(1))
    ptr = s0.banks["attn.qk"][0].a.unsafe_buffer_pointer()
    s1 = M.activate_adapter(s0, 1)
    assert s0.is_donated and not s1.is_donated
    # In place: the slot write reused the donated buffer instead of copying the bank.
    assert s1.banks["attn.qk"][0].a.unsafe_buffer_pointer() == ptr
    with pytest.raises(M.DonatedStateError, match="donated to the state returned by a later"):
        M.activate_adapter(s0, 1)
    assert bookkeeping(s0)[0] == (0, 0, 0)  # host bookkeeping of the old state is untouched
    # An operation that writes nothing shares the arrays and donates nothing.
    s2 = M.activate_adapter(s1, 1)
    assert not s1.is_donated and jax.tree.leaves(s2)[0] is jax.tree.leaves(s1)[0]


def test_add_adapters_in_order_and_warmup_changes_nothing_observable():
    state = M.activate_adapter(M.add_adapter(toy_state(max_cpu_loras=2), make_adapter(1)), 1)
    # Adapter 3 evicts the least recently used, 1, from the host cache and its slot.
    state = M.add_adapters(state, [make_adapter(2), make_adapter(3)])
    assert state.lru == (2, 3) and state.slots == (0, 0, 0)
    check_invariants(state, {2: make_adapter(2), 3: make_adapter(3)})
    state = M.activate_adapter(state, 3)
    snap = snapshot(state)
    kept = M.warmup(state, donate=False)
    assert_unchanged(state, snap)
    assert_unchanged(kept, snap)
    warm = M.warmup(state)
    assert state.is_donated
    assert_unchanged(warm, snap)
    with pytest.raises(M.DonatedStateError):
        M.warmup(state)


def test_state_is_a_pytree_of_banks_but_never_a_jit_argument():
    state = M.activate_adapter(M.add_adapter(toy_state(), make_adapter(1)), 1)
    leaves = jax.tree.leaves(state)
    assert len(leaves) == 3 * 4 and all(isinstance(x, jax.Array) for x in leaves)
    moved = jax.device_put(state)
    assert moved.slots == state.slots and moved.cache == state.cache
    with pytest.raises(TypeError, match="Pass state.banks to the jitted function"):
        jax.jit(lambda s: s.banks)(state)

    @jax.jit
    def delta(banks, x, slots):
        return reference.add_lora(jnp.zeros((x.shape[0], 7)), x, banks["mlp.down"], slots)

    out = delta(state.banks, jnp.ones((2, 5)), jnp.asarray([1, 0], jnp.int32))
    assert np.asarray(out)[0].any() and not np.asarray(out)[1].any()


def test_failed_operations_leave_the_state_exactly_as_it_was():
    disk = MemoryDisk({1: make_adapter(1, path="/mem/1"), 2: make_adapter(2, path="/mem/2")})

    def broken_load(request, config, dtype):
        if request.adapter_id == 3:
            raise jlora.AdapterWeightsError("/mem/3: corrupt")
        return disk(request, config, dtype)

    state = toy_state(max_loras=2, max_cpu_loras=2, load_fn=broken_load)
    state = M.pin_adapter(state, disk.request(1))
    state = M.activate_adapter(state, disk.request(2))
    snap = snapshot(state)
    failing = [
        lambda s: M.activate_adapter(s, LoRARequest(lora_name="c", lora_int_id=3, lora_path="/3")),
        lambda s: M.prepare_batch(
            s, [2, LoRARequest(lora_name="c", lora_int_id=3, lora_path="/3")], [1, 1]
        ),
        lambda s: M.add_adapter(s, make_adapter(2, seed=5, path="/mem/2")),
        lambda s: M.add_adapter(s, make_adapter(4, rank=9)),
        lambda s: M.pin_adapter(M.pin_adapter(s, 2, donate=False), 5),
        lambda s: M.prepare_batch(s, [1, 2, 4], [1, 1, 1]),
        lambda s: M.remove_adapter(s, 9),
        # The first would evict adapter 2 from the host (a device write); the second fails.
        lambda s: M.add_adapters(s, [make_adapter(5), make_adapter(4, rank=9)]),
    ]
    for op in failing:
        with pytest.raises(jlora.LoRAError):
            op(state)
        assert_unchanged(state, snap)
    check_invariants(state, disk.models)


# ---------------------------------------------------------------------------------------------
# Disk tier through real files


def test_disk_tier_reloads_peft_directories_and_orbax_checkpoints(tmp_path):
    peft_dir = ADAPTERS_DIR / "attn_r8"
    converted = jlora.load_adapter(peft_dir, adapter_id=2, name="ckpt")
    ckpt = save_adapter(converted, tmp_path / "attn_r8_ckpt")
    cfg = jlora.LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    state = M.init_state(cfg, llama_targets())
    r1 = LoRARequest(lora_name="peft", lora_int_id=1, lora_path=peft_dir)
    r2 = LoRARequest(lora_name="ckpt", lora_int_id=2, lora_path=ckpt)
    for request in (r1, r2, r1):
        state = M.activate_adapter(state, request)
    assert state.cache[1].name == "peft" and state.slots == (0, 1)
    state = M.activate_adapter(state, 2)
    np.testing.assert_array_equal(
        state.cache[2].loras["model.layers.0.self_attn.q_proj"].lora_a,
        converted.loras["model.layers.0.self_attn.q_proj"].lora_a,
    )
    check_invariants(state, {2: converted})
    # A restored model records the folder it was converted from; the disk tier's copy records
    # the checkpoint it was read from, so a request naming that path is the same adapter.
    assert converted.path != ckpt and state.cache[2].path == ckpt
    assert M.add_adapter(state, r2).cache[2] is state.cache[2]


def test_disk_tier_names_a_checkpoint_without_its_metadata(tmp_path):
    ckpt = save_adapter(make_adapter(1), tmp_path / "c")
    os.remove(os.path.join(ckpt, META_ITEM, META_FILE))
    request = LoRARequest(lora_name="a1", lora_int_id=1, lora_path=ckpt)
    with pytest.raises(jlora.CheckpointError, match="missing; the checkpoint is incomplete"):
        M.add_adapter(toy_state(), request)


def _copy_fixture(name: str, to) -> str:
    shutil.copytree(ADAPTERS_DIR / name, to)
    return os.fspath(to)


def test_a_reload_must_find_the_files_it_first_read(tmp_path):
    path = _copy_fixture("attn_r8", tmp_path / "a")
    cfg = jlora.LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    request = LoRARequest(lora_name="a", lora_int_id=1, lora_path=path)
    state = M.activate_adapter(M.init_state(cfg, llama_targets()), request)
    first = state.cache[1]
    other = LoRARequest(lora_name="b", lora_int_id=2, lora_path=ADAPTERS_DIR / "attn_r8")
    state = M.activate_adapter(state, other)  # evicts 1 from the host cache
    assert 1 not in state.cache
    # The same files again: reloaded.
    state = M.activate_adapter(M.activate_adapter(state, 1), 2)
    # Other weights under the same file name: refused, naming the adapter and what to do.
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    save_file({k: v * 2 for k, v in tensors.items()}, weights)
    snap = snapshot(state)
    with pytest.raises(
        AdapterMismatchError, match="'a' \\(id 1\\): adapter_model.safetensors at .* changed"
    ):
        M.activate_adapter(state, 1)
    assert_unchanged(state, snap)
    state = M.add_adapter(M.remove_adapter(state, 1), request)  # re-added: the new weights
    key = next(iter(first.loras))
    np.testing.assert_array_equal(state.cache[1].loras[key].lora_a, 2 * first.loras[key].lora_a)
    # Files gone: the loader's error, saying it was a reload of an evicted adapter.
    state = M.activate_adapter(state, 2)
    shutil.rmtree(path)
    with pytest.raises(jlora.AdapterConfigError, match="'a' \\(id 1\\) was evicted .* remove_"):
        M.activate_adapter(state, 1)


def test_a_relative_request_path_is_kept_as_the_directory_it_named(tmp_path, monkeypatch):
    _copy_fixture("attn_r8", tmp_path / "here" / "ad")
    _copy_fixture("layers_r4", tmp_path / "there" / "ad")
    monkeypatch.chdir(tmp_path / "here")
    cfg = jlora.LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    state = M.activate_adapter(
        M.init_state(cfg, llama_targets()),
        LoRARequest(lora_name="a", lora_int_id=1, lora_path="ad"),
    )
    first = state.cache[1]
    state = M.add_adapter(state, make_llama_adapter(2))  # evicts 1 from the host cache
    monkeypatch.chdir(tmp_path / "there")
    state = M.activate_adapter(state, 1)  # reloaded from here/ad, not there/ad
    assert M.list_adapters(state)[0].path == os.fspath(tmp_path / "here" / "ad")
    assert not M._difference(first, state.cache[1])


def make_llama_adapter(adapter_id: int) -> LoRAModel:
    return jlora.load_adapter(ADAPTERS_DIR / "attn_r8", adapter_id=adapter_id, name="other")


def test_weights_the_banks_cannot_hold_or_check_are_refused():
    a = make_adapter(1)
    float8 = a.replace(
        loras={
            k: w.replace(lora_a=w.lora_a.astype(ml_dtypes.float8_e4m3fn))
            for k, w in a.loras.items()
        }
    )
    with pytest.raises(AdapterWeightsError, match="lora_a is float8_e4m3fn; LoRA weights are"):
        M.add_adapter(toy_state(), float8)
    lists = a.replace(loras={k: w.replace(lora_b=w.lora_b.tolist()) for k, w in a.loras.items()})
    with pytest.raises(TypeError, match="lora_b is a list; give a NumPy or JAX array"):
        M.add_adapter(toy_state(), lists)
    with pytest.raises(AdapterMismatchError, match="'empty' \\(id 5\\) holds no LoRA modules"):
        M.add_adapter(toy_state(), LoRAModel(loras={}, id=5, name="empty"))


def test_arguments_of_the_wrong_type_are_type_errors():
    state = M.add_adapter(toy_state(), make_adapter(1))
    for bad in ("1", 1.0, None):
        with pytest.raises(TypeError, match="adapter id"):
            M.activate_adapter(state, bad)
        with pytest.raises(TypeError, match="adapter id"):
            M.pin_adapter(state, bad)
    for bad in ("1", 1.0):
        with pytest.raises(TypeError, match="an adapter id is an int"):
            M.deactivate_adapter(state, bad)
        with pytest.raises(TypeError, match="a batch entry must be .* got"):
            M.prepare_batch(state, [bad], [1])
    with pytest.raises(UnknownAdapterError, match="got -1"):
        M.prepare_batch(state, [-1], [1])
    with pytest.raises(TypeError, match="takes a list of adapters"):
        M.add_adapters(state, make_adapter(2))


def test_re_adding_a_cached_adapter_marks_it_most_recently_used():
    state = jlora.add_adapters(toy_state(max_cpu_loras=2), [make_adapter(1), make_adapter(2)])
    state = M.add_adapter(state, make_adapter(1))
    assert state.lru == (2, 1)
    assert sorted(M.add_adapter(state, make_adapter(3)).cache) == [1, 3]


@pytest.mark.parametrize("source", ["peft", "checkpoint"])
def test_the_loaders_arrays_are_cached_without_a_copy(source, tmp_path):
    # The loaders freeze their read buffer down to its owner, so the cache may keep their views.
    model = jlora.load_adapter(ADAPTERS_DIR / "attn_r8", adapter_id=1)
    if source == "checkpoint":
        model = jlora.restore_adapter(save_adapter(model, tmp_path / "c"))
    cfg = jlora.LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    state = M.add_adapter(M.init_state(cfg, llama_targets()), model)
    assert _shares_arrays(state.cache[1], model)


def test_re_adding_the_same_model_object_compares_no_arrays(monkeypatch):
    a = make_adapter(1)
    for x in jax.tree.leaves(a):
        x.setflags(write=False)
    state = M.add_adapter(toy_state(), a)
    compared = []
    monkeypatch.setattr(M, "_difference", lambda *m: compared.append(m) or "")
    assert M.add_adapter(state, a).cache[1] is state.cache[1] and compared == []
    a.loras.pop("attn.q")  # the caller's dict changed: now another adapter, compared
    M.add_adapter(state, a)
    assert len(compared) == 1


def test_a_relative_path_through_a_symlink_is_read_as_the_filesystem_resolves_it(
    tmp_path, monkeypatch
):
    _copy_fixture("attn_r8", tmp_path / "store" / "attn_r8")
    (tmp_path / "store" / "sub").mkdir()
    (tmp_path / "cwd").mkdir()
    os.symlink(tmp_path / "store" / "sub", tmp_path / "cwd" / "link")
    monkeypatch.chdir(tmp_path / "cwd")
    request = LoRARequest(lora_name="a", lora_int_id=1, lora_path="link/../attn_r8")
    assert jlora.load_adapter(request.path, adapter_id=1)  # link/.. is store/, not cwd/
    cfg = jlora.LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    state = M.activate_adapter(M.init_state(cfg, llama_targets()), request)
    assert state.requests[1].path == os.path.join(tmp_path / "cwd", "link/../attn_r8")
