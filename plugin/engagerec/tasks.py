"""Task: a label, a kind, a head and a loss. Heads map a tower representation to one output."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from engagerec.config import TaskConfig
from engagerec.towers.common import mlp, out_dim

KINDS = ("regression", "binary")
REGRESSION_OUTPUTS = ("sigmoid", "identity")


class TaskHead(nn.Module):
    """Optional task MLP, then one output unit. Regression applies its output transform
    (sigmoid keeps a watch ratio in [0, 1]); binary returns the logit."""

    def __init__(self, input_dim: int, hidden: List[int], transform: str) -> None:
        super().__init__()
        self.hidden = mlp(input_dim, hidden)
        self.out = nn.Linear(out_dim(input_dim, hidden), 1)
        self.transform = transform

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        value = self.out(self.hidden(representation)).squeeze(-1)
        return torch.sigmoid(value) if self.transform == "sigmoid" else value


class Task:
    """Built from a TaskConfig; owns the meaning of the head's output for its kind."""

    def __init__(self, cfg: TaskConfig) -> None:
        if cfg.kind not in KINDS:
            raise ValueError(f"task '{cfg.name}': kind '{cfg.kind}', expected one of {KINDS}")
        if cfg.kind == "regression" and cfg.output not in REGRESSION_OUTPUTS:
            raise ValueError(
                f"task '{cfg.name}': output '{cfg.output}', expected one of {REGRESSION_OUTPUTS}"
            )
        self.cfg = cfg
        self.name, self.label, self.kind, self.weight = cfg.name, cfg.label, cfg.kind, cfg.weight

    def build_head(self, input_dim: int) -> TaskHead:
        return TaskHead(
            input_dim, list(self.cfg.head_sizes), self.cfg.output if self.kind == "regression" else "identity"
        )

    def loss(self, output: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """MSE for regression, binary cross-entropy on the logit for binary (study section 7),
        averaged with ``weight`` (0 for rows whose label is missing and for padding rows)."""
        if self.kind == "binary":
            per_row = F.binary_cross_entropy_with_logits(output, label, reduction="none")
        else:
            per_row = (output - label) ** 2
        return (per_row * weight).sum() / weight.sum().clamp_min(1.0)

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The value metrics read: the regression estimate, or the probability of the positive class."""
        return torch.sigmoid(output) if self.kind == "binary" else output
