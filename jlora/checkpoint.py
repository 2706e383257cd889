"""Saves converted adapters (``LoRAModel``) with orbax-checkpoint and restores them exactly.

A restored adapter is already in jlora's layout and dtype: no PEFT config parsing, no transposes,
no casts, which makes it the fast path of the manager's disk tier (``jlora.manager`` restores a
``LoRARequest`` whose path is such a checkpoint instead of re-converting PEFT safetensors).

On disk (an orbax composite checkpoint with two items, written and committed by orbax's
``Checkpointer``: temporary directory, atomic rename, commit marker):
  ``arrays``: one flat buffer per dtype (``float32.bin``, ``bfloat16.bin``, ...) holding every
    tensor of that dtype back to back: raw bytes in the host's (little-endian) order, written and
    read by ``_buffer_args().handler``, a small orbax ``CheckpointHandler``, with one
    ``readinto`` into an aligned buffer (``jlora.hostio``). Not
    tensorstore: reading one 80 MB buffer through orbax's PyTree handler took 73-105 ms against
    ~10-20 ms for the file itself (OCDBT on or off, any chunking; BENCHMARKS.md), which made a
    restore slower than re-converting the PEFT file; this layout restores faster than the
    conversion. The byte size of every buffer is in the metadata, so a truncated file is caught.
  ``jlora_adapter``: JSON with the format version, the adapter's id, name and path, the buffers'
    sizes, and per module its weights' placement (dtype, offset, shape), scaling and kind.

Restoring reproduces ids, names, paths, module order, scalings (exact: JSON round-trips Python
floats), array values and dtypes (bfloat16 included). Arrays come back as host numpy views into
the per-dtype buffers, checked for NaN/Inf like a PEFT load. Imports jlora.config, jlora.errors,
jlora.hostio and jlora.weights; orbax lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import types
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora.config import is_int
from jlora.errors import CheckpointError, LoRAError
from jlora.hostio import FLOAT_DTYPE_NAMES, count_nonfinite, freeze, read_ranges_checked
from jlora.weights import LoRALayerWeights, LoRAModel, PackedLoRALayerWeights

FORMAT = "jlora.adapter"
# One buffer file per dtype, named by it (the names are checked on restore: they become paths).
_BUFFER_DTYPES = FLOAT_DTYPE_NAMES
# orbax's TMP_DIR_SUFFIX (private in orbax.checkpoint._src.path.atomicity_types)
_ORBAX_TMP = ".orbax-checkpoint-tmp"
FORMAT_VERSION = 2  # 1: buffers in tensorstore (orbax PyTree handler)
ARRAYS_ITEM = "arrays"
META_ITEM = "jlora_adapter"
META_FILE = "metadata"  # orbax's JsonCheckpointHandler's file in the META_ITEM directory
# Everything orbax and jlora write in a checkpoint: what overwrite may delete, and nothing else.
_OWN_ENTRIES = {
    "": {META_ITEM, ARRAYS_ITEM, "_CHECKPOINT_METADATA", "commit_success.txt"},
    META_ITEM: {META_FILE, "commit_success.txt"},
    ARRAYS_ITEM: {f"{d}.bin" for d in _BUFFER_DTYPES} | {"commit_success.txt"},
}


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a ``save_adapter`` checkpoint: its metadata file is there
    (cheap: no orbax, no reads; ``restore_adapter`` checks the rest)."""
    return os.path.isfile(os.path.join(os.fspath(path), META_ITEM, META_FILE))


