"""The console script: demo prints the adapter table; inspect validates or explains."""

from conftest import ADAPTER_NAMES, ADAPTERS_DIR

from jlora import cli


def test_demo_prints_every_adapter(capsys):
    assert cli.main(["demo", "--adapters", str(ADAPTERS_DIR)]) == 0
    out = capsys.readouterr().out
    for name in ADAPTER_NAMES:
        assert name in out
    for column in ("rank", "alpha", "scaling", "targets", "params", "bytes"):
        assert column in out


def test_inspect_ok_and_error(capsys, tmp_path):
    assert cli.main(["inspect", str(ADAPTERS_DIR / "mlp_r4_rslora")]) == 0
    out = capsys.readouterr().out
    assert "mlp_r4_rslora" in out and "True" in out
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
