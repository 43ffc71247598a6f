"""Learning-rate schedules over a run: every learning rate (the dense optimiser's and the fused
sparse optimiser's) follows one factor of the run's progress.

Why: with a constant rate, the last updates of an embedding row are as large as the early ones;
a decaying rate averages more of a row's gradients toward the end (docs/EXPERIMENTS.md measures
it on the KuaiRand-1K shape). Progress is counted in epochs, (epochs finished + this epoch's
share of its batches) / train.epochs, not in steps: a run resumed on another number of ranks
(fewer or more steps an epoch) or on a grown preparation continues the schedule where it was.
Nothing of it is kept in the optimiser state, so a warm start begins it again.
"""

from __future__ import annotations

import math
from typing import Any, List

SCHEDULES = ("constant", "linear", "cosine")  # train.lr_schedule's values


def lr_multiplier(schedule: str, progress: float, final: float = 0.0) -> float:
    """
    The factor on each base learning rate at ``progress`` through the run.

    Args:
        schedule (str): ``constant`` (1 throughout), ``linear`` (from 1 down to ``final``) or
            ``cosine`` (half a cosine from 1 down to ``final``).
        progress (float): the share of the run done, 0 at its start and 1 at its end (clipped
            to 0..1).
        final (float): the factor as the run ends (unused by ``constant``). Default: 0.

    Returns:
        float: the factor.

    Raises:
        ValueError: an unknown schedule.

    Example::

        >>> [lr_multiplier("linear", p) for p in (0.0, 0.25, 0.5, 1.0, 1.5)]
        [1.0, 0.75, 0.5, 0.0, 0.0]
        >>> round(lr_multiplier("cosine", 0.5, final=0.1), 3), lr_multiplier("constant", 0.7)
        (0.55, 1.0)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule '{schedule}', expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_progress(epochs_done: int, batches_done: int, batches_per_epoch: int, epochs: int) -> float:
    """
    The share of a run done: (epochs finished + the current epoch's share of its batches) /
    epochs. Counted in epochs, it is the same on any number of ranks.

    Args:
        epochs_done (int): epochs finished.
        batches_done (int): batches of the current epoch done (this rank's).
        batches_per_epoch (int): this rank's batches in an epoch.
        epochs (int): the epochs the run trains (``train.epochs``).

    Returns:
        float: the share, 0 at the start.

    Example::

        >>> run_progress(1, 50, 100, 4), run_progress(1, 25, 50, 4)  # one rank, then two
        (0.375, 0.375)
    """
    return (epochs_done + batches_done / max(batches_per_epoch, 1)) / max(epochs, 1)


class LearningRateSchedule:
    """
    Sets each parameter group's learning rate to its base rate (the one it was built with) times
    ``lr_multiplier`` at the run's progress. A torchrec ``CombinedOptimizer`` lists the fused
    sparse optimiser's groups beside the dense ones; the fused optimiser hands its group's rate
    to FBGEMM in its ``zero_grad()`` and ``step()``, which TrainPipelineSparseDist calls around
    every step, so a step's dense and sparse rates are the same factor of their bases.

    Args:
        optimizer (Any): a torch or torchrec optimiser (``param_groups`` with ``lr``), as built:
            its rates then are the bases.
        schedule (str): see ``lr_multiplier``.
        final (float): the factor as the run ends. Default: 0.

    Raises:
        ValueError: an unknown schedule.

    Example::

        >>> import torch
        >>> weight = torch.nn.Parameter(torch.zeros(2))
        >>> adam = torch.optim.Adam([weight], lr=0.01)
        >>> schedule = LearningRateSchedule(adam, "linear")
        >>> schedule.apply(0.5)
        >>> adam.param_groups[0]["lr"], schedule.factor
        (0.005, 0.5)
    """

    def __init__(self, optimizer: Any, schedule: str, final: float = 0.0) -> None:
        lr_multiplier(schedule, 0.0, final)  # refuses an unknown schedule now
        self.optimizer, self.schedule, self.final = optimizer, schedule, final
        self.base_rates: List[float] = [float(group["lr"]) for group in optimizer.param_groups]
        self.factor = 1.0  # the factor last applied

    def apply(self, progress: float) -> None:
        """
        Set every group's rate for ``progress``.

        Args:
            progress (float): the share of the run done (0..1). The groups are read again each
                time: loading a state dict may replace them.
        """
        self.factor = lr_multiplier(self.schedule, progress, self.final)
        for group, base in zip(self.optimizer.param_groups, self.base_rates, strict=True):
            group["lr"] = base * self.factor
