"""The example notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel) on the bundled data.

Each must produce its figures (image/png outputs: ``dynascope.figure`` returns a Figure that shows itself)
and its run tables (text/html), with no error and nothing on stderr but the sentinel's event lines. Skipped
only when nbclient is missing and CI is not set (``pip install -e .[test]`` installs it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# notebook -> (figures it draws, HTML outputs: run tables, figure catalog, inline report)
EXPECTED = {
    "signal_propagation.ipynb": (3, 3),
    "edge_of_stability.ipynb": (1, 2),
    "analyze_checkpoints.ipynb": (3, 1),
}


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed but CI is set: pip install -e .[test]")
        pytest.skip(f"{module} not installed (pip install -e .[test])")


def test_every_notebook_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_draws(name, tmp_path, monkeypatch):
    nbformat = _need("nbformat")
    nbclient = _need("nbclient")
    _need("ipykernel")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    t0 = time.monotonic()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.monotonic() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    # the sentinel announces each event on stderr as it happens (one line "dynascope: step N: ..."); nothing else
    other = [line for text in stderr for line in text.splitlines() if line and not line.startswith("dynascope: step ")]
    assert not other, stderr
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    htmls = [o for o in outputs if "text/html" in o.get("data", {})]
    n_png, n_html = EXPECTED[name]
    assert len(pngs) == n_png, [o.get("data", {}).get("text/plain") for o in outputs]
    assert len(htmls) == n_html
    for o in pngs:
        assert len(o["data"]["image/png"]) > 10_000  # base64 of a real figure, not an empty canvas
    print(f"{name}: {elapsed:.1f}s")
