"""Modules follow the notebooks: a kdnb module imports only modules of lower-numbered notebooks, at module level,
and never a private name (`_x`) of another module (STYLE.md, rule 8)."""
import ast
import json
import statistics
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebook_order() -> dict[str, tuple[str, str]]:
    """module name -> (notebook number, notebook file), read from each notebook's `#| default_exp`; a number may
    carry a letter (04b comes after 04 and before 05)."""
    order = {}
    for nb in sorted((ROOT / "nbs").glob("[0-9][0-9]*_*.ipynb")):
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text())
        if m: order[m.group(1)] = (nb.name.split("_")[0], nb.name)
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
    order = {"a": ("00", "00_a.ipynb"), "b": ("00b", "00b_b.ipynb")}
    (tmp_path / "a.py").write_text("from .b import thing\ndef f():\n    from kdnb.b import _private\n")
    (tmp_path / "b.py").write_text("from .a import ok\n")
    bad = violations(tmp_path, order)
    assert any("later notebook 00b_b.ipynb" in v for v in bad)
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
    """Only the engine's Trainer builds the optimizer, from the task's `param_groups(cfg)` (config -> param_groups ->
    AdamW); layer_decay's `param_groups` is called only there, in a task's `param_groups` method (the engine's
    default, a family of students' own lr per student) or in the Trainer."""
    calls = {}
    for path in sorted((ROOT / "kdnb").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", None))
                if name in ("param_groups", "AdamW", "Adam", "SGD"): calls.setdefault(name, []).append(path.name)
    assert calls.get("AdamW") == ["engine.py"] and not {"Adam", "SGD"} & set(calls), calls
    outside = [f"{path.name}:{fn.name}" for path in sorted((ROOT / "kdnb").glob("*.py"))
               for fn in ast.walk(ast.parse(path.read_text())) if isinstance(fn, ast.FunctionDef)
               and fn.name not in ("param_groups", "__init__")
               and any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "param_groups"
                       for n in ast.walk(fn))]
    assert not outside, f"parameter groups built outside a task's param_groups or the Trainer: {outside}"


# --- issue 36: one model parser, a loop that names no model, cells in nbdev's rhythm

PREFIXES = ("timm:", "run:", "local-dir:")  # the model families written "<family>:<name>"
PARSER = ("config.py", "model_spec")  # the one place that takes a model name apart


def _has_prefix(node) -> bool:
    consts = node.elts if isinstance(node, ast.Tuple) else [node]
    return any(isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith(PREFIXES) for c in consts)


