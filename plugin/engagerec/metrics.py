"""Per-task metrics with torchrec.metrics, plus exact XAUC, GAUC, the losses and constant baselines.

regression tasks: MSE, MAE; in evaluation also XAUC, exact over the whole split (ExactXAUC)
binary tasks:     AUC, accuracy (threshold 0.5), NE, calibration, log loss; in evaluation also
                  GAUC, the AUC per group (user) weighted by its rows (ExactAUC)

Evaluation's memory is a few bytes per row per task, whatever the split's size: the sums
(MSE, MAE, NE, accuracy, calibration) are torchrec's O(1) lifetime states, and the rank metrics
(AUC, GAUC, XAUC) keep compact numpy columns (float32 prediction, uint8 or float32 label, int32
group id: 5 to 9 bytes a row per task) instead of torchrec's AUC window, which holds the whole
split as float32 (prediction, label, weight) per task and copies it again to sort it
(benchmarks/eval_memory.py measures both).

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

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engagerec.config import TaskConfig
from engagerec.tasks import Task
from engagerec.xauc import dense_ranks, exact_xauc

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
    auc: bool = True,
) -> RecMetricModule:
    """One RecMetricModule over every task; ``window_size`` is global (all ranks) in rows.
    ``auc=False`` leaves torchrec's AUC out (its window holds every row: evaluation scores AUC
    with ExactAUC instead); the other metrics' lifetime states are O(1)."""
    infos = {task.name: _task_info(task) for task in tasks}
    metrics: Dict[RecMetricEnum, RecMetricDef] = {}
    window = max(window_size, batch_size * world_size * 2)  # torchrec: local window > batch size
    for enum in REGRESSION_METRICS + BINARY_METRICS:
        if enum == RecMetricEnum.AUC and not auc:
            continue
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


AUC_BLOCK_ROWS = 1 << 17  # sorted rows the AUC kernel scans at a time: bounds its transient memory
_ONE, _SCORE_BITS = np.uint64(1), np.uint64(32)


def _score_codes(scores: np.ndarray) -> np.ndarray:
    """uint32 codes that order as ``scores`` do: a float32's bits rearranged (-0.0 and 0.0 equal),
    or, for wider types, the rank among the distinct values (float64 scores stay apart)."""
    scores = np.asarray(scores)
    if scores.dtype.itemsize > 4 or scores.dtype.kind not in "fiu":
        return dense_ranks(scores)[0].astype(np.uint32)
    bits = np.add(scores, 0.0, dtype=np.float32).view(np.uint32)  # one copy; -0.0 + 0.0 is 0.0
    negative = bits >= np.uint32(0x80000000)
    # a negative float sorts backwards by its bits: flip them all; a positive one: set the sign bit
    np.invert(bits, out=bits, where=negative)
    np.bitwise_or(bits, np.uint32(0x80000000), out=bits, where=~negative)
    return bits


def _group_codes(groups: np.ndarray) -> np.ndarray:
    """Group ids as codes in [0, 2^31) that keep them apart: the ids themselves when they fit
    (user ids, embedding rows), else their rank among the distinct ids (hashed 64-bit ids)."""
    groups = np.asarray(groups)
    if len(groups) == 0 or (groups.min() >= 0 and groups.max() < 2**31):
        return groups
    return dense_ranks(groups)[0]


