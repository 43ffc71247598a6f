"""SingleTask: one independent MLP per task, the no-sharing baseline."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from engagerec.towers.common import mlp, out_dim
from engagerec.towers.registry import register_tower


@register_tower("single_task")
class SingleTask(nn.Module):
    """``num_tasks`` separate columns; nothing is shared above the embeddings.

    Example::

        tower = SingleTask(input_dim=32, num_tasks=2, layer_sizes=[64, 32])
        reps = tower(torch.randn(8, 32))  # two tensors of shape [8, 32]
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        layer_sizes: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.columns = nn.ModuleList(
            mlp(input_dim, layer_sizes, activation, dropout) for _ in range(num_tasks)
        )
        self.output_dims: List[int] = [out_dim(input_dim, layer_sizes)] * num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [column(x) for column in self.columns]
