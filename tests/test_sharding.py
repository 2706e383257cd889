"""Sharded multi-LoRA (jlora.sharding): the reference Llama with a mixed batch of PEFT adapters
gives the single-device logits on (1, 8), (2, 4) and (8, 1) meshes, plain and fully sharded; the
slot banks carry the shardings the issue specifies, and keep them through the manager's writes.

The 8-device runs happen in one subprocess (tests/sharding_worker.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, so this process and the rest of the suite
keep one CPU device; the rules themselves are also checked here, on one device or an abstract
mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import jlora.manager as mgr
from jlora import sharding as sh
from jlora.apply import apply
from jlora.config import LoRAConfig
from jlora.errors import LoRAConfigError
from jlora.mapping import LoRAMapping
from jlora.models.llama import LlamaConfig, LlamaForCausalLM, from_pretrained
from jlora.targets import TargetModule
from jlora.weights import LoRALayerWeights, LoRAModel, model_split_of

WORKER = pathlib.Path(__file__).parent / "sharding_worker.py"
CASES = ["1x8", "1x8-fully", "2x4", "2x4-fully", "8x1", "8x1-fully", "2x4-fully-fused", "4x2"]
CASES += ["4x2-fused", "2x4-fused-g1"]  # fused columns in 2 groups; [q | k | v] on 4 devices
PHASES = ["init", "prepare_batch", "deactivate", "evict", "decode_batch"]
# Logits of the sharded runs against the single-device run: max |diff| / max |logits|.
REL_TOL = 1e-5

# The layout, written out here (not imported from jlora.sharding): column-parallel
# layers (q/k/v, gate/up, and the LM head) keep A replicated and split B on out; row-parallel
# ones (o, down, and the vocab-parallel embedding) split A on in and keep B replicated; fully
# sharded LoRA also splits the column-parallel A on its rank, and the row-parallel B on out.
COLUMN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj")
COLUMN += ("lm_head",)
ROW = ("o_proj", "down_proj", "embed_tokens")
SPLIT_IN, SPLIT_OUT = P(None, "model", None), P(None, None, "model")


def expected_bank_specs(target_name: str, fully: bool) -> list:
    suffix = target_name.rpartition(".")[2]
    if suffix in COLUMN:
        a, b = (SPLIT_OUT if fully else P()), SPLIT_OUT  # [slots, in, r]: split r == dim 2
    elif suffix in ROW:
        a, b = SPLIT_IN, (SPLIT_OUT if fully else P())
    else:
        raise AssertionError(f"unexpected target {target_name}")
    return [str(a), str(b), str(P()), True]  # specs of a, b, scale; on the whole mesh


@pytest.fixture(scope="module")
def report() -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(WORKER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=WORKER.parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout)
    assert result["devices"] == 8
    assert [c["name"] for c in result["cases"]] == CASES
    return result


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> list[dict]:
    """Two processes of four host devices each under ``jax.distributed.initialize`` (Gloo for
    the CPU collectives): the (2, 4) mesh spans both, as it would span two hosts."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("distributed")
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(out / f"{i}.log", "w")) for i in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), "2x4", "--processes", "2", "--process", str(i)]
                + ["--coordinator", f"localhost:{port}", "--out", str(out / f"{i}.json")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=logs[i],
                cwd=WORKER.parent.parent,
            )
            for i in range(2)
        ]
        try:
            codes = [p.wait(timeout=900) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    logs = [
        "\n".join(
            line for line in (out / f"{i}.log").read_text().splitlines() if "[Gloo]" not in line
        )
        for i in range(2)
    ]
    assert codes == [0, 0], [log[-4000:] for log in logs]
    return [json.loads((out / f"{i}.json").read_text()) for i in range(2)]


def case(report, name) -> dict:
    return next(c for c in report["cases"] if c["name"] == name)


# --------------------------------------------------------------------------------------------
# 8 devices (subprocess)
# --------------------------------------------------------------------------------------------


def test_single_device_reference_matches_peft(report):
    expected = load_file(str(FIXTURES / "mixed_batch.safetensors"))["logits"]
    assert report["peft_err"] <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("name", CASES)
def test_sharded_logits_match_single_device(report, name):
    """Prefill of PEFT's mixed batch (seven adapters, base rows) into a KV cache; on the 2-D mesh
    also a decode step after adapter churn."""
    c = case(report, name)
    assert c["prefill_rel_err"] <= REL_TOL
    if (c["mesh"] == [2, 4] and not c["fused"]) or name in ("8x1", "4x2", "4x2-fused"):
        assert c["decode_rel_err"] <= REL_TOL


@pytest.mark.parametrize("name", CASES)
def test_banks_carry_the_specified_shardings_through_manager_writes(report, name):
    """``shard_state`` places every bank array with its specified spec; after activation
    (prepare_batch), deactivation, eviction with and without donation, and re-activation, every
    array still lies on the whole mesh with the same layout. (Same layout, not the same spec
    text: on the (8, 1) mesh a 'model' split is over one device, XLA may report the output of a
    jitted write as P(), and that is the same layout.)"""
    c = case(report, name)
    init = c["banks"]["init"]
    assert len(init) == (10 if c["fused"] else 16)
    for target, slices in init.items():
        assert slices == [[*expected_bank_specs(target, c["fully"]), True]] * len(slices), target
    if c["fused"]:
        assert len(init["model.layers.0.self_attn.qkv_proj"]) == 3
        assert len(init["model.layers.1.mlp.gate_up_proj"]) == 2
    for phase in PHASES[1:]:
        banks = c["banks"][phase]
        assert sorted(banks) == sorted(init)
        for target, slices in banks.items():
            assert all(on_mesh and kept for *_, on_mesh, kept in slices), (phase, target)
            if c["mesh"][1] > 1:  # a real split: the layout pins the spec
                assert [s[:3] for s in slices] == [s[:3] for s in init[target]], (phase, target)


@pytest.mark.parametrize("name", CASES)
def test_logits_and_kv_cache_stay_sharded(report, name):
    c = case(report, name)
    kv_heads = "'model'" if 2 % c["mesh"][1] == 0 else "None"  # 2 KV heads
    cache_spec = f"P('data', {kv_heads}, None, None)"
    assert c["logits_spec"] == str(P("data", None, None))
    assert c["cache_spec_init"] == c["cache_spec"] == cache_spec
    if "decode_cache_spec" in c:
        assert c["decode_cache_spec"] == cache_spec


@pytest.mark.parametrize("name", CASES)
def test_slot_writes_compile_once_per_bank_layout(report, name):
    """About ten slot writes per case: at most one program each for the donating writer and
    the copying writer in each input order (PyTorch's, for the float32 PEFT loads; the banks',
    for the bfloat16 one, converted on the host) and one for the slot clearer; none when an
    earlier case had the same layout."""
    assert case(report, name)["slot_writer_compiles"] <= 5


def nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v and k not in ("rel_err", "in_loops")}


