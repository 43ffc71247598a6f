"""Per-task metrics with torchrec.metrics, plus the losses and constant baselines beside them.

regression tasks: MSE, MAE; in evaluation also XAUC, exact over the whole split (ExactXAUC)
binary tasks:     AUC, accuracy (threshold 0.5), NE, calibration, log loss

torchrec's own XAUC is left out: it compares every pair within each batch, so it costs
O(batch^2) per step (it dominated training time at batch 4096) and its value depends on the
batch size and the world size.

Every task is weighted by its own row weights (``Batch.label_weights``: 0 for lock-step
padding rows and where that task's label is missing) and reduced across ranks, so a 2-rank
evaluation of a split equals a 1-rank evaluation of it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo

from engagerec.tasks import Task
from engagerec.xauc import exact_xauc

REGRESSION_METRICS = (RecMetricEnum.MSE, RecMetricEnum.MAE)
BINARY_METRICS = (RecMetricEnum.AUC, RecMetricEnum.ACCURACY, RecMetricEnum.NE, RecMetricEnum.CALIBRATION)


def _task_info(task: Task) -> RecTaskInfo:
    return RecTaskInfo(
        name=task.name,
        label_name=f"{task.name}_label",
        prediction_name=f"{task.name}_prediction",
        weight_name=f"{task.name}_weight",
    )


def build_metric_module(
    tasks: List[Task],
    batch_size: int,
    window_size: int,
    device: torch.device,
    world_size: int = 1,
    rank: int = 0,
    process_group: Optional[dist.ProcessGroup] = None,
) -> RecMetricModule:
    """One RecMetricModule over every task; ``window_size`` is global (all ranks) in rows."""
    infos = {task.name: _task_info(task) for task in tasks}
    metrics: Dict[RecMetricEnum, RecMetricDef] = {}
    window = max(window_size, batch_size * world_size * 2)  # torchrec: local window > batch size
    for enum in REGRESSION_METRICS + BINARY_METRICS:
        kind = "regression" if enum in REGRESSION_METRICS else "binary"
        chosen = [infos[t.name] for t in tasks if t.kind == kind]
        if chosen:
            metrics[enum] = RecMetricDef(rec_tasks=chosen, window_size=window)
    config = MetricsConfig(
        rec_tasks=list(infos.values()), rec_metrics=metrics, throughput_metric=None, state_metrics=[]
    )
    return generate_metric_module(
        RecMetricModule,
        config,
        batch_size=batch_size,
        world_size=world_size,
        my_rank=rank,
        state_metrics_mapping={},
        device=device,
        process_group=process_group,
    )


def metric_inputs(
    tasks: List[Task],
    predictions: Dict[str, torch.Tensor],
    labels: Dict[str, torch.Tensor],
    weights: Dict[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """The RecMetricModule's input dict; ``weights`` are per task (0: padding or missing label)."""
    out = {}
    for task in tasks:
        out[f"{task.name}_prediction"] = predictions[task.name]
        out[f"{task.name}_label"] = labels[task.name]
        out[f"{task.name}_weight"] = weights[task.name]
    return out


def readable(computed: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """'auc-skip|window_auc' -> 'skip/auc'; lifetime values win over window ones."""
    out: Dict[str, float] = {}
    for key, value in sorted(computed.items(), key=lambda kv: "lifetime" not in kv[0]):
        task_metric, _, name = key.partition("|")
        _, _, task = task_metric.partition("-")
        metric = name.replace("lifetime_", "").replace("window_", "")
        out.setdefault(f"{task}/{metric}", float(value))
    return out


class LossAndBaselines:
    """Weighted sums for each task's loss and for constant predictors fitted on train:
    the train mean (regression MSE) and the train majority class (binary accuracy)."""

    def __init__(self, tasks: List[Task], train_means: Dict[str, float], device: torch.device) -> None:
        self.tasks, self.train_means = tasks, train_means
        # per task: [weight, loss sum, constant's squared error or correct count]
        self.sums = torch.zeros(len(tasks), 3, dtype=torch.float64, device=device)

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
    ) -> None:
        """Add one batch to each task's sums; a row counts with its weight (0: padding or no label)."""
        for i, task in enumerate(self.tasks):
            w = weights[task.name].double()
            p, y = predictions[task.name].double(), labels[task.name].double()
            constant = self.train_means[task.label]
            if task.kind == "binary":
                loss = F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y, reduction="none")
                baseline = (y == float(constant >= 0.5)).double()
            else:
                loss = (p - y) ** 2
                baseline = (y - constant) ** 2
            self.sums[i] += torch.stack([w.sum(), (w * loss).sum(), (w * baseline).sum()])

    def compute(self) -> Dict[str, float]:
        """The weighted means over every rank so far (a collective: every rank must call it); sums are kept.

        Returns:
            Dict[str, float]: per task ``<task>/log_loss`` (binary) or ``<task>/mse_loss``, and
            the constant predictor's ``<task>/baseline_accuracy_majority`` or
            ``<task>/baseline_mse_train_mean``; ``loss``, the task-weighted sum of these losses (what
            training minimises, except for a regression task trained with cross-entropy, which
            is scored here by its MSE like any regression task); ``rows``, the total weight of
            the task with the most labelled rows.
        """
        sums = self.sums.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        out, total = {}, 0.0
        for i, task in enumerate(self.tasks):
            weight, loss, baseline = sums[i].tolist()
            weight = max(weight, 1e-12)
            name = "log_loss" if task.kind == "binary" else "mse_loss"
            out[f"{task.name}/{name}"] = loss / weight
            out[
                f"{task.name}/baseline_{'accuracy_majority' if task.kind == 'binary' else 'mse_train_mean'}"
            ] = baseline / weight
            total += task.weight * loss / weight
        out["loss"] = total
        out["rows"] = sums[:, 0].max().item()  # rows with a label for at least the fullest task
        return out


class ExactXAUC:
    """XAUC of every regression task over a whole evaluation split, on any number of ranks.

    Keeps the (prediction, label) of every row with a non-zero weight (weights are 0 or 1 here:
    padding and missing labels are 0; O(rows) memory, as an exact AUC must), gathers them from
    every rank in ``compute``, and scores them with ``exact_xauc``: the value does not depend on
    the batch size or the world size.

    Args:
        tasks: the model's tasks; the regression ones are scored.
    """

    def __init__(self, tasks: List[Task]) -> None:
        self.tasks = [task for task in tasks if task.kind == "regression"]
        self.parts: Dict[str, List[np.ndarray]] = {task.name: [] for task in self.tasks}

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
    ) -> None:
        """Keep this batch's rows with a non-zero weight."""
        for task in self.tasks:
            keep = weights[task.name] > 0
            pair = torch.stack([predictions[task.name][keep], labels[task.name][keep]], dim=1)
            self.parts[task.name].append(pair.double().cpu().numpy())

    def compute(self) -> Dict[str, float]:
        """``{"<task>/xauc": value}``; a collective: every rank calls it and gets the same values."""
        out = {}
        for task in self.tasks:
            rows = np.concatenate(self.parts[task.name]) if self.parts[task.name] else np.zeros((0, 2))
            if dist.is_initialized() and dist.get_world_size() > 1:
                gathered: List[np.ndarray] = [None] * dist.get_world_size()  # type: ignore[list-item]
                dist.all_gather_object(gathered, rows)
                rows = np.concatenate(gathered)
            out[f"{task.name}/xauc"] = exact_xauc(rows[:, 0], rows[:, 1]) if len(rows) > 1 else float("nan")
        return out
