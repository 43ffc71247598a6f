import json
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
KUAIRAND = REPO / "datasets" / "kuairand"

warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")


def pytest_configure(config):
    """Under pytest-xdist each worker keeps to one thread (and so do the processes it starts):
    two workers on two cores whose OpenMP pools each spin on both cores ran a tiny model's
    training 30x slower than one worker alone."""
    import os

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool, and for subprocesses
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # an inductor cache of its own per worker: two workers compiling the same AOTI package
        # shared one directory, and one worker once loaded a package's file while it was empty
        import tempfile

        os.environ.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{worker}")
        )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are collected everywhere and skipped where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun launch's rendezvous (``--master-port``):
    launches started at the same time (pytest-xdist workers) get different ones. Not ``--standalone``:
    its rendezvous through the launcher cost 1.7x the CPU of a launch of 2 evaluating ranks here,
    and 1 of 12 such launches under load ended in a rank's SIGABRT at exit (0 of 12 with a port)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nproc: int) -> list:
    """The start of a torchrun command line for ``nproc`` local ranks, on a free port."""
    import sys

    launcher = str(Path(sys.executable).with_name("torchrun"))
    return [launcher, "--nproc-per-node", str(nproc), "--master-port", str(free_port())]


PORT_TAKEN = "address already in use"  # the rendezvous store's bind error (errno 98), lowercased


def run_on_a_free_port(command: Callable[[], list], tries: int = 3, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command(), capture_output=True, text=True, **kwargs)``, again with a new
    command (so a new port, as ``torchrun`` picks one) when the launch failed because another
    process took its port between ``free_port``'s probe and the bind: concurrent launches and
    gloo's own connections take ports from the same range. Any other failure is returned as it is."""
    for _ in range(tries):
        done = subprocess.run(command(), capture_output=True, text=True, **kwargs)
        if done.returncode == 0 or PORT_TAKEN not in (done.stdout + done.stderr).lower():
            return done
    return done


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def in_repo(monkeypatch):
    """The repository as the working directory, for a test whose config names data by a path
    relative to it (``datasets/kuairand/...``): such paths are the working directory's, as for a
    user who runs ``engagerec`` from the repository (the Makefile does)."""
    monkeypatch.chdir(REPO)
    return REPO


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's directory, built by ``build(directory)`` once for the whole test run:
    under pytest-xdist the workers share it (the first to get the lock builds it, the others
    wait and read it); without xdist it lies in this session's own temporary directory."""
    import os

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    out = root / name
    with FileLock(str(out) + ".lock"):
        if not (out / ".built").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a build interrupted by a failure
            out.mkdir()
            build(out)
            (out / ".built").touch()
    return out


def _bundled_prepared(tmp_path_factory, config: str):
    """The bundled KuaiRand data prepared once per run with ``configs/<config>.yaml``: (its
    directory, prepare's summary, the config)."""
    from engagerec.config import load_config
    from engagerec.data.prepare import prepare

    cfg = load_config(REPO / "configs" / f"{config}.yaml")

    def build(out):
        with pytest.MonkeyPatch.context() as patch:  # the config's data paths are the repository's
            patch.chdir(REPO)
            summary = prepare(cfg.data, out / "data")
        (out / "summary.json").write_text(json.dumps(summary))

    out = built_once(tmp_path_factory, config, build)
    return out / "data", json.loads((out / "summary.json").read_text()), cfg


@pytest.fixture(scope="session")
def kuairand_random(tmp_path_factory):
    """configs/kuairand_random.yaml's preparation of the bundled data: (its directory, prepare's
    summary, the config). Tests read it and never write into it."""
    return _bundled_prepared(tmp_path_factory, "kuairand_random")


@pytest.fixture(scope="session")
def kuairand_temporal(tmp_path_factory):
    """configs/kuairand_temporal.yaml's preparation of the bundled data: (its directory, prepare's
    summary, the config). Tests read it and never write into it."""
    return _bundled_prepared(tmp_path_factory, "kuairand_temporal")


@pytest.fixture(scope="session")
def kuairand_run(kuairand_random, tmp_path_factory):
    """One epoch of configs/kuairand_random.yaml on the bundled data: (run directory, its data).
    Tests read it and never write into it."""
    import dataclasses

    from engagerec.train import train

    data_dir, _, cfg = kuairand_random
    changes = {"data_dir": str(data_dir), "epochs": 1, "progress_bar": False, "device": "cpu"}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
    out = built_once(tmp_path_factory, "kuairand_run", lambda out: train(cfg, out / "run"))
    return out / "run", data_dir


# metrics that must agree exactly between runs that should be the same (resumed, resharded, 2 ranks)
EQUAL_METRICS = (
    "loss",
    "watch_ratio/mse",
    "watch_ratio/mae",
    "watch_ratio/xauc",
    "skip/auc",
    "skip/gauc",  # grouped by user_id: exact, gathered across ranks
    "skip/accuracy",
    "skip/ne",
)


def study_run_config(data_dir, **train):
    """A small MMoE run on 12,000 synthetic study-schema rows, read from ``data_dir``; each
    keyword overrides one key of the ``train`` section."""
    from engagerec.config import config_from_dict

    return config_from_dict(
        {
            "name": "study_small",
            "data": {
                "source": {
                    "adapter": "synthetic",
                    "synthetic": {"num_rows": 12_000, "num_users": 400, "num_contents": 300},
                },
                # the synthetic study features, with 8 duration buckets
                "features": [
                    *SYNTHETIC_STUDY_FEATURES[:-1],
                    {"name": "duration", "kind": "numeric", "transform": "log1p", "buckets": 8},
                ],
                "filters": {"min_user_views": 0},
            },
            "model": {
                "embeddings": {"dim": 8},
                "tower": {"name": "mmoe", "params": {"num_experts": 3, "expert_sizes": [32]}},
            },
            "train": {
                "data_dir": str(data_dir),
                "batch_size": 256,
                "eval_batch_size": 1024,
                "epochs": 3,
                "dense_lr": 0.003,
                "sparse_lr": 0.05,
                "progress_bar": False,
                "log_every_steps": 5,
                "device": "cpu",  # the same numbers on a GPU machine; tests/test_gpu.py asks for cuda
                **train,
            },
        }
    )


