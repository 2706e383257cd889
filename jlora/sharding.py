"""Sharded multi-LoRA on a device mesh with JAX's own SPMD: the slot banks carry ``NamedSharding`` s
that match their base layers, and one ``jax.jit`` runs the whole batch over the mesh.

Mesh. Two named axes: ``"data"`` splits the batch (rows of ``ids``, the KV cache, the mapping's
per-token and per-sequence slots), ``"model"`` splits the weights tensor-parallel, Megatron style.
Both axes are ``AxisType.Auto``: XLA's SPMD partitioner propagates shardings from the inputs and
inserts the collectives, so the model and LoRA code stay the single-device code.

Base weights (``llama_param_specs``): a layer is *column-parallel* when its kernel ``[in, out]`` is
split on ``out`` (q/k/v, gate/up, fused qkv/gate_up, lm_head), *row-parallel* when split on ``in``
(o, down, and the vocab-parallel embedding ``[vocab, hidden]``); norms are replicated.

Slot banks (``bank_specs``), per the base layer's style, for ``a [slots, in, r]``,
``b [slots, r, out]`` (``scale [slots]`` is always replicated); the last column is the collective
XLA adds for the LoRA of one layer (measured on a (1, 8) mesh, tests/test_sharding.py):

==============  ==============  ==============  ================================================
style           a               b               LoRA collective
==============  ==============  ==============  ================================================
column          replicated      split on out    none: the delta comes out split like y
row             split on in     replicated      all-reduce of the partial ``h = x @ a`` [T, r]
column, fully   split on r      split on out    all-gather of ``h`` [T, r] from its rank shards
row, fully      split on in     split on out    all-reduce of ``h``; the delta comes out split
replicated      replicated      replicated      none
==============  ==============  ==============  ================================================

"fully" is ``LoRAConfig.fully_sharded_loras`` (S-LoRA; vLLM's ``*WithShardedLoRA`` layers): every
device holds ``1 / model`` of every bank. A row-parallel A is already split (on ``in``, which one
mesh axis cannot split twice), so there B is split on ``out`` instead, as vLLM's
``RowParallelLinearWithShardedLoRA`` does. The slot axis is never split: any device may need any
adapter in a mixed batch. A packed (fused) target has one bank per slice, each split on its own
``out``; XLA moves the columns when the slices do not line up with the base kernel's shards.

Styles come from the base model, not from names: ``layer_styles`` reads how each wrapped layer's
kernel is placed, so a model sharded another way gets matching banks (``LLAMA_STYLES`` is only
the default for ``bank_specs`` without styles).

The forward is the single-device one inside ``jax.jit``: banks, mapping and inputs enter placed
(or with ``in_shardings``), the context is entered inside the jit, ``out_shardings`` pin the
logits and the KV cache::

    mesh = make_mesh(data=2, model=4)
    model = jlora.apply(shard_model(llama, mesh))
    styles = layer_styles(model)  # read from the placed kernels
    state = shard_state(init_state(config, find_targets(model)),
                        bank_shardings(find_targets(model), mesh, styles,
                                       fully_sharded=config.fully_sharded_loras))

    graphdef, params = nnx.split(model)
    cache = kv_cache_zeros(llama.config, mesh, batch_size=16, max_len=256)

    @functools.partial(jax.jit, out_shardings=(batch_sharding(mesh, 3),
                                               kv_cache_shardings(llama.config, mesh)))
    def step(params, banks, mapping, ids, positions, cache):
        with jlora.lora_context(banks, mapping):
            return nnx.merge(graphdef, params)(ids, positions, kv_cache=cache)

    state, mapping = prepare_batch(state, requests, lengths)
    logits, cache = step(params, state.banks, *shard_batch(mesh, mapping, ids, positions), cache)

Imports jlora data-model modules, jlora.apply and jlora.models.llama.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora.apply import find_targets
from jlora.config import is_int
from jlora.errors import AdapterMismatchError, LoRAConfigError
from jlora.mapping import LoRAMapping
from jlora.models.llama import KVCache, LlamaConfig
from jlora.targets import TargetModule
from jlora.weights import DATA, MODEL, LoRABank, model_split_of

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from jlora.manager import AdapterManagerState


COLUMN = "column"
ROW = "row"
REPLICATED = "replicated"
STYLES = (COLUMN, ROW, REPLICATED)

# Megatron-style tensor parallelism for the reference Llama, by the last name of a parameter's
# module: the kernel (or embedding table) [in, out] is split on out (column) or in (row).
LLAMA_STYLES: Mapping[str, str] = {
    "q_proj": COLUMN,
    "k_proj": COLUMN,
    "v_proj": COLUMN,
    "qkv_proj": COLUMN,
    "gate_proj": COLUMN,
    "up_proj": COLUMN,
    "gate_up_proj": COLUMN,
    "lm_head": COLUMN,
    "o_proj": ROW,
    "down_proj": ROW,
    "embed_tokens": ROW,  # vocab-parallel embedding [vocab, hidden]
}

BankSpecs = dict[str, tuple[LoRABank, ...]]  # LoRABanks whose leaves are PartitionSpecs
BankShardings = dict[str, tuple[LoRABank, ...]]  # ... or NamedShardings


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def make_mesh(data: int = 1, model: int | None = None, *, devices=None) -> Mesh:
    """A ``(data, model)`` mesh of ``devices`` (default ``jax.devices()``, every process's).

    ``model`` defaults to ``len(devices) // data``. Both axes are ``AxisType.Auto``, so jitted
    code is partitioned by XLA from the shardings of its inputs and outputs.

    >>> dict(make_mesh(1, 1, devices=jax.devices()[:1]).shape)
    {'data': 1, 'model': 1}
    """
    for name, v in (("data", data), ("model", model)):
        if not (is_int(v) or (name == "model" and v is None)):
            raise TypeError(f"make_mesh: {name} must be an int, got {v!r}")
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // max(data, 1)
    if data < 1 or model < 1 or data * model != len(devices):
        raise LoRAConfigError(
            f"a (data={data}, model={model}) mesh needs {data * model} devices, "
            f"{len(devices)} are given; pick data * model == {len(devices)}"
        )
    return jax.make_mesh(
        (data, model), (DATA, MODEL), (AxisType.Auto, AxisType.Auto), devices=devices
    )


def check_mesh(mesh: Mesh) -> None:
    """Raises ``LoRAConfigError`` unless ``mesh`` has the ``data`` and ``model`` axes, both
    ``AxisType.Auto`` (``jax.make_mesh`` makes Explicit axes by default, which JAX's sharding
    checks then refuse deep inside a slot write); ``make_mesh`` builds a right one."""
    if not isinstance(mesh, Mesh | AbstractMesh):
        raise LoRAConfigError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    missing = [a for a in (DATA, MODEL) if a not in types]
    if missing:
        raise LoRAConfigError(
            f"the mesh has axes {list(mesh.axis_names)}, not {missing}: jlora's shardings use "
            f"{DATA!r} and {MODEL!r}; build it with jlora.sharding.make_mesh"
        )
    explicit = [a for a in (DATA, MODEL) if types[a] != AxisType.Auto]
    if explicit:
        raise LoRAConfigError(
            f"mesh axes {explicit} are {[str(types[a]) for a in explicit]}, not AxisType.Auto: "
            "jlora relies on XLA propagating shardings; build the mesh with "
            "jlora.sharding.make_mesh (or pass axis_types=(AxisType.Auto,) * 2 to jax.make_mesh)"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """An array whose leading dim is the batch: split on ``data``, the rest replicated."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


def llama_param_specs(model: nnx.Module) -> nnx.State:
    """``PartitionSpec`` per parameter of a ``LlamaForCausalLM`` (the structure of
    ``nnx.state(model)``): Megatron tensor parallelism over ``model`` (``LLAMA_STYLES``), norms
    replicated. A bias follows its kernel's output dim."""

    def spec(path, leaf) -> P:
        names = [_key_name(k) for k in path if _key_name(k) != "value"]
        module, param = names[-2], names[-1]
        style = LLAMA_STYLES.get(module, REPLICATED)
        if style == REPLICATED or leaf.ndim == 0:
            return P()
        if param == "bias":
            return P(MODEL) if style == COLUMN else P()
        return P(None, MODEL) if style == COLUMN else P(MODEL, None)

    return jax.tree_util.tree_map_with_path(spec, nnx.state(model))


def shard_model(model: nnx.Module, mesh: Mesh, specs: nnx.State | None = None) -> nnx.Module:
    """Returns a copy of ``model`` whose parameters are placed on ``mesh`` (``specs`` default:
    ``llama_param_specs(model)``); ``model`` is left as it was.

    Every split dim is checked before anything moves: ``LoRAConfigError`` names the parameter
    whose dim its mesh axis does not divide.
    """
    check_mesh(mesh)
    warn_if_fused_split(getattr(model, "config", None), mesh)
    specs = llama_param_specs(model) if specs is None else specs
    graphdef, state = nnx.split(model)

    def sharding(path, x, spec):
        name = ".".join(_key_name(k) for k in path if _key_name(k) != "value")
        _check_spec(name, x.ndim, spec, mesh)
        _check_divisible(name, x.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(sharding, state, specs)
    return nnx.merge(graphdef, jax.tree.map(place, state, shardings))


def warn_if_fused_split(config, mesh) -> bool:
    """Logs a warning, and returns True, when a model with fused projections (``fuse_qkv`` /
    ``fuse_gate_up``) is split over a ``model`` axis of more than one device that does not
    divide its ``fused_groups``: the fused kernel's columns then cut across the slices on the
    devices and XLA moves columns between them in every layer (26 collective-permutes per
    forward on a (1, 8) mesh with ``[q | k | v]`` columns, measured: docs/multihost.md)."""
    fused = [f for f in ("fuse_qkv", "fuse_gate_up") if getattr(config, f, False)]
    model = dict(mesh.shape).get(MODEL, 1)
    groups = getattr(config, "fused_groups", 1)
    if not fused or model <= 1 or groups % model == 0:
        return False
    logger.warning(
        "%s with fused_groups=%d split over model=%d devices: the fused columns cut across the "
        "slices and XLA moves them between devices in every layer; build the model with "
        "fused_groups a multiple of %d that divides the slices (from_pretrained(..., mesh=mesh) "
        "picks it when it can) or without %s (docs/multihost.md)",
        " and ".join(fused),
        groups,
        model,
        model,
        " and ".join(fused),
    )
    return True


def layer_styles(model: nnx.Module) -> dict[str, str]:
    """Target name -> ``"column"``, ``"row"`` or ``"replicated"``, read from how each layer's kernel
    of a ``jlora.apply`` -ed NNX model is placed: split over ``model`` on its output dims is
    column-parallel, on its input dims row-parallel, elsewhere (or not at all) replicated.

    Handles ``nnx.Linear``, ``nnx.LinearGeneral`` (input dims lead the kernel) and ``nnx.Embed``
    (``[vocab, features]``); for other layers give the styles by hand.
    """
    modules = {".".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
    styles = {}
    for target in find_targets(model):
        m = modules[target.name]
        if isinstance(m, nnx.Embed):
            kernel, n_in = m.embedding, 1
        elif isinstance(m, nnx.Linear):
            kernel, n_in = m.kernel, 1
        elif isinstance(m, nnx.LinearGeneral):
            kernel, n_in = m.kernel, len(m.in_features)
        else:
            raise TypeError(
                f"layer_styles cannot read {target.name!r} ({type(m).__name__}); pass its style "
                f"to bank_shardings by hand (one of {STYLES})"
            )
        styles[target.name] = _style_of(kernel[...], n_in)
    return styles


def _style_of(kernel: jax.Array, n_in: int) -> str:
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return REPLICATED
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))

    def uses_model(entries) -> bool:
        return any(MODEL in (e if isinstance(e, tuple) else (e,)) for e in entries)

    if uses_model(spec[n_in:]):
        return COLUMN
    if uses_model(spec[:n_in]):
        return ROW
    return REPLICATED


# --------------------------------------------------------------------------------------------
# Slot banks
# --------------------------------------------------------------------------------------------


def bank_specs(
    targets: Sequence[TargetModule],
    styles: Mapping[str, str] | Callable[[str], str] | None = None,
    *,
    fully_sharded: bool = False,
) -> BankSpecs:
    """Target name -> one ``LoRABank`` of ``PartitionSpec`` s per output slice (see the table in
    the module docstring).

    Args:
      targets: the model's ``TargetModule`` s (``jlora.apply.find_targets``).
      styles: target name -> style, a mapping (``layer_styles(model)``) or a function of the
        name; default: ``LLAMA_STYLES`` by the name's last part.
      fully_sharded: ``LoRAConfig.fully_sharded_loras``.
    """
    out = {}
    for target in targets:
        style = _lookup_style(styles, target.name)
        if style == COLUMN:
            a = P(None, None, MODEL) if fully_sharded else P()
            b = P(None, None, MODEL)
        elif style == ROW:
            a = P(None, MODEL, None)
            b = P(None, None, MODEL) if fully_sharded else P()
        else:
            a = b = P()
        split = model_split_of(a, b)
        out[target.name] = tuple(
            LoRABank(a=a, b=b, scale=P(), model_split=split) for _ in target.out_dims
        )
    return out


def bank_shardings(
    targets: Sequence[TargetModule],
    mesh: Mesh,
    styles: Mapping[str, str] | Callable[[str], str] | None = None,
    *,
    fully_sharded: bool = False,
) -> BankShardings:
    """``bank_specs`` as ``NamedSharding`` s on ``mesh``; checks every split dim divides.

    >>> t = TargetModule(name="layers.0.o_proj", in_dim=8, out_dims=(4,),
    ...                  peft_names=("layers.0.o_proj",))
    >>> mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    >>> bank_shardings([t], mesh, fully_sharded=True)["layers.0.o_proj"][0].a.spec
    P(None, 'model', None)
    """
    check_mesh(mesh)
    specs = bank_specs(targets, styles, fully_sharded=fully_sharded)
    by_name = {t.name: t for t in targets}
    out = {}
    for name, banks in specs.items():
        target = by_name[name]
        for bank, out_dim, peft_name in zip(banks, target.out_dims, target.peft_names, strict=True):
            # The rank dim is checked when the banks are placed (shard_state): it is a config value.
            _check_divisible(f"{peft_name} LoRA A", (None, target.in_dim, None), bank.a, mesh)
            _check_divisible(f"{peft_name} LoRA B", (None, None, out_dim), bank.b, mesh)
        out[name] = tuple(
            jax.tree.map(lambda spec: NamedSharding(mesh, spec), bank, is_leaf=_is_spec)
            for bank in banks
        )
    return out


def shard_state(state: AdapterManagerState, shardings: BankShardings) -> AdapterManagerState:
    """Returns ``state`` (a ``jlora.manager.AdapterManagerState``) with its banks placed per
    ``shardings`` (``bank_shardings``); the host bookkeeping is shared, ``state`` is left as it
    was. Call it once, on the state ``init_state`` returns: the manager's slot writes keep these
    shardings.

    Raises ``LoRAConfigError`` before any transfer when a target has no shardings or when
    ``max_lora_rank`` does not divide over the mesh axis that splits it (fully sharded LoRA).
    """
    extra = set(shardings) - {t.name for t in state.targets}
    if extra:
        raise AdapterMismatchError(
            f"shardings are given for targets {sorted(extra)} the state does not have; build "
            "them with bank_shardings from the same targets as the state"
        )
    placements = []
    for target, banks in zip(state.targets, state.bank_list, strict=True):
        placed = shardings.get(target.name)
        if placed is None or len(placed) != len(banks):
            raise LoRAConfigError(
                f"no shardings for every slice of target {target.name!r}; build them with "
                "bank_shardings from the same targets as the state"
            )
        for bank, sharding, peft_name in zip(banks, placed, target.peft_names, strict=True):
            _check_divisible(
                f"{peft_name} LoRA A",
                bank.a.shape,
                sharding.a.spec,
                sharding.a.mesh,
                hint="fully sharded LoRA splits the rank: make LoRAConfig.max_lora_rank a "
                "multiple of the model axis size",
            )
        placements.append(tuple(placed))
    bank_list = tuple(
        tuple(
            bank.replace(
                a=place(bank.a, to.a),
                b=place(bank.b, to.b),
                scale=place(bank.scale, to.scale),
                model_split=to.sharded_split(),
            )
            for bank, to in zip(banks, placed, strict=True)
        )
        for banks, placed in zip(state.bank_list, placements, strict=True)
    )
    return dataclasses.replace(state, bank_list=bank_list)


def bank_specs_of(banks: Mapping[str, Sequence[LoRABank]]) -> BankSpecs:
    """The ``PartitionSpec`` of every bank array, padded to the array's rank (``P()`` when
    replicated), to compare with ``bank_specs``; None for an array not laid out on a mesh (one
    committed to a single device, say)."""

    def spec_of(x) -> P | None:
        sharding = x.sharding
        if not isinstance(sharding, NamedSharding):
            return None
        return _normalize(sharding.spec, x.ndim)

    return {name: tuple(jax.tree.map(spec_of, b) for b in bs) for name, bs in banks.items()}


# --------------------------------------------------------------------------------------------
# Batch: mapping, inputs, KV cache
# --------------------------------------------------------------------------------------------


def mapping_shardings(mapping: LoRAMapping, mesh: Mesh) -> LoRAMapping:
    """Shardings for a ``LoRAMapping``: token and sequence slots split on ``data`` with the batch
    rows they follow (tokens are laid out row after row), the slot-sorted order and the per-slot
    counts replicated (they index the whole batch). When ``data`` splits the rows, ``jlora.ops``
    sorts each shard's slots itself and leaves those three unused."""
    check_mesh(mesh)
    data = mesh.shape[DATA]
    split = NamedSharding(mesh, P(DATA))
    whole = replicated(mesh)
    return LoRAMapping(
        token_slots=split if mapping.token_slots.shape[0] % data == 0 else whole,
        seq_slots=split if mapping.seq_slots.shape[0] % data == 0 else whole,
        sorted_token_ids=whole,
        slot_counts=whole,
        slot_starts=whole,
        is_prefill=mapping.is_prefill,
    )


def shard_batch(mesh: Mesh, mapping: LoRAMapping, *arrays) -> tuple:
    """``(mapping, *arrays)`` placed on ``mesh``: the mapping per ``mapping_shardings``, each
    array (``ids [B, L]``, ``positions [B, L]``, ...) split on ``data`` along its leading batch
    dim. Every process passes the same global values (the host bookkeeping that builds them is
    deterministic), so this also places a batch on a multi-host mesh."""
    check_mesh(mesh)
    for i, x in enumerate(arrays):
        if not isinstance(x, np.ndarray | jax.Array):
            raise TypeError(
                f"shard_batch: batch array {i} is a {type(x).__name__}; pass a NumPy or JAX array"
            )
        if x.ndim == 0:
            raise LoRAConfigError(
                f"shard_batch: batch array {i} is 0-d; each array has a leading batch dim"
            )
        _check_divisible(f"batch array {i}", x.shape, P(DATA), mesh)
    mapping = jax.tree.map(place, mapping, mapping_shardings(mapping, mesh))
    return (mapping, *(place(x, batch_sharding(mesh, np.ndim(x))) for x in arrays))


def kv_cache_shardings(config: LlamaConfig, mesh: Mesh) -> KVCache:
    """Each layer's ``k, v [batch, kv_heads, max_len, head_dim]``: batch split on ``data``, KV
    heads on ``model`` when they divide (else replicated over ``model``)."""
    check_mesh(mesh)
    heads = MODEL if config.num_key_value_heads % mesh.shape[MODEL] == 0 else None
    s = (NamedSharding(mesh, P(DATA, heads, None, None)),) * config.num_hidden_layers
    return KVCache(k=s, v=s)


def kv_cache_zeros(
    config: LlamaConfig, mesh: Mesh, *, batch_size: int, max_len: int, dtype=None
) -> KVCache:
    """``KVCache.zeros`` created on the mesh per ``kv_cache_shardings``: each device allocates
    its shard only."""
    shardings = kv_cache_shardings(config, mesh)
    _check_divisible("KV cache", (batch_size,), shardings.k[0].spec, mesh)
    zeros = functools.partial(
        KVCache.zeros, config, batch_size=batch_size, max_len=max_len, dtype=dtype
    )
    return jax.jit(zeros, out_shardings=shardings)()


def place(x, sharding: NamedSharding) -> jax.Array:
    """``x`` laid out per ``sharding``. A device array moves device to device
    (``jax.device_put``) when it stays within this process's devices or is already a global
    array; otherwise (host values, or a local array bound for a mesh spanning several
    processes) every process passes the same full value and hands each of its devices its
    shard (``jax.make_array_from_callback``)."""
    if isinstance(x, jax.Array) and (sharding.is_fully_addressable or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _lookup_style(styles, name: str) -> str:
    if styles is None:
        style = LLAMA_STYLES.get(name.rpartition(".")[2], REPLICATED)
    elif callable(styles):
        style = styles(name)
    else:
        if name not in styles:
            raise LoRAConfigError(
                f"no parallel style for target {name!r}; styles has {sorted(styles)}"
            )
        style = styles[name]
    if style not in STYLES:
        raise LoRAConfigError(f"target {name!r}: style {style!r} is not one of {STYLES}")
    return style


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _normalize(spec: P, ndim: int) -> P:
    entries = list(spec) + [None] * (ndim - len(spec))
    return P(*entries) if any(e is not None for e in entries) else P()


def _check_spec(what: str, ndim: int, spec, mesh) -> None:
    """A user's ``PartitionSpec`` for an ``ndim`` array fits ``mesh``: no more entries than dims,
    only the mesh's axes, each at most once (JAX's own errors come later, some mid-placement)."""
    entries = tuple(spec)
    if len(entries) > ndim:
        raise LoRAConfigError(f"{what}: {spec} has {len(entries)} entries for {ndim} dims")
    used = [a for e in entries if e is not None for a in (e if isinstance(e, tuple) else (e,))]
    unknown = [a for a in used if a not in mesh.axis_names]
    if unknown:
        raise LoRAConfigError(
            f"{what}: {spec} names {unknown}, not axes of the mesh {list(mesh.axis_names)}"
        )
    if len(set(used)) < len(used):
        raise LoRAConfigError(f"{what}: {spec} uses a mesh axis twice")


def _check_divisible(what: str, shape, spec, mesh, *, hint: str | None = None) -> None:
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec), strict=False)):
        if size is None or entry is None:
            continue
        axes = entry if isinstance(entry, tuple) else (entry,)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            raise LoRAConfigError(
                f"{what}: dim {dim} ({size}) is split over mesh axis {'x'.join(axes)!r} of "
                f"{parts} devices, which does not divide it; "
                + (hint or f"pick a mesh whose {'x'.join(axes)!r} size divides {size}")
            )


__all__ = [
    "COLUMN",
    "DATA",
    "LLAMA_STYLES",
    "MODEL",
    "REPLICATED",
    "ROW",
    "STYLES",
    "bank_shardings",
    "bank_specs",
    "bank_specs_of",
    "batch_sharding",
    "check_mesh",
    "kv_cache_shardings",
    "kv_cache_zeros",
    "layer_styles",
    "llama_param_specs",
    "make_mesh",
    "mapping_shardings",
    "place",
    "replicated",
    "shard_batch",
    "shard_model",
    "shard_state",
]
