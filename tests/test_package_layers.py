"""The package map of docs/design.md holds: imports point down the layers only, and a
subpackage is used through its `__init__`, never through another's private modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top: a unit may import its own modules and any unit below it (docs/design.md).
LAYERS = [
    "storage",
    "cached_mslt",  # the package root: only __version__
    "cached_mslt.config",
    "cached_mslt.rundir",
    "cached_mslt.data",
    "cached_mslt.models",
    "cached_mslt.training",
    "cached_mslt.stages",
    "cached_mslt.evaluation",
    "cached_mslt.methods",
    "cached_mslt.inspect",
    "cached_mslt.bench",
    "pipelines",
]
RANK = {unit: i for i, unit in enumerate(LAYERS)}


def unit_of(module: str) -> str:
    """The layer a module belongs to: the longest entry of LAYERS that is a prefix of it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and docs/design.md")


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's own code in a file, nested ones too."""
    me = module_of(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
    return [(n, m) for n, m in found if m.split(".")[0] in ("cached_mslt", "storage")]


def layering_violations(path: Path) -> list[str]:
    importer = unit_of(module_of(path))
    problems = []
    for line, module in imported_modules(path):
        unit = unit_of(module)
        where = f"{path.relative_to(ROOT)}:{line} imports {module}"
        if RANK[unit] > RANK[importer]:
            problems.append(f"{where}: upward ({importer} is below {unit})")
        elif unit != importer and module != unit:
            problems.append(f"{where}: a private module of {unit}; import from {unit} itself")
    return problems


def library_files() -> list[Path]:
    return sorted(
        p for d in ("storage", "cached_mslt", "pipelines") for p in (ROOT / d).rglob("*.py")
    )


def test_imports_point_down_the_layers_and_through_each_package_init():
    files = library_files()
    assert len(files) > 60, "the walk found too few modules to mean anything"
    problems = [p for f in files for p in layering_violations(f)]
    assert not problems, "\n".join(problems)


def test_layering_check_flags_an_upward_and_a_private_import(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    bad = tmp_path / "cached_mslt" / "training" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "from cached_mslt.methods import METHODS\n"  # upward
        "from cached_mslt.models.bert import grow\n"  # private module of another package
        "from cached_mslt.training.metrics import RunClock\n"  # own package: fine
        "from .budget import Budget\n"  # own package, relative: fine
    )
    problems = layering_violations(bad)
    assert len(problems) == 2
    assert "upward" in problems[0] and "private module of cached_mslt.models" in problems[1]


def test_every_package_init_names_its_public_api():
    for init in sorted((ROOT / "cached_mslt").glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} says nothing of what its package owns"
        exported = next(
            (
                n.value
                for n in tree.body
                if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"
            ),
            None,
        )
        assert exported is not None, f"{init} has no __all__"


def test_no_library_function_is_over_60_lines():
    long = [
        f"{f.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for f in library_files()
        for n in ast.walk(ast.parse(f.read_text()))
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno >= 60
    ]
    assert not long, "split these where a reader wants a name for a part:\n" + "\n".join(long)