def save_adapter(model: LoRAModel, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes ``model`` to the directory ``path`` (created; must not exist unless
    ``overwrite``, which replaces only an existing jlora checkpoint holding nothing but what a
    save writes: any other file or directory there is refused, never deleted). The checkpoint
    is written beside ``path`` and moved there once complete, so a failed save leaves ``path``
    as it was. Returns the absolute path.

    >>> import tempfile, numpy as np
    >>> w = LoRALayerWeights(module_name="q", lora_a=np.ones((4, 2), np.float32),
    ...                      lora_b=np.ones((2, 3), np.float32), scaling=0.5)
    >>> d = save_adapter(LoRAModel(loras={"q": w}, id=7, name="demo"),
    ...                  tempfile.mkdtemp() + "/demo")
    >>> restore_adapter(d).loras["q"].scaling
    0.5
    """
    import orbax.checkpoint as ocp

    if not isinstance(model, LoRAModel):
        raise TypeError(f"save_adapter takes a LoRAModel, got {type(model).__name__}")
    if not os.fspath(path):
        raise CheckpointError("save_adapter: the checkpoint path is empty; name a new directory")
    path = os.path.abspath(os.fspath(path))
    if _ORBAX_TMP in os.path.basename(path):
        # orbax takes such a name for one of its unfinished writes and refuses to restore it
        raise CheckpointError(
            f"{path}: a name containing {_ORBAX_TMP!r} marks an unfinished orbax write, which "
            "could never be restored; choose another name"
        )
    if os.path.lexists(path):
        if not overwrite:
            raise CheckpointError(f"{path}: already exists; pass overwrite=True to replace it")
        _check_replaceable(path)
    # Every field checked, and the metadata serialized once, before orbax starts: a failure in
    # orbax's writer would leave its temporary directory behind.
    if not is_int(model.id) or model.id < 1:
        raise CheckpointError(
            f"{path}: adapter {model.name!r} has id {model.id!r}; ids are ints >= 1 "
            "(LoRAModel.clone(new_id) gives it one)"
        )
    if not isinstance(model.name, str):
        raise CheckpointError(f"{path}: adapter name {model.name!r} must be a str")
    if model.path is not None and not isinstance(model.path, str | os.PathLike):
        raise CheckpointError(
            f"{path}: adapter {model.name!r} has path {model.path!r}; pass a str, a PathLike "
            "or None"
        )
    packer = _Packer(path)
    modules: list[dict] = []
    for name, weights in model.loras.items():
        if isinstance(weights, PackedLoRALayerWeights):
            layers = [None if s is None else packer.layer(s) for s in weights.slices]
            modules.append(
                {"name": name, "packed": True, "module_name": weights.module_name, "layers": layers}
            )
        elif isinstance(weights, LoRALayerWeights):
            modules.append({"name": name, "packed": False, "layers": [packer.layer(weights)]})
        else:
            raise TypeError(f"module {name!r}: cannot save a {type(weights).__name__}")
    buffers = packer.buffers()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "id": int(model.id),
        "name": model.name,
        "path": None if model.path is None else os.fspath(model.path),
        "buffers": {k: v.nbytes for k, v in buffers.items()},
        "modules": modules,
    }
    try:
        json.dumps(meta)  # what orbax's JsonSave will do, in its writer thread
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: adapter {model.name!r} has a field JSON cannot hold ({e}); module names "
            "must be strs"
        ) from None
    items: dict[str, Any] = {
        META_ITEM: ocp.args.JsonSave(meta),
        ARRAYS_ITEM: _buffer_args().save(buffers),
    }
    # Written beside the destination and moved into place once orbax has committed it, so a
    # failed save leaves no partial checkpoint and keeps the one it was to replace.
    parent, base = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{base}.jlora-save-", dir=parent)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be written ({type(e).__name__}: {e})") from None
    try:
        new = os.path.join(staging, "new")
        with _checkpointer() as ckptr:
            ckptr.save(new, ocp.args.Composite(**items))
        old = os.path.join(staging, "old")
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.rename(new, path)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, path)
            raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be written ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_replaceable(path: str) -> None:
    """Raises unless ``path`` is a jlora checkpoint holding only what a save writes: all that
    ``save_adapter(overwrite=True)`` may delete."""

    def refuse(why: str):
        raise CheckpointError(
            f"{path}: {why}; overwrite replaces only a jlora adapter checkpoint that holds "
            "nothing else, so choose a new path or remove it yourself"
        )

    try:
        with open(os.path.join(path, META_ITEM, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if os.path.islink(path) or not isinstance(meta, dict) or meta.get("format") != FORMAT:
        refuse("exists and is not a jlora adapter checkpoint (no readable metadata)")
    for sub, own in _OWN_ENTRIES.items():
        directory = os.path.join(path, sub)
        for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            where = os.path.join(directory, entry)
            want_dir = not sub and entry in _OWN_ENTRIES  # the two item directories
            if (
                entry not in own
                or os.path.islink(where)
                or not (os.path.isdir(where) if want_dir else os.path.isfile(where))
            ):
                refuse(f"holds {where}, which jlora does not write")


def restore_adapter(path: str | os.PathLike) -> LoRAModel:
    """Reads a ``save_adapter`` checkpoint back into the ``LoRAModel`` that was saved."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.join(path, META_ITEM)):
        raise CheckpointError(
            f"{path}: not a jlora adapter checkpoint (no {META_ITEM!r} item); write one with "
            "jlora.save_adapter, or load a PEFT adapter directory with jlora.load_adapter"
        )
    if not is_adapter_checkpoint(path):
        raise CheckpointError(
            f"{os.path.join(path, META_ITEM, META_FILE)}: missing; the checkpoint is incomplete "
            "(an interrupted copy?): re-save the adapter with jlora.save_adapter"
        )
    try:
        return _restore(path, ocp)
    except LoRAError:
        raise
    except OSError as e:
        raise CheckpointError(
            f"{path}: the checkpoint cannot be read ({type(e).__name__}: {e}); check its "
            "files and permissions, or re-save the adapter"
        ) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # json errors are ValueErrors; the rest are metadata of the wrong shape
        raise CheckpointError(
            f"{path}: the checkpoint's metadata is corrupt ({type(e).__name__}: {e}); re-save "
            "the adapter with jlora.save_adapter"
        ) from None


def _restore(path: str, ocp) -> LoRAModel:
    with _checkpointer() as ckptr:
        meta = ckptr.restore(path, ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[
            META_ITEM
        ]
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                f"jlora reads {FORMAT!r} version {FORMAT_VERSION}. Re-save the adapter"
            )
    # The metadata came through orbax (so the checkpoint is a finalized one); the buffers are
    # read straight from the item's directory, as BuffersHandler.restore would, without a second
    # orbax round trip (~2 ms of its ~16 ms restore).
    buffers = _read_buffers(os.path.join(path, ARRAYS_ITEM), meta.get("buffers", {}))
    unpacker = _Unpacker(
        path,
        {k: buf for k, (buf, _) in buffers.items()},
        {k for k, (_, bad) in buffers.items() if bad},
    )
    _check_fields(path, meta)
    loras = {}
    for module in meta["modules"]:
        layers = [None if m is None else unpacker.layer(m) for m in module["layers"]]
        if module["packed"]:
            loras[module["name"]] = PackedLoRALayerWeights(
                slices=tuple(layers), module_name=module["module_name"]
            )
        else:
            loras[module["name"]] = layers[0]
    return LoRAModel(loras=loras, id=meta["id"], name=meta["name"], path=meta["path"])


def _checkpointer():
    import orbax.checkpoint as ocp

    handler = ocp.CompositeCheckpointHandler(
        **{ARRAYS_ITEM: _buffer_args().handler(), META_ITEM: ocp.JsonCheckpointHandler()}
    )
    return ocp.Checkpointer(handler)


@functools.cache
def _buffer_args():
    """The orbax handler of the ``arrays`` item and its save/restore args (built on first use:
    orbax is imported lazily)."""
    import orbax.checkpoint as ocp

    class BuffersHandler(ocp.CheckpointHandler):
        """dtype name -> 1-D numpy buffer, one raw ``<dtype>.bin`` file each."""

        def save(self, directory, args):
            for key, buf in args.buffers.items():
                with open(os.path.join(os.fspath(directory), f"{key}.bin"), "wb") as f:
                    f.write(memoryview(np.ascontiguousarray(buf).view(np.uint8)))

        def restore(self, directory, args):
            return _read_buffers(os.fspath(directory), args.sizes)

    @ocp.args.register_with_handler(BuffersHandler, for_save=True)
    @dataclasses.dataclass
    class BuffersSave(ocp.args.CheckpointArgs):
        buffers: dict[str, np.ndarray]

    @ocp.args.register_with_handler(BuffersHandler, for_restore=True)
    @dataclasses.dataclass
    class BuffersRestore(ocp.args.CheckpointArgs):
        sizes: dict[str, int]

    return types.SimpleNamespace(handler=BuffersHandler, save=BuffersSave, restore=BuffersRestore)


def _read_buffers(directory: str, sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, int]]:
    """dtype name -> (its 1-D buffer, the buffer's count of NaN/Inf values), every file's size
    checked against the metadata before it is read."""
    out = {}
    for key, nbytes in sizes.items():
        if key not in _BUFFER_DTYPES or not isinstance(nbytes, int) or nbytes < 0:
            raise CheckpointError(
                f"{directory}: metadata lists a buffer {key!r} of {nbytes!r} bytes; jlora writes "
                f"one buffer per float dtype ({sorted(_BUFFER_DTYPES)}): re-save the adapter"
            )
        file = os.path.join(directory, f"{key}.bin")
        if not os.path.isfile(file) or os.path.getsize(file) != nbytes:
            have = os.path.getsize(file) if os.path.isfile(file) else "no"
            raise CheckpointError(
                f"{file}: {have} bytes where the checkpoint's metadata says {nbytes}; "
                "the checkpoint is incomplete or corrupt, re-save it"
            )
        dtype = jnp.dtype(key)
        if nbytes % dtype.itemsize:
            raise CheckpointError(
                f"{file}: {nbytes} bytes is not a whole number of {key} values; re-save it"
            )
        buf, _, (bad,) = read_ranges_checked(file, [(0, nbytes)], [dtype])
        freeze(buf)
        out[key] = (buf.view(dtype), bad)
    return out


