"""Which of FBGEMM's two CPU backward paths the large embedding tables take while training.

FBGEMM's CPU backward with row-wise Adagrad (the fused optimizer of engagerec's id tables) runs
an asmjit-generated kernel for a float32 table read by one feature, and a plain C++ loop for a
table read by several (fbgemm_gpu's embedding_backward_split_cpu_template.cpp). Which is faster
depends on the CPU. benchmarks/backward_paths.py times both on KuaiRand-1K's history table:
on an Intel Xeon with AMX the loop took 4.6 ms against the kernel's 33.6 ms; on an AMD EPYC the
kernel was about twice as fast as the loop (docs/EXPERIMENTS.md).

``train.embedding_backward: loop`` gives each table of at least ``MIN_ROWS`` rows that one
feature reads a second feature that never holds an id, ``<feature>__loop``: FBGEMM then treats
the table as shared and runs its loop. The update is the same (an empty feature adds no
gradient; tests/test_embedding_backward.py). Nothing else changes: the tables, their names and
weights, checkpoints and exports are the model's own; only the sharded model of a run (its
training, evaluation and scoring) has the companions, its batches carry their keys with no ids
(``ShardReader(empty_keys=...)``), and the model never reads their pooled columns (it takes its
features by name). ``auto`` (the default) times both paths once per process on a small table and
takes the faster on CPU; on GPU FBGEMM's CUDA kernels run either way, so the tables stay as built.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import List, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

LOOP_SUFFIX = "__loop"
# smaller tables see few distinct rows a step, so the path hardly matters, and the planner
# replicates the smallest (FBGEMM's dense kernel, neither path)
MIN_ROWS = 100_000
SETTINGS = ("auto", "kernel", "loop")


def loop_tables(
    tables: Sequence[EmbeddingBagConfig], min_rows: Optional[int] = None
) -> List[EmbeddingBagConfig]:
    """
    ``tables`` with a companion feature, ``<feature>__loop``, added to each table of at least
    ``min_rows`` rows that one feature reads: FBGEMM's CPU backward then runs its loop for it.

    Args:
        tables (Sequence[EmbeddingBagConfig]): an EmbeddingBagCollection's tables.
        min_rows (Optional[int]): the smallest table given a companion. Default: ``MIN_ROWS``.

    Returns:
        List[EmbeddingBagConfig]: new configs (the others as they were).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from engagerec.embedding_backward import loop_tables
        >>> big = EmbeddingBagConfig(name="t_v", num_embeddings=10**6, embedding_dim=4, feature_names=["v"])
        >>> small = EmbeddingBagConfig(name="t_h", num_embeddings=24, embedding_dim=4, feature_names=["h"])
        >>> [t.feature_names for t in loop_tables([big, small])]
        [['v', 'v__loop'], ['h']]
    """
    least = MIN_ROWS if min_rows is None else min_rows
    return [
        _with_features(t, [*t.feature_names, t.feature_names[0] + LOOP_SUFFIX])
        if len(t.feature_names) == 1 and t.num_embeddings >= least
        else t
        for t in tables
    ]


def loop_keys(tables: Sequence[EmbeddingBagConfig]) -> List[str]:
    """
    The companion features ``loop_tables`` added to ``tables``: the keys a batch must carry, with
    no ids, for a model built on them.

    Args:
        tables (Sequence[EmbeddingBagConfig]): a model's tables (``MultiTaskModel.tables``).

    Returns:
        List[str]: the companions' names, in table order (empty when there are none).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from engagerec.embedding_backward import loop_keys, loop_tables
        >>> big = EmbeddingBagConfig(name="t_v", num_embeddings=10**6, embedding_dim=4, feature_names=["v"])
        >>> loop_keys(loop_tables([big])), loop_keys([big])
        (['v__loop'], [])
    """
    return [name for t in tables for name in t.feature_names[1:] if name == t.feature_names[0] + LOOP_SUFFIX]


def model_loop_keys(model: torch.nn.Module) -> List[str]:
    """
    ``loop_keys`` of a model's tables, through any DistributedModelParallel or DDP wrapping.

    Args:
        model (torch.nn.Module): a MultiTaskModel, wrapped or not.

    Returns:
        List[str]: the keys its batches must carry with no ids.

    Example::

        >>> import torch
        >>> from engagerec.embedding_backward import model_loop_keys
        >>> model_loop_keys(torch.nn.Linear(2, 1))  # no tables
        []
    """
    while not hasattr(model, "tables") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return loop_keys(getattr(model, "tables", []))


def uses_loop(setting: str, device: torch.device) -> bool:
    """
    Whether ``train.embedding_backward``'s ``setting`` routes the large tables through FBGEMM's
    loop on ``device``: ``"loop"`` on CPU; ``"auto"`` on CPU when ``loop_is_faster()``; never on
    GPU, nor for ``"kernel"``.

    Args:
        setting (str): ``"auto"``, ``"kernel"`` or ``"loop"``.
        device (torch.device): where the model trains.

    Returns:
        bool: whether to build the tables with ``loop_tables``.

    Example::

        >>> import torch
        >>> from engagerec.embedding_backward import uses_loop
        >>> uses_loop("loop", torch.device("cpu")), uses_loop("kernel", torch.device("cpu"))
        (True, False)
        >>> uses_loop("loop", torch.device("cuda"))
        False
    """
    if setting not in SETTINGS:
        raise ValueError(f"train.embedding_backward: '{setting}', expected one of {list(SETTINGS)}")
    if device.type != "cpu" or setting == "kernel":
        return False
    return setting == "loop" or loop_is_faster()


@functools.lru_cache(maxsize=1)
def loop_is_faster(rows: int = 200_000, dim: int = 16, ids: int = 40_000, repeats: int = 5) -> bool:
    """
    Time FBGEMM's two CPU backward paths on this machine, once per process: a ``rows`` x ``dim``
    row-wise Adagrad table, a batch of ``ids`` ids in bags of 20 (most of them distinct, as a
    history's are), the best of ``repeats`` backward passes each (about 0.1 s in all).

    Args:
        rows (int): the probe table's rows. Default: 200,000.
        dim (int): its width. Default: 16.
        ids (int): the ids a batch holds. Default: 40,000.
        repeats (int): backward passes timed per path. Default: 5.

    Returns:
        bool: whether the loop was faster.

    Example::

        >>> from engagerec.embedding_backward import loop_is_faster
        >>> loop_is_faster(rows=1000, ids=400, repeats=1) in (True, False)
        True
    """
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        OptimType,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    generator = torch.Generator().manual_seed(0)  # the caller's random streams stay as they were
    indices = torch.randint(0, rows, (ids // 20 * 20,), generator=generator)
    bags = indices.numel() // 20
    best = {}
    for features in (1, 2):  # one feature: the kernel; a second, empty one: the loop
        table = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            feature_table_map=[0] * features,
            optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
            pooling_mode=PoolingMode.SUM,
        )
        lengths = torch.cat([torch.full((bags,), 20), torch.zeros(bags * (features - 1), dtype=torch.long)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        times = []
        for _ in range(repeats + 1):  # the first builds the kernels
            pooled = table(indices, offsets)
            start = time.perf_counter()
            pooled.sum().backward()
            times.append(time.perf_counter() - start)
        best[features] = min(times[1:] or times)
    return best[2] < best[1]


def _with_features(table: EmbeddingBagConfig, names: List[str]) -> EmbeddingBagConfig:
    """``table`` read by ``names`` instead."""
    return dataclasses.replace(table, feature_names=names)