def _starts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values in ``keys`` begins."""
    new = np.empty(len(keys), dtype=bool)
    new[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    return np.flatnonzero(new)


def auc_sums(
    groups: Optional[np.ndarray],
    scores: np.ndarray,
    labels: np.ndarray,
    weights: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    Per group, in ascending order of id: rows, positive weight, negative weight, and the
    Mann-Whitney sum (for each positive row, its weight times the negative weight scored below
    it, ties one half): a group's AUC is ``sum / (positive * negative)``.

    One uint64 key per row, ``[group: 31 bits][score: 32 bits][label: 1 bit]``, sorted in place (8
    bytes a row; a tie's negatives sort before its positives), then scanned ``AUC_BLOCK_ROWS``
    rows at a time, each block ending where a run of equal (group, score) ends, with the current
    group's negatives carried from block to block: exact, O(n log n), and some 10 bytes a row.

    Args:
        groups (Optional[np.ndarray]): [n] integer group ids; None: one group.
        scores (np.ndarray): [n] scores (float32 compared as float32; wider types exactly).
        labels (np.ndarray): [n] labels; above 0.5 is positive.
        weights (Optional[np.ndarray]): [n] row weights; None: every row weighs 1.

    Returns:
        Tuple[np.ndarray, ...]: (group codes, rows, positive, negative, Mann-Whitney sum).

    Example::

        >>> import numpy as np
        >>> from engagerec.metrics import auc_sums
        >>> _, rows, positive, negative, pairs = auc_sums(None, np.array([0.1, 0.4, 0.4, 0.8]),
        ...                                               np.array([0, 0, 1, 1]))
        >>> rows, positive, negative, pairs  # 0.4 ties one negative, beats one; 0.8 beats both
        (array([4]), array([2.]), array([2.]), array([3.5]))
    """
    n = len(scores)
    key = np.zeros(n, dtype=np.uint64)
    if groups is not None:
        key[:] = _group_codes(groups)  # cast as it is copied: no 8-byte temporary
        key <<= _SCORE_BITS
    key |= _score_codes(scores)
    key <<= _ONE
    key |= np.asarray(labels) > 0.5
    w = None
    if weights is None:
        key.sort()
    else:  # the weights follow the sort
        order = np.argsort(key)
        key, w = key[order], np.asarray(weights, dtype=np.float64)[order]
        del order
    parts: List[Tuple[np.ndarray, ...]] = []
    carry_group, carry_negative = -1, 0.0  # the last group scanned, its negative weight so far
    lo = 0
    while lo < n:
        hi = min(lo + AUC_BLOCK_ROWS, n)
        if hi < n:  # end the block with its last run of equal (group, score)
            hi = int(np.searchsorted(key, ((key[hi - 1] >> _ONE) + _ONE) << _ONE)) or n
        run_key = key[lo:hi] >> _ONE
        starts = _starts(run_key)
        weight = np.ones(hi - lo) if w is None else w[lo:hi]
        pos = np.add.reduceat((key[lo:hi] & _ONE) * weight, starts)
        neg = np.add.reduceat(weight, starts) - pos
        rows = np.diff(np.append(starts, hi - lo))
        group = (run_key[starts] >> _SCORE_BITS).astype(np.int64)
        del run_key, weight
        # the negatives below each run in its group: the block's exclusive prefix sum, restarted
        # at the group's first run, plus what earlier blocks saw of the group
        below = np.cumsum(neg) - neg
        below -= below[np.searchsorted(group, group, side="left")]
        below[group == carry_group] += carry_negative
        edges = _starts(group)
        sums = [np.add.reduceat(x, edges) for x in (rows, pos, neg, pos * (below + 0.5 * neg))]
        parts.append((group[edges], *sums))
        last = int(group[-1])
        carry_negative = (carry_negative if last == carry_group else 0.0) + float(neg[group == last].sum())
        carry_group, lo = last, hi
    del key, w
    if not parts:
        return tuple(np.zeros(0) for _ in range(5))  # type: ignore[return-value]
    ids, *columns = (np.concatenate(column) for column in zip(*parts, strict=True))
    edges = _starts(ids)  # a group that spans blocks is summed once
    return (ids[edges], *(np.add.reduceat(column, edges) for column in columns))  # type: ignore[return-value]


