"""TargetModule: the contract between a model (what ``jlora.apply`` finds in it) and the adapter
manager (what slot banks it allocates). Imports jax, jlora.config, jlora.errors and
jlora.weights only.

A model layer that LoRA can wrap is described by its path in the JAX model, its input dim, and
one output slice per PEFT module it serves. A plain ``q_proj`` Linear has one slice; a fused
``qkv_proj`` Linear has three, served by PEFT's separate ``q_proj``, ``k_proj`` and ``v_proj``
adapters. The manager keeps one ``LoRABank`` per slice, keyed by ``TargetModule.name``.

A packed layer's columns are the slices one after the other (``[q | k | v]``), or, with
``groups = g``, ``g`` groups of every slice's next ``1/g`` (``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``):
split over ``g`` devices (or a divisor of ``g``), each device then holds whole groups, its own
share of every slice, so neither the layer nor its LoRA moves columns between devices.

A LoRA keyed by the packed layer's own name (trained on a fused layer) is served as one LoRA per
slice (``split_whole_layer``): the slices share its A and take their columns of its B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp

from jlora.config import is_int
from jlora.errors import AdapterMismatchError
from jlora.weights import LoRALayerWeights


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
        for field, value in (("out_dims", self.out_dims), ("peft_names", self.peft_names)):
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise AdapterMismatchError(
                    f"target {self.name!r}: {field}={value!r} must be a sequence (one per slice)"
                )
        object.__setattr__(self, "peft_names", tuple(self.peft_names))
        object.__setattr__(self, "out_dims", tuple(self.out_dims))
        if not all(isinstance(n, str) for n in self.peft_names):  # "" is a root-level layer
            raise AdapterMismatchError(
                f"target {self.name!r}: peft_names={self.peft_names!r} must be strs (PEFT "
                "module names)"
            )
        out_dims = tuple(self.out_dims)
        if not all(is_int(d) and d >= 1 for d in (self.in_dim, *out_dims)):  # not int(2.7) = 2
            raise AdapterMismatchError(
                f"target {self.name!r}: in_dim={self.in_dim!r} and out_dims={out_dims!r} must "
                "be ints >= 1"
            )
        object.__setattr__(self, "in_dim", int(self.in_dim))
        object.__setattr__(self, "out_dims", tuple(int(d) for d in out_dims))
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


def split_whole_layer(
    layer: LoRALayerWeights, target: TargetModule
) -> tuple[LoRALayerWeights, ...]:
    """A LoRA trained on the whole of packed layer ``target`` (one ``lora_b`` over all its
    output columns, as PEFT trains it on a model whose own layer is fused, e.g. Phi-3's
    ``qkv_proj``) as one LoRA per slice: the same ``lora_a`` and scaling, and the slice's columns
    of ``lora_b`` (and bias). ``y + s * x A B`` then equals the packed layer with every slice's
    ``s * x A B_j``, exactly. ``lora_b``'s columns are the layer's own: with ``groups = g`` they
    are in its ``g`` groups (module docstring). Slicing keeps NumPy views where the layout allows.

    >>> import numpy as np
    >>> t = TargetModule(name="qkv", in_dim=4, out_dims=(2, 1, 1), peft_names=("q", "k", "v"))
    >>> w = LoRALayerWeights(lora_a=np.ones((4, 1)), lora_b=np.arange(4.0)[None], module_name="qkv")
    >>> [s.lora_b.tolist() for s in split_whole_layer(w, t)]
    [[[0.0, 1.0]], [[2.0]], [[3.0]]]
    """
    if (layer.input_dim, layer.output_dim) != (target.in_dim, target.out_dim):
        raise AdapterMismatchError(
            f"module {layer.module_name or target.name!r}: a LoRA over the whole of packed layer "
            f"{target.name!r} maps {layer.input_dim} -> {layer.output_dim}, but the layer maps "
            f"{target.in_dim} -> {target.out_dim}; the adapter was trained for another model"
        )
    g = target.groups

    def columns(x, j: int):  # slice j's columns of the last axis: its 1/g share of each group
        lo, width = target.slice_offsets[j] // g, target.out_dims[j] // g
        if g == 1:
            return x[..., lo : lo + width]
        lead = x.shape[:-1]
        return x.reshape(*lead, g, target.out_dim // g)[..., lo : lo + width].reshape(*lead, -1)

    return tuple(
        layer.replace(
            lora_b=columns(layer.lora_b, j),
            bias=None if layer.bias is None else columns(layer.bias, j),
            module_name=f"{layer.module_name or target.name}[{j}] ({peft})",
        )
        for j, peft in enumerate(target.peft_names)
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
    widths = [p.shape[-1] for p in parts]
    if not parts or any(w % groups for w in widths):
        raise AdapterMismatchError(
            f"join_packed: slice widths {tuple(widths)} must be one or more, each dividing by "
            f"groups={groups}"
        )
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