class _Packer:
    """Collects arrays into one flat buffer per dtype, recording where each one went."""

    def __init__(self, path: str):
        self.path = path
        self.parts: dict[str, list[np.ndarray]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, x, what: str) -> list | None:
        if x is None:
            return None
        x = np.asarray(x)
        key = x.dtype.name
        if key not in _BUFFER_DTYPES:
            raise CheckpointError(
                f"{self.path}: {what} has dtype {key}; checkpoints hold "
                f"{sorted(_BUFFER_DTYPES)}: cast the adapter first (LoRAModel.optimize(dtype))"
            )
        # Restore refuses NaN/Inf, so a save must too, before it replaces a good checkpoint.
        bad = count_nonfinite(x)
        if bad:
            raise CheckpointError(
                f"{self.path}: {what} holds {bad} NaN/Inf values; a checkpoint of it could "
                "not be restored: fix the adapter's weights (a cast to a narrower dtype can "
                "overflow to Inf)"
            )
        offset = self.sizes.get(key, 0)
        self.parts.setdefault(key, []).append(x.reshape(-1))
        self.sizes[key] = offset + x.size
        return [key, offset, list(x.shape)]

    def layer(self, w: LoRALayerWeights) -> dict:
        return {
            "module_name": w.module_name,
            "scaling": float(w.scaling),
            "is_embedding": bool(w.is_embedding),
            "a": self.add(w.lora_a, f"module {w.module_name!r} lora_a"),
            "b": self.add(w.lora_b, f"module {w.module_name!r} lora_b"),
            "bias": self.add(w.bias, f"module {w.module_name!r} bias"),
        }

    def buffers(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}


