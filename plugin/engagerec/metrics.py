"""Per-task metrics with torchrec.metrics, plus exact XAUC, GAUC, the losses and constant baselines.

regression tasks: MSE, MAE; in evaluation also XAUC, exact over the whole split (ExactXAUC)
binary tasks:     AUC, accuracy (threshold 0.5), NE, calibration, log loss; in evaluation also
                  GAUC, the AUC per group (user) weighted by its rows (GroupedAUC)

``TaskMetrics`` is the one call that builds them from the tasks, for engagerec's trainer and for
a TorchRec user's own loop alike, and names every value ``<task>/<metric>``.

torchrec's own XAUC is left out: it compares every pair within each batch, so it costs
O(batch^2) per step (it dominated training time at batch 4096) and its value depends on the
batch size and the world size.

Every task is weighted by its own row weights (``Batch.label_weights``: 0 for lock-step
padding rows and where that task's label is missing) and reduced across ranks, so a 2-rank
evaluation of a split equals a 1-rank evaluation of it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engagerec.config import TaskConfig
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
        rec_tasks=list(infos.values()),
        rec_metrics=metrics,
        throughput_metric=None,
        state_metrics=[],
        compute_on_all_ranks=True,  # every rank gets the values (torchrec's default: rank 0 only)
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


def grouped_auc(groups: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> float:
    """
    GAUC: the AUC within each group (e.g. each user), averaged with weights by the group's
    rows, over the groups that hold both classes (Zhou et al., "Deep Interest Network", KDD
    2018, eq. 3). Ties in prediction count one half (Mann-Whitney). O(n log n), numpy alone.

    Args:
        groups (np.ndarray): [n] integer group ids.
        predictions (np.ndarray): [n] scores.
        labels (np.ndarray): [n] 0/1 labels (a label above 0.5 is positive).

    Returns:
        float: GAUC in [0, 1]; NaN when no group holds both classes.

    Example::

        >>> import numpy as np
        >>> from engagerec.metrics import grouped_auc
        >>> groups = np.array([7, 7, 7, 9, 9, 5])  # user 5 has one class only: left out
        >>> scores = np.array([0.9, 0.2, 0.4, 0.3, 0.6, 0.1])
        >>> labels = np.array([1, 0, 1, 1, 0, 1])
        >>> grouped_auc(groups, scores, labels)  # (3 rows * AUC 1 + 2 rows * AUC 0) / 5
        0.6
    """
    g = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    x = np.asarray(predictions, dtype=np.float64)
    positive = np.asarray(labels, dtype=np.float64) > 0.5
    order = np.lexsort((x, g))
    g, x, positive = g[order], x[order], positive[order]
    n = len(g)
    # runs of equal (group, prediction) share their average position
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (x[1:] != x[:-1])
    run = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], n)
    average_position = ((starts + ends - 1) / 2)[run]
    group_start = np.searchsorted(g, g, side="left")
    rank = average_position - group_start + 1  # 1-based rank within the group
    rows = np.bincount(g).astype(np.float64)
    positives = np.bincount(g, weights=positive).astype(np.float64)
    negatives = rows - positives
    rank_sum = np.bincount(g, weights=rank * positive)
    both = (positives > 0) & (negatives > 0)
    if not both.any():
        return float("nan")
    auc = (rank_sum[both] - positives[both] * (positives[both] + 1) / 2) / (positives[both] * negatives[both])
    return float((rows[both] * auc).sum() / rows[both].sum())


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """
    ROC AUC (Mann-Whitney, ties one half): ``grouped_auc`` with every row in one group.

    Args:
        scores (np.ndarray): [n] scores.
        labels (np.ndarray): [n] 0/1 labels.

    Returns:
        float: the AUC; NaN with one class only.

    Example::

        >>> import numpy as np
        >>> from engagerec.metrics import binary_auc
        >>> binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    return grouped_auc(np.zeros(len(scores), dtype=np.int64), scores, labels)


