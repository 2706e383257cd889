"""Adapter load time: a Llama-7B-shaped rank-16 PEFT adapter from disk into a device slot.

    python -m benchmarks.load [--repeats 7] [--max-loras 4] [--dtype float16] [--json]
                              [--default-heap]

Writes a synthetic PEFT adapter (32 layers x q,k,v,o,gate,up,down; hidden 4096, intermediate
11008, rank 16; float16 tensors by default: 40M parameters, 80 MB) and a jlora orbax checkpoint
of the same adapter to a temp dir, then times, interleaved in one run (medians of ``--repeats``):

  raw            safetensors.numpy.load_file: the file into numpy arrays, nothing else
  peft->slot     activate_adapter(state, LoRARequest(peft_dir)): parse + validate the config,
                 read, check finite, transpose, fit-check, copy into a device slot
  orbax->slot    activate_adapter(state, LoRARequest(checkpoint_dir)): restore + copy
  convert        jlora.load_adapter alone (host LoRAModel from PEFT safetensors)
  restore        jlora.restore_adapter alone (host LoRAModel from the orbax checkpoint)
  slot write     activate_adapter of an adapter already in the host cache (device copy only)

Heap: by default the benchmark asks glibc (``mallopt``) to keep freed memory instead of returning
it to the kernel, so every repeat of every case reuses warm pages. Without it the raw read is
bimodal: 448 arrays of 90-180 KB get fresh, zero-filled pages each round (51-81 ms) unless an
earlier allocation happened to raise glibc's mmap/trim thresholds (12-16 ms), which made the
reference depend on what the other cases allocate. ``--default-heap`` measures without it.

The manager's banks are a packed Llama-7B layout (fused qkv and gate_up) with ``--max-loras``
slots. Files are read from the page cache (written just before), as in a serving host that has
the adapters on a local disk. Ratios are what to compare across machines; targets from issue 4:
peft->slot <= 1.5x raw, and orbax restore faster than conversion.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
from flax import nnx
from safetensors.numpy import load_file

import jlora
from jlora import manager, synthetic
from jlora.checkpoint import restore_adapter, save_adapter
from jlora.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.targets import TargetModule

HIDDEN, INTERMEDIATE, LAYERS, RANK = 4096, 11008, 32, 16
LLAMA_7B = LlamaConfig(
    vocab_size=32000,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=32,
)


def write_peft_adapter(directory: str, dtype: str) -> str:
    """A PEFT-format adapter on every projection of Llama-7B, random weights."""
    return synthetic.write_peft_adapter(
        directory, synthetic.llama_module_shapes(LLAMA_7B), r=RANK, alpha=2 * RANK, dtype=dtype
    )


def llama7b_targets() -> tuple[TargetModule, ...]:
    """The LoRA targets of a fused-qkv/gate_up Llama-7B, found by ``jlora.apply`` on an abstract
    model (``nnx.eval_shape``: nothing is allocated)."""
    config = dataclasses.replace(LLAMA_7B, fuse_qkv=True, fuse_gate_up=True)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return jlora.find_targets(jlora.apply(model, target_modules=list(synthetic.LLAMA_PROJECTIONS)))


def keep_freed_heap() -> bool:
    """Asks glibc to keep freed memory mapped (mmap and trim thresholds at 256 MiB). False where
    the C library has no ``mallopt`` (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 28)) and bool(mallopt(m_trim_threshold, 1 << 28))


def run(repeats: int, max_loras: int, dtype: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="jlora-bench-load-")
    try:
        return _run(tmp, repeats, max_loras, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: str, repeats: int, max_loras: int, dtype: str) -> dict:
    peft_dir = write_peft_adapter(os.path.join(tmp, "peft"), dtype)
    weights = os.path.join(peft_dir, "adapter_model.safetensors")
    config = jlora.LoRAConfig(max_loras=max_loras, max_lora_rank=RANK)
    converted = jlora.load_adapter(peft_dir, adapter_id=1, config=config)
    ckpt_dir = save_adapter(converted, os.path.join(tmp, "orbax"))
    peft_request = jlora.LoRARequest(lora_name="peft", lora_int_id=1, lora_path=peft_dir)
    ckpt_request = jlora.LoRARequest(lora_name="orbax", lora_int_id=2, lora_path=ckpt_dir)

    box = {"state": manager.init_state(config, llama7b_targets(), dtype=dtype)}
    cached = converted.clone(3)

    def to_slot(adapter):
        state = manager.activate_adapter(box["state"], adapter)
        box["state"] = jax.block_until_ready(state)

    def forget(adapter_id):
        box["state"] = manager.remove_adapter(box["state"], adapter_id)

    def evict_from_device():
        # Cached on the host but not on the device: only the copy into a slot remains to time.
        state = manager.add_adapter(box["state"], cached)
        box["state"] = jax.block_until_ready(manager.deactivate_adapter(state, 3))

    # name -> (untimed setup, timed work, untimed teardown)
    cases = {
        "raw": (None, lambda: load_file(weights), None),
        "peft->slot": (None, lambda: to_slot(peft_request), lambda: forget(1)),
        "orbax->slot": (None, lambda: to_slot(ckpt_request), lambda: forget(2)),
        "convert": (None, lambda: jlora.load_adapter(peft_dir, config=config), None),
        "restore": (None, lambda: restore_adapter(ckpt_dir), None),
        "slot write": (evict_from_device, lambda: to_slot(3), None),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for rep in range(repeats + 1):  # the first round warms caches and compiles the slot writer
        # Rotate the order each round so no case always follows the same neighbour.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            setup, work, teardown = cases[name]
            if setup:
                setup()
            t0 = time.perf_counter()
            work()
            t = time.perf_counter() - t0
            if rep:
                times[name].append(t)
            if teardown:
                teardown()
    med = {k: statistics.median(v) for k, v in times.items()}
    size = os.path.getsize(weights)
    return {
        "command": "python -m benchmarks.load "
        f"--repeats {repeats} --max-loras {max_loras} --dtype {dtype}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "adapter": f"Llama-7B shape, rank {RANK}, 224 modules, {dtype}, {size / 1e6:.0f} MB",
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "ratios": {
            "peft->slot / raw": round(med["peft->slot"] / med["raw"], 2),
            "orbax->slot / raw": round(med["orbax->slot"] / med["raw"], 2),
            "restore / convert": round(med["restore"] / med["convert"], 2),
            "orbax->slot / peft->slot": round(med["orbax->slot"] / med["peft->slot"], 2),
            "slot write / raw": round(med["slot write"] / med["raw"], 2),
        },
        "raw_GBps": round(size / med["raw"] / 1e9, 2),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--default-heap", action="store_true", help="leave glibc's malloc settings alone"
    )
    args = parser.parse_args(argv)
    heap = "default" if args.default_heap or not keep_freed_heap() else "freed memory kept"
    result = run(args.repeats, args.max_loras, args.dtype)
    result["heap"] = heap
    if args.default_heap:
        result["command"] += " --default-heap"
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['adapter']}; {result['machine']}; jax {result['jax']}; heap: {heap}")
    for name, t in result["median_s"].items():
        print(f"  {name:<12} {t * 1e3:9.1f} ms")
    for name, r in result["ratios"].items():
        print(f"  {name:<26} {r:6.2f}x")


if __name__ == "__main__":
    main()
