"""The code's shape: short functions, imports in the header, imports that point down."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icm_dist"
MAX_FUNCTION_LINES = 90

# Modules that nothing below them may import: the commands sit on top of everything, the trainer on
# top of the library, and the test-only fault hooks are wired in by the commands alone.
TOP = {"icm_dist.commands": set(), "icm_dist.trainer": {"icm_dist.commands"}, "icm_dist.faults": {"icm_dist.commands"}}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text())


def _imported(name: str, node: ast.AST, is_package: bool) -> list[str]:
    """Absolute names of the icm_dist modules an import statement brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("icm_dist")]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = name.split(".") if is_package else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if not base.startswith("icm_dist"):
        return []
    return [base] + [f"{base}.{a.name}" for a in node.names]


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for _, path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_package_imports_sit_in_the_module_header():
    """An icm_dist import inside a function hides a dependency (and often a cycle)."""
    hidden = []
    for name, path, tree in _modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{path.relative_to(PACKAGE.parent)}:{n.lineno} in {fn.name}" for n in ast.walk(fn)
                           if _imported(name, n, path.name == "__init__.py")]
    assert hidden == []


def test_imports_point_down():
    upward = []
    for name, path, tree in _modules():
        for node in ast.walk(tree):
            for target in _imported(name, node, path.name == "__init__.py"):
                for top, allowed in TOP.items():
                    inside = name == top or name.startswith(top + ".") or any(
                        name == a or name.startswith(a + ".") for a in allowed)
                    if (target == top or target.startswith(top + ".")) and not inside:
                        upward.append(f"{name} imports {target}")
    assert upward == []
