"""A trained run, opened: its config, the sharded model with a checkpoint loaded, on this
process group. What evaluate, predict and export start from."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from torchrec.distributed.model_parallel import DistributedModelParallel

from engagerec import checkpoint
from engagerec.config import ExperimentConfig, config_from_dict, prepared_dir
from engagerec.distributed import (
    CPU_SPARSE_OPTIMIZERS,
    CUDA_ONLY_SHARDING,
    Runtime,
    close_runtime,
    init_runtime,
    sharded_model_from_config,
)
from engagerec.errors import CheckpointError
from engagerec.model import MultiTaskModel


@dataclass
class OpenedRun:
    """A run's config (made CPU-ready when opened on CPU), its prepared data directory, the
    process group, the sharded model with the checkpoint's weights, and that checkpoint."""

    cfg: ExperimentConfig
    data_dir: str
    runtime: Runtime
    dmp: DistributedModelParallel
    model: MultiTaskModel
    checkpoint: Path


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The config a run was trained with (its config.json).

    Raises:
        CheckpointError: ``run_dir`` has no config.json (it is no run directory).
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} is no run directory: it has no config.json (written by `engagerec train`)"
        )
    return config_from_dict(json.loads(path.read_text()), check=False)  # as it was trained


def for_cpu(cfg: ExperimentConfig) -> ExperimentConfig:
    """A GPU run's config for use on CPU: a run opened for inference loads no optimiser state
    and any sharding reshards, so a CUDA-only sparse optimiser or sharding type is swapped for
    CPU ones."""
    train = cfg.train
    optimizer = (
        train.sparse_optimizer if train.sparse_optimizer in CPU_SPARSE_OPTIMIZERS else "rowwise_adagrad"
    )
    sharding = {k: [t for t in v if t not in CUDA_ONLY_SHARDING] for k, v in train.sharding.items()}
    sharding = {k: v for k, v in sharding.items() if v}
    return dataclasses.replace(
        cfg, train=dataclasses.replace(train, sparse_optimizer=optimizer, sharding=sharding)
    )


@contextlib.contextmanager
def open_run(
    run_dir: str | Path, checkpoint_name: str = "best", device: Optional[str] = None
) -> Iterator[OpenedRun]:
    """Open a finished (or interrupted) run on however many ranks this process group has.

    Args:
        run_dir: a directory written by ``engagerec train``.
        checkpoint_name: "best" (the best validation epoch) or "latest" (the newest step).
        device: "cpu", "cuda" or "auto"; default the run's ``train.device`` (``cpu`` opens a
            GPU-trained run on CPU).

    Yields:
        OpenedRun, in eval mode; the process group is closed on exit.

    Raises:
        CheckpointError: no run directory, or no checkpoint of that kind that checks out.
    """
    cfg = run_config(run_dir)
    runtime = init_runtime(device or cfg.train.device)
    try:
        if runtime.device.type == "cpu":
            cfg = for_cpu(cfg)
        dmp, model = sharded_model_from_config(cfg, runtime)
        pattern = checkpoint.BEST_PATTERN if checkpoint_name == "best" else checkpoint.STEP_PATTERN
        root = Path(run_dir) / "checkpoints"
        path = checkpoint.latest(root, pattern)
        if path is None:
            raise CheckpointError(f"no {checkpoint_name} checkpoint under {root}")
        checkpoint.load(path, dmp, restore_rng=False, checked=True)  # latest has just verified it
        dmp.eval()
        yield OpenedRun(cfg, prepared_dir(cfg), runtime, dmp, model, path)
    finally:
        close_runtime(runtime)
