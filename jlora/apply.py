"""``jlora.apply``: multi-LoRA for an existing Flax model (NNX or Linen) without editing its code.

NNX: graph surgery on a clone of the model. Each targeted ``nnx.Linear``, ``LinearGeneral``,
``Einsum`` or ``Embed`` becomes an instance of a LoRA subclass of its own class (``LoRALinear``,
...) holding the *same* variables and two static attributes (its ``TargetModule`` and
``LayerView``). Parameter paths, types and values are unchanged, so ``nnx.state(model, nnx.Param)``
of the wrapped model equals the original's, checkpoints and shardings keyed by path still apply,
and the model holds no LoRA state at all: that comes from ``jlora.lora_context`` at call time.

Linen: ``nn.intercept_methods`` around ``Module.apply``; the returned ``LoRALinenModel`` has the
module's ``init``/``apply`` and the parameter tree is the module's own.

Targets are matched by their dotted module path the way PEFT matches ``target_modules`` (a list
of names or dotted suffixes, a regex string that must match the whole path, or ``"all-linear"``).
A fused projection (``qkv_proj``, ``gate_up_proj``) is one target with one output slice per PEFT
module it serves, declared by ``packed_modules`` or the model's ``packed_modules_mapping``.
Whether an adapter fits the targets (module names, dims, rank) is checked where it enters a slot
bank: ``jlora.manager.add_adapter``.

Wrapped models and their graph definitions pickle: a ``LoRA<cls>`` class is pickled as a
rebuild from its base class (``copyreg``), so another process recreates it on load.

Imports jlora data-model modules and jlora.context only.
"""

from __future__ import annotations

import copyreg
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jlora.config import LoRAConfig, is_int
from jlora.context import LayerView, einsum_dims, lora_forward
from jlora.errors import AdapterMismatchError, LoRAConfigError
from jlora.peft import matches_target
from jlora.targets import TargetModule

