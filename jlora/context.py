"""How LoRA state reaches the layers of a model whose code was not written for it.

``jlora.apply`` wraps layers; at call time a wrapped layer reads the active ``lora_context``: a
dict of slot banks keyed by ``TargetModule.name`` and the step's ``LoRAMapping``. Enter the
context *inside* the jitted function, so the banks and the mapping are traced arguments and
loading, evicting or re-mapping adapters never retraces::

    @jax.jit
    def step(state, banks, mapping, input_ids):
        model = nnx.merge(graphdef, state)
        with jlora.lora_context(banks, mapping):
            return model(input_ids)

Without an active context (or for a layer absent from ``banks``) a wrapped layer returns exactly
its base output.

Token layout: a layer sees ``x [..., in]`` (for example ``[B, L, in]``); its leading dims are
flattened row-major into ``T`` token rows, so token ``b * L + l`` of a ``[B, L]`` batch is row
``l`` of sequence ``b``. ``mapping.token_slots [T]`` must follow that layout (see
``padded_batch_mapping``). A layer that sees one row per sequence instead (an LM head applied to
each sequence's last hidden state, ``[B, hidden]``) uses ``mapping.seq_slots [B]``. A layer whose
flattened row count is neither ``T`` nor ``B`` is an error.

Also here: ``LayerView``, how a Linear, LinearGeneral, Einsum or Embed layer's input and output
map to PEFT's ``[T, in]`` / ``[T, out]`` view. Imports jlora data-model modules and jlora.ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import ops
from jlora.config import is_int
from jlora.errors import AdapterMismatchError, LoRAConfigError, MappingError
from jlora.mapping import LoRAMapping, check_arrays
from jlora.targets import TargetModule
from jlora.weights import LoRABank

Banks = Mapping[str, Sequence[LoRABank]]


@dataclasses.dataclass(frozen=True)
class LoRAContext:
    """The LoRA state of one forward pass: slot banks per target name, the batch mapping, and
    the ``jlora.ops`` implementation the layers use."""

    banks: Mapping[str, tuple[LoRABank, ...]]
    mapping: LoRAMapping
    impl: str = "auto"
    # Names of the banks a wrapped layer has read (filled while the context is active).
    read: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)


_ACTIVE: contextvars.ContextVar[LoRAContext | None] = contextvars.ContextVar(
    "jlora_lora_context", default=None
)

# JAX caches the traces of `jax.checkpoint` (`nnx.remat`), inner `jit`s and lax loop bodies by
# their arguments and its own trace context, which a contextvar is not part of: a layer traced
# once without (or with another) context would have its trace reused. Each traced context enters
# a fresh key of JAX's trace context, so those caches miss. Eager contexts share one key: a fresh
# one each would recompile every jitted jnp op called inside.
_TRACE_KEY = jax.make_user_context(None)
_TRACE_SERIAL = itertools.count(1)


@contextlib.contextmanager
def lora_context(
    banks: Banks, mapping: LoRAMapping, *, impl: str = "auto", strict: bool = True
) -> Iterator[LoRAContext]:
    """Makes ``banks`` and ``mapping`` the LoRA state of every wrapped layer called inside.

    Args:
      banks: ``{TargetModule.name: (LoRABank, ...)}``, one bank per output slice (a single
        ``LoRABank`` is accepted for an unpacked target). Every bank has ``mapping.num_slots``
        slots; slot 0 is zeros (the base model).
      mapping: the step's ``LoRAMapping``; ``token_slots`` laid out as the module docstring says.
      impl: ``jlora.ops.add_lora``'s ``impl``: ``"auto"`` (Pallas on GPU, XLA elsewhere),
        ``"pallas"`` or ``"xla"``.
      strict: on leaving the context, raise ``AdapterMismatchError`` naming any bank that no
        wrapped layer read (its LoRA was not applied: a name that matches no layer). Pass
        ``strict=False`` for a call that runs only part of the model.

    Contexts nest; the innermost one wins. Wrapped layers under ``nnx.remat``, ``jax.checkpoint``,
    an inner ``jit`` or in a ``lax`` loop body see it too (each traced context is a fresh key of
    JAX's trace context, so their cached traces are not reused). Enter it inside ``jax.jit`` (see
    the module docstring): a wrapped layer traced under a transformation while the context holds
    concrete arrays raises, because those arrays would be baked into the compiled program as
    constants. Under ``jax.vmap`` the mapping applies to each vmapped call as a whole: to vmap
    over the batch, enter the context inside the vmapped function with each example's own
    mapping.
    """
    if impl not in ops.IMPLS:
        raise LoRAConfigError(f"lora_context: impl={impl!r} is not one of {ops.IMPLS}")
    if not isinstance(strict, bool | np.bool_):
        raise LoRAConfigError(f"lora_context: strict must be a bool, got {strict!r}")
    if not isinstance(mapping, LoRAMapping):
        raise MappingError(f"lora_context needs a LoRAMapping, got {type(mapping).__name__}")
    check_arrays("lora_context", mapping)
    if not isinstance(banks, Mapping):
        raise AdapterMismatchError(
            f"lora_context needs a dict of banks keyed by target name, got {type(banks).__name__}"
        )
    normalized = {}
    for name, value in banks.items():
        slices = (value,) if isinstance(value, LoRABank) else value
        iterable = isinstance(slices, Iterable) and not isinstance(slices, str)
        slices = tuple(slices) if iterable else ()
        if not slices or not all(isinstance(b, LoRABank) for b in slices):
            raise AdapterMismatchError(
                f"banks[{name!r}] must be a LoRABank or a tuple of LoRABanks (one per slice)"
            )
        for bank in slices:
            if bank.num_slots != mapping.num_slots:
                raise MappingError(
                    f"banks[{name!r}] has {bank.num_slots} slots but the mapping was built for "
                    f"num_slots={mapping.num_slots}; build both from the same max_loras + 1"
                )
        normalized[name] = slices
    ctx = LoRAContext(banks=normalized, mapping=mapping, impl=impl)
    key = next(_TRACE_SERIAL) if isinstance(mapping.token_slots, jax.core.Tracer) else "concrete"
    token = _ACTIVE.set(ctx)
    try:
        with _TRACE_KEY(key):
            yield ctx
    finally:
        _ACTIVE.reset(token)
    unread = [name for name in normalized if name not in ctx.read]
    if strict and unread:
        shown = ", ".join(repr(n) for n in unread[:4]) + (", ..." if len(unread) > 4 else "")
        raise AdapterMismatchError(
            f"lora_context: no wrapped layer read the banks of {shown} ({len(unread)} of "
            f"{len(normalized)}), so their LoRA was not applied. Key banks by the names "
            "jlora.find_targets(model) gives. For a call that runs only part of the model, pass "
            "strict=False"
        )


def current_context() -> LoRAContext | None:
    """The innermost active ``lora_context``, or None."""
    return _ACTIVE.get()


def padded_batch_mapping(
    seq_slots: Sequence[int] | np.ndarray,
    seq_len: int,
    *,
    num_slots: int,
    num_seqs: int | None = None,
    is_prefill: bool = True,
) -> LoRAMapping:
    """The mapping for a padded ``[B, L]`` batch: row ``b``'s ``L`` tokens all use its slot.

    ``B = num_seqs`` (default ``len(seq_slots)``); rows past ``len(seq_slots)`` use slot 0.
    Padding positions inside a row take the row's slot, which is harmless: their outputs are
    discarded.

    >>> m = padded_batch_mapping([2, 0, 1], 4, num_slots=3)
    >>> m.token_slots.tolist()
    [2, 2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1]
    """
    slots = np.asarray(seq_slots)
    if slots.ndim != 1 or not (slots.size == 0 or np.issubdtype(slots.dtype, np.integer)):
        raise MappingError(
            f"seq_slots must be a 1-D sequence of int slot indices, got {slots.dtype} {slots.shape}"
        )
    if not is_int(seq_len) or seq_len < 0:
        raise MappingError(f"seq_len must be an int >= 0, got {seq_len!r}")
    if num_seqs is not None and not is_int(num_seqs):
        raise MappingError(f"num_seqs must be None or an int, got {num_seqs!r}")
    b = len(slots) if num_seqs is None else int(num_seqs)
    if b < len(slots):
        raise MappingError(f"{len(slots)} sequences do not fit num_seqs={b}")
    # In the slots' own dtype: LoRAMapping.build checks the values before any cast can wrap them.
    padded = np.zeros(b, slots.dtype if slots.size else np.int64)
    padded[: len(slots)] = slots
    return LoRAMapping.build(
        padded,
        [int(seq_len)] * b,
        num_slots=num_slots,
        is_prefill=is_prefill,
        num_tokens=b * int(seq_len),
        num_seqs=b,
    )


# --------------------------------------------------------------------------------------------
# Layer views: a layer's input/output <-> PEFT's [T, in] / [T, out]
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerView:
    """How a layer's input and output map to PEFT's ``x [T, in]``, ``y [T, out]`` view.

    kinds:
      ``"linear"``: contracts the listed input axes (``in_axes``, as the layer's ``axis``: any
        order, negative or not; like Flax, the kernel's input axes follow them sorted), output =
        remaining input dims + ``num_out_axes`` trailing feature dims (``nnx.Linear``,
        ``LinearGeneral``, Linen ``Dense``/``DenseGeneral``).
      ``"einsum"``: ``einsum_str`` of the form ``"[...]<batch+contracted>,<kernel>-><...>"`` with
        no kernel batch dims; the kernel's ``[in, out]`` view is its contracted axes then its
        output axes, each group in kernel order, flattened.
      ``"embed"``: integer ids ``[...]`` -> ``[..., features]``.
    """

    kind: str
    in_axes: tuple[int, ...] = (-1,)
    num_out_axes: int = 1
    einsum_str: str | None = None

    def tokens_in(self, x: jax.Array) -> jax.Array:
        """``x`` as ``[T, in]`` (or ids ``[T]`` for an embedding)."""
        if self.kind == "embed":
            return x.reshape(-1)
        if self.kind == "einsum":
            p = _parse_einsum(self.einsum_str)
            xt = jnp.einsum(f"{p.lhs}->...{p.batch}{p.contracted}", x)
            n_in = math.prod(xt.shape[xt.ndim - len(p.contracted) :])
            return xt.reshape(-1, n_in)
        # Flax contracts the axes in sorted order, whatever order `axis` lists them in.
        axes = tuple(sorted(a % x.ndim for a in self.in_axes))
        rest = tuple(a for a in range(x.ndim) if a not in axes)
        n_in = math.prod(x.shape[a] for a in axes)
        if axes != tuple(range(x.ndim - len(axes), x.ndim)):
            x = jnp.transpose(x, rest + axes)
        return x.reshape(-1, n_in)

    def tokens_out(self, y: jax.Array) -> jax.Array:
        """``y`` as ``[T, out]``."""
        if self.kind == "einsum":
            p = _parse_einsum(self.einsum_str)
            y = jnp.einsum(f"{p.out}->...{p.batch}{p.kernel_out}", y)
            n = len(p.kernel_out)
        else:
            n = 1 if self.kind == "embed" else self.num_out_axes
        return y.reshape(-1, math.prod(y.shape[y.ndim - n :]))

    def restore_out(self, y2: jax.Array, y: jax.Array) -> jax.Array:
        """``y2 [T, out]`` back in the layout of the layer's output ``y``."""
        if self.kind == "einsum":
            p = _parse_einsum(self.einsum_str)
            to_tokens = f"{p.out}->...{p.batch}{p.kernel_out}"
            shape = jax.eval_shape(lambda y: jnp.einsum(to_tokens, y), y).shape
            return jnp.einsum(f"...{p.batch}{p.kernel_out}->{p.out}", y2.reshape(shape))
        return y2.reshape(y.shape)


@dataclasses.dataclass(frozen=True)
class _Einsum:
    lhs: str  # with "..." if any
    out: str
    batch: str  # lhs letters not in the kernel, in lhs order
    contracted: str  # kernel letters contracted with the input, in kernel order
    kernel_out: str  # kernel letters that reach the output, in kernel order


def _parse_einsum(einsum_str: str) -> _Einsum:
    """Parses ``einsum_str`` or raises ``AdapterMismatchError`` saying why its ``[in, out]`` view
    is not well defined."""
    s = einsum_str.replace(" ", "")
    try:
        operands, out = s.split("->")
        lhs, rhs = operands.split(",")
    except ValueError:
        raise AdapterMismatchError(
            f"{einsum_str!r} is not of the form 'input,kernel->output'"
        ) from None
    if "..." in rhs or lhs.count("...") > 1 or ("..." in lhs) != ("..." in out):
        raise AdapterMismatchError(
            f"{einsum_str!r}: '...' is allowed only as leading input/output dims"
        )
    if ("..." in lhs and not lhs.startswith("...")) or ("..." in out and not out.startswith("...")):
        raise AdapterMismatchError(f"{einsum_str!r}: '...' must lead the input and output")
    lhs_l, out_l = lhs.replace("...", ""), out.replace("...", "")
    for part in (lhs_l, rhs, out_l):
        if len(set(part)) != len(part) or not part.isalpha():
            raise AdapterMismatchError(
                f"{einsum_str!r}: repeated or non-letter subscripts in {part!r}"
            )
    batch = "".join(c for c in lhs_l if c not in rhs)
    contracted = "".join(c for c in rhs if c in lhs_l)
    kernel_out = "".join(c for c in rhs if c not in lhs_l)
    problems = []
    if any(c in out_l for c in contracted):
        problems.append("the kernel shares a batch dim with the input")
    if any(c not in out_l for c in batch + kernel_out):
        problems.append("a dim is summed away without being contracted")
    if set(out_l) != set(batch + kernel_out):
        problems.append("the output has dims from neither input nor kernel")
    if not contracted or not kernel_out:
        problems.append("the kernel needs both contracted and output dims")
    if problems:
        raise AdapterMismatchError(f"{einsum_str!r} has no [in, out] view: " + "; ".join(problems))
    ellipsis = "..." if "..." in lhs else ""
    return _Einsum(
        lhs=lhs if ellipsis else "..." + lhs,
        out=out if ellipsis else "..." + out,
        batch=batch,
        contracted=contracted,
        kernel_out=kernel_out,
    )


def einsum_dims(einsum_str: str, kernel_shape: Sequence[int]) -> tuple[int, int]:
    """``(in_dim, out_dim)`` of an einsum layer's kernel in PEFT's ``[in, out]`` view."""
    p = _parse_einsum(einsum_str)
    rhs = einsum_str.replace(" ", "").split("->")[0].split(",")[1]
    if len(rhs) != len(kernel_shape):
        raise AdapterMismatchError(
            f"{einsum_str!r} names {len(rhs)} kernel dims, kernel is {kernel_shape}"
        )
    size = dict(zip(rhs, kernel_shape, strict=True))
    return math.prod(size[c] for c in p.contracted), math.prod(size[c] for c in p.kernel_out)


def einsum_kernel_view(einsum_str: str, kernel: jax.Array) -> jax.Array:
    """The einsum kernel as PEFT's ``[in, out]`` matrix (what a merged LoRA adds to)."""
    p = _parse_einsum(einsum_str)
    rhs = einsum_str.replace(" ", "").split("->")[0].split(",")[1]
    k = jnp.einsum(f"{rhs}->{p.contracted}{p.kernel_out}", kernel)
    return k.reshape(einsum_dims(einsum_str, kernel.shape))


# --------------------------------------------------------------------------------------------
# The LoRA step every wrapped layer runs
# --------------------------------------------------------------------------------------------


def lora_forward(target: TargetModule, view: LayerView, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y`` (the base layer's output for input ``x``) plus the active context's LoRA for
    ``target``; exactly ``y`` when no context is active or it holds no banks for ``target``."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return y
    banks = ctx.banks.get(target.name)
    if banks is None:
        return y
    ctx.read.add(target.name)
    _check_banks(target, banks)
    _check_traced(target, x, y, banks, ctx.mapping)
    x2, y2 = view.tokens_in(x), view.tokens_out(y)
    in_dim = None if target.is_embedding else x2.shape[-1]
    if y2.shape[-1] != target.out_dim or in_dim not in (None, target.in_dim):
        raise AdapterMismatchError(
            f"layer {target.name!r} was called as [in={in_dim}, out={y2.shape[-1]}] per token "
            f"but its target is [in={target.in_dim}, out={target.out_dim}]"
        )
    _check_rows(target, ctx.mapping, y2.shape[0])
    if target.is_embedding:
        y2 = ops.add_lora_embedding(y2, x2, banks[0], ctx.mapping)
    else:
        y2 = ops.add_lora(y2, x2, banks, ctx.mapping, impl=ctx.impl, groups=target.groups)
    return view.restore_out(y2, y)


def _check_rows(target: TargetModule, mapping: LoRAMapping, rows: int) -> None:
    # jlora.ops picks token_slots or seq_slots by the same rule; checked here to name the layer.
    if rows in (mapping.token_slots.shape[0], mapping.seq_slots.shape[0]):
        return
    raise MappingError(
        f"layer {target.name!r} sees {rows} token rows, but the mapping has "
        f"{mapping.token_slots.shape[0]} tokens and {mapping.seq_slots.shape[0]} sequences; "
        "build it for the flattened batch (jlora.padded_batch_mapping for [B, L] inputs)"
    )


def _check_banks(target: TargetModule, banks: tuple[LoRABank, ...]) -> None:
    if len(banks) != len(target.out_dims):
        raise AdapterMismatchError(
            f"layer {target.name!r} has {len(target.out_dims)} output slices "
            f"{target.peft_names} but {len(banks)} banks were given"
        )
    for bank, out, peft_name in zip(banks, target.out_dims, target.peft_names, strict=True):
        if bank.input_dim != target.in_dim or bank.output_dim != out:
            what = "vocab" if target.is_embedding else "in"
            raise AdapterMismatchError(
                f"bank for {peft_name!r} is [{what}={bank.input_dim}, out={bank.output_dim}] but "
                f"layer {target.name!r} needs [{what}={target.in_dim}, out={out}]"
            )


def _check_traced(target: TargetModule, x, y, banks, mapping: LoRAMapping) -> None:
    # y too: an Embed fed a NumPy array inside a jit has a concrete x but a traced output.
    if not (isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer)):
        return
    leaves = [mapping.token_slots, *jax.tree_util.tree_leaves(banks)]
    if not all(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        raise MappingError(
            f"layer {target.name!r} is called under a JAX transformation (jit, grad, vmap, ...) "
            "but the lora_context around it holds concrete arrays (under jit they would be "
            "compiled in as constants, and later banks or mappings ignored). Enter "
            "jlora.lora_context inside the transformed function and pass banks and mapping as "
            "its arguments"
        )
