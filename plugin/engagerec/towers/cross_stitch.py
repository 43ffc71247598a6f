"""CrossStitch: one MLP column per task, mixed by a learned cross-stitch unit after every layer.

Study eq. 1 (Misra et al., "Cross-stitch Networks for Multi-task Learning", CVPR 2016),
generalised from two tasks to T: after layer l, the task activations are recombined as
x~_t = sum_s alpha_l[t, s] x_s with one learned T x T matrix alpha_l per layer.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from engagerec.towers.common import mlp, out_dim
from engagerec.towers.registry import register_tower

ALPHA_INITS = ("zeros", "identity", "near_identity")


def initial_alpha(num_tasks: int, init: str, self_weight: float) -> torch.Tensor:
    """zeros: the study's choice; identity: independent columns; near_identity: Misra et al.'s
    (self_weight on the diagonal, the rest split evenly, rows summing to 1)."""
    if init == "zeros":
        return torch.zeros(num_tasks, num_tasks)
    if init == "identity":
        return torch.eye(num_tasks)
    if init == "near_identity":
        if num_tasks == 1:
            return torch.ones(1, 1)
        other = (1.0 - self_weight) / (num_tasks - 1)
        return torch.full((num_tasks, num_tasks), other) + torch.eye(num_tasks) * (self_weight - other)
    raise ValueError(f"unknown alpha_init '{init}', expected one of {ALPHA_INITS}")


@register_tower("cross_stitch")
class CrossStitch(nn.Module):
    """Example::

    tower = CrossStitch(input_dim=32, num_tasks=2, layer_sizes=[64, 32], alpha_init="near_identity")
    reps = tower(torch.randn(8, 32))   # two [8, 32] tensors
    tower.alphas[0]                    # the 2 x 2 mixing matrix after the first layer
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        layer_sizes: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        alpha_init: str = "zeros",
        self_weight: float = 0.9,
        train_alpha: bool = True,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        widths = [input_dim, *layer_sizes]
        # layers[l][t]: task t's column at depth l
        self.layers = nn.ModuleList(
            nn.ModuleList(mlp(widths[i], [widths[i + 1]], activation, dropout) for _ in range(num_tasks))
            for i in range(len(layer_sizes))
        )
        self.alphas = nn.ParameterList(
            nn.Parameter(initial_alpha(num_tasks, alpha_init, self_weight), requires_grad=train_alpha)
            for _ in layer_sizes
        )
        self.output_dims: List[int] = [out_dim(input_dim, layer_sizes)] * num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        states = [x for _ in range(self.num_tasks)]
        for columns, alpha in zip(self.layers, self.alphas, strict=True):
            stacked = torch.stack(
                [column(state) for column, state in zip(columns, states, strict=True)]
            )  # [T, B, H]
            mixed = torch.einsum("ts,sbh->tbh", alpha, stacked)
            states = [mixed[t] for t in range(self.num_tasks)]
        return states
