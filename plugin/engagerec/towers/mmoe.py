"""MMoE: shared experts, one softmax gate per task (study eq. 2-6; Ma et al., KDD 2018)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from engagerec.towers.common import ExpertGroup, GateBank, out_dim
from engagerec.towers.registry import register_tower


@register_tower("mmoe")
class MMoE(nn.Module):
    """
    Multi-gate Mixture-of-Experts (Ma et al., KDD 2018): ``num_experts`` experts shared by all
    tasks and one softmax gate per task, so every task mixes the same experts its own way.
    Task k's representation is f_k(x) = sum_i g_k(x)_i f_i(x) (study eq. 4, the multi-gate
    form of the mixture of eq. 2) with the gate g_k(x) = softmax(W_k x + b_k) (eq. 6, with a
    bias); each expert f_i is an MLP. The heads then compute y_k = h_k(f_k(x)) (eq. 3). The
    gates of the last forward are kept, detached, in ``gate_weights``: ``"task{k}"`` ->
    [B, num_experts] (eq. 5's g_k(x)_i in column i).

    Args:
        input_dim (int): number of elements in each input sample (x, what experts and gates read).
        num_tasks (int): number of tasks, one gate each.
        num_experts (int): number of shared experts, n in eq. 2 and 4. Default: 4.
        expert_sizes (Sequence[int]): ``out_features`` of each expert's layers, bottom to top;
            the last is the representation width. Default: (64,).
        activation (str): the nonlinearity after every expert layer, one of ``"relu"``,
            ``"gelu"``, ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every expert activation. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        List[torch.Tensor]: ``num_tasks`` tensors [B, expert_sizes[-1]], f_k(x) of eq. 4.

    Example::

        >>> import torch
        >>> from engagerec.towers import MMoE
        >>> _ = torch.manual_seed(0)
        >>> tower = MMoE(input_dim=32, num_tasks=2, num_experts=4, expert_sizes=[64])
        >>> [tuple(rep.shape) for rep in tower(torch.randn(8, 32))]
        [(8, 64), (8, 64)]
        >>> gates = tower.gate_weights["task0"]  # from the last forward
        >>> gates.shape, torch.allclose(gates.sum(dim=1), torch.ones(8))
        (torch.Size([8, 4]), True)
        >>> meta = MMoE(32, 2, num_experts=4, expert_sizes=[64], device=torch.device("meta"))
        >>> all(p.is_meta for p in meta.parameters())
        True
        >>> meta(torch.empty(8, 32, device="meta"))[0].shape  # shapes without memory
        torch.Size([8, 64])
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_experts: int = 4,
        expert_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.experts = ExpertGroup(input_dim, num_experts, expert_sizes, activation, dropout, device=device)
        # every gate reads x: one matmul
        self.gates = GateBank(input_dim, [num_experts] * num_tasks, device=device)
        self.output_dims: List[int] = [out_dim(input_dim, expert_sizes)] * num_tasks
        self.gate_weights: Dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B, input_dim] -> one [B, output_dims[k]] per task; records ``gate_weights``."""
        experts = self.experts(x)  # [B, E, H]
        gates = self.gates.stacked(x)  # [B, tasks, E]
        # every task's mixture sum_i g_k(x)_i f_i(x) at once: one batched matmul forward and two
        # backward, where a mixture per task costs a [B, E, H] product and reduction each
        mixtures = torch.bmm(gates, experts)  # [B, tasks, H]
        # unbind, not a select per task: one backward copy instead of a zero-filled [B, tasks, H]
        # gradient per task
        unbound = mixtures.unbind(1)
        outputs = []
        for task in range(self.num_tasks):  # index with ints: traceable whether gates is a leaf or not
            self.gate_weights[f"task{task}"] = gates[:, task].detach()
            outputs.append(unbound[task])
        return outputs
