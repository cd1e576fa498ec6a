"""The quadratic-analysis notebooks execute cleanly, in this interpreter, and render their plots."""

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # executes notebooks in a kernel
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["noisy_quadratic", "deterministic_quadratic"])
def test_notebook_executes(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < 1_000_000  # the committed copy, outputs included
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    # Appended last: which interpreter the kernel ran in.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    resources = {"metadata": {"path": str(NOTEBOOKS)}}
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError on the first failing cell

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    # jupyter_client runs the "python" of the kernelspec as sys.executable: this venv.
    assert Path(outputs[-1]["text"].strip()).resolve() == Path(sys.executable).resolve()
