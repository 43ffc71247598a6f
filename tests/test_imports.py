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


def _loaded_after(statement: str, modules=("duckdb", "pandas", "pyarrow")) -> list:
    """The ``modules`` a fresh interpreter has loaded after running ``statement``."""
    import subprocess
    import sys

    code = f"import sys; {statement}; print(','.join(m for m in {list(modules)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_the_schema_contract_loads_without_the_writers_engine():
    """Readers, the model builder, predict and export read schema.json: none of them should pay
    for (or need installed) DuckDB, pandas or pyarrow to do it."""
    assert _loaded_after("import engagerec.data.schema") == []
    assert _loaded_after("import engagerec.data") == []  # the package's names are lazy
    # the check itself works: the writer does load them
    assert "duckdb" in _loaded_after("import engagerec.data.prepare")


def test_engagerec_data_prepare_is_the_writer_whichever_import_came_first():
    import subprocess
    import sys

    code = (
        "import engagerec.data.prepare as first; from engagerec.data import prepare, DatasetSchema; "
        "import engagerec.data.fitting; "
        "print(callable(prepare), prepare.__name__, first is prepare, DatasetSchema.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "prepare", "True", "DatasetSchema"]
