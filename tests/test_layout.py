"""The shape of the house: tiers as folders, imports only downward, small modules.

Each folder of fxrebirth (and ``passes/``, installed as ``fxrebirth.passes``) states in its
``__init__`` docstring what it owns and, on a line ``May import: ...``, the packages below it; these
tests read that line, so the docstring is the rule and the test is its enforcement. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxrebirth"
FOUNDATION = {"fxrebirth.errors", "fxrebirth.equivalence"}  # import nothing of fxrebirth
TOP = {"fxrebirth", "fxrebirth.__main__", "fxrebirth.cli", "fxrebirth.cli_args"}  # may import anything
MAX_TOP_MODULES, MAX_LINES, MAX_FUNCTION = 12, 400, 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "passes").glob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "passes":
            parts = ["fxrebirth", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _folder(module: str) -> str:
    """The tier a module belongs to: ``fxrebirth.graph`` for ``fxrebirth.graph.capture``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(module: str, path: Path) -> set[str]:
    """Every fxrebirth module ``module`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES)
    return {n for n in found if n == "fxrebirth" or n.startswith("fxrebirth.")} - {module}


def _allowed(folder: str) -> list[str]:
    doc = ast.get_docstring(ast.parse(MODULES[folder].read_text())) or ""
    match = re.search(r"^May import: (.*?)\.?$", doc, flags=re.MULTILINE)
    assert match, f"{MODULES[folder]}: its docstring must say 'May import: ...' (the packages below it)"
    return [name.strip() for name in match.group(1).split(",") if name.strip()]


def test_every_folder_states_what_it_may_import():
    folders = {_folder(m) for m in MODULES if m.count(".") >= 2}
    assert folders >= {"fxrebirth.graph", "fxrebirth.rewrite", "fxrebirth.passes", "fxrebirth.retraining",
                       "fxrebirth.frontends", "fxrebirth.measure", "fxrebirth.paper", "fxrebirth.testing"}
    for folder in folders:
        for name in _allowed(folder):
            assert name in MODULES, f"{folder} may import {name!r}, which is not a module of fxrebirth"


def _may_import(module: str) -> list[str]:
    if module in FOUNDATION:
        return []
    if module.count(".") == 1 and MODULES[module].name != "__init__.py":
        raise AssertionError(f"{module} sits directly in fxrebirth/ but is neither foundation nor entry: "
                             "put it in a tier's folder (or add it to FOUNDATION/TOP with a reason)")
    folder = _folder(module)
    return [folder, *_allowed(folder)]


def test_imports_point_only_downward():
    wrong = []
    for module, path in MODULES.items():
        if module in TOP:
            continue
        allowed = _may_import(module)
        for name in sorted(_imports(module, path)):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                wrong.append(f"{module} imports {name} (it may import: {', '.join(allowed) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


KNOWN_CYCLES_FOR_NOW: set = set()
"""Import cycles still to break, each as its modules in sorted order (the lead empties this set)."""


def _module_of(name: str) -> str:
    """The module an imported name lives in: ``fxrebirth.graph.capture`` for ``fxrebirth.graph.capture.capture``."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _import_graph() -> "networkx.DiGraph":
    import networkx

    graph = networkx.DiGraph()
    for module, path in MODULES.items():
        graph.add_node(module)
        graph.add_edges_from((module, _module_of(name)) for name in _imports(module, path) if _module_of(name) != module)
    return graph


def test_no_import_cycles():
    """No module imports, at any depth of its code, a module that imports it back (directly or through others):
    a cycle means two modules are one concept split in two, or a helper sits in the wrong one."""
    import networkx

    cycles = {tuple(sorted(cycle)) for cycle in networkx.simple_cycles(_import_graph())}
    assert not cycles - KNOWN_CYCLES_FOR_NOW, "\n".join(" -> ".join(c) for c in sorted(cycles - KNOWN_CYCLES_FOR_NOW))


MAX_PRIVATE_IMPORTS = 10
"""Cross-module imports of underscore names allowed (``from fxrebirth.x import _name``): a name another module
needs is that module's interface, so it goes without the underscore."""


def _private_imports(module: str, path: Path) -> list[str]:
    """``module``'s imports of another module's underscore names (``_name``; dunders aside), at any depth."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""]
                            ).strip(".") if node.level else node.module or ""
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {base}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")
                      and (base == "fxrebirth" or base.startswith("fxrebirth."))]
    return found


def test_few_imports_of_private_names_across_modules():
    found = [line for module, path in MODULES.items() for line in _private_imports(module, path)]
    assert len(found) <= MAX_PRIVATE_IMPORTS, (
        f"{len(found)} imports of underscore names across modules (at most {MAX_PRIVATE_IMPORTS}): make a shared "
        "name public where it is defined\n" + "\n".join(found))


def test_the_direction_test_catches_an_upward_import(tmp_path):
    """The rule is live: a graph module importing the retraining tier is reported."""
    fake = tmp_path / "capture.py"
    fake.write_text("def f():\n    from fxrebirth.retraining.planning import plan\n")
    names = _imports("fxrebirth.graph.capture", fake)
    assert "fxrebirth.retraining.planning" in names
    assert not any(n.startswith(a) for a in ["fxrebirth.graph", *_allowed("fxrebirth.graph")] for n in names)


def test_few_modules_at_the_top_and_none_shadows_a_public_function():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, sorted(top)
    import fxrebirth

    for name in ("optimize", "plan", "rebirth", "capture"):
        assert callable(getattr(fxrebirth, name)) and not isinstance(getattr(fxrebirth, name), type(sys))
        assert not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).is_dir(), name


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_modules_and_functions_are_small():
    big, long = [], []
    for module, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for fn in _functions(ast.parse(text)):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION:
                long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {length} lines")
    assert not big and not long, "\n".join(big + long)


def test_importing_fxrebirth_and_compiling_warn_about_nothing():
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import torch, fxrebirth\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()\n"
        "x = torch.randn(2, 3, 8, 8)\n"
        "torch.compile(m, backend='fxrebirth', options={'compiler': 'eager'})(x)\n"
        "fxrebirth.optimize(m, (x,))\n"
        "import fxrebirth.cli, fxrebirth.testing, fxrebirth.passes\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


TESTED_WITH = {
    "streamline": "test_marking.py", "inception": "test_marking.py",  # the two marking passes, tested together
    "linearise": "test_depth.py",  # depth compression's student form and merge, with the segments it builds on
}
"""Families of ``passes/`` whose tests are not (yet) in ``tests/test_<family>.py``, and where they are."""


def test_every_family_has_its_tests_under_its_own_name():
    """A family's proofs are found by its name: ``tests/test_<family>.py`` (or ``tests/passes/test_<family>.py``),
    or the file :data:`TESTED_WITH` names; either way the file imports the family."""
    missing = []
    for path in sorted((ROOT / "passes").glob("*.py")):
        family = path.stem
        if family.startswith("_"):
            continue
        found = [p for p in (ROOT / "tests" / f"test_{family}.py", ROOT / "tests" / "passes" / f"test_{family}.py",
                             ROOT / "tests" / TESTED_WITH.get(family, f"test_{family}.py")) if p.exists()]
        imported = re.compile(rf"fxrebirth\.passes\.{family}\b|from fxrebirth\.passes import [^\n]*\b{family}\b")
        if not any(imported.search(p.read_text()) for p in found):
            missing.append(f"passes/{path.name}: no tests/test_{family}.py that imports it")
    assert not missing, "\n".join(missing)
