"""Run every notebook's own tests: one pytest test per notebook, through nbdev's runner.

nbdev's `test_nb` runs each code cell in a fresh kernel-like shell with the notebook's folder as the
working directory, skipping `#| eval: false` cells and cells flagged with a `tst_flags` flag (`slow`)
unless pytest runs with `--slow`.
"""
import tempfile
from configparser import ConfigParser
from pathlib import Path

import pytest
from nbdev.test import test_nb as run_notebook  # renamed so that pytest does not collect it

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


def _tst_flags():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"].get("tst_flags", "").split()


@pytest.fixture
def registries():
    "nbdev runs every notebook in this process: what a notebook registers (its own copies of kdnb's run kinds,\n"
    "objectives and presets, or toys) is undone after it, so that no notebook sees another's."
    import kdnb.config as c
    import kdnb.runs, kdnb.pipeline  # noqa: F401  kdnb's own registrations first: a module imported during a notebook
    # stays registered
    saved = [(t, dict(t)) for t in (c.RUN_KINDS, c.OBJECTIVES, c.PRESETS)]
    yield
    for t, before in saved:
        t.clear()
        t.update(before)


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook(nb, request, tmp_path, monkeypatch, registries):
    # the notebooks' tempfile.mkdtemp() run folders land in tmp_path, which conftest deletes once the notebook passes,
    # instead of piling up in /tmp (tens of GB over a day of test runs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    flags = _tst_flags()
    slow = request.config.getoption("--slow")
    ok, secs = run_notebook(nb, skip_flags=[] if slow else flags, force_flags=flags if slow else [], showerr=True)
    assert ok, f"{nb.name} failed (see the traceback above, {secs:.1f}s)"


def test_every_notebook_is_collected():
    assert {"00_targets", "01_models", "03_layer_decay"} <= {p.stem for p in NBS}
