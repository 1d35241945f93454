"""The package's architecture holds: each subpackage imports only what its docstring allows, argument
parsing lives in `jaxexit.cli` alone, and no module outgrows one responsibility (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxexit"
SUBPACKAGES = ("exits", "text", "vision", "training", "serving", "analysis", "cli")
# what each subpackage may import from jaxexit (besides itself); the top-level package re-exports
# the text model, so only `cli` may import `jaxexit` itself.
ALLOWED = {
    "exits": set(),
    "training": {"exits"},
    "text": {"exits", "training"},
    "vision": {"exits", "training"},
    "serving": {"exits", "text", "training"},
    "analysis": {"exits", "text", "vision", "training"},
    "cli": set(SUBPACKAGES) | {""},
}
MAX_LINES = 450


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def subpackage(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ""


def jaxexit_imports(path: Path) -> set[str]:
    """The jaxexit subpackages `path` imports (`""` for `jaxexit` itself), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "jaxexit" else [f"jaxexit.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "jaxexit":
                found.add(parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "")
    return found


def test_the_tree_has_one_subpackage_per_concern():
    assert all((PACKAGE / name / "__init__.py").is_file() for name in SUBPACKAGES)
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert flat == [], f"modules outside the subpackages: {flat}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_downward(path):
    own = subpackage(path)
    if own == "":
        return  # jaxexit/__init__.py: the public re-exports
    wrong = jaxexit_imports(path) - ALLOWED[own] - {own}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({own}) imports {sorted(wrong)}; allowed: {sorted(ALLOWED[own])}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_argument_parsing_lives_in_the_cli_alone(path):
    if subpackage(path) == "cli":
        return
    tree = ast.parse(path.read_text())
    parses = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              and ("argparse" in [a.name for a in n.names] or getattr(n, "module", None) == "argparse")]
    assert not parses, f"{path.relative_to(PACKAGE)} imports argparse outside jaxexit/cli"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_size_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (limit {MAX_LINES}): split it by responsibility"


def test_the_import_check_sees_every_form_of_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import jaxexit.text.glue\nfrom jaxexit import analysis, EarlyExitModel\n"
                      "def f():\n    from jaxexit.cli.console import fail\n")
    assert jaxexit_imports(sample) == {"text", "analysis", "", "cli"}
