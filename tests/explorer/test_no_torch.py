"""The explorer never imports torch: it reads a cache, it runs no model (startup time, memory, and a
server that needs no GPU stack). Each check runs in a fresh interpreter, so nothing this test process
imported earlier can hide or cause an import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPLORER = REPO / "explorer"
ENTRY_SCRIPTS = {"explorer.app"}  # draws the app when imported: its imports are checked from its source


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def explorer_modules() -> list[str]:
    return sorted(module_name(p) for p in EXPLORER.rglob("*.py"))


def precompute_imports(module_level_only: bool) -> dict[str, set[str]]:
    """precompute module -> the explorer modules that import it (at module level only, or anywhere)."""
    found: dict[str, set[str]] = {}
    for path in EXPLORER.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "precompute" and _is_module(name):
                    found.setdefault(name, set()).add(module_name(path))
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (REPO / rel.with_suffix(".py")).is_file() or (REPO / rel / "__init__.py").is_file()


def first_torch_importer(modules: list[str]) -> str | None:
    """Import `modules` in order in a fresh interpreter; the first after which torch is loaded, or None."""
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    if 'torch' in sys.modules:\n"
        "        print(m); break\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip() or None


def test_every_explorer_module_imports_without_torch() -> None:
    modules = [m for m in explorer_modules() if m not in ENTRY_SCRIPTS]
    assert "explorer.views.overlaps" in modules and "explorer.data.load" in modules
    culprit = first_torch_importer(modules)
    assert culprit is None, f"importing {culprit} loads torch"


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "in-functions"])
def test_precompute_modules_the_explorer_uses_are_torch_free(module_level_only: bool) -> None:
    """Whatever page or branch runs: each precompute module the explorer imports, at module level or
    inside a function (a page's render path), is torch-free on its own."""
    used = precompute_imports(module_level_only)
    assert "precompute.schema" in used
    heavy = {m: sorted(users) for m, users in sorted(used.items()) if first_torch_importer([m])}
    assert not heavy, f"these precompute modules load torch: {heavy}"
