"""merge_adapter: a copy of an NNX model with one adapter folded into its weights
(``W + scaling * A @ B``). The single-adapter ground truth that multi-LoRA serving must equal, and
what users deploy when one adapter is all they need. Imports jlora modules only.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from jlora.apply import PackedModules, apply, find_targets
from jlora.errors import AdapterMismatchError
from jlora.targets import TargetModule, split_whole_layer
from jlora.weights import LoRALayerWeights, LoRAModel, PackedLoRALayerWeights


def merge_adapter(
    model: nnx.Module,
    adapter: LoRAModel,
    *,
    packed_modules: PackedModules | None = None,
    packed_groups: Mapping[str, int] | None = None,
) -> nnx.Module:
    """Returns a copy of ``model`` (an ``nnx.Module``, plain or returned by ``jlora.apply``)
    with ``adapter`` merged.

    Linear-like layers add ``scaling * lora_a @ lora_b`` to their ``[in, out]`` kernel (into the
    slice's columns for a fused projection); embeddings add ``scaling * lora_a @ lora_b`` to their
    ``[vocab, dim]`` table; a LoRA bias (PEFT ``lora_bias``) adds ``scaling * bias`` to the layer's
    bias. A ``PackedLoRALayerWeights`` keyed by a fused layer's name (as the adapter manager and
    ``restore_adapter`` hold them) merges slice ``j`` into that slice's columns. Packed layers and
    their column groups are those of a wrapped model's targets (so a merge matches what it
    serves), else ``jlora.apply(model, packed_modules=..., packed_groups=...)``'s (default: the
    model's ``packed_modules_mapping`` and ``packed_modules_groups``). The input model is left
    unchanged.

    An embedding's merge changes its table, so a tied LM head (``embed.attend``) sees it too;
    serving (and PEFT unmerged) applies an embedding's LoRA to the lookup only.

    Raises:
      AdapterMismatchError: an adapter module with no layer in the model, dims that differ, a
        packed module whose slices do not match its layer's, a kernel that is not an ``[in, out]``
        matrix, or a LoRA bias for a layer without one.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"merge_adapter takes an nnx.Module (NNX only), got {type(model)}")
    if not isinstance(adapter, LoRAModel):  # a path or a LoRARequest, as Engine takes
        raise TypeError(
            f"merge_adapter takes a LoRAModel, got {type(adapter).__name__}; load one with "
            "jlora.load_adapter(path) or jlora.restore_adapter(path)"
        )
    targets = wrapped = find_targets(model)
    if not targets:  # a plain model: its layers as apply would wrap them
        targets = find_targets(
            apply(model, packed_modules=packed_modules, packed_groups=packed_groups)
        )
    elif packed_modules is not None or packed_groups is not None:
        raise TypeError(
            "merge_adapter: packed_modules / packed_groups are for a plain model; a model "
            "returned by jlora.apply merges into the layers it was wrapped with"
        )
    paths = {".".join(str(p) for p in path) for path, _ in nnx.iter_modules(model)}
    if strays := [t.name for t in targets if t.name not in paths]:
        raise AdapterMismatchError(
            f"the model holds LoRA layers named {strays[:4]}, which are not module paths from "
            "it (a submodule returned by jlora.apply?): merge into that submodule, or build "
            "the model from plain modules"
        )
    by_name = {t.name: t for t in targets}
    where = {p: (t, j) for t in targets for j, p in enumerate(t.peft_names)}
    merges, missing = [], []  # merges: (what to call it, target, slice index, weights)
    for name, weights in adapter.loras.items():
        if isinstance(weights, PackedLoRALayerWeights):
            target = by_name.get(name)
            if target is None:
                missing.append(name)
                continue
            if len(weights.slices) != len(target.out_dims):
                raise AdapterMismatchError(
                    f"adapter {adapter.name!r} packed module {name!r} has "
                    f"{len(weights.slices)} slices but layer {name!r} has "
                    f"{len(target.out_dims)} ({list(target.peft_names)})"
                )
            merges += [
                (f"{name}[{j}]", target, j, s)
                for j, s in enumerate(weights.slices)
                if s is not None
            ]
        elif isinstance(weights, LoRALayerWeights):
            if name in where:
                merges.append((name, *where[name], weights))
            elif name in by_name:  # trained on the whole fused layer: merged as its slices
                target = by_name[name]
                try:
                    slices = split_whole_layer(weights, target)
                except AdapterMismatchError as e:
                    raise AdapterMismatchError(f"adapter {adapter.name!r}, {e}") from None
                merges += [(f"{name}[{j}]", target, j, s) for j, s in enumerate(slices)]
            else:
                missing.append(name)
        else:
            raise AdapterMismatchError(
                f"adapter {adapter.name!r} module {name!r}: expected LoRALayerWeights or "
                f"PackedLoRALayerWeights, got {type(weights).__name__}"
            )
    if missing:
        why = (
            f"not among the {len(wrapped)} layers the model was wrapped with "
            f"({[t.name for t in wrapped][:4]}): wrap it including these modules, or merge "
            "into the plain model"
            if wrapped
            else _why_unserved(model, sorted(missing))
        )
        raise AdapterMismatchError(
            f"adapter {adapter.name!r} targets modules the model lacks: {sorted(missing)[:8]}"
            f" ({why})"
        )
    merged = nnx.clone(model)
    modules = {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(merged)}
    for peft_name, target, j, layer in merges:
        module = modules[target.name]
        width = target.out_dims[j]
        if (layer.input_dim, layer.output_dim) != (target.in_dim, width):
            raise AdapterMismatchError(
                f"adapter {adapter.name!r} module {peft_name!r} is [in={layer.input_dim}, "
                f"out={layer.output_dim}] but layer {target.name!r} slice {j} is "
                f"[in={target.in_dim}, out={width}]"
            )
        param = module.embedding if isinstance(module, nnx.Embed) else module.kernel
        value = jnp.asarray(param.get_value())  # a parameter may hold a NumPy array
        # Sizes first: a kernel that is not an [in, out] matrix must not reach the reshape.
        if isinstance(module, nnx.Einsum) or value.size != target.in_dim * target.out_dim:
            raise AdapterMismatchError(
                f"layer {target.name!r}: its {tuple(value.shape)} weight is not an "
                f"[in={target.in_dim}, out={target.out_dim}] matrix; merging supports Linear, "
                "LinearGeneral and Embed layers"
            )
        # [in, groups, out / groups]: the slice's columns are its 1/groups share in each group
        g = target.groups
        cols = slice(target.slice_offsets[j] // g, (target.slice_offsets[j] + width) // g)
        grouped = value.reshape(target.in_dim, g, target.out_dim // g)
        delta = layer.delta_weight().astype(jnp.float32).reshape(target.in_dim, g, width // g)
        grouped = grouped.at[:, :, cols].add(delta.astype(grouped.dtype))
        if layer.bias is not None:  # PEFT's lora_bias: y += scaling * (x @ A @ B + bias)
            _merge_bias(module, target, cols, layer.scaling * layer.bias)
        param.set_value(grouped.reshape(value.shape))
    return merged


def _merge_bias(module, target: TargetModule, cols: slice, delta) -> None:
    bias = getattr(module, "bias", None)
    if bias is None or bias.get_value() is None:
        raise AdapterMismatchError(
            f"layer {target.name!r} has no bias to merge the adapter's LoRA bias into; build the "
            "layer with use_bias=True"
        )
    value, g = jnp.asarray(bias.get_value()), target.groups
    grouped = value.reshape(g, -1)
    grouped = grouped.at[:, cols].add(jnp.asarray(delta, value.dtype).reshape(g, -1))
    bias.set_value(grouped.reshape(value.shape))


def _why_unserved(model: nnx.Module, names: list[str]) -> str:
    """What ``apply`` says when asked for these modules by name: no such layer, or a layer it
    cannot wrap (one stacked by scan, say), which its default selection skips in silence."""
    try:
        apply(model, target_modules=names)
    except AdapterMismatchError as e:
        return str(e)
    return "no layer has exactly these names; adapter modules are full module paths"
