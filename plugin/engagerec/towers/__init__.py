"""Interchangeable multi-task towers. Each maps x [B, input_dim] to one representation per
task and reports their widths in ``output_dims``; none knows about embeddings, labels or losses.

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
