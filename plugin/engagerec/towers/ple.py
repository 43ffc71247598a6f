"""CGC and PLE: shared and task-specific experts with per-task gates (study eq. 7-11;
Tang et al., "Progressive Layered Extraction", RecSys 2020). One extraction level is CGC."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from engagerec.towers.common import ExpertGroup, GateBank, GatedMixture, mix, out_dim
from engagerec.towers.registry import register_tower


class ExtractionLevel(nn.Module):
    """One level: task t's gate mixes its own experts and the shared ones; below the last
    level a shared gate mixes all experts into the next level's shared input."""

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
    ) -> None:
        super().__init__()
        if num_shared + num_specific == 0:
            raise ValueError("an extraction level needs at least one expert")

        def experts(count: int) -> Optional[ExpertGroup]:
            return ExpertGroup(input_dim, count, expert_sizes, activation, dropout) if count else None

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
        self.gate_bank = GateBank(input_dim, gate_sizes) if one_input else None
        self.task_gates = (
            nn.ModuleList(GatedMixture(input_dim, size) for size in gate_sizes[:num_tasks])
            if not one_input
            else None
        )
        self.shared_gate = GatedMixture(input_dim, gate_sizes[-1]) if shared_gate and not one_input else None
        self.output_dim = out_dim(input_dim, expert_sizes)

    def forward(
        self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor], Dict[str, torch.Tensor]]:
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
    """Example::

    tower = PLE(input_dim=32, num_tasks=2, num_levels=2, num_shared=2, num_specific=1, expert_sizes=[64])
    reps = tower(torch.randn(8, 32))    # two [8, 64] tensors
    tower.gate_weights["level1/task0"]  # [8, 3] (1 own + 2 shared experts), rows sum to 1
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
                )
            )
            width = self.levels[-1].output_dim
        self.output_dims: List[int] = [width] * num_tasks
        self.gate_weights: Dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        task_inputs, shared = [x for _ in range(self.num_tasks)], x
        for index, level in enumerate(self.levels):
            task_inputs, shared, weights = level(task_inputs, shared)
            for name, value in weights.items():
                self.gate_weights[f"level{index}/{name}"] = value.detach()
        return task_inputs


@register_tower("cgc")
class CGC(PLE):
    """Customized Gate Control: PLE with a single extraction level (Tang et al. 2020, section 4.2)."""

    def __init__(
        self,
        input_dim: int,
        num_tasks: int,
        num_shared: int = 2,
        num_specific: int = 1,
        expert_sizes: Sequence[int] = (64,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(input_dim, num_tasks, 1, num_shared, num_specific, expert_sizes, activation, dropout)
