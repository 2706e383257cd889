"""Orbax checkpoints of converted adapters: exact round trips, clear errors on bad checkpoints."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTER_NAMES, ADAPTERS_DIR

import jlora
from jlora.checkpoint import META_ITEM, is_adapter_checkpoint, restore_adapter, save_adapter
from jlora.errors import CheckpointError
from jlora.weights import LoRALayerWeights, LoRAModel, PackedLoRALayerWeights


def assert_same_model(got: LoRAModel, want: LoRAModel):
    assert (got.id, got.name, got.path) == (want.id, want.name, want.path)
    assert list(got.loras) == list(want.loras)
    for name, w in want.loras.items():
        g = got.loras[name]
        assert type(g) is type(w), name
        if isinstance(w, PackedLoRALayerWeights):
            assert g.module_name == w.module_name
            pairs = list(zip(g.slices, w.slices, strict=True))
        else:
            pairs = [(g, w)]
        for gs, ws in pairs:
            if ws is None:
                assert gs is None
                continue
            assert (gs.module_name, gs.scaling, gs.is_embedding) == (
                ws.module_name,
                ws.scaling,
                ws.is_embedding,
            )
            for x, y in ((gs.lora_a, ws.lora_a), (gs.lora_b, ws.lora_b), (gs.bias, ws.bias)):
                if y is None:
                    assert x is None
                    continue
                assert isinstance(x, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
                # Bitwise: compare raw bytes so bfloat16 and -0.0 are checked exactly.
                assert x.tobytes() == np.asarray(y).tobytes(), name


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_fixture_adapters_round_trip_exactly(tmp_path, name):
    model = jlora.load_adapter(ADAPTERS_DIR / name)
    path = save_adapter(model, tmp_path / name)
    assert is_adapter_checkpoint(path) and os.path.isabs(path)
    assert_same_model(restore_adapter(path), model)


def test_mixed_dtypes_packed_layers_bias_and_awkward_scalings_round_trip(tmp_path):
    rng = np.random.default_rng(0)

    def layer(name, d_in, r, d_out, dtype, **kw):
        return LoRALayerWeights(
            lora_a=rng.standard_normal((d_in, r)).astype(dtype),
            lora_b=rng.standard_normal((r, d_out)).astype(dtype),
            module_name=name,
            **kw,
        )

    model = LoRAModel(
        loras={
            "a.q": layer("a.q", 5, 3, 7, jnp.bfloat16, scaling=1 / 3),
            "a.qkv": PackedLoRALayerWeights(
                slices=(layer("a.q2", 5, 2, 4, np.float16), None, layer("a.v", 5, 1, 2, "f4")),
                module_name="a.qkv",
            ),
            "emb": layer("emb", 11, 2, 6, np.float32, scaling=2.0**0.5, is_embedding=True),
            "b": layer("b", 4, 1, 3, np.float32, bias=np.array([-0.0, 1e-40, 3.5], np.float32)),
        },
        id=2**31 - 1,
        name="ünïcode / name",
        path="/some/where",
    )
    path = save_adapter(model, tmp_path / "ckpt")
    assert_same_model(restore_adapter(path), model)


def test_empty_adapter_round_trips(tmp_path):
    model = LoRAModel(loras={}, id=3, name="empty")
    assert_same_model(restore_adapter(save_adapter(model, tmp_path / "e")), model)


def test_existing_path_needs_overwrite(tmp_path):
    model = jlora.load_adapter(ADAPTERS_DIR / "layers_r4")
    path = save_adapter(model, tmp_path / "c")
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_adapter(model, path)
    other = model.replace(name="renamed")
    save_adapter(other, path, overwrite=True)
    assert restore_adapter(path).name == "renamed"


def _meta_file(path) -> str:
    meta_files = [
        os.path.join(d, f)
        for d, _, files in os.walk(os.path.join(path, META_ITEM))
        for f in files
        if not f.startswith(("_", "commit"))
    ]
    assert len(meta_files) == 1
    return meta_files[0]


def _edit_meta(path, edit) -> None:
    with open(_meta_file(path)) as f:
        meta = json.load(f)
    edit(meta)
    with open(_meta_file(path), "w") as f:
        json.dump(meta, f)


def test_not_a_checkpoint_and_wrong_version_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a jlora adapter checkpoint"):
        restore_adapter(ADAPTERS_DIR / "attn_r8")
    assert not is_adapter_checkpoint(ADAPTERS_DIR / "attn_r8")
    path = save_adapter(jlora.load_adapter(ADAPTERS_DIR / "layers_r4"), tmp_path / "c")
    _edit_meta(path, lambda meta: meta.update(version=99))
    with pytest.raises(CheckpointError, match="version 99; this jlora reads 'jlora.adapter'"):
        restore_adapter(path)


def _drop(key):
    return lambda meta: meta.pop(key)


def _set_tensor(i, value):
    def edit(meta):
        meta["modules"][0]["layers"][0]["a"][i] = value

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_drop("modules"), "metadata is corrupt (KeyError"),
        (_drop("buffers"), "missing from the stored arrays"),
        (_set_tensor(1, -10), "at offset -10"),
        (_set_tensor(2, [3, -5]), "with shape [3, -5]"),
        (_set_tensor(0, "../../x"), "missing from the stored arrays"),
        (lambda meta: meta.update(buffers={"../x": 4}), "buffer '../x'"),
        (lambda meta: meta.update(buffers={"float32": 6}), "not a whole number of float32"),
        (lambda meta: meta["modules"][0].update(layers=5), "metadata is corrupt (TypeError"),
        (lambda meta: meta.update(id="abc"), "id 'abc' (an int >= 1)"),
        (lambda meta: meta.update(id=0), "id 0 (an int >= 1)"),
        (lambda meta: meta.update(name=7), "name 7 (a str)"),
        (lambda meta: meta.update(path=["x"]), "path ['x'] (a str or null)"),
        (
            lambda meta: meta["modules"][0]["layers"][0].update(is_embedding="no"),
            "is_embedding 'no' (a bool)",
        ),
        # each restored as a half-valid LoRAModel before
        (lambda meta: meta["modules"][0]["layers"][0].update(a=None), "no lora_a or lora_b"),
        (lambda meta: meta["modules"][0].update(layers=[None]), "layers [None] (one layer)"),
        (lambda meta: meta["modules"][0].update(layers=[]), "layers [] (one layer)"),
        (lambda meta: meta["modules"].append(meta["modules"][0]), "listed twice"),
        # LoRALayerWeights' own checks, once an AdapterWeightsError naming no checkpoint
        (
            lambda meta: meta["modules"][0]["layers"][0].update(scaling="abc"),
            "metadata is corrupt (module",
        ),
        (
            lambda meta: meta["modules"][0]["layers"][0].update(scaling=float("nan")),
            "metadata is corrupt (module",
        ),
    ],
)
def test_corrupt_metadata_is_a_checkpoint_error(tmp_path, edit, fragment):
    path = save_adapter(jlora.load_adapter(ADAPTERS_DIR / "attn_r8"), tmp_path / "c")
    if "whole number" in fragment:
        with open(_buffer_file(path), "wb") as f:
            f.write(b"\0" * 6)
    _edit_meta(path, edit)
    with pytest.raises(CheckpointError) as info:
        restore_adapter(path)
    assert fragment in str(info.value) and str(path) in str(info.value), str(info.value)


def test_unreadable_metadata_json_is_a_checkpoint_error(tmp_path):
    path = save_adapter(jlora.load_adapter(ADAPTERS_DIR / "attn_r8"), tmp_path / "c")
    with open(_meta_file(path), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="metadata is corrupt"):
        restore_adapter(path)


def test_save_refuses_dtypes_it_cannot_name(tmp_path):
    layer = LoRALayerWeights(
        module_name="model.q_proj",
        lora_a=np.ones((4, 2), jnp.float8_e4m3fn),
        lora_b=np.ones((2, 3), jnp.float8_e4m3fn),
    )
    model = LoRAModel(loras={"q": layer}, id=1, name="f8")
    with pytest.raises(CheckpointError, match="float8_e4m3fn") as info:
        save_adapter(model, tmp_path / "c")
    assert "module 'model.q_proj' lora_a" in str(info.value)
    assert str(tmp_path / "c") in str(info.value)
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_save_refuses_nonfinite_weights_and_keeps_the_old_checkpoint(tmp_path, dtype, bad):
    # restore refuses NaN/Inf: a save that wrote them would replace a good checkpoint with one
    # no restore can read (an f32 max cast to bf16 is Inf, for one).
    path = save_adapter(_small(), tmp_path / "c")
    before = _tree(path)
    b = np.ones((2, 3), np.float32)
    b[1, 2] = bad
    layer = LoRALayerWeights(module_name="q", lora_a=np.ones((4, 2), dtype), lora_b=b.astype(dtype))
    with pytest.raises(CheckpointError, match="module 'q' lora_b holds 1 NaN/Inf"):
        save_adapter(LoRAModel(loras={"q": layer}, id=7, name="bad"), path, overwrite=True)
    assert _tree(path) == before and sorted(os.listdir(tmp_path)) == ["c"]
    assert restore_adapter(path).name == "small"


def test_save_refuses_non_models(tmp_path):
    with pytest.raises(TypeError, match="takes a LoRAModel"):
        save_adapter({"q": 1}, tmp_path / "x")


def _buffer_file(path, dtype="float32"):
    return os.path.join(path, "arrays", f"{dtype}.bin")


def test_restored_arrays_are_aligned_read_only_views(tmp_path):
    model = jlora.load_adapter(ADAPTERS_DIR / "attn_r8")
    restored = restore_adapter(save_adapter(model, tmp_path / "c"))
    for x in (w.lora_a for w in restored.loras.values()):
        assert not x.flags.writeable
    first = next(iter(restored.loras.values())).lora_a
    assert first.ctypes.data % 64 == 0


def test_truncated_or_corrupt_buffers_are_refused(tmp_path, rng):
    model = jlora.load_adapter(ADAPTERS_DIR / "attn_r8")
    dtype = next(iter(model.loras.values())).lora_a.dtype.name
    path = save_adapter(model, tmp_path / "c")
    file = _buffer_file(path, dtype)
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[:-2])
    with pytest.raises(CheckpointError, match=r"bytes where the checkpoint's metadata says"):
        restore_adapter(path)
    # Right size, but a NaN where a weight was: caught like a PEFT file's NaN.
    buf = np.frombuffer(data, np.dtype(dtype)).copy()
    buf[rng.integers(buf.size)] = np.nan
    with open(file, "wb") as f:
        f.write(buf.tobytes())
    with pytest.raises(CheckpointError, match="holds 1 NaN/Inf values"):
        restore_adapter(path)
    os.remove(file)
    with pytest.raises(CheckpointError, match="no bytes where"):
        restore_adapter(path)


def test_arrays_item_restores_through_orbax_too(tmp_path):
    # restore_adapter reads the buffers straight from disk; orbax's own restore of the same item
    # (through the registered handler) must give the same buffers.
    import orbax.checkpoint as ocp

    from jlora.checkpoint import ARRAYS_ITEM, _buffer_args, _checkpointer

    model = jlora.load_adapter(ADAPTERS_DIR / "attn_r8")
    path = save_adapter(model, tmp_path / "c")
    with _checkpointer() as ckptr:
        meta = ckptr.restore(path, ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        sizes = meta[META_ITEM]["buffers"]
        args = ocp.args.Composite(**{ARRAYS_ITEM: _buffer_args().restore(sizes)})
        buffers = ckptr.restore(path, args)[ARRAYS_ITEM]
    assert sorted(buffers) == sorted(sizes)
    for key, (buf, bad) in buffers.items():
        with open(_buffer_file(path, key), "rb") as f:
            assert buf.tobytes() == f.read()
        assert (buf.dtype.name, bad) == (key, 0)


def _small(**kw) -> LoRAModel:
    layer = LoRALayerWeights(
        module_name="q", lora_a=np.ones((4, 2), np.float32), lora_b=np.ones((2, 3), np.float32)
    )
    return LoRAModel(loras={"q": layer}, **{"id": 7, "name": "small", **kw})


def _tree(root) -> dict:
    """Every path under ``root`` with its bytes (None for a directory)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = f.read()
    return out


