"""notebooks/explore_divergences.ipynb runs top to bottom (tiny setting: a few steps, tiny MLP)."""
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "explore_divergences.ipynb")


def test_explore_divergences_notebook_executes(monkeypatch):
  monkeypatch.setenv("FDISTILL_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # One device is enough in the kernel; XLA's backend optimisations off halves the compile
  # time of the two distillation steps, which is most of this test.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "| reverse_kl |" in outputs and "| forward_kl |" in outputs
