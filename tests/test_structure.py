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


FOREIGN = {"_orig_mod"}  # private attributes of other libraries' objects (torch.compile's wrapper), not kdnb's state


def lazy_private_attributes(path: Path) -> list[str]:
    """State a class creates lazily: `self._x = ...` outside `__init__` (and the methods `__init__` calls on self)
    for an `_x` never set there, and `getattr(obj, "_x", default)`, which reads an attribute that may not exist."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) == 3:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.startswith("_") \
                    and not name.value.startswith("__") and name.value not in FOREIGN:
                out.append(f"{path.name}:{node.lineno}: getattr(..., {name.value!r}, default) reads lazily made state")
    # methods of a class, including fastcore @patch functions (`def f(self: Cls)`)
    methods: dict[str, list] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            methods.setdefault(node.name, []).extend(n for n in node.body if isinstance(n, ast.FunctionDef))
        elif isinstance(node, ast.FunctionDef) and node.args.args and isinstance(node.args.args[0].annotation, ast.Name):
            methods.setdefault(node.args.args[0].annotation.id, []).append(node)
    for cls, fns in methods.items():
        by_name = {f.name: f for f in fns}
        init = [by_name[n] for n in ("__init__",) if n in by_name]
        # what __init__ calls on self (e.g. self.reset_state()) also declares state
        for f in list(init):
            for c in ast.walk(f):
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", "") \
                        == "self" and c.func.attr in by_name and by_name[c.func.attr] not in init:
                    init.append(by_name[c.func.attr])
        declared = {t.attr for f in init for n in ast.walk(f) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    for t in (t.elts if isinstance(t, ast.Tuple) else [t])
                    if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self"}
        for f in fns:
            if f in init: continue
            for n in ast.walk(f):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
                for t in (e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])):
                    if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self" \
                            and t.attr.startswith("_") and t.attr not in declared:
                        out.append(f"{path.name}:{n.lineno}: {cls}.{f.name} creates self.{t.attr}, which __init__ "
                                   "does not declare")
    return out


def test_engine_declares_its_state():
    "The engine's loop state is declared in __init__ (fastai's Learner); nothing is created lazily."
    bad = lazy_private_attributes(ROOT / "kdnb" / "engine.py")
    assert not bad, "\n".join(bad)


def test_the_state_check_finds_lazy_state(tmp_path):
    (tmp_path / "e.py").write_text(
        "class T:\n    def __init__(self):\n        self._a = 0\n        self.reset()\n"
        "    def reset(self):\n        self._b = 1\n"
        "    def step(self):\n        self._a += 1\n        self._b = 2\n        self._c = 3\n"
        "        self._n = getattr(self, '_n', 0) + 1\n")
    bad = lazy_private_attributes(tmp_path / "e.py")
    assert any("creates self._c" in v for v in bad), bad
    assert any("getattr(..., '_n'" in v for v in bad), bad
    assert not any("self._a" in v or "self._b" in v for v in bad), bad


def test_one_path_to_the_optimizer():
    "Only the engine's Trainer builds parameter groups and the optimizer (config -> param_groups -> AdamW)."
    calls = {}
    for path in sorted((ROOT / "kdnb").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                if name in ("param_groups", "AdamW", "Adam", "SGD"): calls.setdefault(name, []).append(path.name)
    assert calls == {"param_groups": ["engine.py"], "AdamW": ["engine.py"]}, calls
