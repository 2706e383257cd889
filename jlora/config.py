"""LoRAConfig: the serving-wide LoRA settings (slots, ranks, dtype), validated at construction.

A frozen, hashable dataclass registered as a pytree with only static fields, so it can be passed
to jitted functions as a static argument or inside a pytree. Imports only jlora.errors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import LoRAConfigError

LORA_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Scales and sampling parameters are held in float32: a larger finite float64 becomes Inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Serving-wide LoRA settings.

    Attributes:
      max_loras: adapters resident on the device at once (slots 1..max_loras; slot 0 = base).
      max_lora_rank: every slot bank is padded to this rank; larger adapters are refused.
      max_cpu_loras: adapters kept converted in the host cache (LRU); defaults to max_loras.
      lora_dtype: dtype of the device banks; "auto" keeps the base model's (or the adapter's).
      fully_sharded_loras: shard A along the rank dim too (S-LoRA style) when on a mesh.
      bias_enabled: load adapters whose lora_B carries a bias (PEFT ``lora_bias=True``), for
        ``jlora.merge_adapter``; slot banks hold no bias, so the manager refuses to serve them.
      target_modules: optional filter; only modules whose name matches are served.

    >>> LoRAConfig(max_loras=4, max_lora_rank=16).max_cpu_loras
    4
    """

    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"
    fully_sharded_loras: bool = False
    bias_enabled: bool = False
    target_modules: tuple[str, ...] | str | None = None

    def __post_init__(self):
        problems = []
        if not is_int(self.max_loras) or self.max_loras < 1:
            problems.append(f"max_loras must be an int >= 1, got {self.max_loras!r}")
        if not is_int(self.max_lora_rank) or self.max_lora_rank < 1:
            problems.append(f"max_lora_rank must be an int >= 1, got {self.max_lora_rank!r}")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        elif not is_int(self.max_cpu_loras) or (
            is_int(self.max_loras) and self.max_cpu_loras < self.max_loras
        ):
            problems.append(
                f"max_cpu_loras ({self.max_cpu_loras!r}) must be an int >= max_loras "
                f"({self.max_loras!r}): every device-resident adapter is also cached on the host"
            )
        if self.lora_dtype not in LORA_DTYPES:
            problems.append(f"lora_dtype must be one of {LORA_DTYPES}, got {self.lora_dtype!r}")
        targets = self.target_modules
        if targets is not None:
            if isinstance(targets, str):
                try:
                    re.compile(targets)
                except re.error as e:
                    problems.append(f"target_modules regex {targets!r} does not compile: {e}")
            elif isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets):
                object.__setattr__(self, "target_modules", tuple(targets))
            else:
                problems.append(
                    f"target_modules must be a regex string or a list of names, got {targets!r}"
                )
        if problems:
            raise LoRAConfigError("Invalid LoRAConfig: " + "; ".join(problems))

    def jnp_dtype(self, default: jnp.dtype | str = jnp.float32) -> jnp.dtype:
        """The bank dtype: ``lora_dtype``, or ``default`` when it is "auto"."""
        return jnp.dtype(default if self.lora_dtype == "auto" else self.lora_dtype)


def is_int(v) -> bool:
    """A Python or NumPy integer, and not a bool (which Python counts as an int). The one
    integer check of every validated setting in jlora."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


jax.tree_util.register_dataclass(
    LoRAConfig, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(LoRAConfig)]
)
