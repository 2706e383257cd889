"""TargetModule: the contract between a model (what ``jlora.apply`` finds in it) and the adapter
manager (what slot banks it allocates). Imports jlora.errors only.

A model layer that LoRA can wrap is described by its path in the JAX model, its input dim, and
one output slice per PEFT module it serves. A plain ``q_proj`` Linear has one slice; a fused
``qkv_proj`` Linear has three, served by PEFT's separate ``q_proj``, ``k_proj`` and ``v_proj``
adapters. The manager keeps one ``LoRABank`` per slice, keyed by ``TargetModule.name``.
"""

from __future__ import annotations

import dataclasses

from jlora.errors import AdapterMismatchError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetModule:
    """One LoRA-able layer of a model.

    >>> t = TargetModule(name="model.layers.0.self_attn.qkv_proj", in_dim=64,
    ...                  out_dims=(64, 32, 32),
    ...                  peft_names=("model.layers.0.self_attn.q_proj",
    ...                              "model.layers.0.self_attn.k_proj",
    ...                              "model.layers.0.self_attn.v_proj"))
    >>> t.out_dim, t.is_packed
    (128, True)
    """

    name: str
    in_dim: int
    out_dims: tuple[int, ...]
    peft_names: tuple[str, ...]
    is_embedding: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out_dims", tuple(int(d) for d in self.out_dims))
        object.__setattr__(self, "peft_names", tuple(self.peft_names))
        if len(self.out_dims) != len(self.peft_names) or not self.out_dims:
            raise AdapterMismatchError(
                f"target {self.name!r}: {len(self.out_dims)} output slices but "
                f"{len(self.peft_names)} PEFT names; give one name per slice"
            )
        if self.is_embedding and len(self.out_dims) != 1:
            raise AdapterMismatchError(f"embedding target {self.name!r} cannot be packed")

    @property
    def out_dim(self) -> int:
        return sum(self.out_dims)

    @property
    def is_packed(self) -> bool:
        return len(self.out_dims) > 1

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        offsets, start = [], 0
        for d in self.out_dims:
            offsets.append(start)
            start += d
        return tuple(offsets)