def test_lora_collectives_per_bank_layout(report):
    """One Linear on a (1, 8) mesh, LoRA on top of its base matmul, banks as the manager lays
    them out: the collectives the LoRA adds are the ones its layout calls for, once per layer
    (none inside the block loop: `jlora.ops` runs each device's shard, the collective explicit),
    and the result is right. A row-parallel layer's all-reduce of `h [T, r]` rides in the base
    output's all-reduce (XLA combines the two into one)."""
    got = report["layer_collectives"]
    expected = {
        "column": {},  # y stays split on out, like the base output
        "column-fully": {"all-gather": 1},  # h [T, r] gathered from its rank shards
        "row": {},  # partial h [T, r] summed over the in shards, with the base output
        "row-fully": {},
    }
    for layout, want in expected.items():
        assert nonzero(got[layout]) == want, layout
        assert got[layout]["in_loops"] == 0, layout
        assert got[layout]["rel_err"] <= 1e-6, layout


@pytest.mark.parametrize("name", ["8x1", "8x1-fully"])
def test_data_parallel_steps_need_no_collectives(report, name):
    """With the batch split on ``data`` only, every data shard runs its own rows through the
    whole model: the KV-cache writes stay local (a vmapped per-row write, not one scatter over
    the batch) and so does every LoRA op (each shard sorts its own tokens by slot)."""
    c = case(report, name)
    assert nonzero(c["prefill_collectives"]) == {}
    if "decode_collectives" in c:
        assert nonzero(c["decode_collectives"]) == {}


