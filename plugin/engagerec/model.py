"""MultiTaskModel = EmbeddingBagCollection -> [pooled, dense] -> tower -> one head per task.

``forward(batch) -> (loss, (task_losses, predictions, labels))``: the shape TorchRec's
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

from engagerec.batch import Batch
from engagerec.config import ModelConfig
from engagerec.data.schema import DatasetSchema
from engagerec.features import FeatureSpec
from engagerec.losses import FixedWeighting, build_loss_weighting
from engagerec.tasks import Task
from engagerec.towers.registry import build_tower

ModelOutput = Tuple[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]


class MultiTaskModel(nn.Module):
    """Example::

        spec = FeatureSpec.from_schema(schema, cfg.model.embeddings)
        tasks = [Task(t) for t in cfg.model.tasks]
        tower = build_tower("mmoe", spec.input_dim, len(tasks), num_experts=4)
        model = MultiTaskModel(spec, tower, tasks, device=torch.device("meta"))  # DMP materialises it
        loss, (task_losses, predictions, labels) = model(batch)
    """

    def __init__(self, spec: FeatureSpec, tower: nn.Module, tasks: List[Task],
                 device: Optional[torch.device] = None, loss_weighting: Optional[nn.Module] = None) -> None:
        super().__init__()
        if len(tower.output_dims) != len(tasks):
            raise ValueError(f"the tower makes {len(tower.output_dims)} representations for {len(tasks)} tasks")
        self.spec = spec
        self.tasks = tasks
        self.num_tasks = len(tasks)
        self.has_sparse = bool(spec.tables)
        self.feature_names = spec.feature_names
        if self.has_sparse:
            self.sparse_arch = EmbeddingBagCollection(tables=spec.tables, device=device)
        self.tower = tower
        self.heads = nn.ModuleList(task.build_head(dim) for task, dim in zip(tasks, tower.output_dims))
        self.loss_weighting = loss_weighting or FixedWeighting([t.weight for t in tasks])

    @classmethod
    def from_config(cls, schema: DatasetSchema, cfg: ModelConfig, device: Optional[torch.device] = None
                    ) -> "MultiTaskModel":
        spec = FeatureSpec.from_schema(schema, cfg.embeddings)
        tasks = [Task(t) for t in cfg.tasks]
        missing = [t.label for t in tasks if t.label not in schema.label_names]
        if missing:
            raise ValueError(f"task labels {missing} are not in the prepared data (labels: {schema.label_names})")
        tower = build_tower(cfg.tower.name, spec.input_dim, len(tasks), **cfg.tower.params)
        weighting = build_loss_weighting(cfg.loss, [t.weight for t in tasks])
        return cls(spec, tower, tasks, device=device, loss_weighting=weighting)

    def tower_input(self, batch: Batch) -> torch.Tensor:
        if not self.has_sparse:
            return batch.dense_features
        pooled = self.sparse_arch(batch.sparse_features).to_dict()
        # By name, never pooled.values(): a sharded collection returns its keys in the plan's
        # order, which changes with the world size and would scramble the tower's inputs.
        return torch.cat([pooled[name] for name in self.feature_names] + [batch.dense_features], dim=1)

    def forward(self, batch: Batch) -> ModelOutput:
        shared = self.tower_input(batch)
        representations = self.tower(shared)
        losses, predictions, labels = [], {}, {}
        for i in range(self.num_tasks):  # concrete ints: the list is opaque under FX tracing
            task = self.tasks[i]
            output = self.heads[i](representations[i])
            label = batch.labels[task.label]
            losses.append(task.loss(output, label))
            predictions[task.name] = task.prediction(output).detach()
            labels[task.name] = label
        task_losses = torch.stack(losses)
        loss = self.loss_weighting(task_losses, shared)  # fixed weights: the study's eq. 12
        return loss, (task_losses.detach(), predictions, labels)
