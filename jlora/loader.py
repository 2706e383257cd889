"""Loads a HF PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors,
PyTorch layout) into a ``LoRAModel`` in jlora's JAX layout, on the host.

Order of work, so that bad input fails early and cheaply: parse + validate the config, open the
safetensors file (its header is validated against the file size before any tensor is read, so a
header declaring more data than the file holds fails without allocating), check every tensor name,
dtype and shape against the config (from the header: no tensor is opened for it), and only then
read the LoRA tensors' bytes into one aligned buffer (1 MiB ``readinto`` pieces, each checked for
NaN/Inf while it is in cache: ``jlora.hostio.read_ranges_checked``), and hand out the tensors as
transposed views of that buffer (cast only when a dtype is asked for).
Pickle files (``.bin``, ``.pt``) are refused, never opened. Imports jlora data-model modules only.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jlora.config import LoRAConfig, is_int
from jlora.errors import (
    AdapterConfigError,
    AdapterMismatchError,
    AdapterWeightsError,
    LoRAConfigError,
    UnsafeFormatError,
)
from jlora.hostio import count_nonfinite, freeze, read_ranges_checked
from jlora.peft import PEFTConfig
from jlora.weights import LoRALayerWeights, LoRAModel

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PREFIX = "base_model.model."
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}
# What ``load_adapter(dtype=...)`` casts to: the stored dtypes, which banks and checkpoints hold.
LOAD_DTYPES = tuple(jnp.dtype(d) for d in (np.float16, jnp.bfloat16, np.float32, np.float64))

# base_model.model.<module>.lora_A.weight  /  <module>.lora_embedding_A  / <module>.lora_B.bias
# (an optional ".<adapter_name>" before ".weight" appears in files saved by hand from state dicts)
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))??(?:\.(?P<param>weight|bias))?$"
)

CONVERT_HINT = (
    "jlora never unpickles. Convert it to safetensors with PyTorch: "
    "`PeftModel.from_pretrained(base, path).save_pretrained(out, safe_serialization=True)` "
    "or `safetensors.torch.save_file(torch.load(path, weights_only=True), "
    "'adapter_model.safetensors')`"
)


@dataclass
class _Entry:
    """Tensor names found for one module, before reading."""

    a: str | None = None
    b: str | None = None
    bias: str | None = None
    embedding: bool = False
    # (PEFT adapter name or None, embedding?) of its first tensor: the others must agree
    tag: tuple[str | None, bool] | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def default_adapter_id(path: str) -> int:
    """A stable id >= 1 derived from the adapter's absolute path (pass ``adapter_id`` to choose)."""
    return zlib.crc32(os.path.abspath(path).encode()) % (2**31 - 2) + 1


