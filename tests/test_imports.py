"""No import circles inside engagerec, counting imports inside functions too: a circle hidden
by a function-level import still ties two modules into one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "plugin" / "engagerec"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """module -> the engagerec modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:  # `from engagerec.data import prepare` may name a module
                    candidate = f"{base}.{alias.name}"
                    targets.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict):
    """One import circle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engagerec_has_no_import_circle():
    graph = import_graph()
    assert "engagerec.data.prepare" in graph and graph["engagerec.data.prepare"]  # the scan sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_compare_loads_scikit_learn_before_torch():
    """engagerec compare fits the GBDT after the towers in one process; with torch's OpenMP
    runtime loaded before scikit-learn's the fits ran 3x slower (compare.py's imports say why)."""
    import subprocess
    import sys

    order = subprocess.run(
        [sys.executable, "-c", "import sys, engagerec.compare; m = list(sys.modules); "
         "print(m.index('sklearn') < m.index('torch'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert order == "True"
