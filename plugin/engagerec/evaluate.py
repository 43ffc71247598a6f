"""Evaluation without gradients: every row of a split exactly once, on any number of ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from engagerec.data.errors import DataError
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
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
    """``model`` is the (DMP-wrapped) MultiTaskModel; returns metrics, losses and baselines.

    Raises:
        DataError: the split has no rows (data prepared for a refit has no validation rows):
            its metrics would be zeros, not measurements.
    """
    reader = ShardReader(data_dir, split, batch_size=batch_size, even_batches=True)
    if reader.total_rows == 0:
        raise DataError(
            f"split '{split}' has no rows to evaluate",
            file=str(Path(data_dir) / "schema.json"),
            expected="a split with rows (data prepared with split.val_fraction 0 has no 'val')",
        )
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