def hand_parsed_model_names(path: Path) -> list[str]:
    """Model names taken apart outside the one parser: a `timm:`/`run:` prefix tested, cut or compared, or a name
    sliced by hand (`name[5:]`) in a function that speaks of those prefixes."""
    tree, out = ast.parse(path.read_text()), []
    parents = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    def function_of(node):
        while id(node) in parents:
            node = parents[id(node)]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)): return node
        return tree
    for node in ast.walk(tree):
        fn = function_of(node)
        if (path.name, getattr(fn, "name", None)) == PARSER: continue
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "removeprefix", "partition", "split", "find", "index") and any(map(_has_prefix, node.args)):
            out.append(f"{where}: .{node.func.attr}() on a model prefix (parse it with config.model_spec)")
        elif isinstance(node, ast.Compare) and any(map(_has_prefix, [node.left, *node.comparators])):
            out.append(f"{where}: a model name compared with a prefix (parse it with config.model_spec)")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice) and node.slice.upper is None \
                and isinstance(node.slice.lower, ast.Constant) and node.slice.lower.value in (4, 5):
            words = {c.value for c in ast.walk(fn) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if any(w.startswith(PREFIXES) or w in ("timm", "run") for w in words):
                out.append(f"{where}: a name sliced by hand beside a model prefix (parse it with config.model_spec)")
    return out


def test_model_names_are_parsed_in_one_place():
    bad = [v for p in sorted((ROOT / "kdnb").glob("*.py")) if p.name != "_modidx.py" for v in hand_parsed_model_names(p)]
    assert not bad, "\n".join(bad)


def test_the_parser_check_finds_what_it_looks_for(tmp_path):
    (tmp_path / "x.py").write_text(
        "def a(name):\n    if name.startswith('timm:'): return name[5:]\n"
        "def b(name): return name.startswith(('timm:', 'run:'))\n"
        "def c(name): return name[:4] == 'run:'\n"
        "def d(head): return head[5:]\n")  # a slice with no model prefix in sight is not a model name
    bad = hand_parsed_model_names(tmp_path / "x.py")
    assert sorted(v.split(":")[1] for v in bad) == ["2", "2", "3", "4"], bad


def model_class_imports(path: Path, models: Path) -> list[str]:
    "Classes of kdnb.models (and anything of timm.models) that `path` imports."
    classes = {n.name for n in ast.parse(models.read_text()).body if isinstance(n, ast.ClassDef)}
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            if mod in (".models", "kdnb.models"):
                out += [f"{path.name}:{node.lineno} imports the model class {a.name}" for a in node.names
                        if a.name in classes]
            elif mod.startswith("timm.models"):
                out.append(f"{path.name}:{node.lineno} imports from {mod}")
    return out


def test_the_engine_names_no_model():
    "The loop knows no model class: compiling blocks is the models' business (kdnb.models.compile_blocks)."
    bad = model_class_imports(ROOT / "kdnb" / "engine.py", ROOT / "kdnb" / "models.py")
    assert not bad, "\n".join(bad)


def test_the_model_import_check_finds_what_it_looks_for(tmp_path):
    (tmp_path / "models.py").write_text("class Block: pass\ndef compile_blocks(m): pass\n")
    (tmp_path / "engine.py").write_text("from .models import Block, compile_blocks\n"
                                        "from timm.models.beit import Block as B\n")
    bad = model_class_imports(tmp_path / "engine.py", tmp_path / "models.py")
    assert len(bad) == 2 and "Block" in bad[0] and "timm.models.beit" in bad[1], bad


MAX_CELL = 40  # lines of an exported cell, its `#| export` line included (nbdev's own API notebooks: median 14, p90 31)


def long_exported_cells(nbs: Path) -> list[str]:
    import json
    out = []
    for nb in sorted(nbs.glob("*.ipynb")):
        for i, c in enumerate(json.loads(nb.read_text())["cells"]):
            src = "".join(c["source"])
            if c["cell_type"] == "code" and src.lstrip().startswith("#| export"):
                n = len(src.strip().splitlines())  # as the cell reads, its directive included
                if n > MAX_CELL: out.append(f"{nb.name} cell {i}: {n} exported lines (split it at a function boundary)")
    return out


def test_exported_cells_are_short():
    bad = long_exported_cells(ROOT / "nbs")
    assert not bad, "\n".join(bad)


def test_the_cell_check_finds_what_it_looks_for(tmp_path):
    import json
    cell = lambda s: {"cell_type": "code", "source": s, "metadata": {}, "outputs": [], "execution_count": None}
    nb = {"cells": [cell("#| export\n" + "x = 1\n" * 40), cell("#| export\n" + "x = 1\n" * 39), cell("y = 2\n" * 99)],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    assert long_exported_cells(tmp_path) == ["a.ipynb cell 0: 41 exported lines (split it at a function boundary)"]


def test_no_test_only_path_in_the_library():
    """Where the notebooks' tests find data (../../shared, seen from nbs/) is the run notebooks' and tests' business,
    not kdnb's (a preset may name the repository's own data folder, ../shared/data/cifar10, as results/ records it)."""
    hits = [f"{p.name}:{i}" for p in sorted((ROOT / "kdnb").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if "../../shared" in line]
    assert not hits, hits


CHECK = re.compile(r"\btest_\w+\(|\bassert\b")  # a fastcore test_* call or an assert


def _imports_only(src: str) -> bool:
    "An exported cell of imports (and the module's logger): nothing there to check."
    body = ast.parse(src).body
    return all(isinstance(b, (ast.Import, ast.ImportFrom)) or ast.unparse(b).startswith("log = logging.getLogger")
               for b in body)


def page_rhythm(nbs) -> tuple[int, float, float]:
    """(exported cells, their median length in lines, the share followed by a check): nbdev's rhythm, by one rule.
    A cell is checked when a code cell with an assert or a test_* call (its imports aside) follows within the next two
    cells, before the next exported cell; cells of imports only are not counted."""
    lens, checked = [], 0
    for nb in sorted(Path(nbs).glob("[0-9]*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        for i, c in enumerate(cells):
            src = "".join(c["source"])
            if c["cell_type"] != "code" or not src.lstrip().startswith("#| export") or _imports_only(src): continue
            lens.append(len(src.strip().splitlines()))
            for nxt in cells[i + 1:i + 3]:
                s = "".join(nxt["source"])
                if nxt["cell_type"] == "code" and s.lstrip().startswith("#| export"): break
                code = "\n".join(l for l in s.splitlines() if not l.lstrip().startswith(("import ", "from ")))
                if nxt["cell_type"] == "code" and CHECK.search(code):
                    checked += 1
                    break
    return len(lens), statistics.median(lens), checked / len(lens)


def test_pages_keep_nbdevs_rhythm():
    "Short exported cells, each followed by its check, as nbdev's own notebooks are written."
    n, median, share = page_rhythm(ROOT / "nbs")
    assert median <= 15 and share >= 0.8, (f"{n} exported cells: median {median} lines (wanted <= 15), {share:.0%} "
                                           "followed by a check (wanted >= 80%)")


def test_the_rhythm_check_finds_what_it_looks_for(tmp_path):
    cell = lambda s: {"cell_type": "code", "source": s, "metadata": {}, "outputs": [], "execution_count": None}
    md = {"cell_type": "markdown", "source": "prose", "metadata": {}}
    cells = [cell("#| export\nimport os\nlog = logging.getLogger(__name__)"),  # imports: not counted
             cell("#| export\n" + "x = 1\n" * 19), cell("from a import b\n"),  # an import is no check
             cell("#| export\ndef f(): pass"), md, cell("assert f() is None"),
             cell("#| export\ndef g(): pass"), cell("#| export\ndef h(): pass"), cell("test_eq(g(), h())")]
    (tmp_path / "01_a.ipynb").write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert page_rhythm(tmp_path) == (4, 2.0, 0.5)  # 20, 2, 2, 2 lines; f and h are checked, the 20 lines and g are not
