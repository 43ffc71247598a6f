"""The wheel installs into an existing TorchRec environment and works there; its declared
dependencies cover every third-party import of the package."""

import ast
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import free_port, run_on_a_free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        # without build isolation: the pinned setuptools of requirements.txt, nothing downloaded
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    return out


def _requirements(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


def test_wheel_holds_the_code_and_configs_not_the_data(dist):
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "engagerec/configs/kuairand_mmoe.yaml" in names and "engagerec/towers/mmoe.py" in names
    assert "engagerec_study/gbdt_fit.py" in names and "engagerec_study/sections/ensemble.py" in names
    assert not [n for n in names if n.endswith(".csv") or "datasets/" in n]
    assert list(dist.glob("engagerec-*.tar.gz"))


def test_declared_dependencies_cover_every_third_party_import(dist):
    (wheel,) = dist.glob("*.whl")
    declared = {req.name.lower().replace("_", "-") for req in _requirements(wheel)}
    providers = metadata.packages_distributions()
    imported = set()
    for path in (REPO / "plugin").rglob("*.py"):  # the library's and the study's (its extra's)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    # FBGEMM: the user's CPU or CUDA build
    third_party = imported - STDLIB - {"engagerec", "engagerec_study", "fbgemm_gpu"}
    undeclared = {
        module: providers.get(module)
        for module in third_party
        if not {d.lower().replace("_", "-") for d in providers.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def _fresh_venv(venv: Path):
    """A new venv at ``venv``: its python and its site-packages folder (for a .pth file). It gets
    no pip of its own (seeding one costs 6 s): ``_pip_install`` installs into it with this one."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return python, site


def _pip_install(python: Path, wheel: Path) -> None:
    """``pip install wheel`` into the venv of ``python``, offline and without dependencies."""
    install = ["--no-index", "--no-deps", "--ignore-installed", str(wheel)]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", *install], check=True,
                   capture_output=True)  # fmt: skip


def test_wheel_installs_into_an_existing_torchrec_environment(dist, tmp_path):
    """A fresh venv that sees the pinned TorchRec stack (this repo's .venv) through a .pth file,
    as a team's own environment would hold it: the wheel installs without fetching anything,
    its declared ranges are met by that stack, and the CLI and a tower import work."""
    python, site = _fresh_venv(tmp_path / "venv")
    stack = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torchrec").is_dir())
    Path(site, "torchrec_stack.pth").write_text(stack + "\n")
    (wheel,) = dist.glob("*.whl")
    _pip_install(python, wheel)
    check = (
        "import importlib.metadata as m, sys\n"
        "from packaging.requirements import Requirement\n"
        "bad = [str(r) for r in map(Requirement, m.requires('engagerec'))\n"
        "       if not r.specifier.contains(m.version(r.name), prereleases=True)]\n"
        "assert not bad, bad\n"
        "import engagerec, engagerec.towers\n"
        "from engagerec.config import load_config\n"
        f"assert engagerec.__file__.startswith({site!r}), engagerec.__file__\n"
        "assert engagerec.towers.MMoE and load_config('kuairand_mmoe').model.tower.name == 'mmoe'\n"
        "print(m.version('engagerec'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own sys.path only
    done = subprocess.run(
        [python, "-c", check], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.stdout.strip() == metadata.version("engagerec")
    cli = subprocess.run(
        [python.with_name("engagerec"), "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert "prepare" in cli.stdout and "train" in cli.stdout
    assert "compare" in cli.stdout and "results" in cli.stdout  # the study's, by its entry points


# what the core install may bring: the wheel's dependencies without extras, and FBGEMM (the user's build)
EXTRAS_ONLY = ("duckdb", "pandas", "pyarrow", "scikit-learn", "scipy", "tensorboard")


def _closure(roots):
    """The installed distributions ``roots`` need, their needs included (no extras); a need
    that is not installed here (torchrec's metadata asks for the CUDA fbgemm-gpu) is skipped."""
    seen, todo = {}, list(roots)
    while todo:
        requirement = Requirement(todo.pop())
        name = requirement.name.lower().replace("_", "-")
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        todo += dist.requires or []
    return seen


def _core_site(wheel: Path, into: Path) -> Path:
    """A folder holding links to the core closure's installed files only, for a venv's .pth."""
    core = [str(r) for r in _requirements(wheel) if not r.marker] + ["fbgemm-gpu-cpu"]
    dists = _closure(core)
    forbidden = sorted(set(dists) & set(EXTRAS_ONLY))
    assert not forbidden, f"the core install would bring {forbidden}"
    assert "matplotlib" not in dists  # torchrec's stack does not bring it either
    into.mkdir()
    for name, dist in dists.items():
        if name in ("pip", "setuptools"):  # the venv has its own
            continue
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            source = Path(dist.locate_file(top))
            if source.exists() and not top.endswith(".pth") and not (into / top).exists():
                (into / top).symlink_to(source)
    return into


def test_the_core_install_trains_a_torchrec_job_without_any_extra(dist, tmp_path):
    """The wheel in a venv that holds the TorchRec stack and the core dependencies only (no DuckDB,
    pandas, pyarrow, scikit-learn, scipy, TensorBoard, matplotlib): the towers, model, tasks, losses
    and metrics import without them, and docs/examples/torchrec_job.py (the user's own EBC and
    batches; DMP + TrainPipelineSparseDist; per-task metrics with XAUC and GAUC) runs on 2 gloo ranks."""
    (wheel,) = dist.glob("*.whl")
    python, site = _fresh_venv(tmp_path / "venv")
    Path(site, "core_stack.pth").write_text(str(_core_site(wheel, tmp_path / "core")) + "\n")
    _pip_install(python, wheel)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = (
        "import importlib.util, sys\n"
        "extras = ('duckdb', 'pandas', 'pyarrow', 'sklearn', 'scipy', 'tensorboard', 'matplotlib')\n"
        "missing = [m for m in extras if importlib.util.find_spec(m) is None]\n"
        "import engagerec.model, engagerec.towers, engagerec.tasks, engagerec.losses, engagerec.metrics\n"
        "from engagerec import MultiTaskModel, TaskMetrics, build_tower\n"
        "print(len(missing), [m for m in extras if m in sys.modules])\n"
    )
    done = subprocess.run(
        [python, "-c", check], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert done.stdout.split("\n")[0] == "7 []"  # none of them installed, none loaded
    example = REPO / "docs" / "examples" / "torchrec_job.py"

    def launch():
        return [python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), str(example)]  # fmt: skip

    done = run_on_a_free_port(launch, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # each rank's dict, wherever it starts: the ranks share one stdout, and unbuffered (as under
    # pytest-xdist) a print writes its newline apart, so two lines can run together
    printed = sorted(re.findall(r"(rank \d): (\{[^{}]*\})", done.stdout))
    assert [rank for rank, _ in printed] == ["rank 0", "rank 1"], done.stdout[-3000:] + done.stderr[-3000:]
    values = ast.literal_eval(printed[0][1])
    assert values == ast.literal_eval(printed[1][1])  # every rank gets the same metrics
    assert values["click/gauc"] > 0.65 and values["click/auc"] > 0.65  # learned: chance is 0.5
    assert values["dwell/xauc"] > 0.75 and values["dwell/mse"] < 0.02  # a constant's MSE is about 0.04