# suffix of a fused layer's path -> its output slices: (PEFT module suffix, out features), in
# the order they are concatenated along the output dim.
PackedModules = Mapping[str, Sequence[tuple[str, int]]]
_Packing = Mapping[str, tuple[Sequence[tuple[str, int]], int]]  # leaf -> (slices, groups)
TargetSpec = Sequence[str] | str | None


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A LoRA-able layer found in a model (or the reason it is not LoRA-able)."""

    name: str
    kind: str  # "linear" or "embed"
    in_dim: int = 0
    out_dim: int = 0
    view: LayerView | None = None
    unsupported: str | None = None


def _packed_groups(model, packed_modules, packed_groups) -> dict[str, int]:
    """Column groups per packed layer: the model's ``packed_modules_groups`` (how its columns
    are laid out, so it cannot be overridden: an entry that contradicts it would serve and merge
    LoRA into the wrong columns), plus ``packed_groups`` for the layers it does not cover."""
    own = dict(getattr(model, "packed_modules_groups", None) or {})
    given = dict(packed_groups or {})
    unknown = sorted(set(given) - set(packed_modules))
    if unknown:
        raise AdapterMismatchError(
            f"packed_groups names {unknown}, which packed_modules does not declare "
            f"({sorted(packed_modules)})"
        )
    clash = {leaf: g for leaf, g in given.items() if leaf in own and g != own[leaf]}
    if clash:
        raise AdapterMismatchError(
            f"packed_groups {clash} contradicts the model's packed_modules_groups "
            f"({ {leaf: own[leaf] for leaf in clash} }), the layout its columns are in; leave "
            "those layers out of packed_groups (the model's own groups are used)"
        )
    # A layer the caller's packed_modules leaves out is wrapped whole: its groups do not matter.
    return {leaf: g for leaf, g in {**own, **given}.items() if leaf in packed_modules}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def apply(
    model: nnx.Module | nn.Module,
    config: LoRAConfig | None = None,
    *,
    target_modules: TargetSpec = None,
    packed_modules: PackedModules | None = None,
    packed_groups: Mapping[str, int] | None = None,
    sample_args: Sequence[Any] | None = None,
    sample_kwargs: Mapping[str, Any] | None = None,
    path_to_name: Callable[[tuple[str, ...]], str] | None = None,
):
    """Returns ``model`` with multi-LoRA support on every targeted layer.

    Args:
      model: an ``nnx.Module`` (left unchanged; a clone sharing its arrays is returned) or a Linen
        ``nn.Module`` (a ``LoRALinenModel`` is returned).
      config: ``config.target_modules`` is used when ``target_modules`` is None.
      target_modules: PEFT-style names, dotted suffixes, a full-path regex, or ``"all-linear"``
        (every Linear-like layer except ``lm_head``); None: every supported layer.
      packed_modules: ``{"qkv_proj": (("q_proj", 2048), ("k_proj", 512), ("v_proj", 512))}``;
        default: the model's ``packed_modules_mapping`` attribute, if any.
      packed_groups: ``{"qkv_proj": 4}``: that packed layer's columns are in 4 groups of every
        slice's next quarter (``jlora.targets.TargetModule.groups``, the tensor-parallel layout);
        the model's ``packed_modules_groups`` attribute, if any, gives the groups of the layers it
        names (an entry here that contradicts it is refused); any other packed layer: 1.
      sample_args / sample_kwargs: Linen only: inputs for ``module.init`` (run abstractly with
        ``jax.eval_shape``, nothing is allocated) to find the layers and their dims.
      path_to_name: Linen only: module path -> dotted name; default joins with "." after turning
        Linen's list names ``layers_3`` into ``layers.3`` (as PyTorch's ``ModuleList`` names them);
        a layer's own name such as T5's ``wi_0`` stays as it is unless its parent holds a list or
        tuple ``wi`` (so a layer named ``f"heads_{i}"`` in a compact loop needs this argument to
        become ``heads.i``).

    Raises:
      AdapterMismatchError: ``target_modules`` (or one of its entries) matches no layer, or matches
        a layer jlora cannot wrap (one stacked with ``nnx.vmap``/``nnx.scan`` or
        ``nn.scan``/``nn.vmap``, for instance: the default selection skips those); a packed
        layer's slices do not add up to its output dim; ``packed_groups`` names a layer that
        ``packed_modules`` does not declare, or contradicts the model's ``packed_modules_groups``.
      LoRAConfigError: a ``target_modules`` regex that does not compile.

    The wrapped model's forward is the model's own; LoRA state comes from ``jlora.lora_context``.
    ``jlora.find_targets(wrapped)`` reports the ``TargetModule`` s the adapter manager allocates.

    >>> from flax import nnx
    >>> mlp = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> [t.name for t in find_targets(apply(mlp))]
    ['layers.0', 'layers.1']
    """
    if target_modules is None and config is not None:
        target_modules = config.target_modules
    if isinstance(target_modules, list):
        target_modules = tuple(target_modules)
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise LoRAConfigError(
                f"target_modules regex {target_modules!r} does not compile ({e}); pass a Python "
                "regex that matches whole module paths, or a list of module names"
            ) from None
    if packed_modules is None:
        packed_modules = getattr(model, "packed_modules_mapping", None) or {}
    packed_groups = _packed_groups(model, packed_modules, packed_groups)
    packed_modules = {
        leaf: (tuple(spec), packed_groups.get(leaf, 1)) for leaf, spec in packed_modules.items()
    }
    if isinstance(model, nn.Module):
        if sample_args is None:
            raise TypeError("jlora.apply on a Linen module needs sample_args for module.init")
        return _apply_linen(
            model,
            target_modules,
            packed_modules,
            tuple(sample_args),
            dict(sample_kwargs or {}),
            path_to_name,
        )
    if isinstance(model, nnx.Module):
        if sample_args is not None or sample_kwargs is not None or path_to_name is not None:
            raise TypeError("sample_args, sample_kwargs and path_to_name are for Linen modules")
        return _apply_nnx(model, target_modules, packed_modules)
    raise TypeError(f"jlora.apply needs a flax nnx.Module or linen Module, got {type(model)}")


def find_targets(model) -> tuple[TargetModule, ...]:
    """The ``TargetModule`` s of a model returned by ``jlora.apply``, in model order."""
    if isinstance(model, LoRALinenModel):
        return model.targets
    if isinstance(model, nnx.Module):
        return tuple(m._jlora_target for _, m in nnx.iter_modules(model) if _is_lora(m))
    raise TypeError(f"find_targets needs a model returned by jlora.apply, got {type(model)}")


def linen_path_to_name(path: Sequence[str]) -> str:
    """``("model", "layers_3", "q_proj")`` -> ``"model.layers.3.q_proj"``."""
    return ".".join(_LIST_ITEM.sub(r"\1.\2", str(p)) for p in path)


_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")


def _linen_name(m: nn.Module) -> str:
    """The default name of a bound Linen layer: ``linen_path_to_name`` of its path, except that
    a last part like T5's ``wi_0`` is kept when the parent holds no sequence ``wi`` (the layer
    is a named attribute, not an item of a list of layers)."""
    *parents, leaf = m.path or ("",)
    item = _LIST_ITEM.match(leaf)
    if item and not isinstance(getattr(m.parent, item[1], None), list | tuple):
        return ".".join([*([linen_path_to_name(parents)] if parents else []), leaf])
    return linen_path_to_name(m.path)


def _name_of(m: nn.Module, path_to_name: Callable[[tuple[str, ...]], str] | None) -> str:
    return _linen_name(m) if path_to_name is None else path_to_name(m.path)


# --------------------------------------------------------------------------------------------
# Target selection (shared by NNX and Linen)
# --------------------------------------------------------------------------------------------


def _select(
    layers: Sequence[_Layer], target_modules: TargetSpec, packed: _Packing
) -> list[TargetModule]:
    explicit = target_modules is not None
    all_linear = target_modules == "all-linear"
    targets, hits = [], {}
    for layer in layers:
        slices, groups = _slices(layer, packed)
        names = (layer.name, *(n for n, _ in slices))
        if not explicit:
            matched = layer.unsupported is None
        elif all_linear:  # a wildcard: like the default, it skips layers jlora cannot wrap
            matched = (
                layer.kind == "linear"
                and layer.unsupported is None
                and layer.name.split(".")[-1] != "lm_head"
            )
        else:
            matched = False
            entries = (target_modules,) if isinstance(target_modules, str) else target_modules
            for entry in entries:
                spec = entry if isinstance(target_modules, str) else (entry,)
                if any(matches_target(n, spec) for n in names):
                    hits.setdefault(entry, layer.name)
                    matched = True
        if not matched:
            continue
        if layer.unsupported is not None:
            raise AdapterMismatchError(
                f"target_modules {target_modules!r} matches layer {layer.name!r}, which jlora "
                f"cannot wrap: {layer.unsupported}"
            )
        targets.append(
            TargetModule(
                name=layer.name,
                in_dim=layer.in_dim,
                out_dims=tuple(d for _, d in slices),
                peft_names=tuple(n for n, _ in slices),
                is_embedding=layer.kind == "embed",
                groups=groups,
            )
        )
    available = [layer.name for layer in layers if layer.unsupported is None]
    if explicit and not all_linear:
        entries = (target_modules,) if isinstance(target_modules, str) else target_modules
        missing = [e for e in entries if e not in hits]
        if missing:
            raise AdapterMismatchError(
                f"target_modules {list(missing)} match no layer of the model; its LoRA-able "
                f"layers are {_abbrev(available)}"
            )
    if not targets:
        raise AdapterMismatchError(
            f"no layer of the model matches target_modules={target_modules!r}; its LoRA-able "
            f"layers are {_abbrev(available)}"
        )
    return targets


def _slices(layer: _Layer, packed: _Packing) -> tuple[list[tuple[str, int]], int]:
    """``([(peft_name, out_dim), ...], groups)`` for ``layer``: one slice, or the packed ones."""
    prefix, _, leaf = layer.name.rpartition(".")
    spec, groups = packed.get(leaf, (None, 1))
    if spec is None or layer.unsupported is not None:
        return [(layer.name, layer.out_dim)], 1
    if layer.kind == "embed":
        raise AdapterMismatchError(
            f"packed_modules names {leaf!r}, but {layer.name!r} is an embedding, which cannot be "
            "packed; leave it out of packed_modules"
        )
    if not all(isinstance(s, tuple | list) and len(s) == 2 for s in spec):
        raise AdapterMismatchError(
            f"packed_modules[{leaf!r}] = {list(spec)}: give (peft_name, width) pairs, e.g. "
            '{"qkv_proj": (("q_proj", 2048), ("k_proj", 512), ("v_proj", 512))}'
        )
    if not all(is_int(d) and d >= 1 for _, d in spec):
        raise AdapterMismatchError(
            f"packed_modules[{leaf!r}] = {list(spec)}: each slice width must be an int >= 1"
        )
    slices = [(f"{prefix}.{n}" if prefix else n, int(d)) for n, d in spec]
    if sum(d for _, d in slices) != layer.out_dim:
        raise AdapterMismatchError(
            f"packed layer {layer.name!r} has {layer.out_dim} output features but "
            f"packed_modules[{leaf!r}] = {list(spec)} add up to {sum(d for _, d in slices)}"
        )
    return slices, groups


def _abbrev(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)} in all)"


def _stacked_layer(name: str, kind: str, stored, per_call) -> _Layer:
    """A layer whose parameters carry extra leading (layer) axes: one LoRA target cannot serve
    the different layers a scan or vmap runs it as."""
    return _Layer(
        name,
        kind,
        unsupported=(
            f"its parameters are stored as {stored} but one call of the layer uses {per_call}; "
            "layers stacked with nnx.vmap/nnx.scan or nn.scan/nn.vmap are not supported: unroll "
            "them into one module per layer, or leave them out of target_modules"
        ),
    )


# --------------------------------------------------------------------------------------------
# NNX: graph surgery
# --------------------------------------------------------------------------------------------


# base class -> its LoRA subclass, and LoRA subclass -> its base class
_LORA_CLASSES: dict[type, type] = {}
_BASE_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    """``LoRA<cls>``: ``cls`` whose ``__call__`` adds the active context's LoRA to the output.

    One class per base class (cached), so graph definitions, and with them jit caches, are stable.
    """
    if cls in _LORA_CLASSES:
        return _LORA_CLASSES[cls]

    def __call__(self, inputs, *args, **kwargs):
        y = cls.__call__(self, inputs, *args, **kwargs)
        view = self._jlora_view
        if view.kind == "einsum":
            einsum_str = kwargs.get("einsum_str", args[0] if args else None)
            if einsum_str is not None:
                view = LayerView("einsum", einsum_str=einsum_str)
        return lora_forward(self._jlora_target, view, inputs, y)

    __call__.__doc__ = f"{cls.__name__}.__call__ plus LoRA from ``jlora.lora_context``."
    name = f"LoRA{cls.__name__}"
    new = _lora_meta(type(cls))(name, (cls,), {"__call__": __call__, "__module__": __name__})
    new.__qualname__ = name
    _LORA_CLASSES[cls] = new
    _BASE_CLASSES[new] = cls
    return new


_LORA_METAS: dict[type, type] = {}


def _lora_meta(meta: type) -> type:
    """A subclass of the base class's metaclass whose classes pickle as ``_lora_class(base)``:
    pickle finds classes by module attribute, and ``LoRA<cls>`` is made at run time, not bound
    there. ``copyreg`` reducers are looked up by the metaclass, so this one touches only LoRA
    classes."""
    if meta not in _LORA_METAS:
        _LORA_METAS[meta] = type(meta)(f"LoRA{meta.__name__}", (meta,), {"__module__": __name__})
        copyreg.pickle(_LORA_METAS[meta], lambda c: (_lora_class, (_BASE_CLASSES[c],)))
    return _LORA_METAS[meta]


def _is_lora(module) -> bool:
    return type(module) in _BASE_CLASSES


def _nnx_layer(name: str, m: nnx.Module) -> _Layer | None:
    # The shape each layer builds from its features; nnx.vmap/nnx.scan add leading layer axes.
    if isinstance(m, nnx.Embed):
        param, shape = m.embedding, (m.num_embeddings, m.features)
    elif isinstance(m, nnx.Linear):
        param, shape = m.kernel, (m.in_features, m.out_features)
    elif isinstance(m, nnx.LinearGeneral):
        param, shape = m.kernel, (*m.batch_axis.values(), *m.in_features, *m.out_features)
    elif isinstance(m, nnx.Einsum):
        param, shape = m.kernel, tuple(m.kernel_shape)
    else:
        return None
    if tuple(param.shape) != shape:
        kind = "embed" if isinstance(m, nnx.Embed) else "linear"
        return _stacked_layer(name, kind, tuple(param.shape), shape)
    if isinstance(m, nnx.Embed):
        return _Layer(name, "embed", m.num_embeddings, m.features, LayerView("embed"))
    if isinstance(m, nnx.Linear):
        return _Layer(name, "linear", m.in_features, m.out_features, LayerView("linear"))
    if isinstance(m, nnx.LinearGeneral):
        if m.batch_axis:
            return _Layer(name, "linear", unsupported="LinearGeneral with batch_axis")
        view = LayerView("linear", in_axes=tuple(m.axis), num_out_axes=len(m.out_features))
        return _Layer(name, "linear", math.prod(m.in_features), math.prod(m.out_features), view)
    if m.einsum_str is None:  # an nnx.Einsum
        return _Layer(name, "linear", unsupported="Einsum without a constructor einsum_str")
    try:
        in_dim, out_dim = einsum_dims(m.einsum_str, m.kernel.shape)
    except ValueError as e:
        return _Layer(name, "linear", unsupported=str(e))
    return _Layer(name, "linear", in_dim, out_dim, LayerView("einsum", einsum_str=m.einsum_str))


def _apply_nnx(model: nnx.Module, target_modules: TargetSpec, packed: _Packing):
    model = nnx.clone(model)
    found = []
    for path, m in nnx.iter_modules(model):
        if _is_lora(m):  # re-applying: start from the base classes
            object.__setattr__(m, "__class__", _BASE_CLASSES[type(m)])
            del m._jlora_target, m._jlora_view
        layer = _nnx_layer(".".join(str(p) for p in path), m)
        if layer is not None:
            found.append((layer, m))
    targets = {t.name: t for t in _select([layer for layer, _ in found], target_modules, packed)}
    for layer, m in found:
        if layer.name in targets:
            object.__setattr__(m, "__class__", _lora_class(type(m)))
            m._jlora_target = targets[layer.name]
            m._jlora_view = layer.view
    return model


# --------------------------------------------------------------------------------------------
# Linen: method interception
# --------------------------------------------------------------------------------------------

_LINEN_KINDS = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)


@dataclasses.dataclass(frozen=True, eq=False)
class LoRALinenModel:
    """A Linen module with multi-LoRA: ``init`` and ``apply`` are the module's own, ``apply``
    adds LoRA (from ``jlora.lora_context``) to the outputs of the targeted layers.

    Attributes:
      module: the unchanged Linen module; its parameter tree is the wrapped model's.
      targets: the ``TargetModule`` s found by ``jlora.apply``.
    """

    module: nn.Module
    targets: tuple[TargetModule, ...]
    views: Mapping[str, LayerView]
    path_to_name: Callable[[tuple[str, ...]], str] | None

    def name_of(self, m: nn.Module) -> str:
        """The dotted name of a bound Linen layer ``m``."""
        return _name_of(m, self.path_to_name)

    def init(self, *args, **kwargs):
        """``module.init`` (LoRA adds no parameters)."""
        return self.module.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        """``module.apply`` with LoRA added to the targeted layers' outputs."""
        by_name = {t.name: t for t in self.targets}
        # A subclass's __call__ that calls super().__call__ is intercepted twice for one module:
        # LoRA goes on the outermost call's output only (as PEFT wraps the module's forward).
        running: set[int] = set()

        def interceptor(next_fun, f_args, f_kwargs, context):
            m = context.module
            if context.method_name != "__call__" or not isinstance(m, _LINEN_KINDS):
                return next_fun(*f_args, **f_kwargs)
            target = by_name.get(self.name_of(m))
            if target is None or id(m) in running:
                return next_fun(*f_args, **f_kwargs)
            running.add(id(m))
            try:
                y = next_fun(*f_args, **f_kwargs)
            finally:
                running.discard(id(m))
            x = f_args[0] if f_args else f_kwargs["inputs"]
            view = self.views[target.name]
            if view.kind == "einsum":
                einsum_str = f_kwargs.get("einsum_str", f_args[1] if len(f_args) > 1 else None)
                if einsum_str is not None:
                    view = LayerView("einsum", einsum_str=einsum_str)
            return lora_forward(target, view, x, y)

        with nn.intercept_methods(interceptor):
            return self.module.apply(variables, *args, **kwargs)

    __call__ = apply