@pytest.mark.parametrize("keep", ["metadata", "nothing"])
def test_a_checkpoint_without_its_metadata_file_is_a_checkpoint_error(tmp_path, keep):
    path = save_adapter(_small(), tmp_path / "c")
    meta_dir = os.path.join(path, META_ITEM)
    for f in os.listdir(meta_dir):
        os.unlink(os.path.join(meta_dir, f))
    if keep == "nothing":
        os.rmdir(meta_dir)
        os.makedirs(meta_dir)  # a bare jlora_adapter/ directory, as any folder may hold
    assert not is_adapter_checkpoint(path)
    with pytest.raises(CheckpointError) as info:
        restore_adapter(path)
    assert os.path.join(meta_dir, "metadata") in str(info.value) and "re-save" in str(info.value)


def test_an_unreadable_checkpoint_file_is_a_checkpoint_error(tmp_path, monkeypatch):
    from jlora import checkpoint

    path = save_adapter(_small(), tmp_path / "c")

    def denied(directory, sizes):
        raise PermissionError(13, "Permission denied", os.path.join(directory, "float32.bin"))

    monkeypatch.setattr(checkpoint, "_read_buffers", denied)
    with pytest.raises(CheckpointError, match=r"cannot be read \(PermissionError") as info:
        restore_adapter(path)
    assert path in str(info.value)