@pytest.mark.parametrize("name", [c for c in CASES if not c.startswith("8x1")])
def test_tensor_parallel_lora_collectives_run_once_per_layer(report, name):
    """With a `model` axis, each LoRA op runs on each device's shard with its collective
    explicit, so none sits inside the XLA path's block loop (where the partitioner put them,
    once per block: 4 per forward for (2, 4), 26 fully sharded). On the (4, 2) mesh, whose
    model axis divides the KV heads, nothing is resharded either: the step's collectives are
    the base model's (one all-reduce per row-parallel layer, the LoRA's riding with it, and
    the logits' gather), with fused q/k/v and gate/up too when their columns are in groups
    (each device holds whole groups: no column moves between devices)."""
    c = case(report, name)
    for step in ("prefill", "decode"):
        if f"{step}_collectives" in c:
            assert c[f"{step}_collectives"]["in_loops"] == 0, step
            if name in ("4x2", "4x2-fused"):
                assert nonzero(c[f"{step}_collectives"]) == {"all-gather": 1, "all-reduce": 5}


def test_vocab_parallel_embedding_lora_rides_the_base_lookups_all_reduce(report):
    """The embedding's LoRA (vocab-parallel A) is left to XLA's partitioner, which does what a
    hand-written ``shard_map`` would: each device gathers its vocab rows of A (zeros for the
    others) and the ``[T, R]`` partial sums go in the base lookup's own all-reduce, so the LoRA
    adds no collective (fully sharded on a (2, 4) mesh adds small reshards: see docs)."""
    for mesh, layouts in report["embedding_collectives"].items():
        for layout, result in layouts.items():
            assert result["rel_err"] <= 1e-6, (mesh, layout)
            assert result["in_loops"] == 0, (mesh, layout)
            if (mesh, layout) == ("2x4", "fully"):  # measured: 3 (a [T] mask, [T/2, R] blocks)
                assert sum(nonzero(result).values()) <= 3, result
            else:
                assert nonzero(result) == {}, (mesh, layout)


def test_lora_ops_run_per_data_shard(report):
    """``add_lora`` (XLA path, and the Pallas kernels in interpret mode), prefill and decode,
    token rows and sequence rows, and ``add_lora_embedding``, on rows split over 8 data shards:
    the one-device result (float64 reference on random inputs), with no collectives. Also
    called eagerly on sharded arrays (one compiled program: later calls compile nothing), and
    inside a caller's own ``shard_map`` over ``data``."""
    got = report["data_parallel_ops"]
    impls, steps, rows = ("xla", "pallas"), ("prefill", "decode"), ("tokens", "seqs")
    keys = {f"{i}/{s}/{r}" for i in impls for s in steps for r in rows}
    keys |= {"embedding", "embedding/eager", "xla/eager", "xla/in_user_shard_map"}
    assert set(got) == keys
    for key, result in got.items():
        assert result["rel_err"] <= 1e-6, key
        assert nonzero(result) == {}, key


