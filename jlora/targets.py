"""TargetModule: the contract between a model (what ``jlora.apply`` finds in it) and the adapter
manager (what slot banks it allocates). Imports jax, jlora.config and jlora.errors only.

A model layer that LoRA can wrap is described by its path in the JAX model, its input dim, and
one output slice per PEFT module it serves. A plain ``q_proj`` Linear has one slice; a fused
``qkv_proj`` Linear has three, served by PEFT's separate ``q_proj``, ``k_proj`` and ``v_proj``
adapters. The manager keeps one ``LoRABank`` per slice, keyed by ``TargetModule.name``.

A packed layer's columns are the slices one after the other (``[q | k | v]``), or, with
``groups = g``, ``g`` groups of every slice's next ``1/g`` (``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``):
split over ``g`` devices (or a divisor of ``g``), each device then holds whole groups, its own
share of every slice, so neither the layer nor its LoRA moves columns between devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlora.config import is_int
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

    ``groups``: the packed columns' layout (module docstring); every slice's width divides by it.
    """

    name: str
    in_dim: int
    out_dims: tuple[int, ...]
    peft_names: tuple[str, ...]
    is_embedding: bool = False
    groups: int = 1

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
        if not (is_int(self.groups) and self.groups >= 1) or any(
            d % self.groups for d in self.out_dims
        ):
            raise AdapterMismatchError(
                f"target {self.name!r}: groups={self.groups!r} must be an int >= 1 dividing "
                f"every slice width {self.out_dims}"
            )
        object.__setattr__(self, "groups", int(self.groups))

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


def whole_packed_layer(adapter_name: str, target: TargetModule) -> str:
    """The error for a plain LoRA keyed by a packed layer's own name (one trained on the fused
    layer), which neither merging nor the slot banks take."""
    return (
        f"adapter {adapter_name!r} has one LoRA for the whole of layer {target.name!r}, which "
        f"the model declares packed (slices {list(target.peft_names)}): give one LoRA per "
        f"slice under those names, a PackedLoRALayerWeights keyed by {target.name!r}, or wrap "
        "the model with that layer unpacked (packed_modules_mapping without it)"
    )


def split_packed(y: jax.Array, widths: Sequence[int], groups: int = 1) -> list[jax.Array]:
    """A packed output's slices (last axis): ``widths`` wide, laid out in ``groups`` groups.

    >>> y = jnp.arange(6)  # [q0 k0 | q1 k1 | q2 k2] with q and k 3 wide, 3 groups
    >>> [s.tolist() for s in split_packed(y, (3, 3), groups=3)]
    [[0, 2, 4], [1, 3, 5]]
    """
    groups = _check_groups("split_packed", groups)
    if sum(widths) != y.shape[-1] or any(w % groups for w in widths):
        raise AdapterMismatchError(
            f"split_packed: slice widths {tuple(widths)} must add up to the {y.shape[-1]} "
            f"columns and each divide by groups={groups}"
        )
    cuts = [sum(widths[:i]) // groups for i in range(1, len(widths))]
    if groups == 1:
        return jnp.split(y, cuts, axis=-1)
    lead = y.shape[:-1]
    parts = jnp.split(y.reshape(*lead, groups, y.shape[-1] // groups), cuts, axis=-1)
    return [p.reshape(*lead, -1) for p in parts]


def join_packed(parts: Sequence[jax.Array], groups: int = 1) -> jax.Array:
    """The inverse of ``split_packed``: slices (last axis) into one packed output."""
    groups = _check_groups("join_packed", groups)
    if len(parts) == 1:
        return parts[0]
    if groups == 1:
        return jnp.concatenate(parts, axis=-1)
    lead = parts[0].shape[:-1]
    grouped = [p.reshape(*lead, groups, p.shape[-1] // groups) for p in parts]
    return jnp.concatenate(grouped, axis=-1).reshape(*lead, -1)


def _check_groups(where: str, groups) -> int:
    if not (is_int(groups) and groups >= 1):
        raise AdapterMismatchError(
            f"{where}: groups={groups!r} must be an int >= 1 (the number of column groups of "
            "the packed layer, TargetModule.groups)"
        )
    return int(groups)