class _Unpacker:
    """Tensors out of the restored buffers; only a buffer that holds NaN/Inf (``nonfinite``:
    its dtype) has its tensors counted one by one, to name the bad one."""

    def __init__(self, path: str, buffers: dict[str, np.ndarray], nonfinite: set[str]):
        self.path, self.buffers, self.nonfinite = path, buffers, nonfinite

    def get(self, where: list | None) -> np.ndarray | None:
        if where is None:
            return None
        key, offset, shape = where
        if not all(_is_count(n) for n in (offset, *shape)):
            raise CheckpointError(
                f"{self.path}: metadata places a tensor at offset {offset!r} with shape "
                f"{shape!r}; the checkpoint is corrupt, re-save it"
            )
        buf = self.buffers.get(key)
        size = math.prod(shape)
        if buf is None or offset + size > buf.size:  # buffers[key] has dtype key
            raise CheckpointError(
                f"{self.path}: a tensor of dtype {key} at [{offset}, {offset + size}) is "
                "missing from the stored arrays; the checkpoint is incomplete, re-save it"
            )
        x = buf[offset : offset + size].reshape(shape)
        bad = count_nonfinite(x) if key in self.nonfinite else 0
        if bad:
            raise CheckpointError(
                f"{self.path}: a {key} tensor of shape {tuple(shape)} holds {bad} NaN/Inf "
                "values; the checkpoint is corrupt, re-save it from a good adapter"
            )
        return x

    def layer(self, m: dict) -> LoRALayerWeights:
        a, b, bias = self.get(m["a"]), self.get(m["b"]), self.get(m["bias"])
        try:
            return LoRALayerWeights(
                lora_a=a,
                lora_b=b,
                bias=bias,
                module_name=m["module_name"],
                scaling=m["scaling"],
                is_embedding=m["is_embedding"],
            )
        except LoRAError as e:  # save_adapter writes only valid layers: the metadata was edited
            raise CheckpointError(
                f"{self.path}: the checkpoint's metadata is corrupt ({e}); re-save the adapter"
            ) from None


