"""Task-loss weighting: fixed (the study's eq. 12), uncertainty, GradNorm.

Each is an nn.Module ``forward(task_losses [T], shared [B, D]) -> loss``; ``shared`` is
the tower input, the one representation every task depends on in every tower.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from engagerec.config import LossConfig

WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")


class FixedWeighting(nn.Module):
    """L = sum_t omega_t L_t."""

    def __init__(self, weights: List[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, task_losses: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return (task_losses * self.weights).sum()

    def current_weights(self) -> torch.Tensor:
        return self.weights.detach().clone()


class UncertaintyWeighting(nn.Module):
    """Kendall, Gal & Cipolla (CVPR 2018): L = sum_t exp(-s_t) omega_t L_t / 2 + s_t / 2,
    with s_t = log sigma_t^2 learned (initialised at 0, i.e. sigma = 1)."""

    def __init__(self, weights: List[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.log_variance = nn.Parameter(torch.zeros(len(weights)))

    def forward(self, task_losses: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        precision = torch.exp(-self.log_variance)
        return 0.5 * (precision * self.weights * task_losses + self.log_variance).sum()

    def current_weights(self) -> torch.Tensor:
        return (0.5 * torch.exp(-self.log_variance) * self.weights).detach()


class GradNormWeighting(nn.Module):
    """Chen et al. (ICML 2018). Weights w = T softmax(theta) (so they always sum to T) are
    moved so that each task's gradient norm on the shared representation, G_t = w_t ||dL_t/dx||,
    approaches mean(G) * r_t^alpha, where r_t is the task's loss ratio L_t / L_t(first step)
    relative to the mean ratio. The returned loss carries two parts: sum_t w_t L_t with w
    held constant (trains the network) and the GradNorm objective, which depends on theta only.
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5) -> None:
        super().__init__()
        self.num_tasks, self.alpha = num_tasks, alpha
        self.theta = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))

    def weights(self) -> torch.Tensor:
        return self.num_tasks * torch.softmax(self.theta, dim=0)

    def forward(self, task_losses: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        weights = self.weights()
        network_loss = (weights.detach() * task_losses).sum()
        if not (self.training and torch.is_grad_enabled() and shared.requires_grad):
            return network_loss
        if bool((self.initial_losses == 0).all()):
            self.initial_losses.copy_(task_losses.detach())
        norms = torch.stack(
            [
                torch.autograd.grad(task_losses[t], shared, retain_graph=True)[0].norm()
                for t in range(self.num_tasks)
            ]
        ).detach()
        grad_norms = weights * norms
        ratios = task_losses.detach() / self.initial_losses.clamp_min(1e-12)
        target = (grad_norms.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        return network_loss + (grad_norms - target).abs().sum()

    def current_weights(self) -> torch.Tensor:
        return self.weights().detach()


def build_loss_weighting(cfg: LossConfig, task_weights: List[float]) -> nn.Module:
    if cfg.weighting == "fixed":
        return FixedWeighting(task_weights)
    if cfg.weighting == "uncertainty":
        return UncertaintyWeighting(task_weights)
    if cfg.weighting == "gradnorm":
        return GradNormWeighting(len(task_weights), cfg.gradnorm_alpha)
    raise ValueError(f"unknown loss weighting '{cfg.weighting}', expected one of {WEIGHTINGS}")
