"""A Llama in Flax NNX: the reference model for jlora's tests, demo and benchmarks.

Module paths mirror Hugging Face's ``LlamaForCausalLM``, so PEFT adapter keys map directly:
``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``model.layers.{i}.{input,post_attention}_layernorm``,
``model.norm``, ``lm_head``. With ``fuse_qkv`` / ``fuse_gate_up`` the projections are one Linear
each (``self_attn.qkv_proj``, ``mlp.gate_up_proj``) and ``packed_modules_mapping`` tells
``jlora.apply`` which PEFT modules their output slices serve. HF's Linear weight is ``[out, in]``;
an ``nnx.Linear`` kernel is ``[in, out]``: ``from_pretrained`` transposes (and concatenates for
fused layers). RoPE follows HF's ``rotate_half`` convention (halves, not interleaved pairs).

Forward, functional and jittable with static shapes::

    logits = model(input_ids)                                    # [B, L] -> [B, L, vocab]
    cache = KVCache.zeros(model.config, batch_size=B, max_len=S)
    logits, cache = model(input_ids, positions, kv_cache=cache)  # prefill or decode

``positions [B, L]`` are each token's absolute position; rows may be at different lengths, as
continuous batching needs. A token writes its K/V into cache slot ``positions[b, l]`` of row ``b``
and attends to the row's slots ``<= positions[b, l]``. A negative position marks padding: nothing
is written and its output is finite but meaningless. Positions must be ``< max_len``.

Loading reads ``config.json`` and safetensors (one file, or shards with
``model.safetensors.index.json``) with numpy; PyTorch is never imported and pickles are refused.
With a ``mesh`` it builds each parameter sharded, each process reading only its devices' blocks
straight from the files (at most one parameter's blocks in host memory at a time). Imports
jlora.errors and jlora.config only, and jlora.sharding (which imports this module) inside a mesh
load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from safetensors import SafetensorError, safe_open

from jlora.config import is_int
from jlora.errors import CheckpointError, LoRAConfigError
from jlora.hostio import count_nonfinite
from jlora.loader import FLOAT_DTYPES
from jlora.targets import split_packed
from jlora.weights import MODEL

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# Tensors some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The parameter and compute dtypes a model may have.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_original_max_position_embeddings",
)
_DERIVED_FIELDS = ("num_key_value_heads", "head_dim")  # None: derived from the others
_HF_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_FLAG_FIELDS = (*_HF_FLAGS, "fuse_qkv", "fuse_gate_up")  # fuse_*: jlora's own
# field -> whether 0 is allowed
_REAL_FIELDS = {
    "rms_norm_eps": True,
    "rope_theta": False,
    "rope_factor": False,
    "rope_low_freq_factor": False,
    "rope_high_freq_factor": False,
}


# transformers 5.x, then 4.x
_ROPE_KEYS = ("rope_parameters", "rope_scaling")
# what HF's rope validation requires of each rope_type
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _model_dtype_name(dtype) -> str | None:
    """``dtype``'s name (given as a name or a dtype object) if it is in ``MODEL_DTYPES``."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        return None
    return name if name in MODEL_DTYPES else None


