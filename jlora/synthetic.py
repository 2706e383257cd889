"""Synthetic models and adapters for demos, benchmarks and tests: a random-weight Llama and PEFT
adapters written in PEFT's own file layout (adapter_config.json + adapter_model.safetensors with
PyTorch-layout tensors), so they go through the same loader as adapters trained with PEFT.
Imports jlora.models only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jlora.models.llama import LlamaConfig, LlamaForCausalLM

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_llama(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A Llama with random weights (Flax's default initialisers)."""
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def llama_module_shapes(
    config: LlamaConfig, projections: Sequence[str] = LLAMA_PROJECTIONS
) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in, out) for the given projections of every layer."""
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

    ``A`` rows are unit-variance over ``in`` and ``B`` is sized so that ``scaling * x @ A @ B`` has
    about ``delta_scale`` times the norm of ``x`` (a visible but not dominant change).
    """
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
