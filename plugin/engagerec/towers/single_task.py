"""SingleTask: one independent MLP per task, the no-sharing baseline."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from engagerec.towers.common import mlp, out_dim
from engagerec.towers.registry import register_tower


@register_tower("single_task")
class SingleTask(nn.Module):
    """
    ``num_tasks`` separate MLP columns; nothing is shared above the embeddings. In the study's
    eq. 3, y_k = h_k(f_k(x)), every f_k is its own network (a CrossStitch with the identity
    as every alpha computes the same).

    Args:
        input_dim (int): number of elements in each input sample (the tower input).
        num_tasks (int): number of tasks, one column each.
        layer_sizes (Sequence[int]): ``out_features`` of each column's layers, bottom to top.
            Default: (128, 64).
        activation (str): the nonlinearity after every layer, one of ``"relu"``, ``"gelu"``,
            ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every activation. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        List[torch.Tensor]: ``num_tasks`` tensors [B, output_dims[t]], task t's column's
        output; ``output_dims`` is ``[layer_sizes[-1]] * num_tasks``.

    Example::

        >>> import torch
        >>> from engagerec.towers import SingleTask
        >>> _ = torch.manual_seed(0)
        >>> tower = SingleTask(input_dim=32, num_tasks=2, layer_sizes=[64, 32])
        >>> [tuple(rep.shape) for rep in tower(torch.randn(8, 32))]
        [(8, 32), (8, 32)]
        >>> tower.output_dims
        [32, 32]
        >>> meta = SingleTask(32, 2, layer_sizes=[64, 32], device=torch.device("meta"))
        >>> meta.columns[0][0].weight.device
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
        self.columns = nn.ModuleList(
            mlp(input_dim, layer_sizes, activation, dropout, device=device) for _ in range(num_tasks)
        )
        self.output_dims: List[int] = [out_dim(input_dim, layer_sizes)] * num_tasks

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B, input_dim] -> one [B, output_dims[t]] per task."""
        return [column(x) for column in self.columns]
