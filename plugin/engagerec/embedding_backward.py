"""Which of FBGEMM's two CPU backward paths the large embedding tables take while training.

FBGEMM's CPU backward with row-wise Adagrad (the fused optimizer of engagerec's id tables) runs
an asmjit-generated kernel for a float32 table read by one feature, and a plain C++ loop for a
table read by several (fbgemm_gpu's embedding_backward_split_cpu_template.cpp). Which is faster
depends on the CPU. benchmarks/backward_paths.py times both on KuaiRand-1K's history table: on a
2-core Intel Xeon with AMX the loop took 4.8 ms against the kernel's 36.9 ms. On a 2-core AMD
EPYC a table shared by the video id and the history, which takes the loop, made the embedding
backward about twice as slow as two tables of their own (docs/EXPERIMENTS.md).

``train.embedding_backward: loop`` gives each table of at least ``MIN_ROWS`` rows that one
feature reads a second feature that never holds an id, ``<feature>__loop``: FBGEMM then treats
the table as shared and runs its loop. The update is the same (an empty feature adds no
gradient; tests/test_embedding_backward.py). Nothing else changes: the tables, their names and
weights, checkpoints and exports are the model's own. Only a model sharded to train
(engagerec.runs.sharded_model) has the companions; its batches carry their keys with no ids
(``ShardReader(empty_keys=...)``), and the model never reads their pooled columns (it takes its
features by name). ``auto`` (the default) times both paths once per process on a small table and
takes the loop on CPU where it is clearly faster; on GPU FBGEMM's CUDA kernels run either way,
so the tables stay as built.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import List, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

LOOP_SUFFIX = "__loop"
# smaller tables see few distinct rows a step, so the path hardly matters, and the planner
# replicates the smallest (FBGEMM's dense kernel, neither path)
MIN_ROWS = 100_000
SETTINGS = ("auto", "kernel", "loop")
# auto takes the loop under this share of the kernel's time: 0.13 on an Intel Xeon with AMX
# (benchmarks/backward_paths.py); about 2 on an AMD EPYC, as a shared table's backward measured
LOOP_MARGIN = 0.8


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


def loop_features(tables: Sequence[EmbeddingBagConfig]) -> List[str]:
    """
    The features whose tables ``loop_tables`` gave a companion: each companion's name without
    ``LOOP_SUFFIX``.

    Args:
        tables (Sequence[EmbeddingBagConfig]): a model's tables.

    Returns:
        List[str]: the features, in table order.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from engagerec.embedding_backward import loop_features, loop_tables
        >>> big = EmbeddingBagConfig(name="t_v", num_embeddings=10**6, embedding_dim=4, feature_names=["v"])
        >>> loop_features(loop_tables([big]))
        ['v']
    """
    return [name.removesuffix(LOOP_SUFFIX) for name in loop_keys(tables)]


def add_empty_keys(features: KeyedJaggedTensor, keys: Sequence[str]) -> KeyedJaggedTensor:
    """
    ``features`` with ``keys`` after its own, holding no ids: a batch from a source other than
    engagerec's reader (which adds them itself, ``ShardReader(empty_keys=...)``) made ready for
    a model built with companions.

    Args:
        features (KeyedJaggedTensor): a batch's sparse features.
        keys (Sequence[str]): the keys to add (``loop_keys``).

    Returns:
        KeyedJaggedTensor: the same values, the lengths followed by zeros.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from engagerec.embedding_backward import add_empty_keys
        >>> kjt = KeyedJaggedTensor(keys=["v"], values=torch.tensor([3, 5]), lengths=torch.tensor([1, 1]))
        >>> added = add_empty_keys(kjt, ["v__loop"])
        >>> added.keys(), added["v__loop"].lengths().tolist(), added["v"].values().tolist()
        (['v', 'v__loop'], [0, 0], [3, 5])
    """
    lengths = features.lengths()
    zeros = torch.zeros(features.stride() * len(keys), dtype=lengths.dtype, device=lengths.device)
    return KeyedJaggedTensor(
        keys=features.keys() + list(keys),
        values=features.values(),
        lengths=torch.cat([lengths, zeros]),
        weights=None if features.weights_or_none() is None else features.weights(),
    )


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


def fbgemm_table(rows: int, dim: int, loop: bool, fp16: bool = False, learning_rate: float = 0.01):
    """
    One FBGEMM table of ``rows`` x ``dim``, row-wise Adagrad, on CPU, sum pooling, read by one
    feature, or with ``loop`` by that feature and an always-empty second one (``bag_offsets``),
    so that its backward takes FBGEMM's loop; ``fp16`` stores its weights in fp16 (the loop too).

    Args:
        rows (int): the table's rows.
        dim (int): its width.
        loop (bool): add the empty second feature.
        fp16 (bool): fp16 weights and momentum (float32 output). Default: False.
        learning_rate (float): the fused optimizer's rate. Default: 0.01.

    Returns:
        SplitTableBatchedEmbeddingBagsCodegen: the table.

    Example::

        >>> from engagerec.embedding_backward import bag_offsets, fbgemm_table
        >>> table = fbgemm_table(100, 4, loop=True)
        >>> table(torch.tensor([1, 2, 3, 4]), bag_offsets(2, 2, loop=True)).shape  # 2 rows, 2 features
        torch.Size([2, 8])
    """
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        OptimType,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        feature_table_map=[0, 0] if loop else [0],
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=learning_rate,
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP16 if fp16 else SparseType.FP32,
        output_dtype=SparseType.FP32,
    )


def bag_offsets(rows: int, bag: int, loop: bool) -> torch.Tensor:
    """
    The offsets of a batch of ``rows`` bags of ``bag`` ids each for an ``fbgemm_table``: then,
    with ``loop``, ``rows`` empty bags of its second feature.

    Args:
        rows (int): the batch's rows.
        bag (int): ids a row.
        loop (bool): the table has the empty second feature.

    Returns:
        torch.Tensor: [rows (x 2 with loop) + 1] offsets.

    Example::

        >>> from engagerec.embedding_backward import bag_offsets
        >>> bag_offsets(2, 3, loop=False).tolist(), bag_offsets(2, 3, loop=True).tolist()
        ([0, 3, 6], [0, 3, 6, 6, 6])
    """
    lengths = torch.full((rows,), bag, dtype=torch.long)
    if loop:
        lengths = torch.cat([lengths, torch.zeros(rows, dtype=torch.long)])
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def backward_seconds(rows: int = 200_000, dim: int = 16, ids: int = 40_000, repeats: int = 5) -> dict:
    """
    Time FBGEMM's two CPU backward paths on this machine: a ``rows`` x ``dim`` row-wise Adagrad
    table, a batch of ``ids`` ids in bags of 20 (most of them distinct, as a history's are),
    the best of ``repeats`` backward passes each, after one that builds the kernels.

    Args:
        rows (int): the table's rows. Default: 200,000.
        dim (int): its width. Default: 16.
        ids (int): the ids a batch holds. Default: 40,000.
        repeats (int): backward passes timed per path. Default: 5.

    Returns:
        dict: ``{"kernel": seconds, "loop": seconds}``.

    Example::

        >>> from engagerec.embedding_backward import backward_seconds
        >>> times = backward_seconds(rows=1000, ids=400, repeats=1)
        >>> sorted(times), all(seconds > 0 for seconds in times.values())
        (['kernel', 'loop'], True)
    """
    generator = torch.Generator().manual_seed(0)  # the caller's random streams stay as they were
    bags = ids // 20
    indices = torch.randint(0, rows, (bags * 20,), generator=generator)
    best = {}
    for path in ("kernel", "loop"):
        table = fbgemm_table(rows, dim, loop=path == "loop")
        offsets = bag_offsets(bags, 20, loop=path == "loop")
        times = []
        for _ in range(repeats + 1):
            pooled = table(indices, offsets)
            start = time.perf_counter()
            pooled.sum().backward()
            times.append(time.perf_counter() - start)
        best[path] = min(times[1:])
    return best


@functools.lru_cache(maxsize=None)
def loop_is_faster() -> bool:
    """
    Whether FBGEMM's loop is clearly faster than its kernel here: under ``LOOP_MARGIN`` of the
    kernel's time in ``backward_seconds()``, timed once per process (then remembered). The
    margin keeps a close or noisy timing on the kernel, FBGEMM's own choice.

    Returns:
        bool: whether to take the loop.

    Example::

        >>> from engagerec.embedding_backward import loop_is_faster
        >>> loop_is_faster() == loop_is_faster()  # timed once
        True
    """
    seconds = backward_seconds()
    return seconds["loop"] < LOOP_MARGIN * seconds["kernel"]


def _with_features(table: EmbeddingBagConfig, names: List[str]) -> EmbeddingBagConfig:
    """``table`` read by ``names`` instead."""
    return dataclasses.replace(table, feature_names=names)
