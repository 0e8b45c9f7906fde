"""Runs notebooks/walkthrough.ipynb top to bottom (its cells assert what they show), so it can never rot."""
import os

import nbclient
import pytest
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "walkthrough.ipynb")


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom(tmp_path, monkeypatch):
    # the kernel inherits the environment: one thread (conftest), and its temporary run folder inside tmp_path,
    # which pytest removes, instead of a 14 MB folder left in /tmp per run
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel runs in notebooks/, as a reader's would; its budget is the 2 minutes plus slack for CI
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "iter 2: win-rate" in text and "by hand" in text
