"""Modules follow the notebooks: a kdnb module imports only modules of lower-numbered notebooks, at module level,
and never a private name (`_x`) of another module (STYLE.md, rule 8)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebook_order() -> dict[str, tuple[int, str]]:
    "module name -> (notebook number, notebook file), read from each notebook's `#| default_exp`."
    order = {}
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")):
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text())
        if m: order[m.group(1)] = (int(nb.name[:2]), nb.name)
    return order


def kdnb_imports(path: Path):
    "(line, imported module, names, at module level?) of every import of a kdnb module in `path`."
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = ("kdnb." if node.level else "") + (node.module or "")
            if node.level or mod.startswith("kdnb."):
                yield node.lineno, mod.removeprefix("kdnb."), [a.name for a in node.names], id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kdnb."): yield node.lineno, a.name.removeprefix("kdnb."), [], id(node) in top


def violations(lib: Path, order: dict) -> list[str]:
    out = []
    for path in sorted(lib.glob("*.py")):
        me = path.stem
        if me not in order: continue
        for line, mod, names, at_top in kdnb_imports(path):
            where = f"{path.name}:{line}"
            if mod not in order: out.append(f"{where} imports kdnb.{mod}, which no notebook exports"); continue
            if not at_top: out.append(f"{where}: import of kdnb.{mod} inside a function or class (move it to the top)")
            if order[mod][0] >= order[me][0]:
                out.append(f"{where}: {order[me][1]} imports kdnb.{mod} from the later notebook {order[mod][1]}")
            out += [f"{where}: uses the private name {n!r} of kdnb.{mod}" for n in names if n.startswith("_")]
    return out


def test_modules_import_only_earlier_notebooks():
    order = notebook_order()
    assert {"targets", "models", "weights", "engine", "runs", "cli"} <= set(order)
    bad = violations(ROOT / "kdnb", order)
    assert not bad, "\n".join(bad)


def test_the_check_finds_what_it_looks_for(tmp_path):
    "The checker itself fails on each kind of violation (a test that can fail)."
    order = {"a": (0, "00_a.ipynb"), "b": (1, "01_b.ipynb")}
    (tmp_path / "a.py").write_text("from .b import thing\ndef f():\n    from kdnb.b import _private\n")
    (tmp_path / "b.py").write_text("from .a import ok\n")
    bad = violations(tmp_path, order)
    assert any("later notebook 01_b.ipynb" in v for v in bad)
    assert any("inside a function" in v for v in bad)
    assert any("private name '_private'" in v for v in bad)
    assert not [v for v in bad if v.startswith("b.py")]
