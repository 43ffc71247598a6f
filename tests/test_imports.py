"""The import graph of the two packages, counting imports inside functions too: no circles (a
circle hidden by a function-level import still ties two modules into one), and the library
(engagerec) never imports the study (engagerec_study)."""

import ast
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "plugin"
PACKAGES = ("engagerec", "engagerec_study")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PLUGIN).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, modules=()) -> set:
    """The absolute module names a file imports, anywhere in it: ``from a.b import c`` gives
    ``a.b.c`` when that is one of ``modules``, else ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from engagerec.data import prepare` may name a module
                candidate = f"{node.module}.{alias.name}"
                names.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def import_graph() -> dict:
    """module -> the modules of both packages it imports (anywhere in the file)."""
    modules = {_module_name(p): p for package in PACKAGES for p in (PLUGIN / package).rglob("*.py")}
    return {
        name: {t for t in imported_names(path, modules) if t in modules and t != name}
        for name, path in modules.items()
    }


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


def test_the_packages_have_no_import_circle():
    graph = import_graph()
    assert "engagerec.data.prepare" in graph and graph["engagerec.data.prepare"]  # the scan sees imports
    assert "engagerec.runs" in graph["engagerec_study.compare"]  # and both packages
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_study():
    """A TorchRec job imports engagerec without the study's extra: no file of the library names
    engagerec_study in an import, not even inside a function."""
    offenders = {
        str(path.relative_to(PLUGIN)): sorted(
            n for n in imported_names(path) if n.split(".")[0] == "engagerec_study"
        )
        for path in (PLUGIN / "engagerec").rglob("*.py")
    }
    assert len(offenders) > 40  # the scan sees the library's files
    assert {path: names for path, names in offenders.items() if names} == {}
    # and the scan finds such an import where there is one
    assert "engagerec_study.gbdt" in imported_names(PLUGIN / "engagerec_study" / "compare.py")


def _sitecustomize(directory: Path, code: str) -> str:
    """A directory holding a sitecustomize.py that runs ``code`` as Python starts (put it on
    PYTHONPATH: every process started from here runs it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(code)
    return str(directory)


@pytest.mark.slow
def test_the_gbdt_fits_in_a_process_that_never_loads_torch(tmp_path, monkeypatch):
    """compare fits the GBDT after training towers with torch; with torch's OpenMP runtime in the
    same process the fits ran 3x slower (whichever runtime loaded first decides), so they run in a
    process of their own, which reports whether torch was loaded there and is refused if so."""
    import sys

    import torch  # as in compare: torch is loaded and has run here

    from engagerec.config import load_config
    from engagerec.data.prepare import prepare
    from engagerec.data.schema import DatasetSchema
    from engagerec_study.gbdt import data_layout, gbdt_reference
    from engagerec_study.gbdt_fit import fit_reference

    torch.ones(64, 64) @ torch.ones(64, 64)
    data = tmp_path / "data"
    prepare(load_config("synthetic_study", ["data.source.synthetic.num_rows=2000"]).data, data)
    tasks = [("skip", "skip", "binary"), ("watch_ratio", "watch_ratio", "regression")]
    iterations = {"skip": 30, "watch_ratio": 30}  # few: quick
    isolated = gbdt_reference(data, 1, tasks, iterations)  # refused had its process loaded torch
    assert set(isolated) == {"skip/auc", "skip/accuracy", "skip/iterations", "watch_ratio/mse",
                             "watch_ratio/mae", "watch_ratio/xauc", "watch_ratio/iterations"}  # fmt: skip
    # the same fits in this process give the same numbers: the process changes nothing but where
    assert isolated == fit_reference(data, data_layout(DatasetSchema.load(data)), 1, tasks, iterations)
    assert "sklearn" in sys.modules and "torch" in sys.modules  # here, by the line above

    # the check is real: a fitting process that loads torch (here as Python starts) is refused
    monkeypatch.setenv("PYTHONPATH", _sitecustomize(tmp_path / "site", "import torch\n"))
    with pytest.raises(RuntimeError, match="imported torch"):
        gbdt_reference(data, 1, tasks, iterations)


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
