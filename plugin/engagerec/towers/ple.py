"""CGC and PLE: shared and task-specific experts with per-task gates (study eq. 7-11;
Tang et al., "Progressive Layered Extraction", RecSys 2020). One extraction level is CGC."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from engagerec.towers.common import ExpertGroup, GateBank, GatedMixture, mix, out_dim
from engagerec.towers.registry import register_tower


class ExtractionLevel(nn.Module):
    """
    One extraction level j of PLE (study eq. 7-11): ``num_shared`` shared experts,
    ``num_specific`` experts per task, and per task a gate over its own and the shared
    experts; below the last level also a shared gate over every expert, whose mixture is the
    next level's shared input. Task k's experts and gate read its previous representation
    d_{k,j-1} (eq. 10), the shared experts and gate the previous shared mixture.

    Args:
        input_dim (int): width of the level's inputs (x at the first level, the previous
            level's expert width above it).
        num_tasks (int): number of tasks.
        num_shared (int): shared experts, E_s of eq. 8.
        num_specific (int): experts per task (E_r and E_c of eq. 8 for the study's two tasks).
        expert_sizes (Sequence[int]): ``out_features`` of each expert's layers.
        activation (str): the experts' nonlinearity.
        dropout (float): dropout probability after every expert activation.
        shared_gate (bool): build the shared gate (every level but the last).
        one_input (bool): every expert and gate reads the same input (the first level, where
            all read x): all experts are then one ExpertGroup and all gates one GateBank.
            Default: False.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        task_inputs (List[torch.Tensor]): one [B, input_dim] per task, d_{k,j-1}.
        shared_input (torch.Tensor): [B, input_dim], the previous shared mixture (or x).

    Returns:
        Tuple[List[torch.Tensor], Optional[torch.Tensor], Dict[str, torch.Tensor]]: the task
        representations d_{k,j} (one [B, H] each), the shared mixture [B, H] (None without a
        shared gate) and the gate weights by ``"task{k}"`` / ``"shared"``.

    Raises:
        ValueError: if the level would have no expert.
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_shared: int,
        num_specific: int,
        expert_sizes: Sequence[int],
        activation: str,
        dropout: float,
        shared_gate: bool,
        one_input: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_shared + num_specific == 0:
            raise ValueError("an extraction level needs at least one expert")

        def experts(count: int) -> Optional[ExpertGroup]:
            return (
                ExpertGroup(input_dim, count, expert_sizes, activation, dropout, device=device)
                if count
                else None
            )

        self.num_tasks, self.num_shared, self.num_specific = num_tasks, num_shared, num_specific
        # one_input (the first level, where every expert reads x): all experts in one group,
        # one wide matmul; columns [shared | task 0 | task 1 | ...]
        self.all_experts = experts(num_shared + num_tasks * num_specific) if one_input else None
        self.shared_experts = experts(num_shared) if not one_input else None
        self.task_experts = (
            nn.ModuleList(experts(num_specific) for _ in range(num_tasks))
            if num_specific and not one_input
            else None
        )
        gate_sizes = [num_specific + num_shared] * num_tasks + (
            [num_tasks * num_specific + num_shared] if shared_gate else []
        )
        self.has_shared_gate = shared_gate
        # one_input: every gate reads x too, so all gates are one GateBank (one matmul)
        self.gate_bank = GateBank(input_dim, gate_sizes, device=device) if one_input else None
        self.task_gates = (
            nn.ModuleList(GatedMixture(input_dim, size, device=device) for size in gate_sizes[:num_tasks])
            if not one_input
            else None
        )
        self.shared_gate = (
            GatedMixture(input_dim, gate_sizes[-1], device=device) if shared_gate and not one_input else None
        )
        self.output_dim = out_dim(input_dim, expert_sizes)

    def forward(
        self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """One level: d_{k,j} per task, the shared mixture (or None) and the gate weights."""
        if self.all_experts is not None:
            every = self.all_experts(shared_input)  # [B, Es + T * Et, H]
            shared = [every[:, : self.num_shared]] if self.num_shared else []
        else:
            shared = (
                [self.shared_experts(shared_input)] if self.shared_experts is not None else []
            )  # [B, Es, H]
        bank = self.gate_bank(shared_input) if self.gate_bank is not None else None
        outputs, weights, every_expert = [], {}, []
        for task in range(self.num_tasks):
            if self.all_experts is not None:
                start = self.num_shared + task * self.num_specific
                own = [every[:, start : start + self.num_specific]] if self.num_specific else []
            else:
                own = [self.task_experts[task](task_inputs[task])] if self.task_experts is not None else []
            every_expert += own
            candidates = torch.cat(own + shared, dim=1)
            if bank is not None:
                weights[f"task{task}"] = bank[task]
                outputs.append(mix(bank[task], candidates))
            else:
                mixed, weights[f"task{task}"] = self.task_gates[task](task_inputs[task], candidates)
                outputs.append(mixed)
        shared_output = None
        if self.has_shared_gate:
            everything = torch.cat(every_expert + shared, dim=1)
            if bank is not None:
                weights["shared"] = bank[self.num_tasks]
                shared_output = mix(bank[self.num_tasks], everything)
            else:
                shared_output, weights["shared"] = self.shared_gate(shared_input, everything)
        return outputs, shared_output, weights


@register_tower("ple")
class PLE(nn.Module):
    """
    Progressive Layered Extraction (Tang et al., RecSys 2020): ``num_levels`` stacked
    extraction levels, each with ``num_shared`` shared experts, ``num_specific`` experts per
    task and softmax gates (study eq. 7-11). At level j every expert is an MLP,
    h_{i,j} = f_{i,j}(.) (eq. 11), of ``expert_sizes``; a level has E = num_shared +
    num_tasks * num_specific experts (eq. 8, where E_r and E_c are the two tasks' counts),
    stacked as S_j of eq. 7. Task k's gate, w_{k,j} = softmax(W_{k,j} d_{k,j-1} + b_{k,j})
    (eq. 10, d_{k,0} = x), weighs task k's own experts and the shared ones (Tang et al.'s
    routing; eq. 9 writes the sum over all E) into d_{k,j} = sum_i w_{k,j,i} h_{i,j} (eq. 9).
    Below the last level a shared gate weighs all E experts into the next level's shared
    input. The tower returns d_{k,N}, on which the heads are linear (the head equations that
    follow eq. 10). The gates of the last forward are kept, detached, in ``gate_weights``:
    ``"level{j}/task{k}"`` -> [B, num_specific + num_shared] and, for j < num_levels - 1,
    ``"level{j}/shared"`` -> [B, E] (j counts from 0).

    Args:
        input_dim (int): number of elements in each input sample (x).
        num_tasks (int): number of tasks, one gate (and ``num_specific`` experts) each per level.
        num_levels (int): number of extraction levels N (j = 1..N in eq. 7); 1 is CGC. Default: 2.
        num_shared (int): shared experts per level, E_s of eq. 8. Default: 2.
        num_specific (int): experts per task per level (E_r = E_c of eq. 8 for the study's
            regression and classification tasks); 0 leaves only shared experts, gated per
            task. Default: 1.
        expert_sizes (Sequence[int]): ``out_features`` of every expert's layers, bottom to top,
            at every level; the last is the width H of each level's output (level j + 1's
            experts read width H). Default: (64,).
        activation (str): the nonlinearity after every expert layer, one of ``"relu"``,
            ``"gelu"``, ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every expert activation. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        List[torch.Tensor]: ``num_tasks`` tensors [B, expert_sizes[-1]], d_{k,N} of eq. 9.

    Raises:
        ValueError: if ``num_levels < 1`` or ``num_shared + num_specific == 0``.

    Example::

        >>> import torch
        >>> from engagerec.towers import PLE
        >>> _ = torch.manual_seed(0)
        >>> tower = PLE(32, num_tasks=2, num_levels=2, num_shared=2, num_specific=1, expert_sizes=[64])
        >>> [tuple(rep.shape) for rep in tower(torch.randn(8, 32))]
        [(8, 64), (8, 64)]
        >>> for name, weights in sorted(tower.gate_weights.items()):
        ...     print(name, tuple(weights.shape))
        level0/shared (8, 4)
        level0/task0 (8, 3)
        level0/task1 (8, 3)
        level1/task0 (8, 3)
        level1/task1 (8, 3)
        >>> meta = PLE(32, 2, num_levels=2, device=torch.device("meta"))
        >>> {p.device.type for p in meta.parameters()}
        {'meta'}
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_levels: int = 2,
        num_shared: int = 2,
        num_specific: int = 1,
        expert_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_tasks = num_tasks
        self.levels = nn.ModuleList()
        width = input_dim
        for level in range(num_levels):
            self.levels.append(
                ExtractionLevel(
                    width,
                    num_tasks,
                    num_shared,
                    num_specific,
                    expert_sizes,
                    activation,
                    dropout,
                    shared_gate=level < num_levels - 1,
                    one_input=level == 0,
                    device=device,
                )
            )
            width = self.levels[-1].output_dim
        self.output_dims: List[int] = [width] * num_tasks
        self.gate_weights: Dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B, input_dim] -> one [B, output_dims[k]] per task; records ``gate_weights``."""
        task_inputs, shared = [x for _ in range(self.num_tasks)], x
        for index, level in enumerate(self.levels):
            task_inputs, shared, weights = level(task_inputs, shared)
            for name, value in weights.items():
                self.gate_weights[f"level{index}/{name}"] = value.detach()
        return task_inputs


@register_tower("cgc")
class CGC(PLE):
    """
    Customized Gate Control (Tang et al. 2020, section 4.2): PLE with one extraction level.
    Each task's gate, softmax(W_k x + b_k) (study eq. 10 with d_{k,0} = x), weighs its own
    ``num_specific`` experts and the ``num_shared`` shared ones (eq. 9 for j = 1); there is
    no shared gate. ``gate_weights`` holds ``"level0/task{k}"`` -> [B, num_specific + num_shared].

    Args:
        input_dim (int): number of elements in each input sample (x).
        num_tasks (int): number of tasks, one gate and ``num_specific`` experts each.
        num_shared (int): shared experts, E_s of eq. 8. Default: 2.
        num_specific (int): experts per task (E_r = E_c of eq. 8 for the study's two tasks).
            Default: 1.
        expert_sizes (Sequence[int]): ``out_features`` of every expert's layers, bottom to top.
            Default: (64,).
        activation (str): the nonlinearity after every expert layer, one of ``"relu"``,
            ``"gelu"``, ``"silu"``, ``"tanh"``. Default: ``"relu"``.
        dropout (float): dropout probability after every expert activation. Default: 0.0.
        device (Optional[torch.device]): where the parameters are created. Default: None.

    Call Args:
        x (torch.Tensor): [B, input_dim].

    Returns:
        List[torch.Tensor]: ``num_tasks`` tensors [B, expert_sizes[-1]].

    Raises:
        ValueError: if ``num_shared + num_specific == 0``.

    Example::

        >>> import torch
        >>> from engagerec.towers import CGC
        >>> _ = torch.manual_seed(0)
        >>> tower = CGC(input_dim=32, num_tasks=2, num_shared=2, num_specific=1, expert_sizes=[16])
        >>> [tuple(rep.shape) for rep in tower(torch.randn(8, 32))]
        [(8, 16), (8, 16)]
        >>> sorted(tower.gate_weights), tuple(tower.gate_weights["level0/task1"].shape)
        (['level0/task0', 'level0/task1'], (8, 3))
        >>> CGC(32, 2, device=torch.device("meta")).levels[0].all_experts.weights[0].device
        device(type='meta')
    """

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_shared: int = 2,
        num_specific: int = 1,
        expert_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(
            input_dim,
            num_tasks,
            1,
            num_shared,
            num_specific,
            expert_sizes,
            activation,
            dropout,
            device=device,
        )