def load_adapter(
    path: str | os.PathLike,
    *,
    adapter_id: int | None = None,
    name: str | None = None,
    config: LoRAConfig | None = None,
    dtype: jnp.dtype | str | None = None,
) -> LoRAModel:
    """Reads a PEFT LoRA adapter directory into a host-side ``LoRAModel``.

    Args:
      path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      adapter_id: an int >= 1 (Python or NumPy); default: stable hash of the absolute path.
      name: default: the directory's base name.
      config: serving limits to check against (max_lora_rank, bias_enabled); its
        target_modules select the model's layers (``jlora.apply``), and whether this adapter's
        modules are among them is checked where it enters a slot bank (``jlora.manager``).
      dtype: dtype of the converted arrays (float16, bfloat16, float32 or float64); default
        ``config.lora_dtype``; "auto" (or no config) keeps each tensor's stored dtype.

    Raises:
      LoRAConfigError (a bad adapter_id), AdapterConfigError, AdapterWeightsError
      (UnsafeFormatError for pickles),
      AdapterMismatchError: each naming the file or module and the fix.
    """
    path = os.fspath(path)
    if adapter_id is not None:
        if not is_int(adapter_id) or adapter_id < 1:
            raise LoRAConfigError(
                f"{path}: adapter_id must be an int >= 1 (0 is the base model), got "
                f"{adapter_id!r}; or leave it out for a stable id from the path"
            )
        adapter_id = int(adapter_id)
    if os.path.isfile(path) and path.endswith((".bin", ".pt", ".pth", ".pkl")):
        raise UnsafeFormatError(f"{path}: a pickle-based file. {CONVERT_HINT}")
    if not os.path.isdir(path):
        raise AdapterConfigError(f"{path}: not a directory; pass a PEFT adapter directory")
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        pickles = [p for p in PICKLE_NAMES if os.path.isfile(os.path.join(path, p))]
        if pickles:
            raise UnsafeFormatError(
                f"{os.path.join(path, pickles[0])}: only a pickle-based adapter is present. "
                + CONVERT_HINT
            )
    peft_config = PEFTConfig.from_dir(path)
    peft_config.validate_legal(config)
    if not os.path.isfile(weights_file):
        raise AdapterWeightsError(f"{weights_file}: not found; save the adapter with PEFT")
    if os.path.getsize(weights_file) == 0:
        raise AdapterWeightsError(f"{weights_file}: empty file; re-save the adapter")
    if dtype is None and config is not None:
        dtype = config.lora_dtype
    target_dtype = None
    if not _is_auto(dtype):
        try:
            target_dtype = jnp.dtype(dtype)
        except (TypeError, ValueError):
            pass  # not a dtype at all: refused below
    if not _is_auto(dtype) and (target_dtype is None or target_dtype not in LOAD_DTYPES):
        raise AdapterConfigError(
            f"{path}: dtype={dtype!r} is not a dtype LoRA weights load in; pass one of "
            f"{', '.join(d.name for d in LOAD_DTYPES)}, or 'auto' to keep the stored one"
        )

    # The file is opened three times (safe_open validates the header, then we parse it and read
    # the tensors): a writer saving over it meanwhile (a re-save into a served path) would mix
    # two versions, so its stamp must not move.
    stamp = _stamp(weights_file)
    try:
        with safe_open(weights_file, framework="numpy") as f:  # validates the header
            keys = list(f.keys())
        header, data_start = _read_header(weights_file)
        entries = _index_tensors(keys, header, weights_file, peft_config, config)
        tensors, nonfinite = _read_tensors(weights_file, header, data_start, entries)
    except Exception as e:
        _check_unchanged(weights_file, stamp)  # a rewrite explains any failure here
        if isinstance(e, SafetensorError | EOFError):
            raise AdapterWeightsError(
                f"{weights_file}: truncated or corrupt safetensors file ({e}); re-save the adapter"
            ) from None
        raise
    _check_unchanged(weights_file, stamp)
    loras = {
        module: _read_layer(
            tensors, nonfinite, weights_file, module, entry, peft_config, target_dtype
        )
        for module, entry in entries.items()
    }
    if not loras:
        raise AdapterWeightsError(f"{weights_file}: holds no LoRA tensors")
    return LoRAModel(
        loras=loras,
        id=default_adapter_id(path) if adapter_id is None else adapter_id,
        name=name or os.path.basename(os.path.normpath(path)),
        path=path,
    )


def _is_auto(dtype) -> bool:
    return dtype is None or (isinstance(dtype, str) and dtype == "auto")


def _stamp(file: str) -> tuple[int, int, int, int]:
    st = os.stat(file)
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def _check_unchanged(file: str, stamp: tuple[int, int, int, int]) -> None:
    try:
        same = _stamp(file) == stamp
    except OSError:
        same = False
    if not same:
        raise AdapterWeightsError(
            f"{file}: changed while it was being read (another process saving the adapter?); "
            "load it again once the save has finished"
        )


