"""A command whose extra is not installed says so in one line, naming the extra; training
without the tensorboard extra writes log.csv and says once that event files are off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_study_config

REPO = Path(__file__).resolve().parents[1]


def _without(module: str, tmp_path: Path) -> dict:
    """An environment in which importing ``module`` fails as if it were not installed."""
    blocker = tmp_path / "blocked" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO / "plugin")])}


def test_prepare_without_the_data_extra_names_it_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "engagerec", "prepare", "--config", "configs/kuairand_stats.yaml",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env=_without("duckdb", tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "engagerec prepare: error: engagerec prepare needs the data extra (duckdb is not installed): "
        "pip install 'engagerec[data]'"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_without_tensorboard_writes_the_csv_log_and_says_so(study_data, tmp_path):

    config = write_study_config(tmp_path / "run.yaml", study_data, epochs=1)
    done = subprocess.run(
        [sys.executable, "-m", "engagerec", "train", "--config", str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env=_without("tensorboard", tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TensorBoard event files needs the tensorboard extra" in done.stdout
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") > 2
    assert not list((tmp_path / "run").glob("events.out.tfevents*"))
