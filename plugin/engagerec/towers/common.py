"""Building blocks shared by the towers."""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(
    input_dim: int, layer_sizes: Sequence[int], activation: str = "relu", dropout: float = 0.0
) -> nn.Sequential:
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


class ExpertGroup(nn.Module):
    """``num_experts`` MLPs of one shape on one input, computed together: the first layer is one
    wide matmul, deeper layers one batched matmul, instead of a small matmul per expert.
    Each expert is initialised as nn.Linear would be. Returns [B, num_experts, out_dim].
    ``expert(i)`` gives expert i's weights as an ordinary nn.Sequential (for inspection)."""

    def __init__(
        self,
        input_dim: int,
        num_experts: int,
        layer_sizes: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}', expected one of {sorted(ACTIVATIONS)}")
        self.num_experts, self.input_dim = num_experts, input_dim
        widths = [input_dim, *layer_sizes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            bound = 1.0 / fan_in**0.5  # nn.Linear's default initialisation
            self.weights.append(
                nn.Parameter(torch.empty(num_experts, fan_in, fan_out).uniform_(-bound, bound))
            )
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, fan_out).uniform_(-bound, bound)))
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.output_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.weights) == 0:
            return x.unsqueeze(1).expand(-1, self.num_experts, -1)
        batch = x.shape[0]
        first, bias = self.weights[0], self.biases[0]
        wide = first.permute(1, 0, 2).reshape(self.input_dim, -1)  # [D, E * H1]
        h = torch.addmm(bias.reshape(1, -1), x, wide).view(batch, self.num_experts, -1).transpose(0, 1)
        h = self.dropout(self.activation(h))  # [E, B, H1]
        for weight, bias in zip(list(self.weights)[1:], list(self.biases)[1:], strict=True):
            h = self.dropout(self.activation(torch.baddbmm(bias, h, weight)))
        return h.transpose(0, 1)  # [B, E, H]


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_i w_i f_i: weights [B, E], experts [B, E, H] -> [B, H]. Elementwise: for a handful of
    experts this beats a batch of one-row matmuls."""
    return (weights.unsqueeze(-1) * experts).sum(dim=1)


class GateBank(nn.Module):
    """Several softmax gates that read the same input, as one Linear (one matmul forward, one
    backward through the wide input instead of one per gate). Returns one [B, n_g] per gate."""

    def __init__(self, input_dim: int, gate_sizes: Sequence[int]) -> None:
        super().__init__()
        self.gate_sizes = list(gate_sizes)
        self.linear = nn.Linear(input_dim, sum(gate_sizes))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        logits = self.linear(x)
        gates, start = [], 0
        for size in self.gate_sizes:  # Python ints: FX-traceable, unlike iterating a split
            gates.append(torch.softmax(logits[:, start : start + size], dim=-1))
            start += size
        return gates


class GatedMixture(nn.Module):
    """softmax(W x + b) over stacked expert outputs: sum_i g_i(x) f_i(x) (study eq. 2-6, 9-10)."""

    def __init__(self, gate_input_dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(gate_input_dim, num_experts)

    def forward(self, gate_input: torch.Tensor, experts: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """experts: [B, E, H] -> (mixture [B, H], weights [B, E])."""
        weights = torch.softmax(self.gate(gate_input), dim=-1)
        return mix(weights, experts), weights