def check_sharded_loading(loading: dict, local_shards: dict[str, int]) -> None:
    """Each parameter ``from_pretrained(mesh=...)`` built equals (bitwise, on this process's
    devices, in the dtype asked for) and is laid out as ``shard_model(from_pretrained(...))``'s,
    and was read from the checkpoint one shard at a time, each of this process's distinct
    shards once (replicas over ``data`` share a read): ``local_shards`` per loading case, how
    many distinct shards of a weight split over ``model`` this process's devices hold."""
    assert sorted(loading) == sorted(local_shards)
    for name, local in local_shards.items():
        model = int(name.split("-")[0].split("x")[1])
        for param, p in loading[name].items():
            assert p["equal"] and p["same_sharding"], (name, param)
            assert p["dtype"] == ("bfloat16" if "bf16" in name else "float32"), (name, param)
            split = "norm" not in param  # Megatron style: only the norms stay replicated
            assert ("'model'" in p["spec"]) == split, (name, param, p["spec"])
            assert p["distinct_shards"] == (local if split else 1), (name, param)
            block = p["size"] // model if split else p["size"]
            assert p["reads"] == [block] * p["distinct_shards"], (name, param)


def test_from_pretrained_on_a_mesh_reads_each_device_shard(report):
    check_sharded_loading(
        report["sharded_loading"],
        {"1x8": 8, "1x8-fused": 8, "2x4": 4, "2x4-fused": 4, "2x4-bf16-files": 4},
    )


def test_two_processes_under_jax_distributed(distributed):
    """The same code as one process with 8 devices, as two processes (hosts) with 4 each: the
    mesh puts ``data`` across the processes and ``model`` within each; both processes' host
    bookkeeping takes the same slots; the logits equal one device's; the banks keep their
    shardings through the manager's writes; ``from_pretrained(mesh=...)`` reads each process's
    shards only."""
    assert [r["process"] for r in distributed] == [0, 1]
    cases = [r["cases"] for r in distributed]
    assert [[c["name"] for c in cs] for cs in cases] == [["2x4-fully"]] * 2
    first, second = cases[0][0], cases[1][0]
    assert first["mesh_processes"] == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert first["slots"] == second["slots"]
    for c in (first, second):
        assert c["prefill_rel_err"] <= REL_TOL and c["decode_rel_err"] <= REL_TOL
        assert c["logits_spec"] == str(P("data", None, None))
        for target, slices in c["banks"]["init"].items():
            assert slices == [[*expected_bank_specs(target, True), True]] * len(slices)
        for phase in PHASES[1:]:
            for target, slices in c["banks"][phase].items():
                assert [s[:3] for s in slices] == [s[:3] for s in c["banks"]["init"][target]]
                assert all(on_mesh and kept for *_, on_mesh, kept in slices), (phase, target)
    for r in distributed:  # 2x4: a process's 4 devices are one data row, every model shard;
        # 1x8: they are half the model axis, and the process reads only their 4 blocks.
        check_sharded_loading(
            r["sharded_loading"], {"2x4": 4, "2x4-fused": 4, "1x8": 4, "1x8-fused": 4}
        )


def test_one_device_banks_have_no_mesh(report):
    for phase in PHASES:
        for slices in report["single_banks"][phase].values():
            assert all(spec == ["None", "None", "None", True, True] for spec in slices)


# --------------------------------------------------------------------------------------------
# The rules, on one device or an abstract mesh
# --------------------------------------------------------------------------------------------


def abstract_mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def target(name: str, in_dim: int = 64, out_dims=(64,)) -> TargetModule:
    peft_names = tuple(f"{name}.{i}" for i in range(len(out_dims)))
    return TargetModule(name=name, in_dim=in_dim, out_dims=out_dims, peft_names=peft_names)


def toy_adapter(targets) -> LoRAModel:
    rng = np.random.default_rng(0)
    loras = {
        peft: LoRALayerWeights(
            lora_a=rng.standard_normal((t.in_dim, 2), np.float32),
            lora_b=rng.standard_normal((2, out), np.float32),
            module_name=peft,
        )
        for t in targets
        for peft, out in zip(t.peft_names, t.out_dims, strict=True)
    }
    return LoRAModel(loras=loras, id=1, name="toy")


