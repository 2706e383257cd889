"""The notebooks under notebooks/: committed without outputs, public API only, and each one runs
top to bottom in a fresh Jupyter kernel without an error and draws its plots.

The kernel is this interpreter (the virtual environment running pytest), started through a
kernel spec written to a temp dir, so a user-level ``python3`` kernel spec pointing elsewhere is
never picked up. Its working directory is ``notebooks/``, as when a user opens a notebook there;
the notebooks find the repository root by walking up to ``pyproject.toml``. Matplotlib draws
with the inline backend, which is headless and renders every figure to PNG, so an error raised
only when a figure is drawn fails the test too.
"""

import ast
import json
import pathlib
import sys
import time

import nbclient
import nbformat
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_serving.ipynb", "03_kernels.ipynb"]
# Each notebook takes 15 to 35 s on a busy 2-core CPU; the limits only catch a hang.
CELL_TIMEOUT_S = 180
NOTEBOOK_TIMEOUT_S = 300
KERNEL_NAME = "jlora-tests-python"


def _read(path: pathlib.Path):
    return nbformat.read(path, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    """Notebooks are committed stripped: outputs are made by running them, never stored."""
    nb = _read(path)
    nbformat.validate(nb)
    for k, cell in enumerate(_code_cells(nb)):
        assert cell.outputs == [], f"{path.name}: code cell {k} has outputs; clear them"
        assert cell.execution_count is None, f"{path.name}: code cell {k} has an execution count"
    assert "widgets" not in nb.metadata, f"{path.name}: stored widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_says_how_long_it_takes(path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown" and "under a minute" in first.source, path.name


def _private_uses(source: str) -> list[str]:
    """Imports of private modules or names, and attribute reads of private names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                found.append(f"line {node.lineno}: {name}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_public_api_only(path):
    """The notebooks show users what works: no private module, name or attribute."""
    for k, cell in enumerate(_code_cells(_read(path))):
        uses = _private_uses(cell.source)
        assert not uses, f"{path.name}: code cell {k} uses private names: {uses}"


def test_private_use_check_catches_them():
    assert _private_uses("from jlora._x import y")
    assert _private_uses("from jlora.ops import add_lora, _xla_plan")
    assert _private_uses("import jlora._impl as impl")
    assert _private_uses("plan = ops._xla_plan(64, cfg)")
    assert not _private_uses("from jlora.ops import add_lora\nx = model.__class__\nimport jlora")


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernel spec for this interpreter, first on JUPYTER_PATH."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jlora tests",
        "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, kernel_name):
    nb = _read(path)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < NOTEBOOK_TIMEOUT_S, f"{path.name} took {elapsed:.0f} s"
    images = [
        o
        for c in _code_cells(nb)
        for o in c.outputs
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
    ]
    assert images, f"{path.name} drew no figure"
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
