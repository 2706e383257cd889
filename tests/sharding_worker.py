"""Runs the sharded Llama + multi-LoRA cases on 8 host devices and prints a JSON report on stdout.

Started by tests/test_sharding.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, so the rest of the suite keeps its single
CPU device. It measures and records; the assertions live in test_sharding.py, which checks the
recorded specs against its own table (not against jlora.sharding's).

Usage: ``python tests/sharding_worker.py [DATAxMODEL ...]`` (default: 1x8 2x4 8x1). With
``--processes N --process I --coordinator HOST:PORT`` it is process I of N under
``jax.distributed.initialize`` (start all N; each sees its own host devices), and runs the fully
sharded case on the global mesh.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from compile_counter import CompileCounter  # noqa: E402
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import load_file

import jlora.manager as mgr
from jlora import sharding as sh
from jlora.apply import apply, find_targets
from jlora.config import LoRAConfig
from jlora.context import lora_context, padded_batch_mapping
from jlora.loader import load_adapter
from jlora.models.llama import KVCache, from_pretrained

warnings.simplefilter("error")  # as the test suite: a "donated buffers were not usable" fails
jax.config.update("jax_default_matmul_precision", "highest")
START = time.perf_counter()

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MIXED = load_file(str(FIXTURES / "mixed_batch.safetensors"))
META = json.loads((FIXTURES / "mixed_batch.json").read_text())
ADAPTERS = META["adapters_loaded"]  # adapter id = index + 1
MAX_LEN = 16
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def cache_spec(cache) -> str:
    """The one spec every layer's K and V share (a mix is reported as such)."""
    specs = {str(x.sharding.spec) for x in cache.k + cache.v}
    return specs.pop() if len(specs) == 1 else f"mixed {sorted(specs)}"


def mixed_batch():
    """PEFT's mixed batch (10 rows: seven adapters, two base rows), padded to 16 rows with more
    adapter rows so every data-axis size (1, 2, 8) divides it."""
    ids = np.asarray(MIXED["input_ids"])
    names = META["adapter_names"]
    ids = np.concatenate([ids, ids[:6][::-1]])
    names = names + names[3:9]
    requests = [None if n == "__base__" else ADAPTERS.index(n) + 1 for n in names]
    return ids, requests


def bank_report(state, mesh, init: dict | None = None) -> dict:
    """Per target, per slice: the specs of a, b and scale; whether all three are laid out on the
    whole mesh (not moved to one device); and whether each lays its data over the devices as the
    same array did in ``init`` (the shardings ``shard_state`` placed). That last one is sharding
    equivalence, not spec equality: on a mesh axis of size 1, ``P(None, 'model', None)`` and
    ``P()`` are the same layout, and XLA may report either for a jitted write's output."""
    specs = sh.bank_specs_of(state.banks)
    out = {}
    for name, banks in state.banks.items():
        rows = []
        for k, (bank, spec) in enumerate(zip(banks, specs[name], strict=True)):
            arrays = (bank.a, bank.b, bank.scale)
            on_mesh = all(mesh is None or getattr(x.sharding, "mesh", None) == mesh for x in arrays)
            kept = init is None or all(
                x.sharding.is_equivalent_to(sharding, x.ndim)
                for x, sharding in zip(arrays, init[name][k], strict=True)
            )
            rows.append([str(spec.a), str(spec.b), str(spec.scale), on_mesh, kept])
        out[name] = rows
    return out


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def collectives(compiled) -> dict[str, int]:
    """Collective ops in a compiled program, by kind (``-start`` async forms counted once), and
    how many of them sit in the body of a while loop (they then run once per iteration)."""
    text = compiled.as_text()
    loop_bodies = set(re.findall(r"body=(%[\w.\-]+)", text))
    counts = dict.fromkeys(COLLECTIVES, 0)
    counts["in_loops"] = 0
    computation = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
        if header:
            computation = header.group(1)
        # The op name after the result type (a tuple type of an async start holds spaces).
        op = re.search(rf"= .*?\b({'|'.join(COLLECTIVES)})(?:-start)?\(", line)
        if op:
            counts[op.group(1)] += 1
            counts["in_loops"] += computation in loop_bodies
    return counts