def _check_fields(path: str, meta: dict) -> None:
    """The metadata's identity and per-layer fields have the types ``save_adapter`` writes
    (JSON accepts anything: a hand-edited file must not become a half-valid LoRAModel)."""
    bad = []
    if not (is_int(meta["id"]) and meta["id"] >= 1):
        bad.append(f"id {meta['id']!r} (an int >= 1)")
    if not isinstance(meta["name"], str):
        bad.append(f"name {meta['name']!r} (a str)")
    if meta["path"] is not None and not isinstance(meta["path"], str):
        bad.append(f"path {meta['path']!r} (a str or null)")
    names = [module["name"] for module in meta["modules"]]
    if len(set(names)) != len(names):
        bad.append(f"modules {sorted({n for n in names if names.count(n) > 1})} listed twice")
    for module in meta["modules"]:
        layers = module["layers"]
        if not module["packed"] and (len(layers) != 1 or layers[0] is None):
            bad.append(f"module {module['name']!r} layers {layers!r} (one layer)")
        for m in layers:
            if m is None:
                continue
            if m["a"] is None or m["b"] is None:
                bad.append(f"module {module['name']!r} has no lora_a or lora_b")
            if not isinstance(m["is_embedding"], bool):
                bad.append(f"module {module['name']!r} is_embedding {m['is_embedding']!r} (a bool)")
            if not isinstance(m["module_name"], str):
                bad.append(f"module {module['name']!r} module_name {m['module_name']!r} (a str)")
    if bad:
        raise CheckpointError(
            f"{path}: the checkpoint's metadata is corrupt: {'; '.join(bad[:4])}; re-save the "
            "adapter with jlora.save_adapter"
        )


def _is_count(n) -> bool:
    return is_int(n) and n >= 0


__all__ = ["is_adapter_checkpoint", "restore_adapter", "save_adapter"]