def gather_rows(array: np.ndarray) -> np.ndarray:
    """
    Every rank's rows of ``array`` ([n, ...], any numeric dtype), concatenated in rank order: one
    all_gather of the row counts and one of the padded tensors, no pickling (memory stays a
    few bytes per row). A collective: every rank calls it. Without a process group of several
    ranks it returns ``array``.

    Args:
        array (np.ndarray): this rank's rows.

    Returns:
        np.ndarray: the rows of every rank.

    Example::

        >>> import numpy as np
        >>> from engagerec.metrics import gather_rows
        >>> gather_rows(np.arange(3, dtype=np.float32))  # one process: its own rows
        array([0., 1., 2.], dtype=float32)
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return array
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    local = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.int64, device=device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)]).cpu().numpy()


class _KeptRows:
    """Per task, the rows of a split with a non-zero weight, each column in its own dtype (float32
    predictions and labels, int64 group ids: 8 or 16 bytes a row; an exact rank metric must see
    every row), gathered across ranks."""

    def __init__(self, names: List[str], dtypes: List[np.dtype]) -> None:
        self.dtypes = dtypes
        self.parts: Dict[str, List[List[np.ndarray]]] = {name: [] for name in names}

    def keep(self, name: str, keep: torch.Tensor, *columns: torch.Tensor) -> None:
        kept = [
            c[keep].detach().cpu().numpy().astype(d, copy=False)
            for c, d in zip(columns, self.dtypes, strict=True)
        ]
        self.parts[name].append(kept)

    def gathered(self, name: str) -> List[np.ndarray]:
        parts = self.parts[name]
        return [
            gather_rows(np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dtype=dtype))
            for i, dtype in enumerate(self.dtypes)
        ]


class ExactXAUC:
    """
    XAUC of every regression task over a whole evaluation split, on any number of ranks.

    Keeps the (prediction, label) of every row with a non-zero weight (weights are 0 or 1 here:
    padding and missing labels are 0; O(rows) memory, as an exact rank metric must), gathers
    them from every rank in ``compute``, and scores them with ``exact_xauc``: the value does not
    depend on the batch size or the world size.

    Args:
        tasks (List[Task]): the model's tasks; the regression ones are scored.

    Example::

        >>> import torch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.metrics import ExactXAUC
        >>> from engagerec.tasks import Task
        >>> xauc = ExactXAUC([Task(TaskConfig("ratio", "ratio"))])
        >>> xauc.update({"ratio": torch.tensor([0.1, 0.5, 0.3])}, {"ratio": torch.tensor([0.0, 1.0, 0.5])},
        ...             {"ratio": torch.ones(3)})
        >>> xauc.compute()
        {'ratio/xauc': 1.0}
    """

    def __init__(self, tasks: List[Task]) -> None:
        self.tasks = [task for task in tasks if task.kind == "regression"]
        self.rows = _KeptRows([task.name for task in self.tasks], [np.float32, np.float32])

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
    ) -> None:
        """Keep this batch's rows with a non-zero weight."""
        for task in self.tasks:
            keep = weights[task.name] > 0
            self.rows.keep(task.name, keep, predictions[task.name], labels[task.name])

    def compute(self) -> Dict[str, float]:
        """``{"<task>/xauc": value}``; a collective: every rank calls it and gets the same values."""
        out = {}
        for task in self.tasks:
            predictions, labels = self.rows.gathered(task.name)
            out[f"{task.name}/xauc"] = exact_xauc(predictions, labels) if len(labels) > 1 else float("nan")
        return out


class GroupedAUC:
    """
    GAUC of every binary task over a whole evaluation split, on any number of ranks: keeps the
    (group, prediction, label) of every row with a non-zero weight, gathers them in
    ``compute`` and scores them with ``grouped_auc``.

    Args:
        tasks (List[Task]): the model's tasks; the binary ones are scored.

    Example::

        >>> import torch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.metrics import GroupedAUC
        >>> from engagerec.tasks import Task
        >>> gauc = GroupedAUC([Task(TaskConfig("skip", "skip", kind="binary"))])
        >>> scores, labels = torch.tensor([0.9, 0.2, 0.4, 0.7]), torch.tensor([1.0, 0.0, 0.0, 1.0])
        >>> users = torch.tensor([3, 3, 8, 8])
        >>> gauc.update({"skip": scores}, {"skip": labels}, {"skip": torch.ones(4)}, groups=users)
        >>> gauc.compute()
        {'skip/gauc': 1.0}
    """

    def __init__(self, tasks: List[Task]) -> None:
        self.tasks = [task for task in tasks if task.kind == "binary"]
        self.rows = _KeptRows([task.name for task in self.tasks], [np.int64, np.float32, np.float32])

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
        groups: torch.Tensor,
    ) -> None:
        """Keep this batch's rows with a non-zero weight, with their group ids ([B])."""
        for task in self.tasks:
            keep = weights[task.name] > 0
            self.rows.keep(task.name, keep, groups, predictions[task.name], labels[task.name])

    def compute(self) -> Dict[str, float]:
        """``{"<task>/gauc": value}``; a collective: every rank calls it and gets the same values."""
        out = {}
        for task in self.tasks:
            groups, predictions, labels = self.rows.gathered(task.name)
            out[f"{task.name}/gauc"] = (
                grouped_auc(groups, predictions, labels) if len(labels) else float("nan")
            )
        return out


def group_ids(groups: Union[torch.Tensor, KeyedJaggedTensor], feature: Optional[str]) -> torch.Tensor:
    """
    [B] group ids: ``groups`` itself, or the ids of ``feature`` in a KeyedJaggedTensor, which must
    hold exactly one id per row.

    Args:
        groups (Union[torch.Tensor, KeyedJaggedTensor]): [B] ids, or the batch's sparse features.
        feature (Optional[str]): the KJT's feature holding the group id.

    Returns:
        torch.Tensor: [B] int64.

    Raises:
        ValueError: the feature is missing, or some row has no or several ids.

    Example::

        >>> import torch
        >>> from torchrec import KeyedJaggedTensor
        >>> from engagerec.metrics import group_ids
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([4, 4, 9, 1, 2]),
        ...                                           torch.tensor([1, 1, 1, 2, 0, 1]))
        >>> group_ids(kjt, "user")
        tensor([4, 4, 9])
    """
    if not isinstance(groups, KeyedJaggedTensor):
        return groups.reshape(-1).long()
    if feature not in groups.keys():
        raise ValueError(
            f"GAUC groups by '{feature}', which is not a sparse feature of the batch ({groups.keys()})"
        )
    ids = groups[feature]
    if not bool((ids.lengths() == 1).all()):
        raise ValueError(f"GAUC groups by '{feature}', which must hold exactly one id per row")
    return ids.values().long()