def _is_real(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _is_finite_real(v) -> bool:
    try:
        return _is_real(v) and math.isfinite(v)
    except OverflowError:  # an int past float's range (JSON's 1e400 is inf, its 10**400 an int)
        return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama hyper-parameters (HF names) plus jlora's layout options.

    ``fuse_qkv`` / ``fuse_gate_up`` build one Linear for q/k/v and for gate/up, its columns the
    slices one after the other (``fused_groups = 1``) or, for a ``model`` axis of ``fused_groups``
    devices (or a divisor of it), in ``fused_groups`` groups of every slice's next share
    (``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``, ``jlora.targets.split_packed``), so that each device
    holds whole groups and no column moves between devices. ``dtype`` is the
    parameter and compute dtype (one of ``MODEL_DTYPES``). ``rope_type`` is ``"default"``,
    ``"linear"`` or ``"llama3"``. Every field is checked on construction (sizes are ints >= 1,
    flags bools, rope numbers finite and > 0): a ``CheckpointError`` names each one out of range.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    fuse_qkv: bool = False
    fuse_gate_up: bool = False
    fused_groups: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        # Checked before anything divides by them (a 0 raised ZeroDivisionError); None is derived.
        problems = []
        for f in _SIZE_FIELDS:
            v = getattr(self, f)
            if (v is not None or f not in _DERIVED_FIELDS) and not (is_int(v) and v >= 1):
                problems.append(f"{f} must be an int >= 1, got {v!r}")
        for f in _FLAG_FIELDS:
            if not isinstance(getattr(self, f), bool | np.bool_):
                problems.append(f"{f} must be a bool, got {getattr(self, f)!r}")
        for f, zero_ok in _REAL_FIELDS.items():
            v = getattr(self, f)
            if _is_finite_real(v) and (v > 0 or (zero_ok and v == 0)):
                object.__setattr__(self, f, float(v))
            else:
                problems.append(
                    f"{f} must be a finite number {'>=' if zero_ok else '>'} 0, got {v!r}"
                )
        if problems:
            raise CheckpointError("Invalid LlamaConfig: " + "; ".join(problems))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            if self.head_dim == 0:
                raise CheckpointError(
                    f"Invalid LlamaConfig: head_dim = hidden_size // num_attention_heads = "
                    f"{self.hidden_size} // {self.num_attention_heads} is 0; give head_dim"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        g = self.fused_groups
        if not (is_int(g) and g >= 1):
            problems.append(f"fused_groups must be an int >= 1, got {g!r}")
        elif g != 1:
            object.__setattr__(self, "fused_groups", int(g))
            widths = {"q_dim": self.q_dim, "kv_dim": self.kv_dim} if self.fuse_qkv else {}
            if self.fuse_gate_up:
                widths["intermediate_size"] = self.intermediate_size
            if not widths:
                problems.append(f"fused_groups={g} needs fuse_qkv or fuse_gate_up")
            else:
                problems += [
                    f"fused_groups={g} does not divide {k}={w}" for k, w in widths.items() if w % g
                ]
        if self.rope_type not in ("default", "linear", "llama3"):
            problems.append(f"rope_type {self.rope_type!r} is not supported")
        elif self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            # HF only warns, then divides by their difference in the smoothing: refused here
            problems.append(
                f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"rope_low_freq_factor={self.rope_low_freq_factor}"
            )
        name = _model_dtype_name(self.dtype)  # jnp.bfloat16 and np.dtype("float16") too
        if name is not None:
            object.__setattr__(self, "dtype", name)
        else:
            problems.append(f"dtype {self.dtype!r} is not one of {MODEL_DTYPES}")
        if problems:
            raise CheckpointError("Invalid LlamaConfig: " + "; ".join(problems))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> LlamaConfig:
        """From a HF ``config.json`` dict (transformers 4.x ``rope_theta``/``rope_scaling`` or
        5.x ``rope_parameters``); ``overrides`` set jlora's fields (``fuse_qkv``, ``dtype``)."""
        if not isinstance(hf, Mapping):
            raise CheckpointError(f"config.json holds a {type(hf).__name__}, not a JSON object")
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise CheckpointError(f"model_type {model_type!r} is not 'llama'")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        rope_key = next((k for k in _ROPE_KEYS if hf.get(k)), None)
        rope = {} if rope_key is None else hf[rope_key]
        if not isinstance(rope, Mapping):
            raise CheckpointError(f"{rope_key} is a {type(rope).__name__}, not a JSON object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(rope_type, str):
            raise CheckpointError(f"{rope_key}'s rope_type {rope_type!r} is not a string")
        if rope_type == "llama3":
            # As transformers 5.x standardizes it: a top-level field wins over the rope dict's,
            # which defaults to max_position_embeddings (2048 when config.json has none either).
            old = hf.get(
                "original_max_position_embeddings",
                rope.get(
                    "original_max_position_embeddings", hf.get("max_position_embeddings", 2048)
                ),
            )
            rope = {**rope, "original_max_position_embeddings": old}
        lacks = [k for k in _ROPE_REQUIRED.get(rope_type, ()) if k not in rope]
        if lacks:
            # HF refuses these too; a default would silently change the positions' frequencies
            raise CheckpointError(f"{rope_key} of rope_type {rope_type!r} lacks {lacks}")
        kwargs = dict(
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_position_embeddings=rope.get(
                "original_max_position_embeddings", 8192
            ),
        )
        # HF's top-level fields (the rope ones come from the rope dict above)
        for f in (
            *(f for f in _SIZE_FIELDS if not f.startswith("rope_")),
            "rms_norm_eps",
            *_HF_FLAGS,
        ):
            if hf.get(f) is not None:
                kwargs[f] = hf[f]
        missing = [
            f
            for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
            if f not in kwargs
        ]
        if missing or "num_attention_heads" not in kwargs:
            raise CheckpointError(f"config.json lacks {missing or ['num_attention_heads']}")
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        if dtype in MODEL_DTYPES:
            kwargs["dtype"] = dtype
        kwargs.update(overrides)
        return cls(**kwargs)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


@struct.dataclass
class KVCache:
    """Preallocated keys and values, one array per layer: ``k[i]``, ``v[i]``
    ``[batch, kv_heads, max_len, head_dim]``.

    One array per layer, so a layer's attention reads its cache in place (XLA copies a slice of
    one stacked array out per layer and step); heads before positions, so attention
    contracts each (row, KV head) pair's ``[max_len, head_dim]`` block as it lies, with no
    transposed copy.

    >>> c = KVCache.zeros(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
    ...                               num_hidden_layers=2, num_attention_heads=2),
    ...                   batch_size=3, max_len=16)
    >>> len(c.k), c.k[0].shape
    (2, (3, 2, 16, 4))
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, *, batch_size: int, max_len: int, dtype=None) -> KVCache:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        dtype = jnp.dtype(dtype or config.dtype)
        layers = range(config.num_hidden_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, dtype) for _ in layers),
        )

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[2])

    def with_layer(self, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
        """A copy with layer ``layer``'s arrays replaced."""
        return KVCache(
            k=self.k[:layer] + (k,) + self.k[layer + 1 :],
            v=self.v[:layer] + (v,) + self.v[layer + 1 :],
        )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _linear(c: LlamaConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    dtype = jnp.dtype(c.dtype)
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class LlamaRMSNorm(nnx.Module):
    """HF's LlamaRMSNorm: normalize in float32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


def rope_inv_freq(c: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` (float32), as HF computes them per rope_type."""
    d = c.head_dim
    inv = (1.0 / (c.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
    if c.rope_type == "linear":
        inv = inv / c.rope_factor
    elif c.rope_type == "llama3":
        old = c.rope_original_max_position_embeddings
        low_wavelen = old / c.rope_low_freq_factor
        high_wavelen = old / c.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
        smooth = (old / wavelen - c.rope_low_freq_factor) / (
            c.rope_high_freq_factor - c.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def _rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, ...]:
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x [B, L, heads, D]; HF's rotate_half: (x1, x2) -> (-x2, x1) on the two halves.
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``q [B, L, H, D]``, ``k, v [B, K, S, D]``, ``mask bool [B, L, S]`` -> ``[B, L, H * D]``.

    Query head ``h`` uses KV head ``h // (H // K)``, as HF's ``repeat_kv``.
    """
    b, seq, h, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    q = q.reshape(b, seq, kv, g, d)
    # Both products are batched over (b, k) with the g * seq query rows of a KV head as one
    # matrix: XLA:CPU then runs one matmul per (b, k) where, with (g, l) kept apart, it ran
    # Eigen's batched dot over 4x more, far smaller ones. Per layer of the `jlora bench` model
    # (32 rows, 8 KV heads x 2, 96 positions): probs @ v 1.01 -> 0.11 ms at decode, 7.5 -> 4.5
    # ms at a 64-token prefill; q @ k 11.2 -> 5.6 ms at the prefill, while at decode (seq = 1)
    # the einsum as written stays faster (0.28 vs 0.38 ms: q would need a transpose first).
    if seq == 1:
        scores = jnp.einsum("blkgd,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
    else:
        rows = q.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * seq, d)
        scores = jnp.einsum("bkmd,bksd->bkms", rows, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv, g, seq, s)
    scores = scores * (d**-0.5)
    # A large finite fill (not -inf) keeps fully masked padding rows finite.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs.reshape(b, kv, g * seq, s), v)
    out = out.reshape(b, kv, g, seq, d).transpose(0, 3, 1, 2, 4)  # [b, l, k, g, d]
    return out.reshape(b, seq, h * d)


def _write_rows(cache: jax.Array, new: jax.Array, write_pos: jax.Array) -> jax.Array:
    """`cache [B, K, S, D]` with each row's `new [B, L, K, D]` written at its `write_pos [B, L]`
    (out-of-range positions dropped)."""

    def one_row(c, u, p):  # [K, S, D], [L, K, D], [L]
        return c.at[:, p].set(u.transpose(1, 0, 2).astype(c.dtype), mode="drop")

    return jax.vmap(one_row)(cache, new, write_pos)


class LlamaAttention(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = c
        h, bias = c.hidden_size, c.attention_bias
        if c.fuse_qkv:
            self.qkv_proj = _linear(c, h, c.q_dim + 2 * c.kv_dim, bias, rngs)
        else:
            self.q_proj = _linear(c, h, c.q_dim, bias, rngs)
            self.k_proj = _linear(c, h, c.kv_dim, bias, rngs)
            self.v_proj = _linear(c, h, c.kv_dim, bias, rngs)
        self.o_proj = _linear(c, c.q_dim, h, bias, rngs)

    def __call__(self, x, cos, sin, mask, cache=None, layer=0, write_pos=None):
        c = self.config
        b, seq, _ = x.shape
        if c.fuse_qkv:
            widths = (c.q_dim, c.kv_dim, c.kv_dim)
            q, k, v = split_packed(self.qkv_proj(x), widths, c.fused_groups)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = _apply_rope(q.reshape(b, seq, c.num_attention_heads, c.head_dim), cos, sin)
        k = _apply_rope(k.reshape(b, seq, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(b, seq, c.num_key_value_heads, c.head_dim)
        if cache is None:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, L, D]
        else:
            ck, cv = cache.k[layer], cache.v[layer]
            ck = _write_rows(ck, k, write_pos)
            cv = _write_rows(cv, v, write_pos)
            cache = cache.with_layer(layer, ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        return self.o_proj(_attention(q, k, v, mask)), cache


class LlamaMLP(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = c
        h, i, bias = c.hidden_size, c.intermediate_size, c.mlp_bias
        if c.fuse_gate_up:
            self.gate_up_proj = _linear(c, h, 2 * i, bias, rngs)
        else:
            self.gate_proj = _linear(c, h, i, bias, rngs)
            self.up_proj = _linear(c, h, i, bias, rngs)
        self.down_proj = _linear(c, i, h, bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        if c.fuse_gate_up:
            widths = (c.intermediate_size, c.intermediate_size)
            gate, up = split_packed(self.gate_up_proj(x), widths, c.fused_groups)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(c.dtype)
        self.self_attn = LlamaAttention(c, rngs=rngs)
        self.mlp = LlamaMLP(c, rngs=rngs)
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, mask, cache=None, layer=0, write_pos=None):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, write_pos)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
    """The decoder stack: embeddings, layers, final norm (HF's ``LlamaModel``)."""

    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(c.dtype)
        self.config = c
        self.embed_tokens = nnx.Embed(
            c.vocab_size, c.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        kv_cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """``input_ids [B, L]`` -> final hidden states ``[B, L, hidden]`` and the new cache."""
        b, seq = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
        x = self.embed_tokens(input_ids)
        cos, sin = _rope_cos_sin(positions, rope_inv_freq(self.config), x.dtype)
        query_pos = positions[:, :, None]
        write_pos = None
        if kv_cache is None:
            key_pos = positions[:, None, :]
            mask = (key_pos <= query_pos) & (key_pos >= 0)  # [B, L, L]
        else:
            slots = jnp.arange(kv_cache.max_len)[None, None, :]
            mask = slots <= query_pos  # [B, L, S]
            write_pos = jnp.where(positions >= 0, positions, kv_cache.max_len)  # OOB: dropped
        for i, layer in enumerate(self.layers):
            x, kv_cache = layer(x, cos, sin, mask, kv_cache, i, write_pos)
        return self.norm(x), kv_cache


class LlamaForCausalLM(nnx.Module):
    """HF's ``LlamaForCausalLM`` in NNX.

    >>> c = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                 num_hidden_layers=1, num_attention_heads=2)
    >>> model = LlamaForCausalLM(c, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 32)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, False, rngs)

    @property
    def packed_modules_mapping(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Fused layer suffix -> (PEFT module suffix, out features) per slice, for jlora.apply."""
        c, packed = self.config, {}
        if c.fuse_qkv:
            packed["qkv_proj"] = (("q_proj", c.q_dim), ("k_proj", c.kv_dim), ("v_proj", c.kv_dim))
        if c.fuse_gate_up:
            packed["gate_up_proj"] = (
                ("gate_proj", c.intermediate_size),
                ("up_proj", c.intermediate_size),
            )
        return packed

    @property
    def packed_modules_groups(self) -> dict[str, int]:
        """Fused layer suffix -> its column groups (``fused_groups``), for jlora.apply."""
        return {name: self.config.fused_groups for name in self.packed_modules_mapping}

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        *,
        kv_cache: KVCache | None = None,
        logits_index: jax.Array | None = None,
    ):
        """Logits for ``input_ids [B, L]``.

        Args:
          positions: ``[B, L]`` absolute positions (default ``0..L-1``); negative = padding.
          kv_cache: a ``KVCache``; when given, this chunk's K/V are written into it at
            ``positions`` and attention reads the whole cache row up to each token's position.
          logits_index: ``[B]``: only the hidden state at ``[b, logits_index[b]]`` reaches the LM
            head (logits ``[B, vocab]``), e.g. each row's last real token.

        Returns:
          ``logits [B, L, vocab]`` (``[B, vocab]`` with ``logits_index``), and the new cache as
          ``(logits, kv_cache)`` when a cache was passed.
        """
        hidden, new_cache = self.model(input_ids, positions, kv_cache=kv_cache)
        if logits_index is not None:
            hidden = hidden[jnp.arange(hidden.shape[0]), logits_index]
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits if kv_cache is None else (logits, new_cache)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> LlamaForCausalLM:
        """See ``jlora.models.llama.from_pretrained``."""
        return from_pretrained(path, **kwargs)


# --------------------------------------------------------------------------------------------
# Loading a HF checkpoint
# --------------------------------------------------------------------------------------------


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | jnp.dtype | None = None,
    fuse_qkv: bool = False,
    fuse_gate_up: bool = False,
    fused_groups: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    specs: nnx.State | None = None,
) -> LlamaForCausalLM:
    """Loads a HF Llama checkpoint directory (``config.json`` + safetensors, sharded or not).

    Args:
      path: the directory.
      dtype: parameter/compute dtype; default: the checkpoint's ``dtype``/``torch_dtype``, else
        float32.
      fuse_qkv / fuse_gate_up: build fused projections (HF's separate weights are concatenated).
      fused_groups: the fused columns' layout (``LlamaConfig.fused_groups``); default: the
        ``model`` axis size of ``mesh`` when a projection is fused and its slices divide by it
        (each device then holds whole groups, the tensor-parallel layout), else 1.
      mesh: load tensor-parallel onto this ``("data", "model")`` mesh: each parameter is created
        with its sharding (``specs``, default ``jlora.sharding.llama_param_specs``) and each
        device's block is read from the files on its own (once for all replicas of it): no
        device holds a whole split weight, and a process reads only its own devices' blocks,
        holding at most one parameter's of them in host memory at a time, never the model. The
        result equals ``jlora.sharding.shard_model(from_pretrained(path, fused_groups=...),
        mesh)`` with the same ``fused_groups``.
      specs: ``PartitionSpec`` per parameter (the structure of ``nnx.state(model)``); with
        ``mesh`` only.

    Raises:
      CheckpointError: naming the file or tensor: no config or weights, a pickle-only checkpoint,
        a config field out of range (``LlamaConfig``) or a rope type lacking a key HF requires,
        a missing, unexpected or mis-shaped tensor, an index pointing at a missing shard or tensor
        or outside ``path``, a tensor holding NaN/Inf in ``dtype`` (while it is read).
      LoRAConfigError: ``dtype`` not one of ``MODEL_DTYPES``, ``fuse_qkv``/``fuse_gate_up`` not a
        bool, a ``fused_groups`` the fused slices cannot take, a mesh jlora cannot use, ``specs``
        lacking a parameter, or a mesh axis that does not divide the parameter dim it splits.
      Everything but the values is checked before any weight is read.
    """
    if specs is not None and mesh is None:
        raise TypeError("from_pretrained: specs needs a mesh")
    # The caller's arguments, checked here: LlamaConfig would blame them on config.json.
    bad_args = [
        f"{k}={v!r} must be a bool"
        for k, v in (("fuse_qkv", fuse_qkv), ("fuse_gate_up", fuse_gate_up))
        if not isinstance(v, bool | np.bool_)
    ]
    if fused_groups is not None and not (is_int(fused_groups) and fused_groups >= 1):
        bad_args.append(f"fused_groups={fused_groups!r} must be None or an int >= 1")
    if bad_args:
        raise LoRAConfigError("from_pretrained: " + "; ".join(bad_args))
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{config_file}: not found; pass a HF model directory")
    try:
        with open(config_file) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: unreadable ({e})") from None
    overrides: dict[str, Any] = dict(
        fuse_qkv=fuse_qkv,
        fuse_gate_up=fuse_gate_up,
        fused_groups=1,  # the caller's, set below: an error in it is not config.json's
    )
    if dtype is not None:
        name = _model_dtype_name(dtype)
        if name is None:
            raise LoRAConfigError(
                f"from_pretrained: dtype {dtype!r} is not one of {MODEL_DTYPES}; pass one of them "
                "(or None for the checkpoint's own)"
            )
        overrides["dtype"] = name
    try:
        config = LlamaConfig.from_hf(hf, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{config_file}: bad field ({e})") from None
    if fused_groups is not None and fused_groups != 1:
        try:
            config = dataclasses.replace(config, fused_groups=fused_groups)
        except CheckpointError as e:
            raise LoRAConfigError(f"from_pretrained: fused_groups={fused_groups!r}: {e}") from None
    if fused_groups is None and isinstance(mesh, jax.sharding.Mesh):
        config = _groups_for_mesh(config, mesh)

    files = _tensor_files(path)
    expected = _hf_tensor_shapes(config)
    _check_names(path, files, expected, config)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    variables = {
        ".".join(str(p) for p in var_path): var
        for var_path, var in nnx.iter_graph(abstract)
        if isinstance(var, nnx.Variable)
    }
    sources = _param_sources(config)
    assert sorted(sources) == sorted(variables), set(sources) ^ set(variables)
    shardings = None if mesh is None else _param_shardings(abstract, mesh, specs)
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise LoRAConfigError(
            f"from_pretrained: mesh is a {type(mesh).__name__}; loading needs the devices, "
            "a jax.sharding.Mesh (jlora.sharding.make_mesh builds one)"
        )
    if mesh is not None:
        from jlora.sharding import warn_if_fused_split  # jlora.sharding imports this module

        warn_if_fused_split(config, mesh)
    param_dtype = jnp.dtype(config.dtype)
    with _Checkpoint(path, files) as checkpoint:
        checkpoint.check(expected)
        for name, source in sources.items():
            var = variables[name]
            shape = tuple(var.shape)

            def read(index, source=source, shape=shape):
                raw = checkpoint.read(source, _bounds(index, shape))
                with np.errstate(over="ignore"):  # an overflow is counted and named below
                    block = raw.astype(param_dtype)
                if bad := count_nonfinite(block):
                    files = ", ".join(
                        os.path.join(path, f)
                        for f in sorted({checkpoint.files[n] for n in source.names})
                    )
                    why = (
                        "in the file: corrupt"
                        if count_nonfinite(raw)
                        else f"too large for {param_dtype.name}: load with another dtype"
                    )
                    raise CheckpointError(
                        f"{files}: tensor {'/'.join(source.names)} holds {bad} NaN/Inf values as "
                        f"{param_dtype.name} ({why})"
                    )
                return block

            if shardings is None:
                value = jnp.asarray(read((slice(None),) * len(shape)))
            else:
                value = jax.make_array_from_callback(  # dtype: a process may hold no shard
                    shape, shardings[name], _once_per_shard(read), dtype=param_dtype
                )
            assert value.shape == shape, (name, value.shape, shape)
            var.set_value(value)
    return abstract


def _groups_for_mesh(config: LlamaConfig, mesh) -> LlamaConfig:
    """``config`` with its fused columns in ``model``-axis-size groups (each device then holds
    whole groups) when it fuses a projection and every fused slice divides by that size; else
    unchanged (``from_pretrained`` then warns that the fused columns cut across devices)."""
    model_axis = dict(mesh.shape).get(MODEL, 1)
    if model_axis == 1 or not (config.fuse_qkv or config.fuse_gate_up):
        return config
    try:
        return dataclasses.replace(config, fused_groups=model_axis)
    except CheckpointError:  # a slice the model axis does not divide
        return config


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one parameter is in the checkpoint: HF tensors ``names`` (``widths`` wide)
    concatenated on the parameter's last dim, each transposed first when ``transpose`` (a Linear
    weight ``[out, in]`` becomes a kernel ``[in, out]``; fused projections concatenate on out),
    in ``groups`` groups of each tensor's next ``1 / groups`` (``LlamaConfig.fused_groups``)."""

    names: tuple[str, ...]
    widths: tuple[int, ...]
    transpose: bool
    groups: int = 1

    def segments(self):
        """``(name, tensor_start, width)`` of each run of the parameter's last dim, in order."""
        g = self.groups
        return [
            (name, j * (width // g), width // g)
            for j in range(g)
            for name, width in zip(self.names, self.widths, strict=True)
        ]


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A shard's index (slices, as ``make_array_from_callback`` passes it) as (start, stop)."""
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        assert step == 1, index
        out.append((start, stop))
    return tuple(out)


def _once_per_shard(read):
    """``read`` memoized on the shard's bounds: devices that hold the same shard (replicas over
    ``data``) share one read."""
    cache: dict = {}

    def callback(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return callback


class _Checkpoint:
    """The checkpoint's safetensors files, open for the duration of a load; reads any block of
    a parameter straight from the files (safetensors slices), never a whole tensor it does not
    need."""

    def __init__(self, path: str, files: Mapping[str, str]):
        self.path, self.files = path, files
        self.handles: dict[str, Any] = {}  # file -> open safe_open
        self.keys: dict[str, set[str]] = {}  # file -> its tensor names

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self.handles:
            full = os.path.join(self.path, file)
            try:
                self.handles[file] = safe_open(full, framework="numpy").__enter__()
                self.keys[file] = set(self.handles[file].keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{full}: unreadable safetensors ({e})") from None
        return self.handles[file]

    def check(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Every expected tensor is in its file, with its shape and a float dtype (headers only)."""
        for name, shape in expected.items():
            handle, full = self._handle(name), os.path.join(self.path, self.files[name])
            if name not in self.keys[self.files[name]]:
                raise CheckpointError(
                    f"{full}: tensor {name!r} is missing (the index maps it to this file)"
                )
            info = handle.get_slice(name)
            if tuple(info.get_shape()) != shape:
                raise CheckpointError(
                    f"{full}: tensor {name!r} has shape {list(info.get_shape())}, config.json "
                    f"implies {list(shape)}"
                )
            if info.get_dtype() not in FLOAT_DTYPES:  # each is cast to the model's dtype
                raise CheckpointError(
                    f"{full}: tensor {name!r} has dtype {info.get_dtype()}; "
                    f"expected one of {sorted(FLOAT_DTYPES)}"
                )

    def read(self, source: _Source, bounds: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The block ``bounds`` of the parameter ``source`` describes."""
        *lead, (lo, hi) = bounds
        pieces, offset = [], 0
        for name, first, width in source.segments():
            start, stop = max(lo, offset), min(hi, offset + width)
            if start < stop:
                cols = slice(first + start - offset, first + stop - offset)
                block = [slice(a, b) for a, b in lead] + [cols]
                if source.transpose:
                    block = block[::-1]
                try:
                    piece = self._handle(name).get_slice(name)[tuple(block)]
                except (SafetensorError, OSError) as e:
                    full = os.path.join(self.path, self.files[name])
                    raise CheckpointError(f"{full}: tensor {name!r} unreadable ({e})") from None
                pieces.append(piece.T if source.transpose else piece)
            offset += width
        assert pieces, (source, bounds)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)


def _param_shardings(abstract: nnx.Module, mesh, specs) -> dict[str, jax.sharding.NamedSharding]:
    """NNX parameter path -> its ``NamedSharding`` on ``mesh``, every split checked first."""
    from jlora import sharding as sh  # jlora.sharding imports this module

    sh.check_mesh(mesh)
    specs = sh.llama_param_specs(abstract) if specs is None else specs
    out = {}
    for var_path, spec in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    ):
        name = ".".join(sh._key_name(k) for k in var_path if sh._key_name(k) != "value")
        out[name] = spec
    for var_path, var in nnx.iter_graph(abstract):
        if isinstance(var, nnx.Variable):
            name = ".".join(str(p) for p in var_path)
            if name not in out:
                raise LoRAConfigError(
                    f"from_pretrained: specs has no PartitionSpec for parameter {name!r}; "
                    "pass the structure of nnx.state(model), as jlora.sharding.llama_param_specs"
                )
            spec = out[name]
            if not isinstance(spec, jax.sharding.PartitionSpec):
                raise LoRAConfigError(f"specs[{name!r}] is {spec!r}, not a PartitionSpec")
            sh._check_spec(name, len(var.shape), spec, mesh)
            sh._check_divisible(name, var.shape, spec, mesh)
            out[name] = jax.sharding.NamedSharding(mesh, spec)
    return out


def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> file name (relative to ``path``)."""
    index = os.path.join(path, INDEX_NAME)
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable or without a weight_map ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f"{index}: weight_map is a {type(weight_map).__name__}, not an object"
            )
        for name, file in weight_map.items():
            # a shard is a file of this directory: never an absolute path or one that leaves it
            if not isinstance(file, str) or not _inside(file):
                raise CheckpointError(
                    f"{index}: weight_map maps {name!r} to {file!r}, not a file name inside {path}"
                )
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, file)):
                names = sorted(n for n, f in weight_map.items() if f == file)
                raise CheckpointError(
                    f"{index} maps {len(names)} tensors (e.g. {names[0]!r}) to shard "
                    f"{file!r}, which is missing from {path}"
                )
        return dict(weight_map)
    if os.path.isfile(single):
        return {name: WEIGHTS_NAME for name in _keys(path, WEIGHTS_NAME)}
    pickles = [p for p in PICKLE_NAMES if os.path.isfile(os.path.join(path, p))]
    if pickles:
        raise CheckpointError(
            f"{os.path.join(path, pickles[0])}: a pickle-based checkpoint; jlora never unpickles. "
            "Re-save it with `model.save_pretrained(out, safe_serialization=True)`"
        )
    raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def _inside(file: str) -> bool:
    """``file`` is a relative path that stays inside its directory."""
    parts = file.replace("\\", "/").split("/")
    return bool(file) and not os.path.isabs(file) and ".." not in parts and "" not in parts


def _keys(path: str, file: str) -> list[str]:
    try:
        with safe_open(os.path.join(path, file), framework="numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{os.path.join(path, file)}: unreadable safetensors ({e})") from None


def _hf_tensor_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, v = c.hidden_size, c.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, (n_out, n_in, bias) in _linears(c).items():
            shapes[f"{p}{name}.weight"] = (n_out, n_in)
            if bias:
                shapes[f"{p}{name}.bias"] = (n_out,)
    return shapes


def _linears(c: LlamaConfig) -> dict[str, tuple[int, int, bool]]:
    """A decoder layer's HF Linear modules: (out, in, has bias)."""
    h, i = c.hidden_size, c.intermediate_size
    return {
        "self_attn.q_proj": (c.q_dim, h, c.attention_bias),
        "self_attn.k_proj": (c.kv_dim, h, c.attention_bias),
        "self_attn.v_proj": (c.kv_dim, h, c.attention_bias),
        "self_attn.o_proj": (h, c.q_dim, c.attention_bias),
        "mlp.gate_proj": (i, h, c.mlp_bias),
        "mlp.up_proj": (i, h, c.mlp_bias),
        "mlp.down_proj": (h, i, c.mlp_bias),
    }


def _check_names(path, files: dict[str, str], expected, c: LlamaConfig) -> None:
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} in all) for a Llama with {c.num_hidden_layers} layers"
        )
    ignorable = {"lm_head.weight"} if c.tie_word_embeddings else set()
    unexpected = [
        n
        for n in files
        if n not in expected and n not in ignorable and not n.endswith(IGNORED_SUFFIXES)
    ]
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensor(s) {unexpected[:5]} in {files[unexpected[0]]}; "
            "the checkpoint does not match config.json"
        )


def _param_sources(c: LlamaConfig) -> dict[str, _Source]:
    """NNX parameter path -> where it is in a HF checkpoint (Linear weights transposed, fused
    projections concatenated along the output dim)."""
    linears = _linears(c)
    sources = {
        "model.embed_tokens.embedding": _Source(
            ("model.embed_tokens.weight",), (c.hidden_size,), False
        ),
        "model.norm.weight": _Source(("model.norm.weight",), (c.hidden_size,), False),
    }

    def linear(dst: str, prefix: str, srcs: list[str], bias: bool) -> None:
        widths = tuple(linears[s][0] for s in srcs)
        names = tuple(f"{prefix}{s}" for s in srcs)
        g = c.fused_groups if len(srcs) > 1 else 1
        sources[f"{dst}.kernel"] = _Source(tuple(f"{n}.weight" for n in names), widths, True, g)
        if bias:
            sources[f"{dst}.bias"] = _Source(tuple(f"{n}.bias" for n in names), widths, False, g)

    if not c.tie_word_embeddings:
        sources["lm_head.kernel"] = _Source(("lm_head.weight",), (c.vocab_size,), True)
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"{p}.{norm}.weight"
            sources[name] = _Source((name,), (c.hidden_size,), False)
        groups = [
            ("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            ("self_attn.o_proj", ["self_attn.o_proj"]),
            ("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"]),
            ("mlp.down_proj", ["mlp.down_proj"]),
        ]
        for fused, srcs in groups:
            bias = c.attention_bias if fused.startswith("self_attn") else c.mlp_bias
            if len(srcs) > 1 and (c.fuse_qkv if fused == "self_attn.qkv_proj" else c.fuse_gate_up):
                linear(f"{p}.{fused}", f"{p}.", srcs, bias)
            else:
                for src in srcs:
                    linear(f"{p}.{src}", f"{p}.", [src], bias)
    return sources
