"""The package's shape: no import circles among fslm's modules, only the CLI draws on the terminal or imports the
CLI, and no step calls another through a CLI function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "fslm"
ROOT = PACKAGE.parent


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every fslm module this file imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_detection_sees_function_level_imports():
    """The graph counts imports inside functions too (a lazy import still ties two modules together)."""
    g = graph()
    assert "fslm.steps.evaluate.lm_eval_model" in g["fslm.steps.evaluate.run"]  # imported inside evaluate()


def test_only_the_cli_imports_the_cli_or_draws():
    for name, targets in graph().items():
        if name not in ("fslm.cli", "fslm.__main__"):  # `python -m fslm` is the CLI's own entry point
            assert "fslm.cli" not in targets, f"{name} imports fslm.cli"
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        text = path.read_text(encoding="utf-8")
        for widget in ("rich.progress", "rich.console", "rich.table", "rich.panel", "__wrapped__"):
            assert widget not in text, f"{path.relative_to(ROOT)} uses {widget}"


def test_benchmarks_call_the_library_not_cli_functions():
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert "__wrapped__" not in path.read_text(encoding="utf-8"), path.name
