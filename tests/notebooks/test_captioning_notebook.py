"""The captioning notebook runs top to bottom (on a small demo checkpoint made here)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from multimodal.demo import QUICK, run_demo

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "captioning.ipynb"


def test_captioning_notebook_executes(tmp_path, monkeypatch):
    run_demo(tmp_path / "demo", config=QUICK)
    monkeypatch.setenv("SALAMANDRA_VL_CHECKPOINT", str(tmp_path / "demo" / "checkpoint"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    assert any("ca:" in o.get("text", "") for o in outputs if o.output_type == "stream")
    # The any-resolution cell: a large photograph as base view + tiles, and its token count.
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1800x1200: a 4x5 grid of tiles + the base view = 21 views, 7329 image tokens" in text and "image tokens" in text
