"""Learning-rate schedules over a run: every learning rate (the dense optimiser's and the fused
sparse optimiser's) follows one multiplier of the step.

Why: with a constant rate, the last updates of an embedding row are as large as the early ones,
so a row seen hundreds of times ends as noisy as its last few gradients make it; decaying the
rate toward the end of training averages more of them (the one-epoch runs of the KuaiRand-1K
shape: docs/EXPERIMENTS.md). The schedule is a function of the step alone, so a resumed run
continues it from its saved step and a warm start begins it again; nothing of it is kept in the
optimiser state.
"""

from __future__ import annotations

import math
from typing import Any, List

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(schedule: str, step: int, total_steps: int, final: float = 0.0) -> float:
    """
    The factor on each base learning rate at ``step`` (0 = the first step) of ``total_steps``.

    Args:
        schedule (str): ``constant`` (1 throughout), ``linear`` (from 1 down to ``final``) or
            ``cosine`` (half a cosine from 1 down to ``final``).
        step (int): steps taken so far.
        total_steps (int): the run's planned steps; from there on the factor stays ``final``.
        final (float): the factor at the last step. Default: 0.

    Returns:
        float: the factor.

    Raises:
        ValueError: an unknown schedule.

    Example::

        >>> [lr_multiplier("linear", s, 4) for s in range(5)]
        [1.0, 0.75, 0.5, 0.25, 0.0]
        >>> round(lr_multiplier("cosine", 2, 4, final=0.1), 3), lr_multiplier("constant", 3, 4)
        (0.55, 1.0)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule '{schedule}', expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    progress = min(step / max(total_steps, 1), 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LearningRateSchedule:
    """
    Sets each parameter group's learning rate to its base rate (the one it was built with) times
    ``lr_multiplier`` at a step. A torchrec ``CombinedOptimizer`` lists the fused sparse
    optimiser's groups beside the dense ones; the fused optimiser hands its group's rate to
    FBGEMM in its ``step()``, so the embedding rows get a step's rate from the next backward on
    (one step late; nothing over a run of thousands).

    Args:
        optimizer (Any): a torch or torchrec optimiser (``param_groups`` with ``lr``), as built,
            before any schedule changed its rates.
        schedule (str): see ``lr_multiplier``.
        total_steps (int): the run's planned steps.
        final (float): the factor at the last step. Default: 0.

    Example::

        >>> import torch
        >>> weight = torch.nn.Parameter(torch.zeros(2))
        >>> adam = torch.optim.Adam([weight], lr=0.01)
        >>> schedule = LearningRateSchedule(adam, "linear", total_steps=10)
        >>> schedule.apply(5)
        >>> adam.param_groups[0]["lr"]
        0.005
    """

    def __init__(self, optimizer: Any, schedule: str, total_steps: int, final: float = 0.0) -> None:
        lr_multiplier(schedule, 0, total_steps, final)  # refuses an unknown schedule now
        self.optimizer = optimizer
        self.schedule, self.total_steps, self.final = schedule, total_steps, final
        self.base_rates: List[float] = [float(group["lr"]) for group in optimizer.param_groups]

    def apply(self, step: int) -> None:
        """Set every group's rate for ``step`` (the groups are read again each time: loading a
        state dict may replace them)."""
        factor = lr_multiplier(self.schedule, step, self.total_steps, self.final)
        for group, base in zip(self.optimizer.param_groups, self.base_rates, strict=True):
            group["lr"] = base * factor