def _linen_layer(name: str, m: nn.Module, args, kwargs, y) -> _Layer:
    x = args[0] if args else kwargs["inputs"]
    if isinstance(m, nn.Embed):
        return _Layer(name, "embed", m.num_embeddings, m.features, LayerView("embed"))
    if isinstance(m, nn.Dense):
        return _Layer(name, "linear", x.shape[-1], m.features, LayerView("linear"))
    if isinstance(m, nn.DenseGeneral):
        if m.batch_dims:
            return _Layer(name, "linear", unsupported="DenseGeneral with batch_dims")
        axis = (m.axis,) if isinstance(m.axis, int) else tuple(m.axis)
        features = (m.features,) if isinstance(m.features, int) else tuple(m.features)
        view = LayerView("linear", in_axes=axis, num_out_axes=len(features))
        in_dim = math.prod(x.shape[a] for a in axis)
        return _Layer(name, "linear", in_dim, math.prod(features), view)
    einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or m.einsum_str
    try:
        in_dim, out_dim = einsum_dims(einsum_str, m.shape)
    except ValueError as e:
        return _Layer(name, "linear", unsupported=str(e))
    return _Layer(name, "linear", in_dim, out_dim, LayerView("einsum", einsum_str=einsum_str))


def _is_static(arg) -> bool:
    return arg is None or isinstance(arg, bool | int | float | complex | str)


