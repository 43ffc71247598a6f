"""Evaluation without gradients: every row of a split exactly once, on any number of ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch

from engagerec.data.errors import DataError
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
from engagerec.errors import CheckpointError
from engagerec.metrics import ExactXAUC, LossAndBaselines, build_metric_module, metric_inputs, readable
from engagerec.tasks import Task


def train_label_means(data_dir: str | Path, labels: List[str]) -> Dict[str, float]:
    """Means of the label columns over the train split (missing labels left out): what the
    constant baselines predict. prepare() computed them into schema.json."""
    stats = DatasetSchema.load(data_dir).meta["summary"]["split"]["train"]["labels"]
    missing = [name for name in labels if stats.get(name, {}).get("mean") is None]
    if missing:
        raise DataError(
            f"labels {missing} have no train values (schema.json's train summary)", file=str(data_dir)
        )
    return {name: float(stats[name]["mean"]) for name in labels}


def evaluate(
    model: torch.nn.Module,
    tasks: List[Task],
    data_dir: str | Path,
    split: str,
    batch_size: int,
    device: torch.device,
    train_means: Dict[str, float],
    num_workers: int = 0,
) -> Dict[str, float]:
    """``model`` is the (DMP-wrapped) MultiTaskModel; returns metrics, losses and baselines."""
    reader = ShardReader(data_dir, split, batch_size=batch_size, even_batches=True)
    world, rank = reader.world_size, reader.rank
    metrics = build_metric_module(
        tasks,
        batch_size,
        window_size=reader.total_rows + world * batch_size,
        device=device,
        world_size=world,
        rank=rank,
    )
    sums = LossAndBaselines(tasks, train_means, device)
    xauc = ExactXAUC(tasks)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cuda = device.type == "cuda"
        for batch in make_loader(reader, num_workers=num_workers, pin_memory=cuda):
            batch = batch.to(device, non_blocking=cuda)
            _, (_, predictions, labels, weights) = model(batch)
            metrics.update(metric_inputs(tasks, predictions, labels, weights))
            sums.update(predictions, labels, weights)
            xauc.update(predictions, labels, weights)
    model.train(was_training)
    out = readable(metrics.compute())
    out.update(sums.compute())
    out.update(xauc.compute())
    return out


def _for_cpu(cfg):
    """A GPU run's config for evaluating on CPU: evaluation loads no optimiser state and any
    sharding reshards, so a CUDA-only sparse optimiser or sharding type is swapped for CPU ones."""
    import dataclasses

    from engagerec.distributed import CPU_SPARSE_OPTIMIZERS, CUDA_ONLY_SHARDING

    train = cfg.train
    optimizer = (
        train.sparse_optimizer if train.sparse_optimizer in CPU_SPARSE_OPTIMIZERS else "rowwise_adagrad"
    )
    sharding = {k: [t for t in v if t not in CUDA_ONLY_SHARDING] for k, v in train.sharding.items()}
    sharding = {k: v for k, v in sharding.items() if v}
    return dataclasses.replace(
        cfg, train=dataclasses.replace(train, sparse_optimizer=optimizer, sharding=sharding)
    )


def evaluate_run(
    run_dir: str | Path, split: str = "test", checkpoint_name: str = "best", device: Optional[str] = None
) -> Dict[str, float]:
    """Evaluate a finished (or interrupted) run's best checkpoint (``checkpoint_name="latest"``
    for the newest step) on ``split``, on however many ranks this process group has, on the
    run's ``train.device`` or on ``device`` (``cpu`` evaluates a GPU-trained run on CPU)."""
    import json

    from engagerec import checkpoint
    from engagerec.config import config_from_dict, prepared_dir
    from engagerec.distributed import close_runtime, init_runtime, sharded_model_from_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(
            f"{run_dir} is no run directory: it has no config.json (written by `engagerec train`)"
        )
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    runtime = init_runtime(device or cfg.train.device)
    try:
        if runtime.device.type == "cpu":
            cfg = _for_cpu(cfg)
        data_dir = prepared_dir(cfg)
        dmp, model = sharded_model_from_config(cfg, runtime)
        pattern = checkpoint.BEST_PATTERN if checkpoint_name == "best" else checkpoint.STEP_PATTERN
        path = checkpoint.latest(run_dir / "checkpoints", pattern)
        if path is None:
            raise CheckpointError(f"no {checkpoint_name} checkpoint under {run_dir / 'checkpoints'}")
        checkpoint.load(path, dmp, restore_rng=False, checked=True)  # latest has just verified it
        means = train_label_means(data_dir, [t.label for t in model.tasks])
        metrics = evaluate(
            dmp, model.tasks, data_dir, split, cfg.train.eval_batch_size, runtime.device, means
        )
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done before any tears the group down
        return metrics
    finally:
        close_runtime(runtime)