def test_bank_specs_follow_the_style_table():
    targets = [target("l.q_proj"), target("l.o_proj"), target("l.norm_proj")]
    styles = {"l.q_proj": sh.COLUMN, "l.o_proj": sh.ROW, "l.norm_proj": sh.REPLICATED}
    for fully in (False, True):
        specs = sh.bank_specs(targets, styles, fully_sharded=fully)
        for t in targets[:2]:
            (bank,) = specs[t.name]
            assert [str(bank.a), str(bank.b), str(bank.scale), True] == expected_bank_specs(
                t.name, fully
            )
        (bank,) = specs["l.norm_proj"]
        assert (bank.a, bank.b, bank.scale) == (P(), P(), P())
    # Without styles: the Llama names.
    assert (
        sh.bank_specs([target("model.layers.0.mlp.down_proj")])["model.layers.0.mlp.down_proj"][0].a
        == SPLIT_IN
    )


def test_llama_param_specs_are_megatron_style():
    for fuse in (False, True):
        model = from_pretrained(FIXTURES / "tiny_llama", fuse_qkv=fuse, fuse_gate_up=fuse)
        flat = nnx.to_flat_state(sh.llama_param_specs(model))
        specs = {".".join(map(str, path)): spec for path, spec in flat}
        assert len(specs) == 21 - (6 if fuse else 0)
        for name, spec in specs.items():
            module = name.split(".")[-2]
            if module in COLUMN:
                want = P(None, "model")
            elif module in ROW:
                want = P("model", None)
            else:
                assert module.endswith("norm") or module == "model", name
                want = P()
            assert spec == want, name


def test_fused_projections_split_over_model_are_warned_about(caplog, monkeypatch):
    fused = from_pretrained(FIXTURES / "tiny_llama", fuse_qkv=True).config
    with caplog.at_level(logging.WARNING, logger="jlora.sharding"):
        assert sh.warn_if_fused_split(fused, abstract_mesh(2, 4))
        assert "fuse_qkv with fused_groups=1 split over model=4 devices" in caplog.text
        caplog.clear()
        both = dataclasses.replace(fused, fuse_gate_up=True)
        assert sh.warn_if_fused_split(both, abstract_mesh(1, 8))
        assert "fuse_qkv and fuse_gate_up with fused_groups=1 split over model=8" in caplog.text
        caplog.clear()
        # Column groups that the model axis does not divide still cut across slices.
        assert sh.warn_if_fused_split(
            dataclasses.replace(both, fused_groups=4), abstract_mesh(1, 8)
        )
        assert "fused_groups=4 split over model=8" in caplog.text
        caplog.clear()
        # Whole groups per device: nothing moves, nothing to say.
        for groups, mesh in ((4, (2, 4)), (8, (2, 4)), (8, (1, 8)), (2, (4, 2))):
            grouped = dataclasses.replace(both, fused_groups=groups)
            assert not sh.warn_if_fused_split(grouped, abstract_mesh(*mesh)), (groups, mesh)
        # Data-parallel only, or nothing fused, or no config at all: nothing to say.
        assert not sh.warn_if_fused_split(both, abstract_mesh(8, 1))
        assert not sh.warn_if_fused_split(
            dataclasses.replace(fused, fuse_qkv=False), abstract_mesh(2, 4)
        )
        assert not sh.warn_if_fused_split(None, abstract_mesh(2, 4))
        assert not caplog.text
    # Both ways of placing a model on a mesh ask.
    seen = []
    monkeypatch.setattr(
        sh, "warn_if_fused_split", lambda config, mesh: seen.append(config.fuse_qkv)
    )
    mesh = sh.make_mesh(1, 1, devices=jax.devices()[:1])
    sh.shard_model(from_pretrained(FIXTURES / "tiny_llama", fuse_qkv=True), mesh)
    from_pretrained(FIXTURES / "tiny_llama", mesh=mesh)
    assert seen == [True, False]