def _read_header(file: str) -> tuple[dict, int]:
    """The safetensors header (already validated by ``safe_open``) and where the data starts."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(header_len)), 8 + header_len


def _index_tensors(
    keys, header: dict, file: str, peft: PEFTConfig, config: LoRAConfig | None
) -> dict:
    entries: dict[str, _Entry] = {}
    for key in keys:
        stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _KEY.match(stripped)
        if m is None and stripped.endswith(".base_layer.weight"):
            # PEFT's save_embedding_layers copies the base embedding / lm_head weights into
            # the adapter when they are targeted; they belong to the base model, not the LoRA.
            # (Matched first: a LoRA tensor of a module under a "base_layer" path is kept.)
            continue
        if m is None and stripped.endswith(".bias"):
            raise AdapterWeightsError(
                f"{file}: tensor {key!r} is a retrained bias of the base model (PEFT "
                f"bias={peft.bias!r}); it replaces the base model's bias, which one batch "
                "cannot swap per request: merge the adapter into the base model "
                "(PeftModel.merge_and_unload) or retrain with bias='none'"
            )
        if m is None:
            raise AdapterWeightsError(
                f"{file}: tensor {key!r} is not a LoRA weight (modules_to_save or another tuner?);"
                " jlora serves LoRA A/B weights only"
            )
        module, part, param = m["module"], m["part"], m["param"]
        if param == "bias" and part != "lora_B":
            raise AdapterWeightsError(
                f"{file}: tensor {key!r} is a bias on {part}; PEFT's LoRA bias (lora_bias=True) "
                "is on lora_B only, so this file was not written by PEFT"
            )
        entry = entries.setdefault(module, _Entry())
        dt = header[key]["dtype"]
        if dt not in FLOAT_DTYPES:
            raise AdapterWeightsError(f"{file}: tensor {key!r} has dtype {dt}; expected a float")
        entry.shapes[key] = tuple(header[key]["shape"])
        role = "bias" if param == "bias" else "a" if part.endswith("A") else "b"
        if getattr(entry, role) is not None:
            raise AdapterWeightsError(
                f"{file}: module {module!r} has two {part}{'.bias' if role == 'bias' else ''} "
                f"tensors ({getattr(entry, role)!r} and {key!r}); save one adapter per file"
            )
        tag = (m["adapter"], part.startswith("lora_embedding"))
        if entry.tag is not None and tag != entry.tag:
            first = next(k for k in entry.shapes if k != key)
            raise AdapterWeightsError(
                f"{file}: module {module!r} mixes tensors of different adapters or kinds "
                f"({first!r} and {key!r}); save one adapter per file"
            )
        entry.tag = tag
        setattr(entry, role, key)
        if role == "a":
            entry.embedding = part.startswith("lora_embedding")
    for module, e in entries.items():
        if e.a is None or e.b is None:
            have, miss = ("lora_A", "lora_B") if e.b is None else ("lora_B", "lora_A")
            raise AdapterWeightsError(
                f"{file}: module {module!r} has {have} but no {miss}; the file is incomplete"
            )
        _check_shapes(file, module, e, peft, config)
    # No check against config.target_modules here: those name the model's JAX layers
    # ("all-linear", a fused qkv_proj), which PEFT module names cannot be matched against
    # without the model. Which modules are served is the manager's check against the wrapped
    # model's targets (jlora.manager.add_adapter), which names a module it has no target for.
    return entries


def _check_shapes(file, module, e: _Entry, peft: PEFTConfig, config) -> None:
    a, b = e.shapes[e.a], e.shapes[e.b]
    if len(a) != 2 or len(b) != 2:
        raise AdapterWeightsError(
            f"{file}: module {module!r}: lora A {a} and B {b} must both be 2-D"
        )
    # PyTorch layout: Linear A [r, in], B [out, r]; Embedding A [r, vocab], B [dim, r].
    r = a[0]
    if b[1] != r:
        raise AdapterWeightsError(
            f"{file}: module {module!r}: A {a} has rank {r} but B {b} has rank {b[1]}; "
            "the two matrices do not belong together"
        )
    expected = peft.rank_for(module)
    if r != expected:
        raise AdapterWeightsError(
            f"{file}: module {module!r}: tensors have rank {r} but adapter_config.json says "
            f"r={expected} for it (r / rank_pattern); the config and weights disagree"
        )
    if config is not None and r > config.max_lora_rank:
        raise AdapterMismatchError(
            f"{file}: module {module!r}: rank {r} exceeds max_lora_rank={config.max_lora_rank}"
        )
    if e.bias is not None:
        if config is None or not config.bias_enabled:
            raise AdapterWeightsError(
                f"{file}: module {module!r} carries a LoRA bias (lora_B.bias), which multi-LoRA "
                "slots do not serve; to merge the adapter into the base model instead "
                "(jlora.merge_adapter), load it with LoRAConfig(bias_enabled=True)"
            )
        if e.shapes[e.bias] != (b[0],):
            raise AdapterWeightsError(
                f"{file}: module {module!r}: bias {e.shapes[e.bias]} must be [{b[0]}]"
            )


def _read_tensors(file: str, header: dict, data_start: int, entries: dict[str, _Entry]):
    """The LoRA tensors of ``entries``, as read-only views of one aligned buffer holding only
    their bytes (a file's other tensors, e.g. PEFT's copies of base embeddings, are not read),
    and each one's count of NaN/Inf values, taken as its bytes land."""
    keys = [k for e in entries.values() for k in (e.a, e.b, e.bias) if k is not None]
    ranges = [tuple(data_start + o for o in header[k]["data_offsets"]) for k in keys]
    dtypes = [np.dtype(FLOAT_DTYPES[header[k]["dtype"]]) for k in keys]
    buf, placed, bad = read_ranges_checked(file, ranges, dtypes)
    freeze(buf)
    tensors = {}
    for key, offset, dtype in zip(keys, placed, dtypes, strict=True):
        shape = header[key]["shape"]
        count = math.prod(shape)  # Python ints: no overflow, and 448 np.prod calls cost ~1 ms
        tensors[key] = np.frombuffer(buf, dtype, count=count, offset=offset).reshape(shape)
    return tensors, dict(zip(keys, bad, strict=True))


