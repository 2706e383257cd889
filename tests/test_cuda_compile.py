"""jlora's GPU programs compile for real NVIDIA GPUs (H200, A100, L4) on this GPU-less machine.

The compile runs in a subprocess (`cuda_compile_worker.py`) with XLA's CUDA PJRT plugin on its
path, which `make test` installs under `.venv/cuda-compiler` (`--target`, so that the test
process itself stays CPU-only). Triton compiles every kernel as it would on the GPU: a kernel it
refuses, or one whose tiles need more shared memory than the GPU has, fails here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("cuda_compile_worker.py")
COMPILER = Path(os.environ.get("JLORA_CUDA_COMPILER", Path(sys.prefix) / "cuda-compiler"))


@pytest.fixture(scope="module")
def compiler() -> Path:
    if not (COMPILER / "jax_plugins").is_dir():
        if platform.system() != "Linux":
            pytest.skip("XLA's CUDA plugin has wheels for Linux only")
        pytest.fail(
            f"XLA's CUDA plugin is not installed at {COMPILER}: run `make test` (it installs "
            "jax-cuda12-pjrt and ptxas there) or point JLORA_CUDA_COMPILER at such a "
            "pip --target directory",
            pytrace=False,
        )
    return COMPILER


def compile_programs(compiler: Path, *parts: str) -> list[dict]:
    path = [str(compiler), str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    proc = subprocess.run(
        [sys.executable, str(WORKER), *parts],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, proc.stderr[-4000:]
    return results


def failures(results: list[dict]) -> list[str]:
    return [f"{r['name']}: {r['error']}" for r in results if not r["ok"]]


def test_every_kernel_compiles_for_each_gpu(compiler):
    results = compile_programs(compiler, "kernels")
    assert failures(results) == []
    # Each program is exactly one kernel launch: the worker compiled what it meant to.
    assert {r["triton_calls"] for r in results} == {1}
    gpus = {r["name"].split("/")[0] for r in results}
    kernels = {r["name"].split("/")[1] for r in results}
    assert gpus == {"h200", "a100", "l4"}
    assert kernels == {"segmented_shrink", "segmented_expand", "gathered_shrink", "gathered_expand"}


def test_add_lora_and_the_engine_compile_with_the_kernels_for_a_gpu(compiler):
    """`add_lora` and the engine's steps and slot writer, traced as on a GPU (the Pallas path
    of `impl="auto"`), compile for an H200."""
    results = compile_programs(compiler, "ops", "engine")
    assert failures(results) == []
    # One shrink and one expand launch per add_lora (the q/k/v slices share them).
    ops = [r["triton_calls"] for r in results if r["name"].startswith("h200/add_lora/")]
    assert ops == [2] * 12, ops
    # On two GPUs each launches them on its own shard, with only the layout's collectives: none
    # for split rows or a column-parallel layer, one all-reduce of h for a row-parallel one.
    sharded = {r["name"]: (r["triton_calls"], r["collectives"]) for r in results
               if r["name"].startswith("h200x2/")}  # fmt: skip
    assert sharded == {
        f"h200x2/add_lora/{layout}/{step}": (2, collectives)
        for layout, collectives in (("data", {}), ("column", {}), ("row", {"all-reduce": 1}))
        for step in ("prefill", "decode")
    }, sharded
    steps = {}
    for r in results:
        if "/engine/" in r["name"]:
            steps.setdefault(r["name"].rsplit("/", 1)[0], []).append(r["triton_calls"])
    # Every LoRA'd projection of both layers launches its kernels; no step fell back to XLA.
    for step in ("h200/engine/prefill", "h200/engine/decode"):
        assert steps.get(step) and all(n >= 2 * 7 * 2 for n in steps[step]), steps
    assert steps.get("h200/engine/write_True"), steps