def grouped_auc(groups: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> float:
    """
    GAUC: the AUC within each group (e.g. each user), averaged with weights by the group's
    rows, over the groups that hold both classes (Zhou et al., "Deep Interest Network", KDD
    2018, eq. 3). Ties in prediction count one half (Mann-Whitney). O(n log n), numpy alone,
    some 10 bytes a row (``auc_sums``).

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
    _, rows, positive, negative, pairs = auc_sums(groups, predictions, labels)
    both = (positive > 0) & (negative > 0)
    if not both.any():
        return float("nan")
    auc = pairs[both] / (positive[both] * negative[both])
    return float((rows[both] * auc).sum() / rows[both].sum())


def binary_auc(scores: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """
    ROC AUC (Mann-Whitney, ties one half), exact, with optional row weights.

    Args:
        scores (np.ndarray): [n] scores.
        labels (np.ndarray): [n] 0/1 labels.
        weights (Optional[np.ndarray]): [n] row weights. Default: every row weighs 1.

    Returns:
        float: the AUC; NaN with one class only.

    Example::

        >>> import numpy as np
        >>> from engagerec.metrics import binary_auc
        >>> binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    _, _, positive, negative, pairs = auc_sums(None, scores, labels, weights)
    if not (len(pairs) and positive[0] > 0 and negative[0] > 0):
        return float("nan")
    return float(pairs[0] / (positive[0] * negative[0]))


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
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    del local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    del padded
    out = np.empty((sum(sizes), *array.shape[1:]), dtype=array.dtype)
    at = 0
    for i, size in enumerate(sizes):  # each part copied out and dropped: no second full copy
        out[at : at + size] = parts[i][:size].cpu().numpy()
        parts[i] = None  # type: ignore[call-overload]
        at += size
    return out


class _Column:
    """A growing 1-D numpy array kept in blocks of ``BLOCK`` rows: no copy as it grows, no
    per-batch objects, one contiguous copy when read."""

    BLOCK = 1 << 20

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.blocks: List[np.ndarray] = []
        self.rows = 0

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if (
            values.dtype.kind in "iu"
            and self.dtype.kind in "iu"
            and not np.can_cast(values.dtype, self.dtype)
        ):
            info = np.iinfo(self.dtype)
            if len(values) and (values.min() < info.min or values.max() > info.max):
                self.widen(np.int64)  # ids past int32 (hashed ids): every row widens once
        done = 0
        while done < len(values):
            at = self.rows % self.BLOCK
            if at == 0:
                self.blocks.append(np.empty(self.BLOCK, dtype=self.dtype))
            take = min(self.BLOCK - at, len(values) - done)
            self.blocks[-1][at : at + take] = values[done : done + take]
            done += take
            self.rows += take

    def widen(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.blocks = [block.astype(self.dtype) for block in self.blocks]

    def values(self) -> np.ndarray:
        if not self.blocks:
            return np.zeros(0, dtype=self.dtype)
        filled = self.rows - (len(self.blocks) - 1) * self.BLOCK  # the last block's rows
        return np.concatenate([*self.blocks[:-1], self.blocks[-1][:filled]])

    def fill(self, value: float) -> "_Column":
        """A column of ``value`` as long as this one (a weight column started late)."""
        other = _Column(np.float32)
        for lo in range(0, self.rows, self.BLOCK):
            other.append(np.full(min(self.BLOCK, self.rows - lo), value, dtype=np.float32))
        return other


class _TaskRows:
    """Per task, the rows with a non-zero weight as compact columns (``name -> dtype``), and a
    float32 weight column only once a weight other than 1 arrives (engagerec's are 0 or 1)."""

    def __init__(self, names: List[str], columns: Dict[str, np.dtype]) -> None:
        self.columns = {name: {c: _Column(d) for c, d in columns.items()} for name in names}
        self.weights: Dict[str, Optional[_Column]] = {name: None for name in names}

    def keep(self, name: str, weights: torch.Tensor, **values: torch.Tensor) -> None:
        # numpy views of CPU tensors, copied once into the columns; rows are masked only in a
        # batch that has rows of weight 0 (padding, missing labels): no per-batch temporaries
        w = weights.detach().cpu().numpy()
        keep = w > 0
        every = bool(keep.all())
        kept = w if every else w[keep]
        columns = self.columns[name]
        if self.weights[name] is None and bool((kept != 1).any()):
            self.weights[name] = next(iter(columns.values())).fill(1.0)
        if self.weights[name] is not None:
            self.weights[name].append(kept)
        for column, value in values.items():  # the column casts (and widens ids that need it)
            array = value.detach().cpu().numpy()
            columns[column].append(array if every else array[keep])

    def gathered(self, name: str) -> Dict[str, Optional[np.ndarray]]:
        """Every rank's rows of ``name``'s columns (and weights: None where every row weighs 1
        on every rank); a collective."""
        out: Dict[str, Optional[np.ndarray]] = {}
        for column, values in self.columns[name].items():
            if values.dtype.kind in "iu":  # every rank widens its ids as any rank had to
                wide = torch.tensor([values.dtype.itemsize], device=_device())
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.all_reduce(wide, op=dist.ReduceOp.MAX)
                if int(wide) > values.dtype.itemsize:
                    values.widen(np.int64)
            out[column] = gather_rows(values.values())
        weighted = torch.tensor([float(self.weights[name] is not None)], device=_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(weighted, op=dist.ReduceOp.MAX)
        if float(weighted) > 0:
            mine = self.weights[name]
            length = next(iter(self.columns[name].values())).rows
            out["weight"] = gather_rows(mine.values() if mine is not None else np.ones(length, np.float32))
        else:
            out["weight"] = None
        return out


def _device() -> Optional[torch.device]:
    """Where collectives' tensors live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


class ExactXAUC:
    """
    XAUC of every regression task over a whole evaluation split, on any number of ranks.

    Keeps the (prediction, label) of every row with a non-zero weight as float32 columns (8 bytes
    a row; an exact rank metric must see every row; weights count as 0 or 1 here), gathers them
    from every rank in ``compute``, and scores them with ``exact_xauc`` (some 30 bytes a row while
    it runs): the value does not depend on the batch size or the world size.

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
        self.rows = _TaskRows(
            [task.name for task in self.tasks], {"prediction": np.float32, "label": np.float32}
        )

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
    ) -> None:
        """Keep this batch's rows with a non-zero weight."""
        for task in self.tasks:
            self.rows.keep(
                task.name, weights[task.name].ne(0).float(), prediction=predictions[task.name],
                label=labels[task.name],
            )  # fmt: skip

    def compute(self) -> Dict[str, float]:
        """``{"<task>/xauc": value}``; a collective: every rank calls it and gets the same values."""
        out = {}
        for task in self.tasks:
            rows = self.rows.gathered(task.name)
            predictions, labels = rows["prediction"], rows["label"]
            out[f"{task.name}/xauc"] = exact_xauc(predictions, labels) if len(labels) > 1 else float("nan")
            del rows, predictions, labels  # one task's rows at a time
        return out


class ExactAUC:
    """
    AUC of every binary task over a whole evaluation split, exact (Mann-Whitney, ties one half,
    with the rows' weights), and with ``grouped=True`` its GAUC as well: the AUC within each group
    (user), weighted by the group's rows, over the groups holding both classes.

    Keeps, per task, the rows with a non-zero weight as compact columns: float32 prediction,
    uint8 label, int32 group id (int64 once an id does not fit) and a float32 weight only where
    a weight is not 1: 5 bytes a row, 9 with groups; gathers them from every rank in ``compute``
    without pickling, and scores them with ``auc_sums`` (some 10 bytes a row while it runs). This
    replaces torchrec's window AUC in evaluation, whose window would hold the whole split.

    Args:
        tasks (List[Task]): the model's tasks; the binary ones are scored.
        grouped (bool): also GAUC; ``update`` then needs ``groups``. Default: False.

    Example::

        >>> import torch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.metrics import ExactAUC
        >>> from engagerec.tasks import Task
        >>> auc = ExactAUC([Task(TaskConfig("skip", "skip", kind="binary"))], grouped=True)
        >>> scores, labels = torch.tensor([0.9, 0.2, 0.4, 0.7]), torch.tensor([1.0, 0.0, 0.0, 1.0])
        >>> users = torch.tensor([3, 3, 8, 8])
        >>> auc.update({"skip": scores}, {"skip": labels}, {"skip": torch.ones(4)}, groups=users)
        >>> auc.compute()
        {'skip/auc': 1.0, 'skip/gauc': 1.0}
    """

    def __init__(self, tasks: List[Task], grouped: bool = False) -> None:
        self.tasks = [task for task in tasks if task.kind == "binary"]
        self.grouped = grouped
        columns = {"prediction": np.float32, "label": np.uint8}
        if grouped:
            columns["group"] = np.int32
        self.rows = _TaskRows([task.name for task in self.tasks], columns)

    def update(
        self,
        predictions: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: Dict[str, torch.Tensor],
        groups: Optional[torch.Tensor] = None,
    ) -> None:
        """Keep this batch's rows with a non-zero weight (with their [B] group ids when grouped)."""
        for task in self.tasks:
            extra = {"group": groups} if self.grouped else {}
            self.rows.keep(
                task.name, weights[task.name], prediction=predictions[task.name],
                label=labels[task.name] > 0.5, **extra,
            )  # fmt: skip

    def compute(self) -> Dict[str, float]:
        """``{"<task>/auc": value}`` (and ``"<task>/gauc"``); a collective: every rank calls it
        and gets the same values."""
        out = {}
        for task in self.tasks:
            rows = self.rows.gathered(task.name)
            out[f"{task.name}/auc"] = binary_auc(rows["prediction"], rows["label"], rows["weight"])
            if self.grouped:
                group = rows.pop("group")
                out[f"{task.name}/gauc"] = (
                    grouped_auc(group, rows["prediction"], rows["label"]) if len(group) else float("nan")
                )
            del rows  # one task's rows at a time
        return out


class GroupedAUC(ExactAUC):
    """
    GAUC of every binary task over a whole evaluation split, on any number of ranks: ``ExactAUC``
    with groups, reporting the GAUC alone.

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
        super().__init__(tasks, grouped=True)

    def compute(self) -> Dict[str, float]:
        """``{"<task>/gauc": value}``; a collective."""
        return {k: v for k, v in super().compute().items() if k.endswith("/gauc")}


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
    - with ``exact=True`` (evaluation), over all rows: the exact XAUC of every regression task and
      the exact AUC of every binary task (ExactAUC, in place of torchrec's window AUC, whose
      window would hold the split); the sums (MSE, MAE, NE, ...) are torchrec's lifetime values.
      Memory: 8 bytes a row per regression task, 5 per binary task (9 with GAUC);
    - with ``gauc_group``, the GAUC of every binary task, grouped by that id.

    Rows count with their per-task weight (0: padding or a missing label), so 2 ranks give what
    1 rank gives on the same rows (XAUC and GAUC exactly; the RecMetricModule's as torchrec reduces).

    Args:
        tasks (Sequence[Union[Task, TaskConfig]]): the model's tasks (``model.tasks``).
        batch_size (int): rows per ``update`` on each rank.
        device (Optional[torch.device]): where the RecMetricModule's states live. Default: CPU.
        window_size (int): rows (all ranks) in the RecMetricModule's window. Default: 100,000.
        exact (bool): the exact XAUC and AUC over every row (a few bytes a row). Default: True.
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
            self.tasks, batch_size, window_size, device or torch.device("cpu"), world, rank, process_group,
            auc=not exact,
        )  # fmt: skip
        self.xauc = ExactXAUC(self.tasks) if exact else None
        # one store serves AUC and GAUC: the GAUC alone when the AUC is torchrec's (exact=False)
        grouped = gauc_group is not None
        self.auc: Optional[ExactAUC] = None
        if exact:
            self.auc = ExactAUC(self.tasks, grouped=grouped)
        elif grouped:
            self.auc = GroupedAUC(self.tasks)

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
        if self.auc is not None:
            ids = None
            if self.gauc_group is not None:
                if groups is None:
                    raise ValueError(
                        f"GAUC groups by '{self.gauc_group}': pass groups= (ids or the batch's KJT)"
                    )
                ids = group_ids(groups, self.gauc_group)
            self.auc.update(predictions, labels, weights, ids)

    def compute(self) -> Dict[str, float]:
        """Every metric so far, ``{"<task>/<metric>": value}``; a collective under torchrun."""
        out = readable(self.module.compute())
        if self.xauc is not None:
            out.update(self.xauc.compute())
        if self.auc is not None:
            out.update(self.auc.compute())
        return out