def _shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    # A layer's own arrays; a child module's params (a Dense subclass holding a LayerNorm,
    # say) are a nested dict.
    return {
        k: tuple(v.shape)
        for k, v in sorted(nn.meta.unbox(params).items())
        if not isinstance(v, Mapping)
    }


def _apply_linen(module, target_modules, packed, sample_args, sample_kwargs, path_to_name):
    # name -> (layer, its module path, the shapes of its params as one call sees them)
    found: dict[str, tuple[_Layer, tuple[str, ...], dict]] = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        m = context.module
        if context.method_name == "__call__" and isinstance(m, _LINEN_KINDS):
            name = _name_of(m, path_to_name)
            if name not in found:
                seen = _shapes(m.variables.get("params", {}))
                found[name] = (_linen_layer(name, m, args, kwargs, y), m.path, seen)
        return y

    key = jax.random.key(0)
    rngs = {"params": key, "dropout": key}
    # Only arrays are traced: a Python flag (train, deterministic) given positionally is passed
    # as it is, as sample_kwargs are.
    traced = [i for i, a in enumerate(sample_args) if not _is_static(a)]

    def init(*arrays):
        args = list(sample_args)
        for i, a in zip(traced, arrays, strict=True):
            args[i] = a
        return module.init(rngs, *args, **sample_kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(init, *(sample_args[i] for i in traced))
    layers = []
    for layer, path, seen in found.values():
        # nn.scan / nn.vmap hand each call one slice of the params the tree stores stacked.
        stored = variables.get("params", {})
        for part in path:
            stored = stored.get(part, {})
        stored = _shapes(stored)
        if stored and stored != seen:
            layer = _stacked_layer(layer.name, layer.kind, stored, seen)
        layers.append(layer)
    targets = tuple(_select(layers, target_modules, packed))
    views = {layer.name: layer.view for layer in layers if layer.view is not None}
    return LoRALinenModel(
        module=module,
        targets=targets,
        views={t.name: views[t.name] for t in targets},
        path_to_name=path_to_name,
    )
