"""LoRA weights as immutable pytrees: one layer, a packed (fused) layer, a whole adapter, and the
device slot bank that serves many adapters at once.

Layout (JAX, chosen once for the whole project): ``lora_a [in, r]``, ``lora_b [r, out]``, so a
layer computes ``y += scaling * (x @ lora_a) @ lora_b``. PEFT's PyTorch layout is the transpose
(``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``); jlora.loader converts. For embedding
LoRA, ``lora_a [vocab, r]`` is indexed by token id instead of multiplied.

Banks stack adapters along a leading slot axis: ``a [slots, in, max_rank]``,
``b [slots, max_rank, out]``, ``scale float32 [slots]``; slot 0 is all zeros ("no adapter").
Imports only jlora.errors, jlora.config and jlora.hostio.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora.config import FLOAT32_MAX, is_int
from jlora.errors import AdapterMismatchError, AdapterWeightsError, UnknownAdapterError
from jlora.hostio import FLOAT_DTYPE_NAMES, count_nonfinite

# The axes of a `jlora.sharding` mesh: batch rows on DATA, tensor parallelism on MODEL.
DATA = "data"
MODEL = "model"
# The ways a bank's dims may be split over MODEL that `jlora.ops` serves per device: column-
# parallel (B on out), row-parallel (A on in), and their fully sharded forms (A on rank as well
# as B on out; A on in and B on out).
MODEL_SPLITS = (("out",), ("in",), ("rank", "out"), ("in", "out"))


def model_split_of(a_spec, b_spec) -> tuple[str, ...] | None:
    """Which of a bank's dims (`"in"`, `"rank"`, `"out"`) the `PartitionSpec` s of its A
    `[slots, in, rank]` and B `[slots, rank, out]` split over MODEL: `()` for none, None for a
    layout other than `MODEL_SPLITS` (any use of another axis, the slot dim, or B's rank)."""
    a = tuple(a_spec) + (None,) * (3 - len(a_spec))
    b = tuple(b_spec) + (None,) * (3 - len(b_spec))
    if any(e not in (None, MODEL) for e in a + b) or a[0] or b[0] or b[1]:
        return None
    split = tuple(dim for dim, e in zip(("in", "rank"), a[1:], strict=True) if e)
    split += ("out",) if b[2] else ()
    return split if split in ((), *MODEL_SPLITS) else None


def _has_shape(*xs) -> bool:
    # Pytree unflattening may pass placeholders (None, object()) instead of arrays: check only
    # real arrays so construction-time validation never breaks JAX's tree utilities.
    return all(hasattr(x, "shape") and hasattr(x, "dtype") for x in xs)


@struct.dataclass
class LoRALayerWeights:
    """One module's LoRA: ``lora_a [in, r]``, ``lora_b [r, out]``, optional ``bias [out]``.

    >>> import numpy as np
    >>> w = LoRALayerWeights(module_name="q_proj", lora_a=np.ones((64, 8), np.float32),
    ...                      lora_b=np.ones((8, 32), np.float32), scaling=2.0)
    >>> (w.input_dim, w.rank, w.output_dim)
    (64, 8, 32)
    """

    lora_a: jax.Array | np.ndarray
    lora_b: jax.Array | np.ndarray
    bias: jax.Array | np.ndarray | None = None
    module_name: str = struct.field(pytree_node=False, default="")
    scaling: float = struct.field(pytree_node=False, default=1.0)
    is_embedding: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        scaling = self.scaling
        if isinstance(scaling, bool) or not (
            isinstance(scaling, int | float | np.integer | np.floating)
            and math.isfinite(scaling)
            and abs(scaling) <= FLOAT32_MAX
        ):
            # It multiplies every output of the module: an Inf or NaN here poisons all of them.
            # Banks and merges hold it in float32, where a larger one becomes Inf.
            raise AdapterWeightsError(
                f"module {self.module_name!r}: scaling must be a finite number within float32's "
                f"range (|s| <= {FLOAT32_MAX:.4g}), got {scaling!r}; check lora_alpha and r"
            )
        if not _has_shape(self.lora_a, self.lora_b):
            return
        a, b = self.lora_a, self.lora_b
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterWeightsError(
                f"module {self.module_name!r}: lora_a {tuple(a.shape)} and lora_b "
                f"{tuple(b.shape)} do not chain; expected lora_a [in, r] and lora_b [r, out]"
            )
        if _has_shape(self.bias) and tuple(self.bias.shape) != (b.shape[1],):
            raise AdapterWeightsError(
                f"module {self.module_name!r}: bias {tuple(self.bias.shape)} must be "
                f"[{b.shape[1]}] to match lora_b's output dim"
            )

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def input_dim(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.lora_b.shape[1])

    def delta_weight(self) -> jax.Array:
        """``scaling * lora_a @ lora_b`` in float32: what merging adds to a ``[in, out]`` kernel."""
        a = jnp.asarray(self.lora_a, jnp.float32)
        b = jnp.asarray(self.lora_b, jnp.float32)
        return self.scaling * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


@struct.dataclass
class PackedLoRALayerWeights:
    """LoRA for a fused projection (qkv, gate_up): one optional ``LoRALayerWeights`` per output
    slice, in the order the slices are concatenated along the output dim. ``None`` marks a slice
    the adapter does not target."""

    slices: tuple[LoRALayerWeights | None, ...]
    module_name: str = struct.field(pytree_node=False, default="")

    @property
    def rank(self) -> int:
        return max((s.rank for s in self.slices if s is not None), default=0)


LayerWeights = LoRALayerWeights | PackedLoRALayerWeights


@struct.dataclass
class LoRAModel:
    """One adapter: its id (>= 1), name, and per-module weights keyed by module path
    (PEFT's names without the ``base_model.model.`` prefix, e.g. ``model.layers.0.mlp.up_proj``).
    """

    loras: dict[str, LayerWeights]
    id: int = struct.field(pytree_node=False, default=1)
    name: str = struct.field(pytree_node=False, default="")
    path: str | None = struct.field(pytree_node=False, default=None)

    @property
    def rank(self) -> int:
        """The largest rank of any module (ranks differ with PEFT's ``rank_pattern``)."""
        return max((w.rank for w in self.loras.values()), default=0)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self.loras)

    def get_lora(self, module_name: str) -> LayerWeights | None:
        """The weights for ``module_name``, or None when this adapter does not target it."""
        return self.loras.get(module_name)

    def check_lora_name(self, module_name: str) -> bool:
        return module_name in self.loras

    def __getitem__(self, module_name: str) -> LayerWeights:
        try:
            return self.loras[module_name]
        except KeyError:
            raise UnknownAdapterError(
                f"adapter {self.name!r} (id {self.id}) has no LoRA for module {module_name!r}; "
                f"it targets {sorted(self.loras)}"
            ) from None

    def clone(self, new_id: int) -> LoRAModel:
        """Returns a copy with id ``new_id``; the arrays are shared (they are immutable)."""
        if not is_int(new_id) or new_id < 1:
            raise AdapterMismatchError(
                f"adapter {self.name!r}: adapter ids must be ints >= 1, got {new_id!r}"
            )
        return self.replace(id=int(new_id))

    def optimize(self, dtype: jnp.dtype | str | None = None) -> LoRAModel:
        """Returns a copy whose arrays are contiguous numpy arrays in ``dtype`` (default: kept),
        ready for fast copies into device slot banks.

        ``dtype`` is a float dtype jlora holds (float16, bfloat16, float32, float64); a weight
        the cast turns into Inf (too large for ``dtype``) is an ``AdapterWeightsError``."""
        if dtype is not None:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = None
            if name not in FLOAT_DTYPE_NAMES:
                raise AdapterWeightsError(
                    f"adapter {self.name!r}: optimize(dtype={dtype!r}) needs one of "
                    f"{sorted(FLOAT_DTYPE_NAMES)}"
                )

        def convert(path, x):
            if x is None:
                return None
            x = np.asarray(x)
            with np.errstate(over="ignore"):  # counted below
                y = np.ascontiguousarray(x, dtype=dtype or x.dtype)
            if y.dtype != x.dtype and count_nonfinite(y) > count_nonfinite(x):
                raise AdapterWeightsError(
                    f"adapter {self.name!r}: {jax.tree_util.keystr(path)} overflows "
                    f"{y.dtype.name} (values too large for it); keep a wider dtype"
                )
            return y

        return jax.tree_util.tree_map_with_path(convert, self)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(self))

    @property
    def num_bytes(self) -> int:
        return sum(
            math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(self)
        )