def _foreign_subdir(root):
    os.makedirs(os.path.join(root, META_ITEM))


def _foreign_file(sub):
    def add(root):
        with open(os.path.join(root, sub, "notes.txt"), "w") as f:
            f.write("user data")

    return add


def _wrong_format(root):
    _edit_meta(root, lambda meta: meta.update(format="someone.else"))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (_foreign_subdir, "not a jlora adapter checkpoint"),
        (_foreign_file(""), "notes.txt"),
        (_foreign_file("arrays"), "notes.txt"),
        (_foreign_file(META_ITEM), "notes.txt"),
        (_wrong_format, "not a jlora adapter checkpoint"),
    ],
)
def test_overwrite_never_deletes_what_is_not_all_a_jlora_checkpoint(tmp_path, make, fragment):
    root = tmp_path / "project"
    if make is _foreign_subdir:
        root.mkdir()
        (root / "precious.txt").write_text("user data")
    else:
        save_adapter(_small(), root)
    make(str(root))
    before = _tree(root)
    with pytest.raises(CheckpointError, match="overwrite") as info:
        save_adapter(_small(name="new"), root, overwrite=True)
    assert fragment in str(info.value)
    assert _tree(root) == before
    assert sorted(os.listdir(tmp_path)) == ["project"]


def test_a_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from jlora.checkpoint import _buffer_args

    path = save_adapter(_small(), tmp_path / "c")
    before = _tree(path)

    def fail(self, directory, args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_buffer_args().handler, "save", fail)
    with pytest.raises(CheckpointError, match="No space left"):
        save_adapter(_small(name="new"), path, overwrite=True)
    assert _tree(path) == before and sorted(os.listdir(tmp_path)) == ["c"]
    monkeypatch.undo()
    save_adapter(_small(name="new"), path, overwrite=True)
    assert restore_adapter(path).name == "new" and sorted(os.listdir(tmp_path)) == ["c"]


def test_numpy_ids_and_pathlike_paths_are_saved_as_plain_values(tmp_path):
    import pathlib

    model = _small(id=np.int64(5), path=pathlib.Path("/some/where"))
    restored = restore_adapter(save_adapter(model, tmp_path / "c"))
    assert (type(restored.id), restored.id, restored.path) == (int, 5, "/some/where")


def test_save_refuses_a_name_orbax_takes_for_an_unfinished_write(tmp_path):
    """orbax refuses to restore <name>.orbax-checkpoint-tmp-<n>: such a save could never be
    read back."""
    with pytest.raises(CheckpointError, match="unfinished orbax write"):
        save_adapter(_small(), tmp_path / "c.orbax-checkpoint-tmp-123")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(id=0), "id"),
        (dict(id=True), "id"),
        (dict(id=2.5), "id"),
        (dict(id="7"), "id"),
        (dict(name=3), "name"),
        (dict(path=3), "path"),
    ],
)
def test_save_refuses_bad_fields_before_writing_anything(tmp_path, fields, fragment):
    with pytest.raises(CheckpointError, match=fragment) as info:
        save_adapter(_small(**fields), tmp_path / "c")
    assert str(tmp_path / "c") in str(info.value)
    assert os.listdir(tmp_path) == []
