"""Project-level checks: the README's commands, CI, nbdev settings that must not regress."""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all('pip install -e ".[dev]"' in c for c in cmds)
    assert "papermill nbs/run_pipeline.ipynb" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = _readme_commands()[1]
    assert test_cmd in ci, "'.ci/run' must run exactly the README's test command"
    assert "git diff --exit-code" in ci and "nbdev_export" in ci


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    "nbdev_clean strips cell metadata; settings.ini must allow papermill's `parameters` tag."
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("epochs = 1", metadata={"tags": ["parameters"], "foo": 1})])
    (tmp_path / "nbs").mkdir()
    path = tmp_path / "nbs" / "x.ipynb"
    nbformat.write(nb, path)
    (tmp_path / "settings.ini").write_text((ROOT / "settings.ini").read_text())
    subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(path)], cwd=tmp_path, check=True)
    cell = json.loads(path.read_text())["cells"][0]
    assert cell["metadata"] == {"tags": ["parameters"]}


def test_run_notebooks_keep_their_parameters_cell():
    import nbformat
    for path in sorted((ROOT / "nbs").glob("run_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"


def test_notebooks_are_clean():
    "No outputs or execution counts in the source notebooks (nbdev_clean, small diffs)."
    import nbformat
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, f"{path.name} has outputs: run nbdev_clean"


ABSOLUTE = re.compile(r"""(?:^|[\s"'=:,\[(])(/(?:[\w.-]+/)+[\w.-]*)""", re.M)


def test_results_hold_no_absolute_paths():
    "What is published says where things are relative to the repository, never on the machine that ran it."
    found = []
    for p in sorted((ROOT / "results").rglob("*")):
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".jsonl", ".csv", ".md", ".txt"):
            found += [f"{p.relative_to(ROOT)}: {m}" for m in ABSOLUTE.findall(p.read_text())]
    assert not found, "\n".join(found[:20])


def test_the_absolute_path_check_can_fail(tmp_path):
    assert ABSOLUTE.findall("data_root: /work/shared/data/cifar10\nurl: https://x.org/a/b") == ["/work/shared/data/cifar10"]


def test_readme_quotes_the_saved_gpu_benchmark():
    "The README's H100 numbers are typed by hand: every step and loader rate it quotes must be the saved measurement."
    res = json.loads((ROOT / "results" / "bench" / "bench_cuda.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert res["gpu"] in readme
    for r in res["step"]:
        if r["kind"] in ("timm_bf16", "ours_bf16", "ours_compile", "finetune_bf16", "finetune_compile"):
            assert f"{round(r['images_per_s']):,} img/s" in readme, (r["kind"], r["batch"], r["images_per_s"])
    for r in res["loader"]:
        if r["workers"] == 16:
            assert f"{round(r['loader_images_per_s']):,} img/s" in readme, r


def test_every_saved_run_config_loads():
    """Renamed or moved config fields must not orphan saved runs: every results/**/config.yaml loads (old names
    translated; the objectives' fields, once all in DistillConfig, dropped where they hold their defaults)."""
    import kdnb.runs  # noqa: F401  (defines every objective's config class, as the CLI and the report do)
    from kdnb.config import load_config
    paths = sorted((ROOT / "results").rglob("config.yaml"))
    assert len(paths) >= 10, paths
    for p in paths:
        cfg = load_config(p)
        assert cfg.to_dict()["out_dir"], p


def test_run_notebooks_parameters_are_what_papermill_reads(caplog):
    """Each run notebook's parameters cell is what `papermill --help-notebook` reads whole: every line a parameter
    with a type papermill can show and a help text, and no line it cannot parse (one '=' per line)."""
    import logging
    import nbformat
    from papermill.translators import PythonTranslator
    for nb in sorted((ROOT / "nbs").glob("run_*.ipynb")):
        cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        lines = [l for l in cell.source.splitlines() if l.strip() and not l.strip().startswith("#")]
        with caplog.at_level(logging.WARNING, logger="papermill"):
            params = PythonTranslator.inspect(cell)
        assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()], (nb.name, caplog.text)
        assert len(params) == len(lines), (nb.name, [p.name for p in params])
        for p in params:
            assert p.inferred_type_name in ("str", "int", "float", "bool"), (nb.name, p)
            assert p.help, (nb.name, p.name)


def test_report_help_describes_each_option(capsys):
    import pytest
    from kdnb.site import report_main
    with pytest.raises(SystemExit):
        report_main(["--help"])
    out = capsys.readouterr().out
    for opt, words in {"--out": "folder the HTML", "--nbs": "sidebar.yml", "--no-execute": "as stored",
                       "--only": "only these pages"}.items():
        assert opt in out and words in " ".join(out.split()), (opt, out)
