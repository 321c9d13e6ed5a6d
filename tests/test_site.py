"""The static report: render every page of the site (executing the notebooks) and open each in headless Chromium.

Chromium is Debian's package (`apt-get install chromium libjs-mathjax`); `.ci/run` installs it. Outside CI
the test is skipped when Chromium is missing; in CI (CI=true) a missing Chromium is a failure."""
import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--window-size=1280,900", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000"]


REPORT_PAGES = {"index", "hyperparameters", "results", "benchmarks"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not CHROMIUM:
        if os.environ.get("CI"): pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium libjs-mathjax)")
    from kdnb.site import build_site
    out = tmp_path_factory.mktemp("site")
    # the report's own pages run; the library pages render as stored (tests/test_notebooks.py runs each of them,
    # and running them all a second time here doubled CI's time)
    pages = build_site(out, ROOT / "nbs", execute=REPORT_PAGES, keep_notebooks=True, log=lambda *a: None)
    return out, pages


def _dom(page: Path, profile: Path) -> str:
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _expected(nb_path: Path):
    "Tables and figures in the notebook's outputs, counted from the notebook itself."
    tables = figures = 0
    for c in nbformat.read(nb_path, as_version=4).cells:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            tables += len(re.findall(r"<table", "".join(data.get("text/html", ""))))
            figures += "image/png" in data
    return tables, figures


def test_every_page_renders_with_its_tables_and_figures(site, tmp_path):
    from kdnb.site import site_pages
    out, pages = site
    names = [Path(p).stem for _, p in site_pages(ROOT / "nbs")]
    assert [p.stem for p in pages] == names
    for page in pages:
        dom = _dom(page, tmp_path / "profile")
        assert "<main>" in dom and "<h1" in dom, page.name
        assert all(f'href="{n}.html"' in dom for n in names), f"{page.name}: sidebar incomplete"
        tables, figures = _expected(out / "_nb" / f"{page.stem}.ipynb")
        assert dom.count("<table") >= tables, f"{page.name}: {dom.count('<table')} tables shown, {tables} in the notebook"
        imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', dom)
        assert len(imgs) >= figures, f"{page.name}: {len(imgs)} figures shown, {figures} in the notebook"
        from PIL import Image
        for b in imgs: Image.open(io.BytesIO(base64.b64decode(b))).verify()  # every figure is a real PNG
        assert not re.search(r'<script[^>]+src="https?://', dom), f"{page.name} loads a script from the network"
        nb = nbformat.read(out / "_nb" / f"{page.stem}.ipynb", as_version=4)
        has_math = any(c.cell_type == "markdown" and re.search(r"\$[^$\s][^$]*\$", c.source) for c in nb.cells)
        if (out / "mathjax").exists() and has_math:
            assert "mjx-chtml" in dom, f"{page.name}: math was not typeset"


def test_what_a_reader_notices(site, tmp_path):
    "Titles in the sidebar, no drawing code on report pages, no page wider than the window, no machine's paths."
    from kdnb.site import site_pages, page_title
    out, pages = site
    titles = {Path(p).stem: page_title(ROOT / "nbs" / p) for _, p in site_pages(ROOT / "nbs")}
    assert titles["00_targets"] == "Targets" and titles["run_glue"] == "Run: GLUE finetuning"
    for page in pages:
        dom = _dom(page, tmp_path / "profile")
        nav = dom[dom.index("<nav>"):dom.index("</nav>")]
        for name, title in titles.items():
            assert re.search(rf'href="{re.escape(name)}.html"[^>]*>{re.escape(title)}</a>', nav), f"{page.name}: {title}"
        assert 'data-wide="false"' in dom, f"{page.name} is wider than the window"
        for machine_path in (str(ROOT), str(ROOT.parent) + "/shared"):
            assert machine_path not in dom, f"{page.name} shows the machine's path {machine_path}"
    # code that only draws (`#| echo: false`) shows its figure, not itself
    for page, token in (("index", "FancyBboxPatch"), ("index", "subplots"), ("benchmarks", "subplots"),
                        ("results", "set_ylabel")):
        assert token not in (out / f"{page}.html").read_text(), f"{page}: drawing code ({token}) is shown"


def test_report_pages_have_content(site):
    "The pages the report is about show what they must: the seeds' tables, the results with plots."
    out, _ = site
    counts = {n: _expected(out / "_nb" / f"{n}.ipynb") for n in ("hyperparameters", "results", "index")}
    assert counts["hyperparameters"][0] >= 6
    assert counts["results"][0] >= 4 and counts["results"][1] >= 2
    assert counts["index"][1] >= 1