def test_mesh_loading_groups_fused_columns_only_when_every_slice_divides(caplog):
    """`from_pretrained(mesh=...)`'s default `fused_groups` (the 8-device loads are in the
    worker): the `model` axis size when the fused slices divide by it, else 1, then warned."""
    from jlora.models.llama import _groups_for_mesh

    hf = json.loads((FIXTURES / "tiny_llama" / "config.json").read_text())
    fused = LlamaConfig.from_hf(hf, fuse_qkv=True, fuse_gate_up=True)  # q 64, kv 32, mlp 176
    for mesh, groups in (((2, 4), 4), ((1, 8), 8), ((8, 1), 1), ((4, 2), 2)):
        assert _groups_for_mesh(fused, abstract_mesh(*mesh)).fused_groups == groups, mesh
    unfused = LlamaConfig.from_hf(hf)
    assert _groups_for_mesh(unfused, abstract_mesh(1, 8)) is unfused
    # One KV head of 4: k and v (4 columns each) do not divide by 8, the fused kernel (24) and
    # every other split dim do; the load keeps [q | k | v] and says the columns will move.
    narrow = LlamaConfig.from_hf(
        hf | {"num_key_value_heads": 1, "head_dim": 4}, fuse_qkv=True, fuse_gate_up=True
    )
    mesh = abstract_mesh(1, 8)
    kept = _groups_for_mesh(narrow, mesh)
    assert kept is narrow and kept.fused_groups == 1
    assert _groups_for_mesh(narrow, abstract_mesh(1, 4)).fused_groups == 4  # 4 divides 4
    with caplog.at_level(logging.WARNING, logger="jlora.sharding"):
        assert sh.warn_if_fused_split(kept, mesh)
    assert "fused_groups=1 split over model=8" in caplog.text


def test_layer_styles_are_read_from_the_placed_kernels():
    mesh = sh.make_mesh(1, 1, devices=jax.devices()[:1])
    base = from_pretrained(FIXTURES / "tiny_llama")
    placed = apply(sh.shard_model(base, mesh))
    styles = sh.layer_styles(placed)
    assert len(styles) == 16
    for name, style in styles.items():
        suffix = name.rpartition(".")[2]
        assert style == (sh.COLUMN if suffix in COLUMN else sh.ROW), name
    # Unplaced kernels, or kernels replicated over the mesh: replicated banks.
    assert set(sh.layer_styles(apply(base)).values()) == {sh.REPLICATED}
    replicated = jax.tree.map(lambda _: P(), sh.llama_param_specs(base))
    assert set(sh.layer_styles(apply(sh.shard_model(base, mesh, replicated))).values()) == {
        sh.REPLICATED
    }
    # The input model is left as it was.
    assert not isinstance(base.lm_head.kernel[...].sharding, jax.sharding.NamedSharding)