def _read_layer(
    tensors, nonfinite, file, module, e: _Entry, peft: PEFTConfig, dtype
) -> LoRALayerWeights:
    arrays = {}
    for role, key in (("a", e.a), ("b", e.b), ("bias", e.bias)):
        if key is None:
            continue
        x = tensors[key]
        bad = nonfinite[key]
        if bad:
            raise AdapterWeightsError(
                f"{file}: module {module!r}: tensor {key!r} holds {bad} NaN/Inf values; "
                "the adapter is corrupt or diverged in training"
            )
        if role != "bias":
            x = x.T  # PyTorch [r, in] / [out, r] -> JAX [in, r] / [r, out], a view: no copy
        if dtype is not None and dtype != x.dtype:
            with np.errstate(over="ignore"):  # counted below, and refused with the module named
                x = x.astype(dtype)
            if jnp.finfo(dtype).max < jnp.finfo(tensors[key].dtype).max:
                bad = count_nonfinite(x)
                if bad:
                    raise AdapterWeightsError(
                        f"{file}: module {module!r}: tensor {key!r} has {bad} values beyond "
                        f"{np.dtype(dtype).name}'s range (max {jnp.finfo(dtype).max}); load it "
                        "in a wider dtype (LoRAConfig.lora_dtype)"
                    )
        arrays[role] = x
    return LoRALayerWeights(
        lora_a=arrays["a"],
        lora_b=arrays["b"],
        bias=arrays.get("bias"),
        module_name=module,
        scaling=peft.scaling_for(module),
        is_embedding=e.embedding,
    )
