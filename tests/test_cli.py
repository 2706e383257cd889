"""The console script: demo serves a mixed batch; bench reports; inspect and convert validate."""

import json

import numpy as np
import pytest
from conftest import ADAPTERS_DIR

import jlora
from jlora import cli
from jlora.checkpoint import restore_adapter


def test_demo_serves_a_mixed_batch(capsys):
    assert cli.main(["demo", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    for name in ("sql", "chat", "code", "math", "poems", "legal", "(base)"):
        assert name in out
    assert "differs" in out and "same" in out and "tokens/s" in out


def test_demo_refuses_max_tokens_below_one(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--max-tokens", "0"])
    assert "must be an int >= 1" in capsys.readouterr().err


def test_convert_to_an_unwritable_path_is_an_error_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["convert", str(ADAPTERS_DIR / "attn_r8"), str(blocker / "out")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_bench_quick_json(capsys):
    assert cli.main(["bench", "--quick", "--no-skewed", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("base_tok_s", "one_adapter_tok_s", "distinct_tok_s"):
        assert result[key] > 0
    assert result["peft_distinct_tok_s"] is None


def test_bench_defaults_are_the_issue_workload(monkeypatch, capsys):
    from jlora import bench

    seen = {}

    def fake_run(cfg, **kwargs):
        seen["cfg"] = cfg
        return {"base_tok_s": 1.0, "one_adapter_tok_s": 1.0, "distinct_tok_s": 1.0}

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["bench", "--no-skewed", "--json"]) == 0
    cfg = seen["cfg"]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (1024, 2816, 8)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (16, 8, 8192)
    assert (cfg.num_seqs, cfg.prompt_len, cfg.new_tokens) == (32, 64, 32)
    assert (cfg.num_adapters, cfg.rank, cfg.alpha) == (32, 16, 32)
    assert cfg.skew_adapters == (8, 64, 512) and cfg.skew_max_loras == 16
    assert cfg.skew_alphas == (1.0, 0.3, 0.1)


def test_inspect_ok_and_error(capsys, tmp_path):
    assert cli.main(["inspect", str(ADAPTERS_DIR / "mlp_r4_rslora")]) == 0
    out = capsys.readouterr().out
    assert "mlp_r4_rslora" in out and "True" in out
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_convert_round_trips(capsys, tmp_path):
    src = ADAPTERS_DIR / "all_r8_bf16"
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    restored, original = restore_adapter(tmp_path / "ckpt"), jlora.load_adapter(src)
    assert set(restored.loras) == set(original.loras)
    for name, layer in original.loras.items():
        np.testing.assert_array_equal(restored[name].lora_a, layer.lora_a)
        assert restored[name].lora_a.dtype == layer.lora_a.dtype
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "x")]) == 2


def test_convert_overwrite_replaces_only_a_checkpoint(capsys, tmp_path):
    src = str(ADAPTERS_DIR / "attn_r8")
    assert cli.main(["convert", src, str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    # Existing output: the CLI names its own flag.
    assert cli.main(["convert", src, str(tmp_path / "ckpt")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    # ... but only where --overwrite would replace what is there.
    (tmp_path / "somefile").write_text("x")
    assert cli.main(["convert", src, str(tmp_path / "somefile")]) == 2
    err = capsys.readouterr().err
    assert "not a jlora checkpoint" in err and "--overwrite" not in err
    assert cli.main(["convert", src, str(tmp_path / "ckpt"), "--overwrite"]) == 0
    # A directory that is not a checkpoint is never deleted, overwrite or not.
    keep = tmp_path / "mine"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert cli.main(["convert", src, str(keep), "--overwrite"]) == 2
    assert "not a jlora adapter checkpoint" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "keep me" and (keep / "sub").is_dir()
    with pytest.raises(jlora.CheckpointError, match="not a jlora adapter checkpoint"):
        jlora.save_adapter(jlora.load_adapter(src), keep, overwrite=True)
    with pytest.raises(jlora.CheckpointError, match="empty"):
        jlora.save_adapter(jlora.load_adapter(src), "", overwrite=True)


def test_inspect_and_convert_know_a_checkpoint(capsys, tmp_path):
    src = ADAPTERS_DIR / "mlp_r4_rslora"
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert str(jlora.load_adapter(src).num_parameters) in out
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "again")]) == 2
    assert "already a jlora checkpoint" in capsys.readouterr().err


def test_bench_refuses_what_would_fail_after_the_run(monkeypatch, capsys, tmp_path):
    from jlora import bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("bench ran"))
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name: None if name == "torch" else real_find_spec(name),
    )
    assert cli.main(["bench", "--compare-peft"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torch") and "not installed" in err
    assert cli.main(["bench", "--plot", str(tmp_path / "no" / "p.png")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["bench", "--no-skewed", "--plot", str(tmp_path / "p.png")]) == 2
    assert "--no-skewed" in capsys.readouterr().err
    # Names matplotlib would refuse, or silently write elsewhere (dir.png, noext.png).
    # p.pgf: matplotlib lists it, but it needs a TeX install (a traceback after the run).
    for name, why in (
        ("p.xyz", "image format"),
        ("noext", "image format"),
        ("p.pgf", "image format"),
        ("", "a directory"),
    ):
        assert cli.main(["bench", "--plot", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --plot") and why in err, err
    # An empty name once skipped the plot silently (a truthiness check).
    assert cli.main(["bench", "--plot", ""]) == 2
    assert "is empty" in capsys.readouterr().err


def test_demo_refuses_more_tokens_than_the_model_has_positions(capsys, monkeypatch):
    monkeypatch.setattr(cli, "print_table", lambda *a: pytest.fail("adapters were written"))
    assert cli.main(["demo", "--max-tokens", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-tokens 5000: at most 1984"), err


def test_demo_max_tokens_error_names_no_private_function(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--max-tokens", "abc"])
    err = capsys.readouterr().err
    assert "must be an int >= 1, got 'abc'" in err and "_positive_int" not in err


def test_inspect_an_empty_and_a_packed_checkpoint(capsys, tmp_path):
    from jlora.weights import LoRALayerWeights, LoRAModel, PackedLoRALayerWeights

    def layer(name, scaling):
        a, b = np.ones((4, 2), np.float32), np.ones((2, 3), np.float32)
        return LoRALayerWeights(module_name=name, lora_a=a, lora_b=b, scaling=scaling)

    empty = jlora.save_adapter(LoRAModel(loras={}, id=3, name="empty"), tmp_path / "empty")
    assert cli.main(["inspect", empty]) == 0
    assert "empty" in capsys.readouterr().out
    packed = LoRAModel(
        loras={
            "l.qkv_proj": PackedLoRALayerWeights(
                slices=(layer("l.q_proj", 0.5), None, layer("l.v_proj", 2.0)),
                module_name="l.qkv_proj",
            )
        },
        id=4,
        name="packed",
    )
    assert cli.main(["inspect", jlora.save_adapter(packed, tmp_path / "packed")]) == 0
    out = capsys.readouterr().out
    assert "0.5/2" in out and "q_proj,v_proj" in out and "float32" in out


def test_inspect_an_incomplete_checkpoint_is_an_error_line(capsys, tmp_path):
    from jlora.checkpoint import META_ITEM

    (tmp_path / "broken" / META_ITEM).mkdir(parents=True)
    assert cli.main(["inspect", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tmp_path / "broken" / META_ITEM / "metadata") in err
    # convert knows it for a checkpoint too (it said adapter_config.json was missing)
    assert cli.main(["convert", str(tmp_path / "broken"), str(tmp_path / "out")]) == 2
    assert "already a jlora checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_shows_a_small_scaling_in_significant_digits(capsys, tmp_path):
    from jlora.synthetic import write_peft_adapter

    src = write_peft_adapter(
        tmp_path / "a", {"model.layers.0.mlp.down_proj": (6, 5)}, r=128, alpha=0.001
    )
    assert cli.main(["inspect", str(src)]) == 0
    assert f"{0.001 / 128:.4g}" in capsys.readouterr().out  # 7.813e-06, not rounded to 0


def test_inspect_and_convert_take_any_rank_and_keep_a_lora_bias(capsys, tmp_path):
    from safetensors.numpy import load_file, save_file

    from jlora.synthetic import write_peft_adapter

    src = write_peft_adapter(tmp_path / "biased", {"model.layers.0.mlp.down_proj": (6, 5)}, r=40)
    weights = tmp_path / "biased" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B"
    tensors[f"{key}.bias"] = np.linspace(-1, 1, 5, dtype=np.float32)
    save_file(tensors, weights)
    config_file = tmp_path / "biased" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lora_bias": True}))
    with pytest.raises(jlora.AdapterConfigError, match="bias_enabled=True"):
        jlora.load_adapter(src)  # a server's default refuses it ...
    assert cli.main(["inspect", src]) == 0  # ... the CLI reads the files as they are
    header, row = (line.split() for line in capsys.readouterr().out.splitlines()[::2])
    assert dict(zip(header, row, strict=True))["lora_bias"] == "True" and "40" in row
    assert cli.main(["convert", src, str(tmp_path / "ckpt")]) == 0
    assert "carries a LoRA bias" in capsys.readouterr().out
    layer = restore_adapter(tmp_path / "ckpt")["model.layers.0.mlp.down_proj"]
    np.testing.assert_array_equal(layer.bias, tensors[f"{key}.bias"])
