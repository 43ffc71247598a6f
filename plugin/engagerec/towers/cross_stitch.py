"""CrossStitch: one MLP column per task, mixed by a learned cross-stitch unit after every layer.

Study eq. 1 (Misra et al., "Cross-stitch Networks for Multi-task Learning", CVPR 2016),
generalised from two tasks to T: after layer l, the task activations are recombined as
x~_t = sum_s alpha_l[t, s] x_s with one learned T x T matrix alpha_l per layer.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from engagerec.towers.common import mlp, out_dim
from engagerec.towers.registry import register_tower

ALPHA_INITS = ("zeros", "identity", "near_identity")


def initial_alpha(
    num_tasks: int, init: str, self_weight: float, device: Optional[torch.device] = None
) -> torch.Tensor:
    """
    A starting cross-stitch matrix alpha (study eq. 1), [num_tasks, num_tasks]; row t says
    how much of each task's activation task t's next layer reads.

    Args:
        num_tasks (int): number of tasks T.
        init (str): ``"zeros"`` (the study's initialisation), ``"identity"`` (independent
            columns, as SingleTask) or ``"near_identity"`` (Misra et al.'s: ``self_weight`` on
            the diagonal, ``(1 - self_weight) / (T - 1)`` elsewhere, rows summing to 1).
        self_weight (float): the diagonal of ``"near_identity"``; unused by the others.
        device (Optional[torch.device]): where the tensor is created. Default: None.

    Returns:
        torch.Tensor: [num_tasks, num_tasks] float32.

    Raises:
        ValueError: if ``init`` is not one of the three names.

    Example::

        >>> from engagerec.towers.cross_stitch import initial_alpha
        >>> initial_alpha(3, "near_identity", self_weight=0.8)
        tensor([[0.8000, 0.1000, 0.1000],
                [0.1000, 0.8000, 0.1000],
                [0.1000, 0.1000, 0.8000]])
    """
    if init == "zeros":
        return torch.zeros(num_tasks, num_tasks, device=device)
    if init == "identity":
        return torch.eye(num_tasks, device=device)
    if init == "near_identity":
        if num_tasks == 1:
            return torch.ones(1, 1, device=device)
        other = (1.0 - self_weight) / (num_tasks - 1)
        eye = torch.eye(num_tasks, device=device)
        return torch.full((num_tasks, num_tasks), other, device=device) + eye * (self_weight - other)
    raise ValueError(f"unknown alpha_init '{init}', expected one of {ALPHA_INITS}")


@register_tower("cross_stitch")
class CrossStitch(nn.Module):
    """
    One MLP column per task, with a cross-stitch unit after every layer (the last one
    included): the columns' activations at layer l are recombined by a learned
    [num_tasks, num_tasks] matrix ``alphas[l]``, x~_t = sum_s alpha_l[t, s] x_s, study eq. 1
    generalised from two tasks to T. With the study's all-zero start the layers wake up one
    per optimiser step, top first: a layer's columns get no gradient until the alphas of that
    layer and of every layer above it have moved away from 0.

    Args:
        input_dim (int): number of elements in each input sample (the tower input).
        num_tasks (int): number of tasks T, one column each.
        layer_sizes (Sequence[int]): ``out_features`` of each column's layers, bottom to top;
            one cross-stitch unit per entry. Default: (128, 64).
        activation (str): the nonlinearity after every layer, one of ``"relu"``, ``"gelu"``,
            ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every activation. Default: 0.0.
        alpha_init (str): how every alpha starts: ``"zeros"`` (the study's), ``"identity"``
            (independent columns: the tower then computes what SingleTask does) or
            ``"near_identity"`` (Misra et al.'s; see ``self_weight``). Default: ``"zeros"``.
        self_weight (float): with ``"near_identity"``, alpha[t, t]; the rest of each row is
            ``(1 - self_weight) / (T - 1)``, so rows sum to 1. Ignored by the other
            initialisations. Default: 0.9 (Misra et al.'s choice).
        train_alpha (bool): learn the alphas; False keeps them at their initial values
            (``requires_grad=False``). Default: True.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim], every column's input.

    Returns:
        List[torch.Tensor]: ``num_tasks`` tensors [B, layer_sizes[-1]], the stitched output
        of each task's column.

    Raises:
        ValueError: if ``alpha_init`` or ``activation`` is unknown.

    Example::

        >>> import torch
        >>> from engagerec.towers import CrossStitch
        >>> _ = torch.manual_seed(0)
        >>> tower = CrossStitch(input_dim=32, num_tasks=2, layer_sizes=[64, 32], alpha_init="near_identity")
        >>> [tuple(rep.shape) for rep in tower(torch.randn(8, 32))]
        [(8, 32), (8, 32)]
        >>> tower.alphas[0].data  # the mixing matrix after the first layer
        tensor([[0.9000, 0.1000],
                [0.1000, 0.9000]])
        >>> meta = CrossStitch(32, 2, layer_sizes=[64, 32], device=torch.device("meta"))
        >>> meta.alphas[0].device, meta.layers[1][0][0].weight.device
        (device(type='meta'), device(type='meta'))
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
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        widths = [input_dim, *layer_sizes]
        # layers[l][t]: task t's column at depth l
        self.layers = nn.ModuleList(
            nn.ModuleList(
                mlp(widths[i], [widths[i + 1]], activation, dropout, device=device) for _ in range(num_tasks)
            )
            for i in range(len(layer_sizes))
        )
        self.alphas = nn.ParameterList(
            nn.Parameter(
                initial_alpha(num_tasks, alpha_init, self_weight, device=device), requires_grad=train_alpha
            )
            for _ in layer_sizes
        )
        self.output_dims: List[int] = [out_dim(input_dim, layer_sizes)] * num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B, input_dim] -> one [B, output_dims[t]] per task."""
        states = [x for _ in range(self.num_tasks)]
        for columns, alpha in zip(self.layers, self.alphas, strict=True):
            stacked = torch.stack(
                [column(state) for column, state in zip(columns, states, strict=True)]
            )  # [T, B, H]
            mixed = torch.einsum("ts,sbh->tbh", alpha, stacked)
            states = [mixed[t] for t in range(self.num_tasks)]
        return states
