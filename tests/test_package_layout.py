"""The package matches docs/architecture.md, has no import cycles, and keeps torch and Ray out of the input side."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fetaliqa"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def documented_tree() -> set[str]:
    """The module paths of docs/architecture.md's package tree (the code block after its marker)."""
    text = ARCHITECTURE.read_text()
    block = re.search(r"<!-- package tree:.*?-->\s*```\n(.*?)```", text, re.S).group(1)
    paths, folders = set(), []
    for line in block.splitlines():
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip(" "))) // 2
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        else:
            paths.add("/".join([*folders, name]))
    return paths


def test_the_documented_tree_is_the_package():
    actual = {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")}
    documented = documented_tree()
    assert documented == actual, (f"in docs/architecture.md only: {sorted(documented - actual)}; "
                                  f"in fetaliqa/ only: {sorted(actual - documented)}")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the fetaliqa modules it imports anywhere in its body (function-level imports included).
    `from package import name` counts as importing the submodule `package.name` when there is one."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fetaliqa"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                edges |= subs or {node.module}
        graph[name] = edges - {name}
    return graph


def test_no_module_imports_a_module_that_imports_it():
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
        return False

    cycles = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if b.startswith("fetaliqa") and reaches(b, a)
                    and not a.startswith(b + "."))  # a package's __init__ re-exporting its own modules
    assert not cycles, cycles


def heavy_imports(modules: list[str]) -> list[str]:
    """Which of torch and Ray a fresh interpreter has loaded after importing `modules`."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return done.stdout.split()


def test_the_input_side_imports_neither_torch_nor_ray():
    inputs = ["fetaliqa.inputs." + p.stem for p in (PACKAGE / "inputs").glob("*.py") if p.stem != "__init__"]
    assert heavy_imports([*inputs, "fetaliqa.preprocess", "fetaliqa.ellipse", "fetaliqa.pseudonym"]) == []
    # the read and write stages of scoring are Ray Data stages, but only the predictor loads torch
    assert heavy_imports(["fetaliqa.score.read", "fetaliqa.score.write"]) == ["ray"]
