"""Task-loss weighting: fixed (the study's eq. 12), uncertainty, GradNorm.

Each is an nn.Module ``forward(task_losses [T], shared [B, D]) -> loss``; ``shared`` is
the tower input, the one representation every task depends on in every tower.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from engagerec.config import LossConfig
from engagerec.errors import ConfigError

WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")


class FixedWeighting(nn.Module):
    """
    The study's weighted sum of task losses, eq. 12 (omega_r L_r + omega_c L_c), for any
    number of tasks: L = sum_t omega_t L_t with constant omega (the tasks' ``weight``).

    Args:
        weights (List[float]): omega_t, one per task, kept as a float32 buffer.

    Call Args:
        task_losses (torch.Tensor): [T], the task losses L_t.
        shared (torch.Tensor): the tower input; unused here (the common signature).

    Returns:
        torch.Tensor: the scalar total loss.

    Example::

        >>> import torch
        >>> from engagerec.losses import FixedWeighting
        >>> weighting = FixedWeighting([1.0, 0.5])
        >>> weighting(torch.tensor([2.0, 4.0]), shared=torch.zeros(0))
        tensor(4.)
        >>> weighting.current_weights()
        tensor([1.0000, 0.5000])
    """

    def __init__(self, weights: List[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))

    def forward(self, task_losses: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """task_losses [T] -> sum_t omega_t L_t."""
        return (task_losses * self.weights).sum()

    def current_weights(self) -> torch.Tensor:
        """[T], the factor each task loss is multiplied by (omega)."""
        return self.weights.detach().clone()


class UncertaintyWeighting(nn.Module):
    """
    Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): each task has a
    learned log variance s_t = log sigma_t^2 (initialised at 0, i.e. sigma = 1) and
    L = sum_t (exp(-s_t) omega_t L_t + s_t) / 2. A noisy task learns a large sigma and counts
    less; the s_t / 2 term keeps sigma from growing without bound. The study's eq. 12 with
    learned factors omega_t exp(-s_t) / 2.

    Args:
        weights (List[float]): omega_t, one per task, a constant factor on top of the
            learned one.

    Call Args:
        task_losses (torch.Tensor): [T], the task losses L_t.
        shared (torch.Tensor): the tower input; unused here (the common signature).

    Returns:
        torch.Tensor: the scalar total loss.

    Example::

        >>> import torch
        >>> from engagerec.losses import UncertaintyWeighting
        >>> weighting = UncertaintyWeighting([1.0, 1.0])
        >>> weighting(torch.tensor([2.0, 4.0]), shared=torch.zeros(0))  # s = 0: (2 + 4) / 2
        tensor(3., grad_fn=<MulBackward0>)
        >>> weighting.current_weights()  # omega_t exp(-s_t) / 2
        tensor([0.5000, 0.5000])
        >>> weighting.log_variance.shape
        torch.Size([2])
    """

    def __init__(self, weights: List[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.log_variance = nn.Parameter(torch.zeros(len(weights)))

    def forward(self, task_losses: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """task_losses [T] -> sum_t (exp(-s_t) omega_t L_t + s_t) / 2."""
        precision = torch.exp(-self.log_variance)
        return 0.5 * (precision * self.weights * task_losses + self.log_variance).sum()

    def current_weights(self) -> torch.Tensor:
        """[T], the factor each task loss is multiplied by now: omega_t exp(-s_t) / 2."""
        return (0.5 * torch.exp(-self.log_variance) * self.weights).detach()


class GradNormWeighting(nn.Module):
    """
    GradNorm (Chen et al., ICML 2018): task weights w = T softmax(theta) (so they always sum
    to T) are moved so that each task's gradient norm on the shared representation,
    G_t = w_t ||dL_t/dx||, approaches mean(G) * r_t^alpha, where r_t is the task's loss ratio
    L_t / L_t(first step) relative to the mean ratio: a task that trains slower gets a larger
    weight. The returned loss carries two parts: sum_t w_t L_t with w held constant (the
    study's eq. 12 with omega = w; trains the network) and the GradNorm objective
    sum_t |G_t - target_t| (target held constant), which reaches theta only. Outside training
    (``eval()``, no grad, or ``shared`` not requiring grad) it returns the first part alone.
    The first training forward records L_t(first step) in the ``initial_losses`` buffer. The
    task weights omega of the TaskConfigs are not used.

    Args:
        num_tasks (int): number of tasks T.
        alpha (float): the asymmetry alpha; 0 pulls every G_t to the mean, larger values
            favour the tasks that lag further. Default: 1.5.

    Call Args:
        task_losses (torch.Tensor): [T], the task losses L_t, in the graph of ``shared``.
        shared (torch.Tensor): [B, D], the representation every task depends on (the tower
            input); G_t is taken with respect to it.

    Returns:
        torch.Tensor: the scalar loss to back-propagate.

    Example::

        >>> import torch
        >>> from engagerec.losses import GradNormWeighting
        >>> _ = torch.manual_seed(0)
        >>> shared = torch.randn(4, 3, requires_grad=True)
        >>> task_losses = torch.stack([shared.pow(2).mean(), (3 * shared).pow(2).mean()])
        >>> weighting = GradNormWeighting(num_tasks=2, alpha=1.5)
        >>> weighting(task_losses, shared).backward()
        >>> torch.equal(weighting.initial_losses, task_losses.detach())  # L_t(first step)
        True
        >>> bool(weighting.theta.grad.abs().sum() > 0)  # the weights will move
        True
        >>> weighting.current_weights()  # w = T softmax(theta), before the optimiser step
        tensor([1., 1.])
        >>> _ = weighting.eval()
        >>> torch.isclose(weighting(task_losses.detach(), shared), task_losses.sum())  # sum_t w_t L_t
        tensor(True)
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5) -> None:
        super().__init__()
        self.num_tasks, self.alpha = num_tasks, alpha
        self.theta = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))

    def weights(self) -> torch.Tensor:
        """[T], w = T softmax(theta), in theta's graph."""
        return self.num_tasks * torch.softmax(self.theta, dim=0)

    def forward(self, task_losses: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """task_losses [T], shared [B, D] -> the network loss plus, in training, the GradNorm objective."""
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
        """[T], the factor each task loss is multiplied by now: w = T softmax(theta)."""
        return self.weights().detach()


def build_loss_weighting(cfg: LossConfig, task_weights: List[float]) -> nn.Module:
    """
    The configured task-loss weighting.

    Args:
        cfg (LossConfig): ``weighting`` (``"fixed"``, ``"uncertainty"`` or ``"gradnorm"``)
            and ``gradnorm_alpha``.
        task_weights (List[float]): omega_t, one per task (the TaskConfigs' ``weight``);
            GradNorm uses only their number.

    Returns:
        nn.Module: a FixedWeighting, UncertaintyWeighting or GradNormWeighting.

    Raises:
        ValueError: if ``cfg.weighting`` is unknown.

    Example::

        >>> from engagerec.config import LossConfig
        >>> from engagerec.losses import build_loss_weighting
        >>> weighting = build_loss_weighting(LossConfig(weighting="gradnorm", gradnorm_alpha=0.5), [1.0, 1.0])
        >>> type(weighting).__name__, weighting.num_tasks, weighting.alpha
        ('GradNormWeighting', 2, 0.5)
    """
    if cfg.weighting == "fixed":
        return FixedWeighting(task_weights)
    if cfg.weighting == "uncertainty":
        return UncertaintyWeighting(task_weights)
    if cfg.weighting == "gradnorm":
        return GradNormWeighting(len(task_weights), cfg.gradnorm_alpha)
    raise ConfigError(f"unknown loss weighting '{cfg.weighting}', expected one of {WEIGHTINGS}")
