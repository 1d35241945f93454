"""Both Colab notebooks run top to bottom against the tiny configuration (their TINY parameter),
the way papermill would run them: a cell setting the parameter goes right after the cell tagged
`parameters`."""

from __future__ import annotations

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat", reason="nbformat is a test requirement (requirements-test.txt)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a test requirement (requirements-test.txt)")
pytest.importorskip("ipykernel", reason="ipykernel is a test requirement (requirements-test.txt)")


def _with_parameters(nb, **values):
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    code = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(code)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


@pytest.mark.parametrize("name", ["quickstart", "policies"])
def test_notebook_runs_top_to_bottom(name):
    nb = _with_parameters(nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4), TINY=True)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name == "quickstart":
        assert "saving" in text and "settings; full model accuracy" in text
        assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    else:
        assert text.count("exits equal offline: True") == 3, text
        assert "calibration half" in text and "report half" in text
