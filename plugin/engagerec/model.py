"""MultiTaskModel = EmbeddingBagCollection -> [pooled, dense] -> tower -> one head per task.

``forward(batch) -> (loss, (task_losses, predictions, labels, weights))``: the shape TorchRec's
train pipelines expect. The KJT goes into the EmbeddingBagCollection untouched (the
pipeline overlaps its input distribution with compute only if nothing reads it first),
and the tower's list output is indexed with concrete ints, so the forward FX-traces
with the tower and heads as leaves.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from engagerec.batch import Batch
from engagerec.config import ModelConfig, TaskConfig
from engagerec.data.schema import DatasetSchema
from engagerec.features import FeatureSpec
from engagerec.losses import FixedWeighting, build_loss_weighting
from engagerec.tasks import Task
from engagerec.towers.registry import build_tower

# (loss, (task losses, predictions, labels, per-task row weights)), dicts keyed by task name
ModelOutput = Tuple[
    torch.Tensor,
    Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, torch.Tensor]],
]


_COLUMN_ORDER: Dict[Tuple, torch.Tensor] = {}


@torch.fx.wrap  # one opaque call under tracing; runs eagerly with real keys
def pooled_by_name(pooled: KeyedTensor, names: List[str]) -> torch.Tensor:
    """The pooled embeddings as [B, sum of dims], features in ``names`` order. Free when the
    collection already returns that order (one rank); else one column gather, whose index is
    computed once per key order."""
    keys = pooled.keys()
    if keys == names:
        return pooled.values()
    values = pooled.values()
    signature = (tuple(keys), tuple(names), tuple(pooled.length_per_key()), values.device)
    if signature not in _COLUMN_ORDER:  # kept on the values' device: no copy per forward
        starts = dict(zip(keys, pooled.offset_per_key()[:-1], strict=True))
        widths = dict(zip(keys, pooled.length_per_key(), strict=True))
        index = torch.cat([torch.arange(starts[n], starts[n] + widths[n]) for n in names])
        _COLUMN_ORDER[signature] = index.to(values.device)
    return values.index_select(1, _COLUMN_ORDER[signature])


def tasks_from_schema(schema: DatasetSchema) -> List[TaskConfig]:
    """One task per label of the prepared data: a regression head ends in a sigmoid when every
    train value of its label lies in [0, 1] (a ratio), else it is the identity."""
    stats = schema.meta.get("summary", {}).get("split", {}).get("train", {}).get("labels", {})
    tasks = []
    for label in schema.labels:
        low, high = stats.get(label.name, {}).get("min"), stats.get(label.name, {}).get("max")
        unit = low is not None and high is not None and 0 <= low and high <= 1
        output = "sigmoid" if unit else "identity"
        tasks.append(TaskConfig(name=label.name, label=label.name, kind=label.kind, output=output))
    return tasks


class MultiTaskModel(nn.Module):
    """Example::

    spec = FeatureSpec.from_schema(schema, cfg.model.embeddings)
    tasks = [Task(t) for t in cfg.model.tasks]
    tower = build_tower("mmoe", spec.input_dim, len(tasks), num_experts=4)
    model = MultiTaskModel(spec, tower, tasks, device=torch.device("meta"))  # DMP materialises it
    loss, (task_losses, predictions, labels) = model(batch)
    """

    def __init__(
        self,
        spec: FeatureSpec,
        tower: nn.Module,
        tasks: List[Task],
        device: Optional[torch.device] = None,
        loss_weighting: Optional[nn.Module] = None,
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
        self.tower = tower
        self.heads = nn.ModuleList(
            task.build_head(dim) for task, dim in zip(tasks, tower.output_dims, strict=True)
        )
        self.loss_weighting = loss_weighting or FixedWeighting([t.weight for t in tasks])

    @classmethod
    def from_config(
        cls, schema: DatasetSchema, cfg: ModelConfig, device: Optional[torch.device] = None
    ) -> "MultiTaskModel":
        spec = FeatureSpec.from_schema(schema, cfg.embeddings)
        tasks = [Task(t) for t in (cfg.tasks or tasks_from_schema(schema))]
        missing = [t.label for t in tasks if t.label not in schema.label_names]
        if missing:
            raise ValueError(
                f"task labels {missing} are not in the prepared data (labels: {schema.label_names})"
            )
        tower = build_tower(cfg.tower.name, spec.input_dim, len(tasks), **cfg.tower.params)
        weighting = build_loss_weighting(cfg.loss, [t.weight for t in tasks])
        return cls(spec, tower, tasks, device=device, loss_weighting=weighting)

    def tower_input(self, batch: Batch) -> torch.Tensor:
        if not self.has_sparse:
            return batch.dense_features
        pooled = self.sparse_arch(batch.sparse_features)
        # By name, never pooled.values(): a sharded collection returns its keys in the plan's
        # order, which changes with the world size and would scramble the tower's inputs.
        return torch.cat([pooled_by_name(pooled, self.feature_names), batch.dense_features], dim=1)

    def forward(self, batch: Batch) -> ModelOutput:
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