def test_shard_state_and_manager_writes_on_a_one_device_mesh():
    """In this process: placement, then writes that keep the banks on the mesh (the 8-device
    runs check the same through real splits)."""
    mesh = sh.make_mesh(1, 1, devices=jax.devices()[:1])
    targets = [target("l.q_proj", out_dims=(8, 4)), target("l.o_proj", in_dim=12, out_dims=(8,))]
    state = mgr.init_state(LoRAConfig(max_loras=2, max_lora_rank=4), targets)
    shardings = sh.bank_shardings(targets, mesh, fully_sharded=True)
    placed = sh.shard_state(state, shardings)
    assert sh.bank_specs_of(placed.banks) == sh.bank_specs(targets, fully_sharded=True)
    assert sh.bank_specs_of(state.banks)["l.q_proj"][0].a is None  # the input is unchanged
    assert placed.slots == state.slots and placed.layout is state.layout

    adapter = toy_adapter(targets)
    placed = mgr.activate_adapter(mgr.add_adapter(placed, adapter), adapter.id)
    slot = placed.slot_of(adapter.id)
    a = np.asarray(placed.banks["l.o_proj"][0].a[slot])
    np.testing.assert_array_equal(a[:, :2], adapter.loras["l.o_proj.0"].lora_a)
    # The banks' static split over `model` (what jlora.ops reads under a jit) comes with the
    # placement and survives every kind of write; the unplaced state has none.
    splits = {"l.q_proj": ("rank", "out"), "l.o_proj": ("in", "out")}
    fresh = mgr.init_state(LoRAConfig(max_loras=2, max_lora_rank=4), targets, shardings=shardings)
    for written in (placed, mgr.deactivate_adapter(placed, adapter.id), fresh):
        for name, banks in written.banks.items():
            assert [b.model_split for b in banks] == [splits[name]] * len(banks), name
            for bank, sharding in zip(banks, shardings[name], strict=True):
                for x, s in zip(jax.tree.leaves(bank), jax.tree.leaves(sharding), strict=True):
                    assert x.sharding.mesh == mesh and x.sharding.is_equivalent_to(s, x.ndim)
    assert {b.model_split for banks in state.banks.values() for b in banks} == {()}


def test_model_split_names_the_layouts_jlora_ops_serves_per_device():
    column, row = [target("l.q_proj")], [target("l.o_proj")]
    for targets, fully, want in (
        (column, False, ("out",)),
        (column, True, ("rank", "out")),
        (row, False, ("in",)),
        (row, True, ("in", "out")),
        ([target("l.norm_proj")], False, ()),
    ):
        (bank,) = sh.bank_specs(targets, {targets[0].name: _style(targets[0])},
                                fully_sharded=fully)[targets[0].name]  # fmt: skip
        assert model_split_of(bank.a, bank.b) == want, (targets[0].name, fully)
    # Layouts it does not serve per device (the partitioner places those): another axis, the
    # slot dim, B's rank, A split on both in and rank.
    for a, b in (
        (P("data", None, None), P()),
        (P(None, "model", None), P("model", None, None)),
        (P(), P(None, "model", None)),
        (P(None, "model", "model"), P()),
        (P(None, ("data", "model"), None), P()),
    ):
        assert model_split_of(a, b) is None, (a, b)


def _style(t: TargetModule) -> str:
    return {"q_proj": sh.COLUMN, "o_proj": sh.ROW}.get(t.name.rpartition(".")[2], sh.REPLICATED)


def test_batch_and_cache_shardings():
    mesh = abstract_mesh(2, 4)
    mapping = LoRAMapping.build([1, 0, 1], [3, 2, 1], num_slots=2, num_tokens=16, num_seqs=3)
    specs = sh.mapping_shardings(mapping, mesh)
    assert specs.token_slots.spec == P("data")  # 16 tokens over 2
    assert specs.seq_slots.spec == P()  # 3 rows do not split over 2
    assert specs.sorted_token_ids.spec == specs.slot_counts.spec == P()
    config = LlamaConfig.from_hf(json.loads((FIXTURES / "tiny_llama" / "config.json").read_text()))
    cache = sh.kv_cache_shardings(config, mesh)
    assert len(cache.k) == len(cache.v) == config.num_hidden_layers
    assert {s.spec for s in cache.k + cache.v} == {P("data", None, None, None)}
    cache = sh.kv_cache_shardings(config, abstract_mesh(4, 2))
    assert {s.spec for s in cache.k + cache.v} == {P("data", "model", None, None)}
    assert sh.batch_sharding(mesh, 2).spec == P("data", None)


