"""notebooks/quickstart.ipynb executes cleanly in this interpreter and prints sensible numbers."""

import copy
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # executes a notebook in a kernel
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def stdout_of(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("name") == "stdout"
    )


def test_committed_notebook_keeps_its_outputs_and_is_small():
    assert NOTEBOOK.stat().st_size < 1_000_000
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert not any(output["output_type"] == "error" for output in outputs)


def test_notebook_runs_and_prints_sensible_numbers():
    notebook = copy.deepcopy(nbformat.read(NOTEBOOK, as_version=4))
    # Prove the kernel is this interpreter (the venv), not some other python3 on PATH.
    probe = nbformat.v4.new_code_cell("import sys; print('interpreter:', sys.executable)")
    notebook.cells.insert(0, probe)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = stdout_of(notebook)

    assert f"interpreter: {sys.executable}\n" in text
    line = re.compile(r"^(\w+)\s+held-out loss (\S+)\s+accuracy (\S+)$", re.M)
    accuracy = {name: (float(loss), float(acc)) for name, loss, acc in line.findall(text)}
    assert set(accuracy) == {"adam", "lookahead_fast", "lookahead_slow"}
    for loss, acc in accuracy.values():
        assert acc > 0.9 and loss < 0.5  # chance is 0.1 accuracy, loss ln(10) = 2.3
    # The run ends mid-cycle, so the fast and slow weights are different models.
    assert "cycle position (count): 2 of k=5" in text
    assert accuracy["lookahead_fast"][0] != accuracy["lookahead_slow"][0]
    assert "slow model holds slow_params: True" in text
    assert "saved at cycle position 3" in text
    assert "resumed fast weights identical: True" in text
    assert "resumed slow weights identical: True" in text