def write_study_config(path, data_dir, tower=None, **train):
    """``study_run_config`` as a YAML file for the command line; ``tower`` replaces the model's
    tower section. Returns ``path``."""
    import dataclasses

    import yaml

    raw = dataclasses.asdict(study_run_config(data_dir, **train))
    if tower is not None:
        raw["model"]["tower"] = tower
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def study_data(tmp_path_factory):
    """``study_run_config``'s data (12,000 synthetic rows) prepared once for the whole session;
    tests read it and never write into it."""
    from engagerec.data.prepare import prepare

    def build(out):
        prepare(study_run_config(out / "data").data, out / "data")

    return built_once(tmp_path_factory, "study_small", build) / "data"


def write_csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def study_files(tmp_path: Path, interactions=None, users=None, content=None):
    """Small study-schema tables on disk; each argument overrides one table."""
    n_users, per_user = 4, 12
    if users is None:
        users = pd.DataFrame(
            {"user_id": range(n_users), "age": [20, 30, 40, 50], "gender": ["F", "M", "F", "M"]}
        )
    if content is None:
        content = pd.DataFrame(
            {
                "content_id": range(6),
                "genres": ["1,2", "2", "3", "1", "", "4,5"],
                "rating": [3.0, 4.5, 2.0, 5.0, 1.0, 3.3],
                "duration": [60, 120, 30, 90, 45, 300],
            }
        )
    if interactions is None:
        rows = []
        for u in range(n_users):
            for k in range(per_user):
                c = (u + k) % 6
                rows.append(
                    {
                        "user_id": u,
                        "content_id": c,
                        "watch_time": (k % 5) * 0.25 * content.duration[c],
                        "timestamp": 1000 * u + k,
                    }
                )
        interactions = pd.DataFrame(rows)
    return {
        "interactions": write_csv(tmp_path / "interactions.csv", interactions),
        "users": write_csv(tmp_path / "users.csv", users),
        "content": write_csv(tmp_path / "content.csv", content),
    }


def study_config(files, **data_overrides):
    from engagerec.config import config_from_dict

    data = {
        "source": {"adapter": "study", **files},
        "features": [
            {"name": "user_id"},
            {"name": "content_id"},
            {"name": "gender"},
            {"name": "genres", "kind": "multi_hot"},
            {"name": "age", "kind": "numeric"},
            {"name": "rating", "kind": "numeric"},
            {"name": "duration", "kind": "numeric", "transform": "log1p", "buckets": 4},
        ],
        "filters": {"min_user_views": 10, "drop_zero_watch_time": False},
        "split": {"kind": "random", "test_fraction": 0.25, "val_fraction": 0.2, "seed": 1},
    }
    for key, value in data_overrides.items():
        data[key] = value
    return config_from_dict({"name": "study_test", "data": data})


SYNTHETIC_STUDY_FEATURES = [
    {"name": "user_id"},
    {"name": "content_id"},
    {"name": "gender"},
    {"name": "genres", "kind": "multi_hot"},
    {"name": "age", "kind": "numeric"},
    {"name": "duration", "kind": "numeric", "transform": "log1p", "buckets": 4},
]


def prepare_synthetic(out_dir, synthetic=None, **data_overrides) -> Path:
    """A small study-schema synthetic dataset written through prepare() (the synthetic adapter):
    6,000 rows, 300 users, 200 items, no user filter; ``synthetic`` overrides the generator's
    settings and every other keyword one key of the ``data`` section."""
    from engagerec.config import config_from_dict
    from engagerec.data.prepare import prepare

    data = {
        "source": {
            "adapter": "synthetic",
            "synthetic": {"num_rows": 6_000, "num_users": 300, "num_contents": 200, **(synthetic or {})},
        },
        "features": SYNTHETIC_STUDY_FEATURES,
        "filters": {"min_user_views": 0},
        **data_overrides,
    }
    prepare(config_from_dict({"name": "synthetic_test", "data": data}).data, out_dir)
    return Path(out_dir)


def synthetic_mmoe_config(data_dir, num_rows, input_dim, overrides=()):
    """configs/synthetic_mmoe.yaml, smaller: ``num_rows`` rows of the inputs x0..x{input_dim-1}
    (its feature list cut to match), prepared into and trained from ``data_dir``."""
    from engagerec.config import load_config

    cfg = load_config(
        REPO / "configs" / "synthetic_mmoe.yaml",
        [
            f"data.source.synthetic.num_rows={num_rows}",
            f"data.source.synthetic.input_dim={input_dim}",
            f"train.data_dir={data_dir}",
            *overrides,
        ],
    )
    cfg.data.features = cfg.data.features[:input_dim]
    return cfg


def video_and_history_schema(**managed):
    """A prepared schema of two sparse features in one id space: a video id and its history
    (``managed``: DatasetSchema's managed-collision spaces)."""
    from engagerec.data.schema import DatasetSchema, SparseFeature

    return DatasetSchema(
        features=[{"name": "content_id", "kind": "categorical"}, {"name": "history", "kind": "history"}],
        sparse=[
            SparseFeature("content_id", "content_id", False),
            SparseFeature("history", "content_id", True),
        ],
        dense=[],
        labels=[],
        vocab_sizes={"content_id": 10},
        **managed,
    )
