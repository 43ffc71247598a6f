"""The wheel installs into an existing TorchRec environment and works there; its declared
dependencies cover every third-party import of the package."""

import ast
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], check=True, capture_output=True
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


def test_wheel_installs_into_an_existing_torchrec_environment(dist, tmp_path):
    """A fresh venv that sees the pinned TorchRec stack (this repo's .venv) through a .pth file,
    as a team's own environment would hold it: the wheel installs without fetching anything,
    its declared ranges are met by that stack, and the CLI and a tower import work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stack = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torchrec").is_dir())
    Path(site, "torchrec_stack.pth").write_text(stack + "\n")
    (wheel,) = dist.glob("*.whl")
    install = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
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
        [venv / "bin" / "engagerec", "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert "prepare" in cli.stdout and "train" in cli.stdout
    assert "compare" in cli.stdout and "results" in cli.stdout  # the study's, by its entry points
