"""MultiTaskModel: the multi-task over-arch around the caller's embedding module.

The caller's EmbeddingBagCollection (or any module mapping a KJT to a KeyedTensor) pools the
sparse features; the chosen pooled features and the dense features are concatenated into the
tower input; the tower makes one representation per task and each task's head predicts it.
``forward(batch) -> (loss, (task_losses, predictions, labels, weights))``: the shape TorchRec's
train pipelines expect, for engagerec's ``Batch`` and ``torchrec.datasets.utils.Batch`` alike.
The KJT goes into the embedding module untouched (the pipeline overlaps its input
distribution with compute only if nothing reads it first), and the tower's list output is
indexed with concrete ints, so the forward FX-traces with the column order, tower and heads as
leaves and the label reading as one wrapped call (``task_labels``), as TorchRec's pipelines
trace it whatever the sharding.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedTensor

from engagerec.config import TaskConfig
from engagerec.losses import FixedWeighting
from engagerec.tasks import Task

# (loss, (task losses, predictions, labels, per-task row weights)), dicts keyed by task name
ModelOutput = Tuple[
    torch.Tensor,
    Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]],
]


class PooledByName(nn.Module):
    """
    The pooled embeddings as [B, sum of widths], features in ``names`` order, whatever order
    the (sharded) collection returns them in: the plan's, which changes with the world size;
    optionally followed by the dense features, so that the tower input is made in one copy.
    Free when the collection already returns that order (one rank, no dense features); else
    one column gather, whose blocks are worked out on the first batch of a key order and kept
    in this module, on the values' device. When no pooled column is used twice, the values need
    a gradient and the dense features do not, the backward is one copy by the inverse
    permutation, with zeros for the columns not used (a feature the model does not read, e.g.
    engagerec.embedding_backward's companions), instead of autograd's zero fill and
    scatter-add: on a 2-core CPU at the KuaiRand-1K shape the tower input and its gradient are
    the largest tensors a step copies.
    TorchRec's pipelines trace it as a leaf (it holds no sharded module). (torchrec's
    KTRegroupAsDict does the same job; on CPU it made a KuaiRand-1K-shaped training step 5x
    slower, 18.7k against 88k samples/s, so it is not used here.)

    Args:
        names (List[str]): the wanted feature order (``FeatureSpec.feature_names``).

    Call Args:
        pooled (KeyedTensor): an EmbeddingBagCollection's output, keys in any order.
        dense (Optional[torch.Tensor]): [B, dense width] columns to append. Default: None.

    Returns:
        torch.Tensor: [B, sum of the features' widths (+ dense width)].

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedTensor
        >>> from engagerec.model import PooledByName
        >>> values = torch.tensor([[1.0, 2.0, 3.0]])  # one row: a is 2 wide, b 1
        >>> pooled = KeyedTensor(keys=["a", "b"], length_per_key=[2, 1], values=values)
        >>> PooledByName(["b", "a"])(pooled)
        tensor([[3., 1., 2.]])
        >>> PooledByName(["b", "a"])(pooled, dense=torch.tensor([[9.0]]))
        tensor([[3., 1., 2., 9.]])
    """

    def __init__(self, names: List[str]) -> None:
        super().__init__()
        self.names = list(names)
        # (keys, widths, device) -> the gather: column blocks, index, inverse (None if a column repeats)
        self._gathers: Dict[Tuple, _ColumnGather] = {}

    def forward(self, pooled: KeyedTensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pooled (and dense) -> [B, sum of widths (+ dense width)] in ``names`` order."""
        keys = pooled.keys()
        values = pooled.values()
        if keys == self.names:
            return values if dense is None else torch.cat([values, dense], dim=1)
        signature = (tuple(keys), tuple(pooled.length_per_key()), values.device)
        if signature not in self._gathers:
            self._gathers[signature] = _ColumnGather.plan(
                keys, pooled.offset_per_key(), pooled.length_per_key(), self.names, values.device
            )
        gather = self._gathers[signature]
        if (
            gather.inverse is not None
            and torch.is_grad_enabled()
            and values.requires_grad
            and (dense is None or not dense.requires_grad)
            and not torch.compiler.is_compiling()
        ):
            return _PermuteColumns.apply(values, dense, gather)
        ordered = values.index_select(1, gather.index)
        return ordered if dense is None else torch.cat([ordered, dense], dim=1)


class _ColumnGather:
    """Where each wanted feature's columns sit in a pooled KeyedTensor's values: ``blocks``
    (start, width) in wanted order, adjacent ones merged; ``index`` the same columns one by one;
    ``inverse`` the blocks (start, width) of the gathered columns that put them back in the
    values' order, a start of None for columns not gathered (their gradient is zero), when no
    column is gathered twice (else None)."""

    def __init__(
        self,
        blocks: List[Tuple[int, int]],
        index: torch.Tensor,
        inverse: Optional[List[Tuple[Optional[int], int]]],
    ) -> None:
        self.blocks, self.index, self.inverse = blocks, index, inverse

    @classmethod
    def plan(
        cls,
        keys: List[str],
        offsets: List[int],
        widths: List[int],
        names: List[str],
        device: torch.device,
    ) -> "_ColumnGather":
        start = dict(zip(keys, offsets[:-1], strict=True))
        width = dict(zip(keys, widths, strict=True))
        blocks: List[Tuple[int, int]] = []
        for name in names:
            if blocks and blocks[-1][0] + blocks[-1][1] == start[name]:  # continues the last block
                blocks[-1] = (blocks[-1][0], blocks[-1][1] + width[name])
            else:
                blocks.append((start[name], width[name]))
        index = torch.cat([torch.arange(s, s + w) for s, w in blocks]).to(device)
        # block k lands at gathered column sum(widths before k); sorted by source start, the
        # blocks and the gaps between them tile the values when no column is used twice
        lands = list(itertools.accumulate((w for _, w in blocks), initial=0))[:-1]
        placed = sorted((s, at, w) for (s, w), at in zip(blocks, lands, strict=True))
        inverse: Optional[List[Tuple[Optional[int], int]]] = []
        covered = 0
        for s, at, w in placed:
            if s < covered:  # overlaps the block before: a column used twice
                inverse = None
                break
            if s > covered:
                inverse.append((None, s - covered))
            inverse.append((at, w))
            covered = s + w
        if inverse is not None and covered < offsets[-1]:
            inverse.append((None, offsets[-1] - covered))
        return cls(blocks, index, inverse)


class _PermuteColumns(torch.autograd.Function):
    """values [B, V] (and dense [B, D]) -> [B, W (+ D)]: W of values' columns, each used once, in
    a _ColumnGather's order, then dense, in one copy; the backward puts the gradient's first W
    columns back in the values' order, zeros for the others, again in one copy (dense gets no
    gradient)."""

    @staticmethod
    def forward(
        ctx, values: torch.Tensor, dense: Optional[torch.Tensor], gather: _ColumnGather
    ) -> torch.Tensor:
        ctx.gather = gather
        parts = [values.narrow(1, start, width) for start, width in gather.blocks]
        return torch.cat(parts if dense is None else [*parts, dense], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = [
            grad.new_zeros(grad.shape[0], width) if start is None else grad.narrow(1, start, width)
            for start, width in ctx.gather.inverse
        ]
        return torch.cat(parts, dim=1), None, None


# (task name, label name, kind, label column): what reading a task's labels needs, as constants
# that FX can record in a graph
LabelSpec = Tuple[Tuple[str, str, str, int], ...]


def label_spec(tasks: Sequence[Task], label_columns: Optional[Dict[str, int]] = None) -> LabelSpec:
    """
    How each task finds its labels in a batch: by label name in a dict of labels, or by column
    ``label_columns[task]`` of a [B, C] labels tensor (by default task i reads column i).

    Args:
        tasks (Sequence[Task]): the tasks, in the model's order.
        label_columns (Optional[Dict[str, int]]): task name -> label column. Default: None.

    Returns:
        LabelSpec: one ``(name, label, kind, column)`` per task.

    Raises:
        ValueError: ``label_columns`` names an unknown task or misses one.

    Example::

        >>> from engagerec.config import TaskConfig
        >>> from engagerec.model import label_spec
        >>> from engagerec.tasks import Task
        >>> tasks = [Task(TaskConfig("dwell", "dwell")), Task(TaskConfig("click", "click", "binary"))]
        >>> label_spec(tasks, {"click": 0, "dwell": 1})
        (('dwell', 'dwell', 'regression', 1), ('click', 'click', 'binary', 0))
    """
    names = [task.name for task in tasks]
    if label_columns is not None:
        unknown = sorted(set(label_columns) - set(names))
        missing = [name for name in names if name not in label_columns]
        if unknown or missing:
            raise ValueError(
                f"label_columns must give each task a column: unknown tasks {unknown}, tasks without "
                f"one {missing} (tasks: {names})"
            )
    columns = [label_columns[n] for n in names] if label_columns is not None else list(range(len(names)))
    return tuple((t.name, t.label, t.kind, c) for t, c in zip(tasks, columns, strict=True))


@torch.fx.wrap  # one opaque call in a traced graph: it branches on the batch's kind of labels
def task_labels(batch, spec: LabelSpec) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """
    Each task's labels and row weights, read from whichever batch the caller has:

    - engagerec's ``Batch`` (or any batch whose ``labels`` is a dict): by label name, with its
      ``label_weights`` (0 where a label is missing, or for padding rows) when it has them;
    - ``torchrec.datasets.utils.Batch`` (``labels`` one tensor): [B] for one task, or [B, C]
      with each task reading its column; every row weighs 1.

    A batch whose labels do not fit the tasks is refused, naming the task and what was
    expected; nothing is broadcast. Binary tasks take float, integer or bool 0/1 labels;
    regression tasks take float labels.

    Args:
        batch: a batch with ``labels`` (a dict or a tensor) and ``dense_features`` [B, D].
        spec (LabelSpec): ``label_spec(tasks, label_columns)``.

    Returns:
        Tuple[List[torch.Tensor], List[torch.Tensor]]: per task, in order, the float32 labels
        [B] and the row weights [B].

    Raises:
        ValueError: labels missing for a task, of the wrong shape, column count or dtype.

    Example::

        >>> import torch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.model import label_spec, task_labels
        >>> from engagerec.tasks import Task
        >>> dwell = TaskConfig("dwell", "dwell", output="identity")  # seconds: no sigmoid
        >>> tasks = [Task(dwell), Task(TaskConfig("click", "click", "binary"))]
        >>> spec = label_spec(tasks, {"dwell": 1, "click": 0})
        >>> class TorchRecBatch:  # the fields of torchrec.datasets.utils.Batch that labels need
        ...     dense_features = torch.zeros(2, 3)
        ...     labels = torch.tensor([[1.0, 30.0], [0.0, 12.0]])  # columns: click, dwell
        >>> labels, weights = task_labels(TorchRecBatch(), spec)
        >>> labels
        [tensor([30., 12.]), tensor([1., 0.])]
        >>> TorchRecBatch.labels = torch.zeros(2)  # one column for two tasks
        >>> task_labels(TorchRecBatch(), spec)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: task 'dwell': labels of shape [2] hold one task's labels; 2 tasks need [B, C] ...
    """
    rows = batch.dense_features.shape[0]
    if isinstance(batch.labels, Mapping):
        return _labels_by_name(batch, spec, rows)
    return _labels_by_column(batch.labels, spec, rows)


def _labels_by_name(batch, spec: LabelSpec, rows: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    label_weights = getattr(batch, "label_weights", None) or {}
    labels, weights = [], []
    for name, label, kind, _ in spec:
        if label not in batch.labels:
            raise ValueError(
                f"task '{name}': the batch has no label '{label}' (labels: {sorted(batch.labels)})"
            )
        labels.append(_checked_label(name, kind, batch.labels[label], rows))
        weight = label_weights.get(label)
        weights.append(weight if weight is not None else torch.ones_like(labels[-1]))
    return labels, weights


def _labels_by_column(
    tensor: torch.Tensor, spec: LabelSpec, rows: int
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    first = spec[0][0]
    if tensor.dim() == 1 and len(spec) > 1:
        raise ValueError(
            f"task '{first}': labels of shape [{tensor.shape[0]}] hold one task's labels; "
            f"{len(spec)} tasks need [B, C] with a column each (label_columns)"
        )
    if tensor.dim() not in (1, 2):
        raise ValueError(f"task '{first}': labels of shape {list(tensor.shape)}, expected [B] or [B, C]")
    labels = []
    for name, _, kind, column in spec:
        if tensor.dim() == 2 and not 0 <= column < tensor.shape[1]:
            raise ValueError(
                f"task '{name}': reads label column {column}, but the labels have "
                f"{tensor.shape[1]} columns (shape {list(tensor.shape)})"
            )
        labels.append(_checked_label(name, kind, tensor if tensor.dim() == 1 else tensor[:, column], rows))
    return labels, [torch.ones_like(label) for label in labels]


def _checked_label(name: str, kind: str, label: torch.Tensor, rows: int) -> torch.Tensor:
    if label.dim() != 1 or label.shape[0] != rows:
        raise ValueError(
            f"task '{name}': labels of shape {list(label.shape)}, expected [{rows}] (one per row)"
        )
    integral = not label.is_floating_point() and not label.is_complex()
    if label.is_complex() or (integral and kind != "binary"):
        raise ValueError(
            f"task '{name}' ({kind}): labels of dtype {label.dtype}, expected a float dtype"
            + (" (or 0/1 integers or bools)" if kind == "binary" else "")
        )
    return label if label.dtype == torch.float32 else label.float()


class MultiTaskModel(nn.Module):
    """
    The multi-task over-arch around the caller's embedding module, as torchrec's ``DLRM``
    takes its ``embedding_bag_collection``: the module pools the sparse features, the pooled
    embeddings of ``feature_names`` (in that order) and the dense features are concatenated
    into the tower input x, the tower makes one representation f_k(x) per task and each
    task's head h_k predicts y_k = h_k(f_k(x)) (study eq. 3). The task losses L_t are combined
    by ``loss_weighting`` (by default the fixed weighted sum of eq. 12). DistributedModelParallel
    shards the caller's tables as it would in the caller's own model (build them on the meta
    device to let it materialise them).

    Args:
        embedding_bag_collection (Optional[nn.Module]): the caller's EmbeddingBagCollection,
            or any module mapping a KeyedJaggedTensor to a KeyedTensor of pooled embeddings;
            None when the tower reads the dense features alone.
        dense_in_features (int): the number of dense features (columns of ``dense_features``).
        tower (nn.Module): a tower (see ``engagerec.towers``) reading the pooled widths of
            ``feature_names`` (or ``input_arch.output_dim``) plus ``dense_in_features`` elements
            and making one representation per task, widths in ``output_dims``.
        tasks (Sequence[Union[Task, TaskConfig]]): the tasks, in the tower's representation order.
        feature_names (Optional[Sequence[str]]): which pooled features feed the tower, in
            order; any subset of the module's features. Default: None, every feature of an
            EmbeddingBagCollection's tables, table by table.
        label_columns (Optional[Dict[str, int]]): task name -> column of a torchrec Batch's
            [B, C] labels (``task_labels``). Default: None (task i reads column i).
        loss_weighting (Optional[nn.Module]): combines the task losses (``engagerec.losses``);
            None is FixedWeighting with the tasks' weights. Default: None.
        input_arch (Optional[nn.Module]): maps the pooled features [B, sum of widths] to the
            tower's sparse part (e.g. ``TargetAttention``). Default: None.
        train_autocast (Optional[torch.dtype]): the dtype the tower computes in while the model
            is in training mode (``torch.autocast``: ``torch.bfloat16`` runs its matmuls on
            AMX / AVX512-BF16 CPUs and on GPUs in half the bytes). The tower receives its input
            x already in that dtype (one cast, so x's readers' gradients add in it too); its
            representations go back to float32. Its parameters, the heads, the losses, and
            every forward in eval mode (evaluation, predict, export) stay float32.
            Default: None (float32 throughout).
        embedding_l2 (float): while training, adds ``embedding_l2`` times the batch mean of the
            squared norm of each row's pooled features (before ``input_arch``) to the loss. For a
            one-id feature that is an L2 penalty on the looked-up embedding, per occurrence, as
            matrix factorisation regularises its factors; for a bag it is on the pooled sum or
            mean. It reaches the rows through the fused sparse optimiser, on any device
            (FBGEMM's CPU kernels ignore a fused optimiser's ``weight_decay``). Not in eval mode:
            evaluation, predict and export see the task losses alone. Default: 0.
        logit_offsets (Optional[nn.Module]): maps the pooled embeddings [B, sparse_dim]
            (``feature_names`` order, before ``input_arch``) to [B, tasks], added to each head's
            output unit before its transform, in training, evaluation and export alike (e.g.
            ``engagerec.interactions.DotLogits``). Needs an embedding module. Default: None.

    Call Args:
        batch: engagerec's ``Batch`` (labels by name, weights for missing labels) or
            ``torchrec.datasets.utils.Batch`` (labels [B] or [B, C]).

    Returns:
        Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor],
        Dict[str, torch.Tensor]]]: ``(loss, (task_losses, predictions, labels, weights))``: the
        scalar loss to back-propagate; the detached task losses [T]; and by task name the
        detached predictions [B] (``Task.prediction``), the labels [B] and the row weights [B]
        (0 where the task's label is missing or the row is padding).

    Raises:
        ValueError: the tower's number of representations is not the number of tasks, a
            feature name is not one of the module's, ``train_autocast`` is another dtype
            (float16 would need a gradient scaler), ``embedding_l2`` is negative, or
            ``logit_offsets`` come without an embedding module.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> from torchrec.datasets.utils import Batch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.model import MultiTaskModel
        >>> from engagerec.towers import build_tower
        >>> _ = torch.manual_seed(0)
        >>> table = EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["item"])
        >>> ebc = EmbeddingBagCollection(tables=[table])  # the caller's, on any device
        >>> tasks = [TaskConfig("watch_ratio", "watch_ratio"), TaskConfig("skip", "skip", kind="binary")]
        >>> tower = build_tower("mmoe", 4 + 1, len(tasks), num_experts=2, expert_sizes=[8])
        >>> model = MultiTaskModel(ebc, dense_in_features=1, tower=tower, tasks=tasks)
        >>> batch = Batch(
        ...     dense_features=torch.randn(3, 1),
        ...     sparse_features=KeyedJaggedTensor.from_lengths_sync(
        ...         keys=["item"], values=torch.tensor([1, 4, 7]), lengths=torch.tensor([1, 1, 1])
        ...     ),
        ...     labels=torch.tensor([[0.2, 1.0], [0.9, 0.0], [0.5, 0.0]]),  # [B, tasks]
        ... )
        >>> loss, (task_losses, predictions, labels, weights) = model(batch)
        >>> loss.shape, task_losses.shape
        (torch.Size([]), torch.Size([2]))
        >>> bool(torch.isclose(loss, task_losses.sum()))  # eq. 12 with both weights 1
        True
        >>> sorted(predictions), labels["skip"]
        (['skip', 'watch_ratio'], tensor([1., 0., 0.]))
        >>> bool(((predictions["watch_ratio"] > 0) & (predictions["watch_ratio"] < 1)).all())
        True
        >>> loss.backward()
        >>> model.embedding_bag_collection.embedding_bags["t"].weight.grad.shape
        torch.Size([10, 4])
    """

    def __init__(
        self,
        embedding_bag_collection: Optional[nn.Module],
        dense_in_features: int,
        tower: nn.Module,
        tasks: Sequence[Union[Task, TaskConfig]],
        feature_names: Optional[Sequence[str]] = None,
        label_columns: Optional[Dict[str, int]] = None,
        loss_weighting: Optional[nn.Module] = None,
        input_arch: Optional[nn.Module] = None,
        train_autocast: Optional[torch.dtype] = None,
        embedding_l2: float = 0.0,
        logit_offsets: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        tasks = [task if isinstance(task, Task) else Task(task) for task in tasks]
        if len(tower.output_dims) != len(tasks):
            raise ValueError(
                f"the tower makes {len(tower.output_dims)} representations for {len(tasks)} tasks"
            )
        self.tasks = tasks
        self.num_tasks = len(tasks)
        self.dense_in_features = dense_in_features
        self.has_sparse = embedding_bag_collection is not None
        configs = _table_configs(embedding_bag_collection)
        self.feature_names = _chosen_features(embedding_bag_collection, configs, feature_names)
        # the tables of the chosen features (all of them when the module keeps no configs)
        self.tables: List[EmbeddingBagConfig] = [
            t for t in configs if set(t.feature_names) & set(self.feature_names)
        ]
        if self.has_sparse:
            self.sparse_arch = embedding_bag_collection
            self.pooled_by_name = PooledByName(self.feature_names)
        self.input_arch = input_arch  # e.g. TargetAttention: pooled -> the tower's sparse part
        self.label_spec = label_spec(tasks, label_columns)
        self.tower = tower
        self.heads = nn.ModuleList(
            task.build_head(dim) for task, dim in zip(tasks, tower.output_dims, strict=True)
        )
        self.loss_weighting = loss_weighting or FixedWeighting([t.weight for t in tasks])
        if train_autocast not in (None, torch.bfloat16):  # float16 would need a gradient scaler
            raise ValueError(f"train_autocast must be None or torch.bfloat16, got {train_autocast}")
        self.train_autocast = train_autocast
        if not embedding_l2 >= 0:
            raise ValueError(f"embedding_l2 must be 0 or more, got {embedding_l2}")
        self.embedding_l2 = float(embedding_l2)
        if logit_offsets is not None and not self.has_sparse:
            raise ValueError("logit_offsets read the pooled embeddings: the model has no embedding module")
        self.logit_offsets = logit_offsets  # e.g. DotLogits: pooled -> [B, tasks]

    @property
    def embedding_bag_collection(self) -> Optional[nn.Module]:
        """The caller's embedding module (after DistributedModelParallel, its sharded form)."""
        return self.sparse_arch if self.has_sparse else None

    @property
    def sparse_dim(self) -> int:
        """Width of the pooled embeddings the tower reads (before ``input_arch``): the chosen
        features' table widths, summed (0 when the module keeps no table configs)."""
        widths = {name: t.embedding_dim for t in self.tables for name in t.feature_names}
        return sum(widths.get(name, 0) for name in self.feature_names)

    def tower_input(self, batch) -> torch.Tensor:
        """x: pooled embeddings (``feature_names`` order; through the input arch if any),
        then dense features."""
        return self._pooled_and_input(batch)[1]

    def _pooled_and_input(self, batch) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(the pooled embeddings [B, sparse_dim] in ``feature_names`` order, None without
        tables; the tower input x)."""
        if not self.has_sparse:
            return None, batch.dense_features
        # By name, never pooled.values(): a sharded collection returns its keys in the plan's
        # order, which changes with the world size and would scramble the tower's inputs.
        pooled = self.sparse_arch(batch.sparse_features)
        if self.input_arch is None and self.logit_offsets is None and self.embedding_l2 == 0:
            # nothing but the tower reads the pooled part: x in one copy, the pooled part a view
            # of it (a reader of that view would add its gradient to x's, which GradNorm's
            # gradient norms on x must not see)
            shared = self.pooled_by_name(pooled, batch.dense_features)
            return shared.narrow(1, 0, shared.size(1) - batch.dense_features.size(1)), shared
        ordered = self.pooled_by_name(pooled)
        sparse = ordered if self.input_arch is None else self.input_arch(ordered)
        return ordered, torch.cat([sparse, batch.dense_features], dim=1)

    def forward(self, batch) -> ModelOutput:
        """batch -> ``(loss, (task_losses, predictions, labels, weights))`` (see the class docstring)."""
        pooled, shared = self._pooled_and_input(batch)
        representations = self._tower(shared)
        offsets = self.logit_offsets(pooled) if self.logit_offsets is not None else None
        read = task_labels(batch, self.label_spec)  # ([label per task], [weight per task])
        losses, predictions, labels, weights = [], {}, {}, {}
        for i in range(self.num_tasks):  # concrete ints: the lists are opaque under FX tracing
            task = self.tasks[i]
            output = self.heads[i](representations[i], None if offsets is None else offsets[:, i])
            label, weight = read[0][i], read[1][i]  # weight 0: label missing or padding
            losses.append(task.loss(output, label, weight))
            predictions[task.name] = task.prediction(output).detach()
            labels[task.name] = label
            weights[task.name] = weight
        task_losses = torch.stack(losses)
        loss = self.loss_weighting(task_losses, shared)  # fixed weights: the study's eq. 12
        if self.training and self.embedding_l2 > 0 and pooled is not None:
            loss = loss + self.embedding_l2 * pooled.square().sum(dim=1).mean()
        return loss, (task_losses.detach(), predictions, labels, weights)

    def _tower(self, shared: torch.Tensor) -> List[torch.Tensor]:
        """The tower's representations, float32; computed in ``train_autocast`` while training."""
        if not (self.training and self.train_autocast is not None):
            return self.tower(shared)
        # the device from a weight: under the train pipeline's FX trace, shared is a proxy
        weight = next(self.tower.parameters(), None)
        device_type = "cpu" if weight is None else weight.device.type
        with torch.autocast(device_type=device_type, dtype=self.train_autocast):
            # cast once here rather than at each of the tower's first matmuls (MMoE's experts and
            # gates both read x): one conversion of x forward and of its gradient backward (the
            # readers' bf16 gradients then add in bf16; validation: docs/EXPERIMENTS.md)
            representations = self.tower(shared.to(self.train_autocast))
        return [representations[i].float() for i in range(self.num_tasks)]


def _table_configs(module: Optional[nn.Module]) -> List[EmbeddingBagConfig]:
    """The module's table configs (an EmbeddingBagCollection's), or none for any other module."""
    configs = getattr(module, "embedding_bag_configs", None)
    return list(configs()) if callable(configs) else []


def _chosen_features(
    module: Optional[nn.Module], configs: List[EmbeddingBagConfig], names: Optional[Sequence[str]]
) -> List[str]:
    """``names``, checked against the module's features; every feature when None."""
    if module is None:
        if names:
            raise ValueError(f"feature_names {list(names)} given without an embedding module")
        return []
    available = [name for table in configs for name in table.feature_names]
    if names is None:
        if not configs:
            raise ValueError(
                f"{type(module).__name__} keeps no table configs (embedding_bag_configs()): "
                "name the pooled features the tower reads with feature_names"
            )
        return available
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"feature_names {names} name a feature twice")
    unknown = [name for name in names if configs and name not in available]
    if unknown:
        raise ValueError(f"feature_names {unknown} are not features of the embedding module ({available})")
    return names