def run_case(base, adapters, mesh, *, fully: bool, decode: bool) -> dict:
    """The mixed batch through a prefill into a KV cache, adapter churn between steps, then (with
    ``decode``) a decode step; on one device when ``mesh`` is None."""
    ids, requests = mixed_batch()
    rows, length = ids.shape
    model = apply(base if mesh is None else sh.shard_model(base, mesh))
    targets = find_targets(model)
    config = LoRAConfig(
        max_loras=len(adapters), max_cpu_loras=16, max_lora_rank=16, fully_sharded_loras=fully
    )
    report: dict = {"banks": {}}
    if mesh is None:
        state = mgr.init_state(config, targets)
    else:
        styles = sh.layer_styles(model)
        report["styles"] = styles
        shardings = sh.bank_shardings(targets, mesh, styles, fully_sharded=fully)
        # Plain LoRA: banks created in place on the mesh; fully sharded: placed afterwards.
        if fully:
            state = sh.shard_state(mgr.init_state(config, targets), shardings)
        else:
            state = mgr.init_state(config, targets, shardings=shardings)
    report["banks"]["init"] = bank_report(state, mesh)
    init = {
        name: [(b.a.sharding, b.b.sharding, b.scale.sharding) for b in banks]
        for name, banks in state.banks.items()
    }

    graphdef, params = nnx.split(model)

    def step(params, banks, mapping, ids, positions, cache):
        with lora_context(banks, mapping):
            return nnx.merge(graphdef, params)(ids, positions, kv_cache=cache)

    if mesh is None:
        forward = jax.jit(step)
        cache = KVCache.zeros(base.config, batch_size=rows, max_len=MAX_LEN)

        def place(mapping, *arrays):
            return (mapping, *arrays)

    else:
        out_shardings = (sh.batch_sharding(mesh, 3), sh.kv_cache_shardings(base.config, mesh))
        forward = jax.jit(step, out_shardings=out_shardings)
        cache = sh.kv_cache_zeros(base.config, mesh, batch_size=rows, max_len=MAX_LEN)
        report["cache_spec_init"] = cache_spec(cache)

        def place(mapping, *arrays):
            return sh.shard_batch(mesh, mapping, *arrays)

    with CompileCounter() as compiles:
        for adapter in adapters:
            state = mgr.add_adapter(state, adapter)
        state, mapping = mgr.prepare_batch(
            state, requests, [length] * rows, num_tokens=rows * length, num_seqs=rows
        )
        report["banks"]["prepare_batch"] = bank_report(state, mesh, init)

        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
        mapping, ids_in, pos_in = place(mapping, ids, positions)
        args = (params, state.banks, mapping, ids_in, pos_in, cache)
        t = time.perf_counter()
        compiled = forward.lower(*args).compile()
        report["prefill_compile_s"] = time.perf_counter() - t
        report["prefill_collectives"] = collectives(compiled)
        logits, cache = compiled(*args)
        report["prefill_logits"] = to_host(logits)
        report["logits_spec"] = str(logits.sharding.spec) if mesh is not None else None
        report["cache_spec"] = cache_spec(cache) if mesh is not None else None

        # Churn between steps: free a slot, fill it, evict the least recently used adapter into
        # another, with donation (the default) and without.
        state = mgr.deactivate_adapter(state, 2)
        report["banks"]["deactivate"] = bank_report(state, mesh, init)
        extra = [adapters[0].clone(len(adapters) + 1), adapters[3].clone(len(adapters) + 2)]
        for adapter in extra:
            state = mgr.add_adapter(state, adapter)
        state = mgr.activate_adapter(state, extra[0].id)  # takes the freed slot
        state = mgr.activate_adapter(state, extra[1].id, donate=False)  # evicts the LRU
        report["banks"]["evict"] = bank_report(state, mesh, init)

        # Decode one token per row at position `length`; re-activates the evicted adapters.
        state, decode_mapping = mgr.prepare_batch(
            state, requests, [1] * rows, is_prefill=False, num_tokens=rows, num_seqs=rows
        )
        report["banks"]["decode_batch"] = bank_report(state, mesh, init)
    report["slot_writer_compiles"] = sum(
        n for name, n in compiles.counts.items() if "write_slot" in name or "clear_slots" in name
    )
    if decode:
        decode_mapping, tok_in, pos_in = place(
            decode_mapping, ids[:, :1], np.full((rows, 1), length, np.int32)
        )
        args = (params, state.banks, decode_mapping, tok_in, pos_in, cache)
        compiled = forward.lower(*args).compile()
        report["decode_collectives"] = collectives(compiled)
        logits, cache = compiled(*args)
        report["decode_logits"] = to_host(logits)
        report["decode_cache_spec"] = cache_spec(cache) if mesh is not None else None
    report["slots"] = list(state.slots)  # the host bookkeeping's final slot table
    return report


