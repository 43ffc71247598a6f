"""MMoE: shared experts, one softmax gate per task (study eq. 2-6; Ma et al., KDD 2018)."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from engagerec.towers.common import ExpertGroup, GateBank, mix, out_dim
from engagerec.towers.registry import register_tower


@register_tower("mmoe")
class MMoE(nn.Module):
    """f_k(x) = sum_i softmax(W_k x)_i f_i(x): every task mixes the same experts its own way.

    Example::

        tower = MMoE(input_dim=32, num_tasks=2, num_experts=4, expert_sizes=[64])
        reps = tower(torch.randn(8, 32))   # two [8, 64] tensors
        tower.gate_weights["task0"]        # [8, 4], rows sum to 1 (from the last forward)
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_experts: int = 4,
        expert_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.experts = ExpertGroup(input_dim, num_experts, expert_sizes, activation, dropout)
        self.gates = GateBank(input_dim, [num_experts] * num_tasks)  # every gate reads x: one matmul
        self.output_dims: List[int] = [out_dim(input_dim, expert_sizes)] * num_tasks
        self.gate_weights: Dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        experts = self.experts(x)  # [B, E, H]
        gates = self.gates(x)
        outputs = []
        for task in range(self.num_tasks):  # index with ints: traceable whether gates is a leaf or not
            self.gate_weights[f"task{task}"] = gates[task].detach()
            outputs.append(mix(gates[task], experts))
        return outputs