class TaskMetrics:
    """
    Every task's metrics, built from the tasks in one call, for engagerec's trainer and for a
    TorchRec user's own loop alike; values named ``<task>/<metric>`` (``dwell/mse``, ``click/auc``):

    - torchrec's RecMetricModule with one RecTaskInfo per task (regression: MSE, MAE; binary:
      AUC, accuracy, NE, calibration), windowed, reduced across ranks;
    - with ``exact=True`` (evaluation), the exact XAUC of every regression task over all rows;
    - with ``gauc_group``, the GAUC of every binary task, grouped by that id.

    Rows count with their per-task weight (0: padding or a missing label), so 2 ranks give what
    1 rank gives on the same rows (XAUC and GAUC exactly; the RecMetricModule's as torchrec reduces).

    Args:
        tasks (Sequence[Union[Task, TaskConfig]]): the model's tasks (``model.tasks``).
        batch_size (int): rows per ``update`` on each rank.
        device (Optional[torch.device]): where the RecMetricModule's states live. Default: CPU.
        window_size (int): rows (all ranks) in the RecMetricModule's window. Default: 100,000.
        exact (bool): also keep the exact XAUC (O(rows) memory). Default: True.
        gauc_group (Optional[str]): the sparse feature whose id groups rows for GAUC when
            ``update`` gets the batch's KJT (a [B] tensor may be given instead). Default: None.
        process_group (Optional[dist.ProcessGroup]): for the RecMetricModule. Default: the world.

    Example::

        >>> import torch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.metrics import TaskMetrics
        >>> tasks = [TaskConfig("dwell", "dwell", output="identity"), TaskConfig("click", "click", "binary")]
        >>> metrics = TaskMetrics(tasks, batch_size=4, gauc_group="user")
        >>> predictions = {"dwell": torch.tensor([1.0, 2, 3, 4]), "click": torch.tensor([0.9, 0.1, 0.8, 0.3])}
        >>> labels = {"dwell": torch.tensor([1.0, 3.0, 2.0, 5.0]), "click": torch.tensor([1.0, 0, 0, 1])}
        >>> weights = {name: torch.ones(4) for name in labels}
        >>> metrics.update(predictions, labels, weights, groups=torch.tensor([1, 1, 2, 2]))
        >>> values = metrics.compute()
        >>> values["dwell/mse"], values["dwell/xauc"], values["click/auc"], values["click/gauc"]
        (0.75, 0.8333333333333334, 0.75, 0.5)
    """

    def __init__(
        self,
        tasks: Sequence[Union[Task, TaskConfig]],
        batch_size: int,
        device: Optional[torch.device] = None,
        window_size: int = 100_000,
        exact: bool = True,
        gauc_group: Optional[str] = None,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.tasks = [task if isinstance(task, Task) else Task(task) for task in tasks]
        self.gauc_group = gauc_group
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.module = build_metric_module(
            self.tasks, batch_size, window_size, device or torch.device("cpu"), world, rank, process_group
        )
        self.xauc = ExactXAUC(self.tasks) if exact else None
        self.gauc = GroupedAUC(self.tasks) if gauc_group is not None else None

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
        groups: Union[torch.Tensor, KeyedJaggedTensor, None] = None,
    ) -> None:
        """
        Add one batch: the model's ``(predictions, labels, weights)`` dicts by task name.

        Args:
            predictions (Dict[str, torch.Tensor]): per task, [B] predictions.
            labels (Dict[str, torch.Tensor]): per task, [B] labels.
            weights (Dict[str, torch.Tensor]): per task, [B] row weights.
            groups (Union[torch.Tensor, KeyedJaggedTensor, None]): GAUC's [B] group ids, or the
                batch's sparse features holding ``gauc_group``; needed when ``gauc_group`` is set.

        Raises:
            ValueError: GAUC is on and no groups were given (or the KJT lacks the feature).
        """
        self.module.update(metric_inputs(self.tasks, predictions, labels, weights))
        if self.xauc is not None:
            self.xauc.update(predictions, labels, weights)
        if self.gauc is not None:
            if groups is None:
                raise ValueError(f"GAUC groups by '{self.gauc_group}': pass groups= (ids or the batch's KJT)")
            self.gauc.update(predictions, labels, weights, group_ids(groups, self.gauc_group))

    def compute(self) -> Dict[str, float]:
        """Every metric so far, ``{"<task>/<metric>": value}``; a collective under torchrun."""
        out = readable(self.module.compute())
        if self.xauc is not None:
            out.update(self.xauc.compute())
        if self.gauc is not None:
            out.update(self.gauc.compute())
        return out
