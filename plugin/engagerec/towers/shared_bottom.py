"""SharedBottom: hard parameter sharing; every task reads the same representation."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from engagerec.towers.common import mlp, out_dim
from engagerec.towers.registry import register_tower


@register_tower("shared_bottom")
class SharedBottom(nn.Module):
    """
    One MLP shared by all tasks (hard parameter sharing, Caruana 1997); the task-specific
    layers live in the heads. In the study's eq. 3, y_k = h_k(f_k(x)), every task has the
    same f_k = f.

    Args:
        input_dim (int): number of elements in each input sample (the tower input).
        num_tasks (int): number of tasks reading the shared representation.
        layer_sizes (Sequence[int]): ``out_features`` of the shared MLP's layers, bottom to
            top. Default: (128, 64).
        activation (str): the nonlinearity after every layer, one of ``"relu"``, ``"gelu"``,
            ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every activation. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        List[torch.Tensor]: the same [B, layer_sizes[-1]] tensor ``num_tasks`` times.

    Example::

        >>> import torch
        >>> from engagerec.towers import SharedBottom
        >>> _ = torch.manual_seed(0)
        >>> tower = SharedBottom(input_dim=32, num_tasks=2, layer_sizes=[64, 32])
        >>> reps = tower(torch.randn(8, 32))
        >>> reps[0].shape, reps[0] is reps[1]
        (torch.Size([8, 32]), True)
        >>> SharedBottom(32, 2, device=torch.device("meta")).bottom[0].weight.device
        device(type='meta')
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        layer_sizes: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.bottom = mlp(input_dim, layer_sizes, activation, dropout, device=device)
        self.output_dims: List[int] = [out_dim(input_dim, layer_sizes)] * num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B, input_dim] -> the shared [B, output_dims[0]] once per task."""
        shared = self.bottom(x)
        return [shared for _ in range(self.num_tasks)]
