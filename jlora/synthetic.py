"""Synthetic models and adapters for demos, benchmarks and tests: a random-weight Llama and PEFT
adapters written in PEFT's own file layout (adapter_config.json + adapter_model.safetensors with
PyTorch-layout tensors), so they go through the same loader as adapters trained with PEFT.
Imports jlora.models, jlora.config and jlora.errors only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jlora.config import is_int
from jlora.errors import LoRAConfigError
from jlora.models.llama import LlamaConfig, LlamaForCausalLM

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A Llama with random weights (Flax's default initialisers)."""
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def llama_module_shapes(
    config: LlamaConfig, projections: Sequence[str] = LLAMA_PROJECTIONS
) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in, out) for the given projections of every layer."""
    # A bare "q_proj" would be read letter by letter; a generator is read once, here.
    projections = (projections,) if isinstance(projections, str) else tuple(projections)
    unknown = [p for p in projections if p not in LLAMA_PROJECTIONS]
    if unknown:
        raise LoRAConfigError(
            f"llama_module_shapes: {unknown} are not Llama projections; give a sequence of "
            f"{LLAMA_PROJECTIONS}"
        )
    c = config
    dims = {
        "q_proj": (c.hidden_size, c.q_dim),
        "k_proj": (c.hidden_size, c.kv_dim),
        "v_proj": (c.hidden_size, c.kv_dim),
        "o_proj": (c.q_dim, c.hidden_size),
        "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size),
        "down_proj": (c.intermediate_size, c.hidden_size),
    }
    part = {p: "self_attn" if p in LLAMA_PROJECTIONS[:4] else "mlp" for p in LLAMA_PROJECTIONS}
    return {
        f"model.layers.{i}.{part[p]}.{p}": dims[p]
        for i in range(c.num_hidden_layers)
        for p in projections
    }


def write_peft_adapter(
    directory: str | os.PathLike,
    module_shapes: Mapping[str, tuple[int, int]],
    *,
    r: int = 16,
    alpha: float = 32,
    seed: int = 0,
    dtype: str = "float32",
    delta_scale: float = 0.5,
) -> str:
    """Writes a PEFT LoRA adapter with random weights; returns the directory.

    ``A`` has entries of variance ``1/in`` and ``B`` is sized so that ``scaling * x @ A @ B`` has
    a norm of about ``delta_scale * sqrt(out / in) * |x|``: ``delta_scale`` times that of a
    base layer with Flax's default (LeCun) init, a visible but not dominant change.

    Raises ``LoRAConfigError`` for a bad argument, before anything is written.
    """
    # Plain Python values from here on: json.dump refuses NumPy scalars (after writing a part).
    module_shapes, r, alpha, dtype, delta_scale = _checked_adapter_args(
        module_shapes, r=r, alpha=alpha, dtype=dtype, delta_scale=delta_scale
    )
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    scaling = alpha / r
    tensors = {}
    for module, (d_in, d_out) in module_shapes.items():
        key = f"base_model.model.{module}"
        a = rng.standard_normal((r, d_in), np.float32) / np.sqrt(d_in)
        b = rng.standard_normal((d_out, r), np.float32) * (delta_scale / (scaling * np.sqrt(r)))
        tensors[f"{key}.lora_A.weight"] = a.astype(dtype)
        tensors[f"{key}.lora_B.weight"] = b.astype(dtype)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in module_shapes}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return directory


def _checked_adapter_args(module_shapes, *, r, alpha, dtype, delta_scale):
    """The arguments of ``write_peft_adapter`` as plain Python values, or a LoRAConfigError."""
    problems = []
    if not is_int(r) or r < 1:
        problems.append(f"r={r!r} must be an int >= 1")
    # alpha = 0 would make B infinite (it is sized by 1 / scaling).
    if not _is_real(alpha) or not (math.isfinite(alpha) and alpha > 0):
        problems.append(f"alpha={alpha!r} must be a finite number > 0")
    if not _is_real(delta_scale) or not (math.isfinite(delta_scale) and delta_scale >= 0):
        problems.append(f"delta_scale={delta_scale!r} must be a finite number >= 0")
    try:
        dtype_name = np.dtype(dtype).name  # "bfloat16" too: JAX registers it with NumPy
    except TypeError:
        dtype_name = None
    if dtype_name not in ("float32", "float16", "bfloat16"):
        problems.append(f"dtype={dtype!r} must be float32, float16 or bfloat16")
    shapes = {}
    if not isinstance(module_shapes, Mapping) or not module_shapes:
        problems.append("module_shapes must be a non-empty dict of module name -> (in, out)")
    else:
        for name, shape in module_shapes.items():
            if (
                isinstance(name, str)
                and isinstance(shape, tuple | list)
                and len(shape) == 2
                and all(is_int(d) and d >= 1 for d in shape)
            ):
                shapes[name] = (int(shape[0]), int(shape[1]))
        bad = [name for name in module_shapes if name not in shapes]
        if bad:
            problems.append(f"module_shapes{bad[:3]} must be (in, out) pairs of ints >= 1")
    if problems:
        raise LoRAConfigError("write_peft_adapter: " + "; ".join(problems))
    return shapes, int(r), float(alpha), dtype_name, float(delta_scale)


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
