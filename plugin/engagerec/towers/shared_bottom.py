"""SharedBottom: hard parameter sharing; every task reads the same representation."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from engagerec.towers.common import mlp, out_dim
from engagerec.towers.registry import register_tower


@register_tower("shared_bottom")
class SharedBottom(nn.Module):
    """One MLP shared by all tasks (Caruana 1997); task-specific layers live in the heads.

    Example::

        tower = SharedBottom(input_dim=32, num_tasks=2, layer_sizes=[64, 32])
        reps = tower(torch.randn(8, 32))  # the same [8, 32] tensor for both tasks
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
        self.bottom = mlp(input_dim, layer_sizes, activation, dropout)
        self.output_dims: List[int] = [out_dim(input_dim, layer_sizes)] * num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        shared = self.bottom(x)
        return [shared for _ in range(self.num_tasks)]
