"""The package's layout: imports run one way (no cycle between patchmap's modules, no private name taken
from another module), no class grows past 200 lines, and the Python tables of allowed values agree with
config/schema.yaml."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from patchmap import interventions, patching, sites
from patchmap.schema import allowed

PACKAGE = Path(__file__).resolve().parent.parent / "patchmap"


def module_name(path, root=PACKAGE):
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module, is_package, node):
    """The absolute module a `from ... import` refers to."""
    if node.level == 0:
        return node.module
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root=PACKAGE):
    """{module: {(imported module, names taken from it, line)}} for every patchmap module, at any depth
    of the file (imports inside functions count too); `from .x import y` where y is a module counts as
    an import of that module."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    out = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                target = resolve(module, path.name == "__init__.py", node)
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in files:
                        found.add((submodule, "", node.lineno))
                    else:
                        found.add((target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                found.update((alias.name, "", node.lineno) for alias in node.names)
        out[module] = {f for f in found if f[0] in files}
    return out


def cycles(graph):
    """Every import cycle (as a list of modules) in {module: {imported modules}}."""
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                found.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def private_imports(found):
    """(module, imported module, name, line) for each private name imported from another module."""
    return [(module, source, name, line) for module, entries in found.items() for source, name, line in entries
            if name.startswith("_") and not name.startswith("__") and source != module]


MAX_CLASS_LINES = 200


def long_classes(root=PACKAGE, limit=MAX_CLASS_LINES):
    """(module, class, lines) of every class in the package longer than `limit` lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit:
                out.append((module_name(path, root), node.name, node.end_lineno - node.lineno + 1))
    return out


def test_no_class_is_longer_than_200_lines():
    assert long_classes() == []


def test_the_class_check_finds_a_planted_long_class(tmp_path):
    package = tmp_path / "patchmap"
    package.mkdir()
    methods = "".join(f"    def m{i}(self):\n        return {i}\n\n" for i in range(70))
    (package / "long.py").write_text(f"class Long:\n{methods}\n\nclass Short:\n    pass\n")
    assert long_classes(package) == [("patchmap.long", "Long", 210)]


def test_no_import_cycle_between_patchmap_modules():
    found = imports()
    graph = {module: {source for source, _, _ in entries if source != module} for module, entries in found.items()}
    assert cycles(graph) == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports(imports()) == []


def test_the_checks_find_a_planted_cycle_and_a_private_import(tmp_path):
    package = tmp_path / "patchmap"
    (package / "engines").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engines" / "__init__.py").write_text("")
    (package / "a.py").write_text("from .engines import b\n")
    (package / "engines" / "b.py").write_text("def f():\n    from ..a import _hidden\n")
    found = imports(package)
    graph = {module: {source for source, _, _ in entries} for module, entries in found.items()}
    assert cycles(graph) == [["patchmap.a", "patchmap.engines.b", "patchmap.a"]]
    assert private_imports(found) == [("patchmap.engines.b", "patchmap.a", "_hidden", 2)]


@pytest.mark.parametrize("key, table", [("intervention", interventions.INTERVENTIONS), ("engine", patching.ENGINES),
                                        ("pairing", interventions.PAIRINGS)])
def test_each_allowed_value_has_exactly_one_entry_in_its_table(key, table):
    assert sorted(table) == sorted(allowed("runs", key))


def test_every_allowed_position_group_has_positions():
    for group in allowed("sites", "positions"):
        assert isinstance(sites.positions(group, 8, 2, 4), list)
    with pytest.raises(ValueError, match="unknown position group"):
        sites.positions("elsewhere", 8, 2, 4)


def test_the_jobs_that_run_no_model_import_neither_torch_nor_transformers():
    """facts, the copy of the shipped weights, model_identity, ablation, divergence and the plots (the traces'
    figures too) are jobs of their own: each starts a fresh Python, and importing torch and transformers costs
    seconds there (more than the job's own work)."""
    code = ("import sys\n"
            "from patchmap import (ablation, aggregate, checkpoints, heads, plot, plot_trace, provenance, runtime,\n"
            "                      shipped, stages, tracefacts)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