def layer_collectives(mesh) -> dict:
    """One Linear wrapped by jlora.apply, its kernel column- or row-parallel, jitted on the mesh:
    the collectives XLA inserts for the LoRA of each bank layout."""
    out = {}
    t, d_in, d_out, rank = 64, 64, 128, 16
    rng = np.random.default_rng(0)
    for style in (sh.COLUMN, sh.ROW):
        for fully in (False, True):
            layer = nnx.Linear(d_in, d_out, use_bias=False, rngs=nnx.Rngs(0))
            kernel_spec = jax.P(None, sh.MODEL) if style == sh.COLUMN else jax.P(sh.MODEL, None)
            layer.kernel.set_value(
                jax.device_put(layer.kernel[...], jax.NamedSharding(mesh, kernel_spec))
            )
            wrapped = apply(layer)
            (target,) = find_targets(wrapped)
            shardings = sh.bank_shardings(
                [target], mesh, sh.layer_styles(wrapped), fully_sharded=fully
            )
            state = mgr.init_state(
                LoRAConfig(max_loras=3, max_lora_rank=rank), [target], shardings=shardings
            )
            banks = {  # random weights, laid out as the manager's banks are
                target.name: tuple(
                    bank.replace(
                        **{
                            k: jax.device_put(v, getattr(bank, k).sharding)
                            for k, v in (
                                ("a", rng.standard_normal(bank.a.shape).astype(np.float32)),
                                ("b", rng.standard_normal(bank.b.shape).astype(np.float32)),
                                ("scale", np.asarray([0.0, 1.0, 2.0, 0.5], np.float32)),
                            )
                        }
                    )
                    for bank in state.banks[target.name]
                )
            }
            mapping = padded_batch_mapping([1, 0, 2, 3] * 4, t // 16, num_slots=4)
            graphdef, params = nnx.split(wrapped)

            def step(params, banks, mapping, x, graphdef=graphdef):
                with lora_context(banks, mapping):
                    return nnx.merge(graphdef, params)(x)

            x = jnp.asarray(rng.standard_normal((t, d_in)), jnp.float32)
            x_spec = jax.P(sh.DATA, sh.MODEL if style == sh.ROW else None)
            args = (
                params,
                banks,
                jax.device_put(mapping, sh.mapping_shardings(mapping, mesh)),
                jax.device_put(x, jax.NamedSharding(mesh, x_spec)),
            )
            compiled = jax.jit(step).lower(*args).compile()
            base = jax.jit(lambda params, x, g=graphdef: nnx.merge(g, params)(x))
            base_compiled = base.lower(params, args[3]).compile()
            with_lora, without = collectives(compiled), collectives(base_compiled)
            key = f"{style}{'-fully' if fully else ''}"
            out[key] = {k: with_lora[k] - without[k] for k in (*COLLECTIVES, "in_loops")}
            (bank,) = jax.device_get(banks[target.name])
            xs, slots = np.asarray(x, np.float64), np.asarray(mapping.token_slots)
            expected = xs @ np.asarray(layer.kernel[...], np.float64)
            for i, s in enumerate(slots):
                expected[i] += bank.scale[s] * (xs[i] @ bank.a[s] @ bank.b[s])
            got = np.asarray(compiled(*args))
            out[key]["rel_err"] = float(np.abs(got - expected).max() / np.abs(expected).max())
    return out


def embedding_collectives(mesh) -> dict:
    """An ``nnx.Embed`` wrapped by jlora.apply, vocab-parallel (its table split on vocab), jitted
    on the mesh, plain and fully sharded LoRA: the collectives the LoRA adds to the base lookup,
    and its error against a float64 reference."""
    out = {}
    t, vocab, hidden, rank = 64, 128, 64, 16
    rng = np.random.default_rng(2)
    for fully in (False, True):
        embed = nnx.Embed(vocab, hidden, rngs=nnx.Rngs(0))
        table = jax.NamedSharding(mesh, jax.P(sh.MODEL, None))
        embed.embedding.set_value(jax.device_put(embed.embedding[...], table))
        wrapped = apply(embed)
        (target,) = find_targets(wrapped)
        shardings = sh.bank_shardings([target], mesh, sh.layer_styles(wrapped), fully_sharded=fully)
        state = mgr.init_state(
            LoRAConfig(max_loras=3, max_lora_rank=rank), [target], shardings=shardings
        )
        (bank,) = state.banks[target.name]
        bank = bank.replace(
            a=jax.device_put(rng.standard_normal(bank.a.shape).astype(np.float32), bank.a.sharding),
            b=jax.device_put(rng.standard_normal(bank.b.shape).astype(np.float32), bank.b.sharding),
            scale=jax.device_put(np.asarray([0.0, 1.0, 2.0, 0.5], np.float32), bank.scale.sharding),
        )
        banks = {target.name: (bank,)}
        mapping = padded_batch_mapping([1, 0, 2, 3] * 4, t // 16, num_slots=4)
        graphdef, params = nnx.split(wrapped)

        def step(params, banks, mapping, ids, graphdef=graphdef):
            with lora_context(banks, mapping):
                return nnx.merge(graphdef, params)(ids)

        ids = jax.device_put(
            jnp.asarray(rng.integers(0, vocab, t), jnp.int32),
            jax.NamedSharding(mesh, jax.P(sh.DATA)),
        )
        args = (params, banks, jax.device_put(mapping, sh.mapping_shardings(mapping, mesh)), ids)
        compiled = jax.jit(step).lower(*args).compile()
        base = jax.jit(lambda params, ids, g=graphdef: nnx.merge(g, params)(ids))
        with_lora, without = collectives(compiled), collectives(base.lower(params, ids).compile())
        key = "fully" if fully else "plain"
        out[key] = {k: with_lora[k] - without[k] for k in (*COLLECTIVES, "in_loops")}
        (host,) = jax.device_get(banks[target.name])
        tokens, slots = np.asarray(ids), np.asarray(mapping.token_slots)
        expected = np.asarray(embed.embedding[...], np.float64)[tokens]
        for i, s in enumerate(slots):
            expected[i] += host.scale[s] * (host.a[s, tokens[i]].astype(np.float64) @ host.b[s])
        got = np.asarray(compiled(*args))
        out[key]["rel_err"] = float(np.abs(got - expected).max() / np.abs(expected).max())
    return out


def data_parallel_ops(mesh) -> dict:
    """`add_lora` (XLA path and the Pallas kernels in interpret mode, prefill and decode, one row
    per token and one per sequence) and `add_lora_embedding` with the rows split on `data`:
    each data shard serves its own rows, with no collectives, and gets the one-device result."""
    from jlora import ops
    from jlora.mapping import LoRAMapping
    from jlora.weights import LoRABank

    rng = np.random.default_rng(1)
    seqs, length, slots, d_in, d_out, rank = 16, 4, 5, 32, 24, 8
    bank = LoRABank(
        a=jnp.asarray(rng.standard_normal((slots, d_in, rank)), jnp.float32),
        b=jnp.asarray(rng.standard_normal((slots, rank, d_out)), jnp.float32),
        scale=jnp.asarray([0.0, 1.0, 0.5, 2.0, 0.25], jnp.float32),
    )
    # Shards of 2 sequences each: some hold one adapter, some base rows, some a mix.
    seq_slots = [1, 1, 0, 0, 2, 3, 4, 1, 3, 3, 0, 2, 4, 4, 2, 1]
    rows = jax.NamedSharding(mesh, jax.P(sh.DATA))
    out = {}
    for prefill in (True, False):
        lengths = [length if prefill else 1] * seqs
        mapping = LoRAMapping.build(seq_slots, lengths, num_slots=slots, is_prefill=prefill)
        for what in ("tokens", "seqs"):
            n = mapping.token_slots.shape[0] if what == "tokens" else seqs
            x = rng.standard_normal((n, d_in)).astype(np.float32)
            y = rng.standard_normal((n, d_out)).astype(np.float32)
            slot_of = np.asarray(mapping.token_slots if what == "tokens" else mapping.seq_slots)
            a, b, scale = (np.asarray(v, np.float64) for v in (bank.a, bank.b, bank.scale))
            expected = y + np.stack(
                [scale[s] * (x[i] @ a[s] @ b[s]) for i, s in enumerate(slot_of)]
            )
            for impl in ("xla", "pallas"):
                config = ops.OpsConfig(interpret=True)
                fn = jax.jit(
                    lambda y, x, m, impl=impl, c=config: ops.add_lora(
                        y, x, bank, m, impl=impl, config=c
                    )
                )
                args = (
                    jax.device_put(y, rows),
                    jax.device_put(x, rows),
                    jax.device_put(mapping, sh.mapping_shardings(mapping, mesh)),
                )
                compiled = fn.lower(*args).compile()
                got = np.asarray(compiled(*args))
                key = f"{impl}/{'prefill' if prefill else 'decode'}/{what}"
                out[key] = {
                    "rel_err": float(np.abs(got - expected).max() / np.abs(expected).max()),
                    **collectives(compiled),
                }
    # Eager, on sharded arrays; and inside a caller's own shard_map, already manual over data
    # (each shard its own mapping): both must take the right path, not a nested shard_map.
    mapping = LoRAMapping.build(seq_slots, [length] * seqs, num_slots=slots)
    x = rng.standard_normal((mapping.token_slots.shape[0], d_in)).astype(np.float32)
    y = rng.standard_normal((x.shape[0], d_out)).astype(np.float32)
    a, b, scale = (np.asarray(v, np.float64) for v in (bank.a, bank.b, bank.scale))
    expected = y + np.stack(
        [scale[s] * (x[i] @ a[s] @ b[s]) for i, s in enumerate(np.asarray(mapping.token_slots))]
    )
    args = (
        jax.device_put(y, rows),
        jax.device_put(x, rows),
        bank,
        jax.device_put(mapping, sh.mapping_shardings(mapping, mesh)),
    )
    got = ops.add_lora(*args)
    # Eager calls run one jitted program (checked for collectives like the jitted cases), and
    # compile once: more calls on fresh values of the same shapes compile nothing.
    compiled = ops._add_lora_jit.lower(*args, impl="auto", config=ops.OpsConfig(), groups=1)
    with CompileCounter() as compiles:
        for _ in range(3):
            fresh = rng.standard_normal(y.shape).astype(np.float32)
            ops.add_lora(jax.device_put(fresh, rows), *args[1:]).block_until_ready()
    out["xla/eager"] = {
        "rel_err": float(np.abs(got - expected).max() / np.abs(expected).max()),
        "recompiles": sum(compiles.counts.values()),
        **collectives(compiled.compile()),
    }
    shard = LoRAMapping.build([3] * 2, [length] * 2, num_slots=slots, num_tokens=2 * length)
    in_shard_map = jax.jit(
        jax.shard_map(
            lambda y, x: ops.add_lora(y, x, bank, shard),
            mesh=mesh,
            in_specs=(jax.P(sh.DATA), jax.P(sh.DATA)),
            out_specs=jax.P(sh.DATA),
            axis_names=frozenset({sh.DATA}),
            check_vma=False,
        )
    )
    got = np.asarray(in_shard_map(y, x))
    expected = y + scale[3] * (x @ a[3] @ b[3])
    out["xla/in_user_shard_map"] = {
        "rel_err": float(np.abs(got - expected).max() / np.abs(expected).max())
    }
    vocab = 11
    emb = LoRABank(
        a=jnp.asarray(rng.standard_normal((slots, vocab, rank)), jnp.float32),
        b=bank.b,
        scale=bank.scale,
    )
    ids = rng.integers(0, vocab, mapping.token_slots.shape[0]).astype(np.int32)
    y = rng.standard_normal((ids.shape[0], d_out)).astype(np.float32)
    slot_of = np.asarray(mapping.token_slots)
    ea, b, scale = (np.asarray(v, np.float64) for v in (emb.a, emb.b, emb.scale))
    expected = y + np.stack(
        [scale[s] * (ea[s, t] @ b[s]) for t, s in zip(ids, slot_of, strict=True)]
    )
    fn = jax.jit(lambda y, ids, m: ops.add_lora_embedding(y, ids, emb, m))
    args = (
        jax.device_put(y, rows),
        jax.device_put(ids, rows),
        jax.device_put(mapping, sh.mapping_shardings(mapping, mesh)),
    )
    compiled = fn.lower(*args).compile()
    got = np.asarray(compiled(*args))
    out["embedding"] = {
        "rel_err": float(np.abs(got - expected).max() / np.abs(expected).max()),
        **collectives(compiled),
    }
    got = ops.add_lora_embedding(args[0], args[1], emb, args[2])
    compiled = ops._add_lora_embedding_jit.lower(
        args[0], args[1], emb, args[2], config=ops.OpsConfig()
    )
    with CompileCounter() as compiles:
        for _ in range(3):
            fresh = rng.standard_normal(y.shape).astype(np.float32)
            ops.add_lora_embedding(jax.device_put(fresh, rows), args[1], emb, args[2])
    out["embedding/eager"] = {
        "rel_err": float(np.abs(got - expected).max() / np.abs(expected).max()),
        "recompiles": sum(compiles.counts.values()),
        **collectives(compiled.compile()),
    }
    return out


def sharded_loading(meshes, bf16_files: bool) -> dict:
    """`from_pretrained(mesh=...)` against `shard_model(from_pretrained(...))`, plain and fused,
    per mesh (and, with `bf16_files`, a 4-file bfloat16 copy of the sharded fixture loaded as
    bfloat16 on the first mesh): per parameter, whether this process's shards are bitwise equal,
    the shardings equivalent, and the sizes of the blocks read from the checkpoint (so the test
    sees that a split weight is only ever read a shard at a time, each distinct shard once)."""
    import tempfile

    from safetensors.numpy import save_file

    import jlora.models.llama as llama

    reads: dict[tuple, list[int]] = {}
    original = llama._Checkpoint.read

    def recording(self, source, bounds):
        block = original(self, source, bounds)
        reads.setdefault(source.names, []).append(int(block.size))
        return block

    variants = [
        (f"{d}x{m}{'-fused' if fuse else ''}", (d, m), FIXTURES / "tiny_llama",
         dict(fuse_qkv=fuse, fuse_gate_up=fuse))
        for d, m in meshes
        for fuse in (False, True)
    ]  # fmt: skip
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if bf16_files:
            src, dst = FIXTURES / "tiny_llama_sharded", pathlib.Path(tmp)
            for file in src.iterdir():
                if file.suffix == ".safetensors":
                    tensors = {k: v.astype(jnp.bfloat16) for k, v in load_file(str(file)).items()}
                    save_file(tensors, str(dst / file.name), metadata={"format": "pt"})
                else:
                    (dst / file.name).write_bytes(file.read_bytes())
            d, m = meshes[0]
            variants.append((f"{d}x{m}-bf16-files", (d, m), dst, dict(dtype="bfloat16")))
        llama._Checkpoint.read = recording
        try:
            for key, (data, model), path, kw in variants:
                mesh = sh.make_mesh(data, model)
                reads.clear()
                loaded = from_pretrained(path, mesh=mesh, **kw)
                param_of = {s.names: n for n, s in llama._param_sources(loaded.config).items()}
                got_reads = {param_of[names]: list(sizes) for names, sizes in reads.items()}
                got = nnx.state(loaded, nnx.Param)
                # Fused: loaded in `model` column groups (whole groups per device) by default.
                assert loaded.config.fused_groups == (model if kw.get("fuse_qkv") else 1)
                kw = dict(kw, fused_groups=loaded.config.fused_groups) if kw.get("fuse_qkv") else kw
                want = nnx.state(sh.shard_model(from_pretrained(path, **kw), mesh), nnx.Param)
                params = {}
                for (key_path, g), (_, w) in zip(
                    jax.tree_util.tree_leaves_with_path(got),
                    jax.tree_util.tree_leaves_with_path(want),
                    strict=True,
                ):
                    name = ".".join(sh._key_name(k) for k in key_path if sh._key_name(k) != "value")
                    shards = {s.device: np.asarray(s.data) for s in w.addressable_shards}
                    params[name] = {
                        "size": int(g.size),
                        "dtype": str(g.dtype),
                        "distinct_shards": len({str(s.index) for s in g.addressable_shards}),
                        "equal": g.dtype == w.dtype
                        and all(
                            np.array_equal(np.asarray(s.data), shards[s.device])
                            for s in g.addressable_shards
                        ),
                        "same_sharding": g.sharding.is_equivalent_to(w.sharding, g.ndim),
                        "spec": str(g.sharding.spec),
                        "reads": got_reads.pop(name, []),
                    }
                assert not got_reads, got_reads  # every block read belongs to a parameter
                out[key] = params
        finally:
            llama._Checkpoint.read = original
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("meshes", nargs="*", default=["1x8", "2x4", "8x1"], help="DATAxMODEL")
    parser.add_argument("--out", help="write the JSON report here (default: stdout)")
    parser.add_argument("--process", type=int, default=0, help="this process's id")
    parser.add_argument("--processes", type=int, default=1, help="processes (hosts) in all")
    parser.add_argument("--coordinator", help="host:port of process 0, for several processes")
    args = parser.parse_args(argv)
    distributed = args.processes > 1
    if distributed:
        # Several processes on one machine: JAX's own multi-controller runtime, with Gloo for
        # the CPU collectives (on GPUs and TPUs the platform's own are used).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.processes, args.process)
    meshes = [tuple(int(n) for n in m.split("x")) for m in args.meshes]
    if jax.device_count() < max(d * m for d, m in meshes):
        raise SystemExit(f"need {max(d * m for d, m in meshes)} devices, have {jax.devices()}")
    base = from_pretrained(FIXTURES / "tiny_llama")
    fused = {  # fused q/k/v and gate/up, columns in g groups (1: [q | k | v])
        g: from_pretrained(
            FIXTURES / "tiny_llama", fuse_qkv=True, fuse_gate_up=True, fused_groups=g
        )
        for g in (1, 2, 4)
    }
    adapters = [
        load_adapter(FIXTURES / "adapters" / n, adapter_id=i + 1) for i, n in enumerate(ADAPTERS)
    ]
    # (data, model, fully sharded, fused q/k/v and gate/up in g column groups (0: unfused),
    # decode step): every mesh with plain and fully sharded LoRA; the decode step on the 2-D
    # mesh and the data-parallel one, the packed projections on a few meshes only, to keep the
    # compile count (the run time) down.
    cases = [
        (d, m, fully, 0, (d, m) == (2, 4) or (d, m, fully) == (8, 1, False))
        for d, m in meshes
        for fully in (False, True)
    ]
    if distributed:  # the layout with every kind of split; the one-process runs cover the rest
        cases = [(d, m, True, 0, True) for d, m in meshes]
    elif (2, 4) in meshes:
        cases.append((2, 4, True, 4, False))
        # A model axis that divides the KV heads (2): no resharding around the attention.
        cases.append((4, 2, False, 0, True))
        cases.append((4, 2, False, 2, True))  # fused, whole groups per device
        cases.append((2, 4, False, 1, False))  # fused [q | k | v] split over model: still right
    timings = {}
    t = time.perf_counter()
    single = run_case(base, adapters, None, fully=False, decode=True)  # this process's device 0
    timings["single"] = time.perf_counter() - t
    result = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "peft_err": float(np.abs(single["prefill_logits"][:10] - MIXED["logits"]).max()),
        "single_banks": single["banks"],
        "cases": [],
    }
    for data, model, fully, groups, decode in cases:
        fuse = bool(groups)
        name = f"{data}x{model}{'-fully' if fully else ''}{'-fused' if fuse else ''}"
        name += f"-g{groups}" if fuse and groups != model else ""
        t = time.perf_counter()
        mesh = sh.make_mesh(data, model)
        case = run_case(fused[groups] if fuse else base, adapters, mesh, fully=fully, decode=decode)
        timings[name] = time.perf_counter() - t
        case.update(
            name=name,
            mesh=[data, model],
            fully=fully,
            fused=fuse,
            mesh_processes=[[d.process_index for d in row] for row in mesh.devices.tolist()],
        )
        for step in ("prefill", "decode"):
            if f"{step}_logits" in case:
                got, want = case.pop(f"{step}_logits"), single[f"{step}_logits"]
                case[f"{step}_rel_err"] = float(np.abs(got - want).max() / np.abs(want).max())
        result["cases"].append(case)
    if not distributed:
        t = time.perf_counter()
        result["layer_collectives"] = layer_collectives(sh.make_mesh(1, 8))
        timings["layer_collectives"] = time.perf_counter() - t
        t = time.perf_counter()
        result["embedding_collectives"] = {
            f"{d}x{m}": embedding_collectives(sh.make_mesh(d, m)) for d, m in ((1, 8), (2, 4))
        }
        timings["embedding_collectives"] = time.perf_counter() - t
        t = time.perf_counter()
        result["data_parallel_ops"] = data_parallel_ops(sh.make_mesh(8, 1))
        timings["data_parallel_ops"] = time.perf_counter() - t
    t = time.perf_counter()
    # Under two processes, the 1x8 mesh gives each half of the model axis.
    result["sharded_loading"] = sharded_loading([(2, 4), (1, 8)], bf16_files=not distributed)
    timings["sharded_loading"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - START
    result["timings"] = timings
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result))
    else:
        json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