@struct.dataclass
class LoRABank:
    """Device slot bank for one (slice of a) target module.

    ``a [slots, in, max_rank]``, ``b [slots, max_rank, out]``, ``scale float32 [slots]``.
    Slot 0 is all zeros and means "no adapter"; ranks below ``max_rank`` are zero-padded.
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    # How a `jlora.sharding` mesh splits this bank over MODEL (`model_split_of`), set where the
    # bank gets its shardings. Static, so `jlora.ops` can run each device's shard under a jit,
    # where an Auto mesh axis shows no split; () when not split or unknown.
    model_split: tuple[str, ...] | None = struct.field(pytree_node=False, default=())

    def __post_init__(self):
        if not _has_shape(self.a, self.b, self.scale):
            return
        a, b, scale = tuple(self.a.shape), tuple(self.b.shape), tuple(self.scale.shape)
        if (len(a), len(b), len(scale)) != (3, 3, 1) or b[:2] != (a[0], a[2]) or scale != a[:1]:
            raise AdapterWeightsError(
                f"LoRABank shapes disagree: a {a} must be [slots, in, rank], "
                f"b {b} [slots, rank, out], scale {scale} [slots]"
            )

    @classmethod
    def zeros(
        cls,
        num_slots: int,
        in_dim: int,
        out_dim: int,
        max_rank: int,
        dtype=jnp.float32,
        *,
        sharding: LoRABank | None = None,
    ) -> LoRABank:
        """An empty bank: every slot zero (serves the base model). ``sharding``: a ``LoRABank``
        of ``jax.sharding.Sharding`` s; each device then allocates only its shard."""
        s = sharding or cls(a=None, b=None, scale=None)
        return cls(
            a=jnp.zeros((num_slots, in_dim, max_rank), dtype, device=s.a),
            b=jnp.zeros((num_slots, max_rank, out_dim), dtype, device=s.b),
            scale=jnp.zeros((num_slots,), jnp.float32, device=s.scale),
            model_split=s.sharded_split(),
        )

    def sharded_split(self) -> tuple[str, ...] | None:
        """`model_split_of` this bank's arrays' (or, for a bank of shardings, its own) named
        shardings; () when they are not `NamedSharding` s."""
        specs = [getattr(getattr(x, "sharding", x), "spec", None) for x in (self.a, self.b)]
        return () if None in specs else model_split_of(*specs)

    @property
    def num_slots(self) -> int:
        return int(self.a.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.a.shape[2])

    @property
    def input_dim(self) -> int:
        return int(self.a.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self.b.shape[2])


def pad_to_rank(layer: LoRALayerWeights, max_rank: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``layer``'s A and B zero-padded along the rank dim to ``max_rank`` (host numpy, ``dtype``):
    the rows a bank slot holds. Padding is exact: the extra rank columns contribute zero."""
    if layer.rank > max_rank:
        raise AdapterMismatchError(
            f"module {layer.module_name!r}: rank {layer.rank} exceeds max_lora_rank {max_rank}; "
            "raise LoRAConfig.max_lora_rank"
        )
    a = np.zeros((layer.input_dim, max_rank), dtype)
    b = np.zeros((max_rank, layer.output_dim), dtype)
    a[:, : layer.rank] = np.asarray(layer.lora_a)
    b[: layer.rank] = np.asarray(layer.lora_b)
    return a, b


__all__ = [
    "DATA",
    "MODEL",
    "MODEL_SPLITS",
    "LoRABank",
    "LoRALayerWeights",
    "LoRAModel",
    "LayerWeights",
    "PackedLoRALayerWeights",
    "model_split_of",
    "pad_to_rank",
]
