"""Interchangeable multi-task towers. Each maps x [B, input_dim] to one representation per
task and reports their widths in ``output_dims``; none knows about embeddings, labels or losses.

Every built-in tower takes ``device`` and creates its parameters there. One built on
``torch.device("meta")`` has shapes but no values: materialise it with
``tower.to_empty(device=...)`` and load a state dict. (DistributedModelParallel's meta
initialisation calls ``reset_parameters`` where a module has one; the experts' and
cross-stitch parameter lists have none, so ``MultiTaskModel.from_config`` builds the tower
on the default device even when the embedding tables go to meta.)

Inside an FX-traced TorchRec model a tower's list output is one opaque value: index it
with concrete ints (``reps[i] for i in range(num_tasks)``), never iterate it.
"""

from engagerec.towers.cross_stitch import CrossStitch
from engagerec.towers.mmoe import MMoE
from engagerec.towers.ple import CGC, PLE
from engagerec.towers.registry import TOWERS, build_tower, get_tower_class, register_tower
from engagerec.towers.shared_bottom import SharedBottom
from engagerec.towers.single_task import SingleTask

__all__ = [
    "CGC",
    "PLE",
    "TOWERS",
    "CrossStitch",
    "MMoE",
    "SharedBottom",
    "SingleTask",
    "build_tower",
    "get_tower_class",
    "register_tower",
]
