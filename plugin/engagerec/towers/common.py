"""Building blocks shared by the towers."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(input_dim: int, layer_sizes: Sequence[int], activation: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """Linear -> activation (-> dropout) for each size. An empty ``layer_sizes`` is the identity."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}', expected one of {sorted(ACTIVATIONS)}")
    layers: List[nn.Module] = []
    width = input_dim
    for size in layer_sizes:
        layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    return nn.Sequential(*layers)


def out_dim(input_dim: int, layer_sizes: Sequence[int]) -> int:
    return layer_sizes[-1] if len(layer_sizes) else input_dim


class GatedMixture(nn.Module):
    """softmax(W x + b) over stacked expert outputs: sum_i g_i(x) f_i(x) (study eq. 2-6, 9-10)."""

    def __init__(self, gate_input_dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(gate_input_dim, num_experts)

    def forward(self, gate_input: torch.Tensor, experts: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """experts: [B, E, H] -> (mixture [B, H], weights [B, E])."""
        weights = torch.softmax(self.gate(gate_input), dim=-1)
        return torch.bmm(weights.unsqueeze(1), experts).squeeze(1), weights
