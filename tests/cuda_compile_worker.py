"""Compiles jlora's GPU programs for NVIDIA GPUs on a machine that has none (deviceless AOT).

`jax.export` (tests/test_kernels_lowering.py) stops at Triton IR; here XLA's GPU compiler runs
Triton on it for real target GPUs, so a kernel Triton refuses, or one that needs more shared
memory than a GPU has, fails on this machine instead of on a lent GPU. Run by
`tests/test_cuda_compile.py` in a subprocess whose `PYTHONPATH` holds the CUDA PJRT plugin
(`make test` installs it and the `ptxas` of the `nvidia-cuda-nvcc-cu12` wheel under
`.venv/cuda-compiler`; no CUDA driver or system toolkit is needed).

Prints one JSON object per compiled program: `{"name", "ok", "triton_calls", "collectives",
"error"}` (collectives: count by kind).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import tempfile
from unittest import mock

os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # never touch a GPU, even if there is one

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

jax.config.update("jax_platforms", "cpu")  # the CPU runs the engine; "cuda" only compiles

sys.path.insert(0, os.path.dirname(__file__))
from kernel_cases import KERNEL_CASES, make_inputs  # noqa: E402
from test_kernels_lowering import CONFIGS, kernel_calls  # noqa: E402

import jlora  # noqa: E402
from jlora import manager, ops  # noqa: E402
from jlora.bench import AdapterPool, BenchConfig  # noqa: E402
from jlora.engine import Engine, SamplingParams  # noqa: E402
from jlora.synthetic import random_llama  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"
# A collective op (its async start counted once) after its result type.
COLLECTIVE = re.compile(
    r"= .*?\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
LARGEST_TILES = [c for c in KERNEL_CASES if c.name in ("rank64", "hidden5120_qkv")]

# XLA's GpuTargetConfig text protos: what the compiler needs of a GPU it cannot query.
_DEVICE = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: {threads_core}
  core_count: {cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_block}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
# The shared memory a block may opt into is what bounds the kernels' tiles: 227 KB on Hopper,
# 163 KB on A100, 99 KB on Ada (L4, RTX 40xx).
GPUS = {
    "h200": dict(name="NVIDIA H200", major=9, minor=0, cores=132, smem_block=232448,
                 smem_core=233472, threads_core=2048, bandwidth=4800000000000, l2=52428800,
                 clock=1.98, memory=150754820096),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, cores=108, smem_block=166912,
                 smem_core=167936, threads_core=2048, bandwidth=2039000000000, l2=41943040,
                 clock=1.41, memory=85031714816),
    "l4": dict(name="NVIDIA L4", major=8, minor=9, cores=58, smem_block=101376,
               smem_core=102400, threads_core=1536, bandwidth=300000000000, l2=50331648,
               clock=2.04, memory=23580639232),
}  # fmt: skip


def gpu_sharding(gpu: str) -> jax.sharding.NamedSharding:
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=_DEVICE.format(**GPUS[gpu]), topology="1x1x1"
    )
    mesh = topologies.make_mesh(topo=topology, mesh_shape=(1,), axis_names=("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract(tree, sharding):
    """Arrays become ShapeDtypeStructs with `sharding` (None: none); static args stay."""

    def leaf(v):
        if isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=sharding)
        return v

    return jax.tree.map(leaf, tree, is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct))


def compile_for(name: str, jitted, args, kwargs=None) -> dict:
    try:
        text = jitted.lower(*args, **(kwargs or {})).compile().as_text()
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
        return {"name": name, "ok": False, "triton_calls": 0, "collectives": {},
                "error": str(e).split("\n")[0]}  # fmt: skip
    return {
        "name": name,
        "ok": True,
        "triton_calls": text.count(TRITON_CALL),
        "collectives": dict(collections.Counter(COLLECTIVE.findall(text))),
        "error": "",
    }


class Recorder:
    """Stands in for a jitted function: records the abstract arguments of each distinct call
    (before the call, which may donate them), then runs it."""

    def __init__(self, jitted):
        self.jitted, self.calls = jitted, {}

    def __call__(self, *args, **kwargs):
        call = abstract((args, kwargs), None)
        self.calls.setdefault(str(jax.tree.flatten(call)), call)
        return self.jitted(*args, **kwargs)


def kernel_programs(gpu: str, sharding) -> list[dict]:
    """Default and tuned configs of every kernel case of the interpret-mode sweep on the H200;
    on the GPUs with less shared memory, of the cases with the largest tiles."""
    out, rng = [], np.random.default_rng(0)
    for case in KERNEL_CASES if gpu == "h200" else LARGEST_TILES:
        inp = make_inputs(case, rng)
        for config in CONFIGS:
            for kernel, (fn, args) in kernel_calls(case, inp, *CONFIGS[config]).items():
                name = f"{gpu}/{kernel}/{case.name}/{config}"
                out.append(compile_for(name, jax.jit(fn), abstract(args, sharding)))
    return out


def engine_programs(sharding) -> list[dict]:
    """The engine's prefill and decode steps and the manager's slot writers, as a mixed batch on
    the CPU drives them, each compiled for the GPU with the Pallas path `impl="auto"` picks
    there."""
    cfg = BenchConfig.quick()
    model = random_llama(cfg.llama(), seed=0)
    writers = {f"write_{k}": Recorder(v) for k, v in manager._WRITE.items()}
    writers |= {f"clear_{k}": Recorder(v) for k, v in manager._CLEAR.items()}
    saved = dict(manager._WRITE), dict(manager._CLEAR)
    manager._WRITE.update({k: writers[f"write_{k}"] for k in manager._WRITE})
    manager._CLEAR.update({k: writers[f"clear_{k}"] for k in manager._CLEAR})
    try:
        with tempfile.TemporaryDirectory() as root:
            pool = AdapterPool(cfg, root)
            config = jlora.LoRAConfig(max_loras=2, max_lora_rank=cfg.rank, max_cpu_loras=4)
            engine = Engine(model, config, max_batch=4, max_seq_len=cfg.prompt_len + 8)
            steps = {"prefill": Recorder(engine._prefill), "decode": Recorder(engine._decode)}
            engine._prefill, engine._decode = steps["prefill"], steps["decode"]
            prompts = [[1 + i] * (cfg.prompt_len - i) for i in range(4)]
            requests = [None, pool.request(0), pool.request(1), pool.request(2)]
            engine.generate(prompts, requests, SamplingParams(max_tokens=4))
    finally:
        manager._WRITE.update(saved[0])
        manager._CLEAR.update(saved[1])
    out = []
    with gpu_default_backend():
        for kind, rec in {**steps, **writers}.items():
            for i, (args, kwargs) in enumerate(rec.calls.values()):
                args, kwargs = abstract((args, kwargs), sharding)
                out.append(compile_for(f"h200/engine/{kind}/{i}", rec.jitted, args, kwargs))
    return out


def op_programs(sharding) -> list[dict]:
    """`add_lora` at Llama-7B shapes (fused q/k/v, rank 16 and 64, 8 adapters), prefill and
    decode, in each dtype the kernels take."""
    out, hidden, slots = [], 4096, 9
    for dtype in ("float32", "bfloat16", "float16"):
        for rank in (16, 64):
            bank = jlora.LoRABank.zeros(slots, hidden, hidden, rank, dtype)
            for tokens, prefill in ((2048, True), (32, False)):
                seqs = 32 if prefill else tokens
                mapping = jlora.LoRAMapping.build(
                    [i % slots for i in range(seqs)],
                    [tokens // seqs] * seqs,
                    num_slots=slots,
                    is_prefill=prefill,
                    num_tokens=tokens,
                )
                y = np.zeros((tokens, 3 * hidden), dtype)
                x = np.zeros((tokens, hidden), dtype)
                args = abstract((y, x, (bank,) * 3, mapping), sharding)
                step = "prefill" if prefill else "decode"
                out.append(compile_for(f"h200/add_lora/{dtype}/r{rank}/{step}", _ADD_LORA, args))
    return out


def sharded_programs() -> list[dict]:
    """`add_lora` at Llama-7B shapes (bf16, rank 16) on two H200s, prefill and decode: with the
    rows split on `data` (fused q/k/v), and tensor-parallel over `model` as a column-parallel
    (q) and a row-parallel (o) layer. Each GPU launches the kernels on its own shard; the
    collectives are the layout's own (none; one all-reduce of `h`), where the partitioner alone
    would gather the operands around the kernels' custom calls."""
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=_DEVICE.format(**GPUS["h200"]), topology="1x1x2"
    )
    P = jax.sharding.PartitionSpec
    hidden, slots, out = 4096, 9, []
    layouts = {  # name: (mesh shape, slices, x spec, y spec, a spec, b spec, model_split)
        "data": ((2, 1), 3, P("data"), P("data"), P(), P(), ()),
        "column": ((1, 2), 1, P(), P(None, "model"), P(), P(None, None, "model"), ("out",)),
        "row": ((1, 2), 1, P(None, "model"), P(), P(None, "model"), P(), ("in",)),
    }
    for name, (shape, slices, x_spec, y_spec, a_spec, b_spec, split) in layouts.items():
        mesh = topologies.make_mesh(topo=topology, mesh_shape=shape, axis_names=("data", "model"))

        def on(spec, mesh=mesh):
            return jax.sharding.NamedSharding(mesh, spec)

        bank = jlora.LoRABank.zeros(slots, hidden, hidden, 16, "bfloat16").replace(
            model_split=split
        )
        bank = bank.replace(a=abstract(bank.a, on(a_spec)), b=abstract(bank.b, on(b_spec)),
                            scale=abstract(bank.scale, on(P())))  # fmt: skip
        for tokens, prefill in ((2048, True), (32, False)):
            seqs = 32 if prefill else tokens
            mapping = jlora.LoRAMapping.build(
                [i % slots for i in range(seqs)],
                [tokens // seqs] * seqs,
                num_slots=slots,
                is_prefill=prefill,
                num_tokens=tokens,
            )
            rows = on(P("data") if name == "data" else P())
            mapping = abstract(mapping, on(P())).replace(
                token_slots=abstract(mapping.token_slots, rows),
                seq_slots=abstract(mapping.seq_slots, rows),
            )
            y = jax.ShapeDtypeStruct((tokens, slices * hidden), "bfloat16", sharding=on(y_spec))
            x = jax.ShapeDtypeStruct((tokens, hidden), "bfloat16", sharding=on(x_spec))
            step = "prefill" if prefill else "decode"
            args = (y, x, (bank,) * slices, mapping)
            out.append(compile_for(f"h200x2/add_lora/{name}/{step}", _ADD_LORA, args))
    return out


_ADD_LORA = jax.jit(ops.add_lora)


@contextlib.contextmanager
def gpu_default_backend():
    """`add_lora(impl="auto")` picks Pallas when the default backend is a GPU, as it is where
    these programs would run; this process's is the CPU. Traces from CPU runs are dropped first,
    so that every program is traced again with the GPU's choice."""
    jax.clear_caches()
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        yield
    jax.clear_caches()


def main(parts: list[str]) -> None:
    shardings = {gpu: gpu_sharding(gpu) for gpu in GPUS}
    results = []
    if "kernels" in parts:
        for gpu, sharding in shardings.items():
            results += kernel_programs(gpu, sharding)
    if "ops" in parts:
        with gpu_default_backend():
            results += op_programs(shardings["h200"])
            results += sharded_programs()
    if "engine" in parts:
        results += engine_programs(shardings["h200"])
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["kernels", "ops", "engine"])
