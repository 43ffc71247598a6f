"""Evaluation without gradients: every row of a split exactly once, on any number of ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch

from engagerec.data.errors import DataError
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
from engagerec.embedding_backward import model_loop_keys
from engagerec.metrics import LossAndBaselines, TaskMetrics
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


def groups_gauc(schema: DatasetSchema, feature: Optional[str]) -> bool:
    """
    Whether evaluation reports GAUC grouped by ``feature``: the prepared data must hold it as a
    sparse feature with one id per row.

    Args:
        schema (DatasetSchema): the prepared data's schema.
        feature (Optional[str]): ``train.gauc_group``.

    Returns:
        bool: True when GAUC can be grouped by it.
    """
    return feature in {f.name for f in schema.sparse if not f.multi}


def evaluate(
    model: torch.nn.Module,
    tasks: List[Task],
    data_dir: str | Path,
    split: str,
    batch_size: int,
    device: torch.device,
    train_means: Dict[str, float],
    num_workers: int = 0,
    gauc_group: Optional[str] = None,
) -> Dict[str, float]:
    """
    Every row of ``split`` once through ``model`` (the DMP-wrapped MultiTaskModel): the tasks'
    metrics (``TaskMetrics``: torchrec's sums, exact AUC, XAUC and GAUC), losses and constant
    baselines. Memory beyond the model and one batch: 8 bytes a row per regression task and 9 per
    binary task (5 without GAUC), held until the metrics are computed.

    Args:
        model (torch.nn.Module): the model, in any sharding.
        tasks (List[Task]): its tasks.
        data_dir (str | Path): the prepared data.
        split (str): ``"val"`` or ``"test"``.
        batch_size (int): rows per batch on each rank.
        device (torch.device): where the model runs.
        train_means (Dict[str, float]): per label, its train mean (the constant baselines).
        num_workers (int): reader processes. Default: 0.
        gauc_group (Optional[str]): GAUC groups rows by this sparse feature's id when the
            prepared data has it with one id per row (``train.gauc_group``, user_id); else no
            GAUC. Default: None.

    Returns:
        Dict[str, float]: ``<task>/<metric>`` values, the losses, baselines and ``rows``.

    Raises:
        DataError: the split has no rows (data prepared for a refit has no validation rows):
            its metrics would be zeros, not measurements.
    """
    reader = ShardReader(
        data_dir, split, batch_size=batch_size, even_batches=True, empty_keys=model_loop_keys(model)
    )
    if reader.total_rows == 0:
        raise DataError(
            f"split '{split}' has no rows to evaluate",
            file=str(Path(data_dir) / "schema.json"),
            expected="a split with rows (data prepared with split.val_fraction 0 has no 'val')",
        )
    grouping = gauc_group if groups_gauc(reader.schema, gauc_group) else None
    # exact rank metrics over compact columns, torchrec's sums as lifetime states: a few bytes a
    # row per task (no torchrec AUC window as large as the split)
    metrics = TaskMetrics(tasks, batch_size, device, gauc_group=grouping)
    sums = LossAndBaselines(tasks, train_means, device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cuda = device.type == "cuda"
        for batch in make_loader(reader, num_workers=num_workers, pin_memory=cuda):
            batch = batch.to(device, non_blocking=cuda)
            _, (_, predictions, labels, weights) = model(batch)
            metrics.update(predictions, labels, weights, groups=batch.sparse_features if grouping else None)
            sums.update(predictions, labels, weights)
    model.train(was_training)
    out = metrics.compute()
    del metrics  # its columns go now, before the caller's next step
    out.update(sums.compute())
    return out
