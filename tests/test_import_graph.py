"""ssltk's modules import one another one way: no cycle, counting imports inside functions and
leaving out ``if TYPE_CHECKING:`` blocks. Reading params.yaml loads no torch and no task or
backbone code.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ssltk"
KERNELS = ROOT / "kernels"  # installed as ssltk.kernels


def module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("ssltk", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module ``tree`` imports anywhere (functions included), as absolute names."""
    found: set[str] = set()
    here = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of ssltk it imports``. Importing ``a.b.c`` runs ``a`` and ``a.b`` too,
    so a package's ``__init__`` counts as imported by everything that imports below it."""
    paths = sorted([*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")])
    files = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for target in _imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in files and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), smallest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups, key=len)


def test_no_module_of_ssltk_imports_itself_round_a_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles among: " + "; ".join(" ↔ ".join(g) for g in found)


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking_blocks():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ssltk.models import ArchConfig\n"
        "def f():\n    from ssltk.pretext import base\n"
    )
    found = _imported(tree, "ssltk.x", is_package=False)
    assert "ssltk.pretext.base" in found and "ssltk.models" not in found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _loaded_after(code: str) -> list[str]:
    """torch, Triton, task and backbone modules loaded by ``code`` in a fresh interpreter."""
    code += (
        "\nimport json, sys\n"
        "heavy = ('torch', 'triton', 'ssltk.models', 'ssltk.pretext')\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m in heavy or m.startswith(tuple(h + '.' for h in heavy)))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reading_and_validating_params_imports_no_torch_and_no_task_or_backbone_code():
    assert _loaded_after("from ssltk.config import load_config\nload_config('params.yaml')") == []


def test_the_command_line_lists_its_commands_and_prints_the_config_without_torch():
    code = (
        "from typer.testing import CliRunner\n"
        "from ssltk.cli import app\n"
        "for args in (['--help'], ['config']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
    )
    assert _loaded_after(code) == []
