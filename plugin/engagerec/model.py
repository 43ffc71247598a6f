"""MultiTaskModel = EmbeddingBagCollection -> [pooled, dense] -> tower -> one head per task.

``forward(batch) -> (loss, (task_losses, predictions, labels, weights))``: the shape TorchRec's
train pipelines expect. The KJT goes into the EmbeddingBagCollection untouched (the
pipeline overlaps its input distribution with compute only if nothing reads it first),
and the tower's list output is indexed with concrete ints, so the forward FX-traces
with the column order, tower and heads as leaves (as TorchRec's pipelines trace it).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from engagerec.attention import TargetAttention
from engagerec.batch import Batch
from engagerec.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    TargetAttentionConfig,
    TaskConfig,
    prepared_dir,
)
from engagerec.data.schema import DatasetSchema, position_names
from engagerec.features import FeatureSpec
from engagerec.losses import FixedWeighting, build_loss_weighting
from engagerec.tasks import Task
from engagerec.towers.registry import build_tower

# (loss, (task losses, predictions, labels, per-task row weights)), dicts keyed by task name
ModelOutput = Tuple[
    torch.Tensor,
    Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]],
]


class PooledByName(nn.Module):
    """
    The pooled embeddings as [B, sum of widths], features in ``names`` order, whatever order
    the (sharded) collection returns them in: the plan's, which changes with the world size.
    Free when the collection already returns that order (one rank); else one column gather,
    whose index is worked out on the first batch of a key order and kept in this module, on the
    values' device. TorchRec's pipelines trace it as a leaf (it holds no sharded module).
    (torchrec's KTRegroupAsDict does the same job; on CPU it made a KuaiRand-1K-shaped training
    step 5x slower, 18.7k against 88k samples/s, so it is not used here.)

    Args:
        names (List[str]): the wanted feature order (``FeatureSpec.feature_names``).

    Call Args:
        pooled (KeyedTensor): an EmbeddingBagCollection's output, keys in any order.

    Returns:
        torch.Tensor: [B, sum of the features' widths].

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedTensor
        >>> from engagerec.model import PooledByName
        >>> values = torch.tensor([[1.0, 2.0, 3.0]])  # one row: a is 2 wide, b 1
        >>> pooled = KeyedTensor(keys=["a", "b"], length_per_key=[2, 1], values=values)
        >>> PooledByName(["b", "a"])(pooled)
        tensor([[3., 1., 2.]])
    """

    def __init__(self, names: List[str]) -> None:
        super().__init__()
        self.names = list(names)
        self._index: Dict[Tuple, torch.Tensor] = {}  # (keys, widths, device) -> column index

    def forward(self, pooled: KeyedTensor) -> torch.Tensor:
        """pooled -> [B, sum of widths] in ``names`` order."""
        keys = pooled.keys()
        if keys == self.names:
            return pooled.values()
        values = pooled.values()
        signature = (tuple(keys), tuple(pooled.length_per_key()), values.device)
        if signature not in self._index:
            starts = dict(zip(keys, pooled.offset_per_key()[:-1], strict=True))
            widths = dict(zip(keys, pooled.length_per_key(), strict=True))
            index = torch.cat([torch.arange(starts[n], starts[n] + widths[n]) for n in self.names])
            self._index[signature] = index.to(values.device)
        return values.index_select(1, self._index[signature])


def target_attention(spec: FeatureSpec, schema: DatasetSchema, cfg: TargetAttentionConfig) -> TargetAttention:
    """The TargetAttention ``model.target_attention`` describes, over the pooled columns of ``spec``.

    Args:
        spec (FeatureSpec): the model's tables (their feature order is the pooled columns').
        schema (DatasetSchema): the prepared data's schema (the history's length and kind).
        cfg (TargetAttentionConfig): which history, which candidate, the MLP's sizes.

    Returns:
        TargetAttention: its ``output_dim`` replaces ``spec.sparse_dim`` in the tower's input.

    Example: ``tests/test_attention.py`` (``MultiTaskModel.from_config`` calls it when the
    config has ``model.target_attention``).

    Raises:
        ConfigError: the history is no positional history feature of the prepared data, or the
            candidate is not embedded in the history's table.
    """
    history = next((f for f in schema.features if f["name"] == cfg.history), None)
    if history is None or history["kind"] != "history" or not history.get("positions"):
        raise ConfigError(
            f"model.target_attention.history '{cfg.history}' is no history feature with positions: true "
            "in the prepared data (prepare it with that feature)"
        )
    widths = {name: t.embedding_dim for t in spec.tables for name in t.feature_names}
    positions = position_names(cfg.history, history["length"])
    table = next((t for t in spec.tables if positions[0] in t.feature_names), None)
    if table is None:
        raise ConfigError(f"model.target_attention.history '{cfg.history}' has no embedding table")
    single = {f.name for f in schema.sparse if not f.multi}
    if cfg.candidate not in table.feature_names or cfg.candidate not in single:
        raise ConfigError(
            f"model.target_attention.candidate '{cfg.candidate}' is not embedded in the history's table "
            f"{table.name} as one id per row (its features: {table.feature_names})"
        )
    return TargetAttention(
        list(widths.values()), list(widths), cfg.candidate, positions, hidden_sizes=cfg.hidden_sizes
    )


def tasks_from_schema(schema: DatasetSchema) -> List[TaskConfig]:
    """
    One task per label of the prepared data, named after it, of its kind, with weight 1: a
    regression head ends in a sigmoid when every train value of its label lies in [0, 1] (a
    ratio, per the train split's label summary in ``schema.meta``), else in the identity.
    What ``MultiTaskModel.from_config`` uses when the config names no tasks.

    Args:
        schema (DatasetSchema): the prepared data's schema.

    Returns:
        List[TaskConfig]: one per ``schema.labels``, in order.

    Example::

        >>> from engagerec.data.schema import DatasetSchema, LabelSpec
        >>> from engagerec.model import tasks_from_schema
        >>> ranges = {"watch_ratio": {"min": 0.0, "max": 1.0}, "watch_time": {"min": 0.0, "max": 310.5}}
        >>> train = {"labels": ranges}
        >>> schema = DatasetSchema(
        ...     features=[],
        ...     sparse=[],
        ...     dense=[],
        ...     labels=[LabelSpec("watch_ratio", "regression"), LabelSpec("watch_time", "regression")],
        ...     vocab_sizes={},
        ...     meta={"summary": {"split": {"train": train}}},
        ... )
        >>> [(task.name, task.kind, task.output) for task in tasks_from_schema(schema)]
        [('watch_ratio', 'regression', 'sigmoid'), ('watch_time', 'regression', 'identity')]
    """
    stats = schema.meta.get("summary", {}).get("split", {}).get("train", {}).get("labels", {})
    tasks = []
    for label in schema.labels:
        low, high = stats.get(label.name, {}).get("min"), stats.get(label.name, {}).get("max")
        unit = low is not None and high is not None and 0 <= low and high <= 1
        output = "sigmoid" if unit else "identity"
        tasks.append(TaskConfig(name=label.name, label=label.name, kind=label.kind, output=output))
    return tasks


def configured_tasks(cfg: ExperimentConfig) -> List[TaskConfig]:
    """
    The tasks a run of ``cfg`` trains: ``model.tasks`` when the config names them, else one
    per label of its prepared data (``tasks_from_schema``), as ``MultiTaskModel.from_config``
    builds them.

    Args:
        cfg (ExperimentConfig): the experiment; its prepared data must exist when it names no tasks.

    Returns:
        List[TaskConfig]: the tasks, in order.

    Example::

        >>> from engagerec.config import load_config
        >>> [task.name for task in configured_tasks(load_config("kuairand_stats"))]
        ['watch_ratio', 'skip']
    """
    return list(cfg.model.tasks) or tasks_from_schema(DatasetSchema.load(prepared_dir(cfg)))


def _check_soft_labels(tasks: List[Task], schema: DatasetSchema) -> None:
    """Cross-entropy reads a regression label as a probability: refuse one whose training
    values (the train split's label summary) leave [0, 1], where its loss has no minimum."""
    stats = schema.meta.get("summary", {}).get("split", {}).get("train", {}).get("labels", {})
    for task in tasks:
        if task.kind != "regression" or task.cfg.loss != "cross_entropy":
            continue
        low, high = stats.get(task.label, {}).get("min"), stats.get(task.label, {}).get("max")
        if low is not None and high is not None and not 0 <= low <= high <= 1:
            raise ConfigError(
                f"model.tasks: task '{task.name}' trains with cross-entropy, which reads label "
                f"'{task.label}' as a probability; its training values lie in [{low:g}, {high:g}], "
                "expected [0, 1] (loss: mse, or cap the ratio)"
            )


class MultiTaskModel(nn.Module):
    """
    The multi-task model: an EmbeddingBagCollection pools every sparse feature, the pooled
    embeddings (in ``spec.feature_names`` order) and the dense features are concatenated into
    the tower input x, the tower makes one representation f_k(x) per task and each task's
    head h_k predicts y_k = h_k(f_k(x)) (study eq. 3). The task losses L_t are combined by
    ``loss_weighting`` (by default the fixed weighted sum of eq. 12). The forward returns what
    TorchRec's train pipelines expect, and FX-traces with the column order, tower and heads as leaves.

    Args:
        spec (FeatureSpec): the embedding tables and the dense width; without tables there is
            no EmbeddingBagCollection and the tower reads the dense features alone.
        tower (nn.Module): a tower (see ``engagerec.towers``) reading ``spec.input_dim``
            elements and making one representation per task, widths in ``output_dims``.
        tasks (List[Task]): the tasks, in the tower's representation order.
        device (Optional[torch.device]): where the embedding tables are created;
            ``torch.device("meta")`` lets DistributedModelParallel shard and materialise them
            (engagerec.distributed does so). The tower is used as given and the heads are
            built on the default device. Default: None.
        loss_weighting (Optional[nn.Module]): combines the task losses
            (``engagerec.losses``); None is FixedWeighting with the tasks' weights. Default: None.

    Call Args:
        batch (Batch): dense and sparse features, labels and row weights.

    Returns:
        Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor],
        Dict[str, torch.Tensor]]]: ``(loss, (task_losses, predictions, labels, weights))``: the
        scalar loss to back-propagate; the detached task losses [T]; and by task name the
        detached predictions [B] (``Task.prediction``), the labels [B] and the row weights [B]
        (0 where the task's label is missing or the row is padding).

    Raises:
        ValueError: if the tower's number of representations is not the number of tasks.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from engagerec.batch import Batch
        >>> from engagerec.config import EmbeddingConfig, study_tasks
        >>> from engagerec.data.schema import DatasetSchema, DenseFeature, LabelSpec, SparseFeature
        >>> from engagerec.features import FeatureSpec
        >>> from engagerec.model import MultiTaskModel
        >>> from engagerec.tasks import Task
        >>> from engagerec.towers import build_tower
        >>> _ = torch.manual_seed(0)
        >>> schema = DatasetSchema(
        ...     features=[],
        ...     sparse=[SparseFeature("item", "item", multi=False)],
        ...     dense=[DenseFeature("x", "x", "none", 0.0, 1.0, None)],
        ...     labels=[LabelSpec("watch_ratio", "regression"), LabelSpec("skip", "binary")],
        ...     vocab_sizes={"item": 9},
        ... )
        >>> spec = FeatureSpec.from_schema(schema, EmbeddingConfig(dim=4))
        >>> spec.input_dim  # one 4-wide embedding and one dense feature
        5
        >>> tasks = [Task(cfg) for cfg in study_tasks()]  # watch_ratio (regression), skip (binary)
        >>> tower = build_tower("mmoe", spec.input_dim, len(tasks), num_experts=2, expert_sizes=[8])
        >>> model = MultiTaskModel(spec, tower, tasks, device=torch.device("cpu"))
        >>> batch = Batch(
        ...     dense_features=torch.randn(3, 1),
        ...     sparse_features=KeyedJaggedTensor.from_lengths_sync(
        ...         keys=["item"], values=torch.tensor([1, 4, 7]), lengths=torch.tensor([1, 1, 1])
        ...     ),
        ...     labels={"watch_ratio": torch.tensor([0.2, 0.9, 0.5]), "skip": torch.tensor([1.0, 0.0, 0.0])},
        ...     weights=torch.ones(3),
        ...     label_weights={"watch_ratio": torch.ones(3), "skip": torch.tensor([1.0, 1.0, 0.0])},
        ... )
        >>> loss, (task_losses, predictions, labels, weights) = model(batch)
        >>> loss.shape, task_losses.shape
        (torch.Size([]), torch.Size([2]))
        >>> bool(torch.isclose(loss, task_losses.sum()))  # eq. 12 with both weights 1
        True
        >>> sorted(predictions), predictions["skip"].shape
        (['skip', 'watch_ratio'], torch.Size([3]))
        >>> bool(((predictions["watch_ratio"] > 0) & (predictions["watch_ratio"] < 1)).all())
        True
        >>> weights["skip"]  # the third row has no skip label
        tensor([1., 1., 0.])
        >>> loss.backward()
        >>> model.sparse_arch.embedding_bags["t_item"].weight.grad.shape
        torch.Size([10, 4])
    """

    def __init__(
        self,
        spec: FeatureSpec,
        tower: nn.Module,
        tasks: List[Task],
        device: Optional[torch.device] = None,
        loss_weighting: Optional[nn.Module] = None,
        input_arch: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if len(tower.output_dims) != len(tasks):
            raise ValueError(
                f"the tower makes {len(tower.output_dims)} representations for {len(tasks)} tasks"
            )
        self.spec = spec
        self.tasks = tasks
        self.num_tasks = len(tasks)
        self.has_sparse = bool(spec.tables)
        self.feature_names = spec.feature_names
        if self.has_sparse:
            self.sparse_arch = EmbeddingBagCollection(tables=spec.tables, device=device)
            self.pooled_by_name = PooledByName(self.feature_names)
        self.input_arch = input_arch  # e.g. TargetAttention: pooled -> the tower's sparse part
        self.tower = tower
        self.heads = nn.ModuleList(
            task.build_head(dim) for task, dim in zip(tasks, tower.output_dims, strict=True)
        )
        self.loss_weighting = loss_weighting or FixedWeighting([t.weight for t in tasks])

    @classmethod
    def from_config(
        cls, schema: DatasetSchema, cfg: ModelConfig, device: Optional[torch.device] = None
    ) -> "MultiTaskModel":
        """
        The model a config describes for prepared data: the spec from ``cfg.embeddings``, the
        tasks from ``cfg.tasks`` (or ``tasks_from_schema``), the tower from ``cfg.tower``
        (built on the default device) and the loss weighting from ``cfg.loss``.

        Args:
            schema (DatasetSchema): the prepared data's schema.
            cfg (ModelConfig): the model section of a config.
            device (Optional[torch.device]): where the embedding tables are created.
                Default: None.

        Returns:
            MultiTaskModel: the model.

        Raises:
            ConfigError: if a task's label is not in the prepared data, or a task trained with
                cross-entropy reads a label with training values outside [0, 1].
        """
        spec = FeatureSpec.from_schema(schema, cfg.embeddings)
        tasks = [Task(t) for t in (cfg.tasks or tasks_from_schema(schema))]
        missing = [t.label for t in tasks if t.label not in schema.label_names]
        if missing:
            raise ConfigError(
                f"model.tasks: labels {missing} are not in the prepared data (labels: {schema.label_names})"
            )
        _check_soft_labels(tasks, schema)
        input_arch = target_attention(spec, schema, cfg.target_attention) if cfg.target_attention else None
        input_dim = input_arch.output_dim + spec.dense_dim if input_arch else spec.input_dim
        try:
            tower = build_tower(cfg.tower.name, input_dim, len(tasks), **cfg.tower.params)
        except KeyError as err:  # an unknown name, with the nearest registered one
            raise ConfigError(f"model.tower.name: {err.args[0]}") from None
        except (TypeError, ValueError) as err:  # a parameter the tower does not take, or a bad value
            raise ConfigError(
                f"model.tower '{cfg.tower.name}' with params {cfg.tower.params}: {err}"
            ) from None
        weighting = build_loss_weighting(cfg.loss, [t.weight for t in tasks])
        return cls(spec, tower, tasks, device=device, loss_weighting=weighting, input_arch=input_arch)

    def tower_input(self, batch: Batch) -> torch.Tensor:
        """x: pooled embeddings (``spec.feature_names`` order; through the input arch if
        any), then dense features."""
        if not self.has_sparse:
            return batch.dense_features
        pooled = self.sparse_arch(batch.sparse_features)
        # By name, never pooled.values(): a sharded collection returns its keys in the plan's
        # order, which changes with the world size and would scramble the tower's inputs.
        sparse = self.pooled_by_name(pooled)
        if self.input_arch is not None:
            sparse = self.input_arch(sparse)
        return torch.cat([sparse, batch.dense_features], dim=1)

    def forward(self, batch: Batch) -> ModelOutput:
        """batch -> ``(loss, (task_losses, predictions, labels, weights))`` (see the class docstring)."""
        shared = self.tower_input(batch)
        representations = self.tower(shared)
        losses, predictions, labels, weights = [], {}, {}, {}
        for i in range(self.num_tasks):  # concrete ints: the list is opaque under FX tracing
            task = self.tasks[i]
            output = self.heads[i](representations[i])
            label = batch.labels[task.label]
            weight = batch.label_weights[task.label]  # 0 where this task's label is missing
            losses.append(task.loss(output, label, weight))
            predictions[task.name] = task.prediction(output).detach()
            labels[task.name] = label
            weights[task.name] = weight
        task_losses = torch.stack(losses)
        loss = self.loss_weighting(task_losses, shared)  # fixed weights: the study's eq. 12
        return loss, (task_losses.detach(), predictions, labels, weights)
