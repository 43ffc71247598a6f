"""Task: a label, a kind, a head and a loss. Heads map a tower representation to one output."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engagerec.config import TaskConfig
from engagerec.errors import ConfigError
from engagerec.towers.common import mlp, out_dim

KINDS = ("regression", "binary")
REGRESSION_OUTPUTS = ("sigmoid", "identity")
REGRESSION_LOSSES = ("mse", "cross_entropy")


class TaskHead(nn.Module):
    """
    A task's prediction head h_k of study eq. 3, y_k = h_k(f_k(x)): an optional MLP, then one
    linear output unit, then the output transform. With no hidden layers it is the linear
    head the study puts on PLE's last representation (the equations after eq. 10). A
    regression head applies ``"sigmoid"`` (keeps a watch ratio in [0, 1]) or ``"identity"``;
    a binary head is built with ``"identity"`` and returns the logit.

    Args:
        input_dim (int): width of the tower representation the head reads.
        hidden (List[int]): ``out_features`` of the MLP layers (ReLU) before the output unit;
            empty for none.
        transform (str): ``"sigmoid"`` or ``"identity"``, applied to the output unit.

    Call Args:
        representation (torch.Tensor): [B, input_dim], the tower's output for this task.
        offset (Optional[torch.Tensor]): [B], added to the output unit before the transform.
            Default: None.

    Returns:
        torch.Tensor: [B], one output per sample.

    Example::

        >>> import torch
        >>> from engagerec.tasks import TaskHead
        >>> _ = torch.manual_seed(0)
        >>> head = TaskHead(input_dim=8, hidden=[16], transform="sigmoid")
        >>> out = head(torch.randn(4, 8))
        >>> out.shape, bool(((out > 0) & (out < 1)).all())
        (torch.Size([4]), True)
    """

    def __init__(self, input_dim: int, hidden: List[int], transform: str) -> None:
        super().__init__()
        self.hidden = mlp(input_dim, hidden)
        self.out = nn.Linear(out_dim(input_dim, hidden), 1)
        self.transform = transform

    def forward(self, representation: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """representation [B, input_dim] -> [B]; ``offset`` [B], if given, joins the output unit
        before the transform (e.g. ``engagerec.interactions.DotLogits``)."""
        value = self.out(self.hidden(representation)).squeeze(-1)
        if offset is not None:
            value = value + offset
        return torch.sigmoid(value) if self.transform == "sigmoid" else value


class Task:
    """
    One prediction task: which label it reads, its kind, its head, its loss and what its
    metrics read. It owns the meaning of the head's output: a regression head's output is
    the estimate (trained with MSE), a binary head's the logit (trained with binary
    cross-entropy, read as sigmoid(logit)). A regression task with ``loss: cross_entropy``
    is read like a binary one: its head returns a logit, trained with cross-entropy against
    the ratio as a soft label (fractional logistic regression, Papke and Wooldridge 1996),
    and read as sigmoid(logit). Both losses are minimised by the conditional mean, but
    cross-entropy's gradient, sigmoid(logit) - label, does not vanish where the sigmoid
    saturates, as MSE's does near the many ratios at the cap of 1. ``weight`` is the task's
    omega in the study's weighted loss sum, eq. 12.

    Args:
        cfg (TaskConfig): ``name`` (the key of the task's loss, prediction and metrics),
            ``label`` (the label it reads from a Batch), ``kind`` (``"regression"`` or
            ``"binary"``), ``weight`` (omega of eq. 12), ``head_sizes`` (the head's hidden
            layers) and ``output`` (a regression head's transform, ``"sigmoid"`` or
            ``"identity"``; binary heads ignore it) and ``loss`` (a regression task's,
            ``"mse"`` when unset, or ``"cross_entropy"``, which needs the sigmoid output).

    Raises:
        ConfigError: if ``kind``, a regression task's ``output`` or ``loss`` is unknown,
            cross-entropy is asked of an identity output (its label need not lie in [0, 1]), or
            a binary task names a loss.

    Example::

        >>> import torch
        >>> from engagerec.config import TaskConfig
        >>> from engagerec.tasks import Task
        >>> _ = torch.manual_seed(0)
        >>> skip = Task(TaskConfig(name="skip", label="skip", kind="binary"))
        >>> skip.build_head(8)(torch.randn(4, 8)).shape  # logits
        torch.Size([4])
        >>> logits, label = torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 0.0])
        >>> round(skip.loss(logits, label, torch.tensor([1.0, 1.0, 1.0, 0.0])).item(), 4)  # log 2
        0.6931
        >>> skip.prediction(logits)  # probabilities
        tensor([0.5000, 0.5000, 0.5000, 0.5000])
        >>> ratio = Task(TaskConfig(name="watch_ratio", label="watch_ratio"))
        >>> ratio.loss(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
        tensor(0.2500)
        >>> soft = Task(TaskConfig(name="watch_ratio", label="watch_ratio", loss="cross_entropy"))
        >>> logits = torch.zeros(2)  # sigmoid 0.5: cross-entropy log 2 for any soft label
        >>> round(soft.loss(logits, torch.tensor([0.3, 1.0]), torch.ones(2)).item(), 4)
        0.6931
        >>> soft.prediction(torch.tensor([0.0, 2.0])).round(decimals=3)
        tensor([0.5000, 0.8810])
    """

    def __init__(self, cfg: TaskConfig) -> None:
        if cfg.kind not in KINDS:
            raise ConfigError(f"task '{cfg.name}': kind '{cfg.kind}', expected one of {KINDS}")
        if cfg.kind == "regression" and cfg.output not in REGRESSION_OUTPUTS:
            raise ConfigError(
                f"task '{cfg.name}': output '{cfg.output}', expected one of {REGRESSION_OUTPUTS}"
            )
        if cfg.kind == "regression" and cfg.loss not in (None, *REGRESSION_LOSSES):
            raise ConfigError(f"task '{cfg.name}': loss '{cfg.loss}', expected one of {REGRESSION_LOSSES}")
        if cfg.kind == "binary" and cfg.loss is not None:
            raise ConfigError(
                f"task '{cfg.name}': loss '{cfg.loss}' on a binary task, which always trains with "
                "cross-entropy on its logit; loss applies to regression tasks"
            )
        if cfg.kind == "regression" and cfg.loss == "cross_entropy" and cfg.output != "sigmoid":
            raise ConfigError(
                f"task '{cfg.name}': loss 'cross_entropy' reads the label as a probability, "
                f"expected output 'sigmoid' (a label in [0, 1]), got '{cfg.output}'"
            )
        self.cfg = cfg
        self.name, self.label, self.kind, self.weight = cfg.name, cfg.label, cfg.kind, cfg.weight
        # binary tasks and cross-entropy regression: the head returns a logit, read as sigmoid(logit)
        self.logit = cfg.kind == "binary" or cfg.loss == "cross_entropy"

    def build_head(self, input_dim: int) -> TaskHead:
        """
        Args:
            input_dim (int): width of the tower representation for this task.

        Returns:
            TaskHead: ``cfg.head_sizes`` hidden layers and the output transform (identity
            where the head returns a logit).
        """
        return TaskHead(input_dim, list(self.cfg.head_sizes), "identity" if self.logit else self.cfg.output)

    def loss(self, output: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """
        MSE for regression, binary cross-entropy on the logit for binary (study section 7)
        and for ``loss: cross_entropy`` regression (the label a soft target), averaged with
        ``weight``: sum(weight * per_row) / max(sum(weight), 1).

        Args:
            output (torch.Tensor): [B], the head's output.
            label (torch.Tensor): [B] float32 label values.
            weight (torch.Tensor): [B] row weights, 0 for rows whose label is missing and
                for padding rows.

        Returns:
            torch.Tensor: the scalar task loss L_t.
        """
        if self.logit:
            per_row = F.binary_cross_entropy_with_logits(output, label, reduction="none")
        else:
            per_row = (output - label) ** 2
        return (per_row * weight).sum() / weight.sum().clamp_min(1.0)

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """
        The value metrics read.

        Args:
            output (torch.Tensor): [B], the head's output.

        Returns:
            torch.Tensor: [B], the regression estimate, or the probability of the positive class.
        """
        return torch.sigmoid(output) if self.logit else output