def test_layouts_a_mesh_cannot_hold_raise_before_placing_anything():
    mesh = abstract_mesh(1, 8)
    with pytest.raises(LoRAConfigError, match=r"up_proj\.0 LoRA B: dim 2 \(100\).*'model' of 8"):
        sh.bank_shardings([target("l.up_proj", out_dims=(100,))], mesh)
    with pytest.raises(LoRAConfigError, match=r"LoRA A: dim 1 \(12\)"):
        sh.bank_shardings([target("l.o_proj", in_dim=12)], mesh)
    even = [target("l.up_proj")]
    state = mgr.init_state(LoRAConfig(max_loras=1, max_lora_rank=12), even)
    with pytest.raises(LoRAConfigError, match=r"dim 2 \(12\).*max_lora_rank a multiple"):
        sh.shard_state(state, sh.bank_shardings(even, mesh, fully_sharded=True))
    with pytest.raises(LoRAConfigError, match=r"no shardings .* 'l\.up_proj'"):
        sh.shard_state(state, {})
    small = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    with pytest.raises(LoRAConfigError, match=r"mlp\.down_proj\.kernel: dim 0 \(100\)"):
        sh.shard_model(LlamaForCausalLM(small, rngs=nnx.Rngs(0)), mesh)
    with pytest.raises(LoRAConfigError, match=r"\(data=2, model=4\) mesh needs 8 devices, 1"):
        sh.make_mesh(2, 4, devices=jax.devices()[:1])
    for data, model in [(1.0, 1), (True, None), (1, True), ("1", 1)]:
        with pytest.raises(TypeError, match=r"make_mesh: (data|model) must be an int"):
            sh.make_mesh(data, model, devices=jax.devices()[:1])
    mapping = LoRAMapping.build([1], [2], num_slots=2)
    with pytest.raises(TypeError, match="shard_batch: batch array 1 is a list; pass a NumPy"):
        sh.shard_batch(mesh, mapping, np.zeros((1, 2), np.int32), [[0, 1]])
    with pytest.raises(LoRAConfigError, match="shard_batch: batch array 0 is 0-d"):
        sh.shard_batch(mesh, mapping, np.array(3, np.int32))
    with pytest.raises(LoRAConfigError, match=r"style 'diagonal'"):
        sh.bank_specs(even, {"l.up_proj": "diagonal"})


def test_meshes_and_shardings_jlora_cannot_use_are_named():
    from jlora.errors import AdapterMismatchError

    even = [target("l.up_proj")]
    wrong_names = AbstractMesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    explicit = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    mapping = LoRAMapping.build([1, 0], [1, 1], num_slots=2, num_tokens=16, num_seqs=2)
    config = LlamaConfig.from_hf(json.loads((FIXTURES / "tiny_llama" / "config.json").read_text()))
    for mesh, fragment in ((wrong_names, "not \\['data', 'model'\\]"), (explicit, "AxisType.Auto")):
        for call, arg in (
            (sh.bank_shardings, even),
            (sh.mapping_shardings, mapping),
            (sh.kv_cache_shardings, config),
        ):
            with pytest.raises(LoRAConfigError, match=fragment):
                call(arg, mesh)
    # init_state checks its shardings before allocating, as shard_state does.
    mesh = abstract_mesh(1, 8)
    cfg = LoRAConfig(max_loras=1, max_lora_rank=12)
    fully = sh.bank_shardings(even, mesh, fully_sharded=True)
    with pytest.raises(LoRAConfigError, match=r"up_proj\.0 LoRA a .*max_lora_rank a multiple"):
        mgr.init_state(cfg, even, shardings=fully)
    with pytest.raises(AdapterMismatchError, match=r"1 slices .* 0 bank shardings"):
        mgr.init_state(cfg, even, shardings={"l.up_proj": ()})
    with pytest.raises(LoRAConfigError, match="bank_specs gives PartitionSpecs"):
        mgr.init_state(cfg, even, shardings=sh.bank_specs(even))
    state = mgr.init_state(cfg, even)
    with pytest.raises(AdapterMismatchError, match=r"\['l\.other'\] the state does not have"):
        sh.shard_state(state, {**fully, "l.other": fully["l.up_proj"]})
