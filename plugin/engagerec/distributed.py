"""Process group, sharding plan and DistributedModelParallel: the same code on 1 process or N,
on CPU or CUDA.

A run's device is ``train.device``: ``auto`` takes CUDA when a GPU is visible. CUDA runs bind
each process to its GPU (``LOCAL_RANK``) before the process group exists and use NCCL, one
process too; CPU runs use gloo. Without torchrun, a one-process group over an in-memory
store, so DMP and the metrics run unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.types import ParameterConstraints, Proposer
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim import optimizers as torchrec_optimizers
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from engagerec.errors import ConfigError
from engagerec.features import table_space
from engagerec.managed_ids import managed_tables
from engagerec.model import MultiTaskModel

SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel", "row_wise", "table_row_wise")
# FBGEMM's CPU kernels have no row-wise or table-row-wise sharding over gloo ranks
CUDA_ONLY_SHARDING = ("row_wise", "table_row_wise")

# train.sparse_optimizer -> the optimiser class TorchRec maps onto FBGEMM's fused kernels
SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torchrec_optimizers.Adam,
    "partial_rowwise_adam": torchrec_optimizers.PartialRowWiseAdam,
    "lamb": torchrec_optimizers.LAMB,
    "partial_rowwise_lamb": torchrec_optimizers.PartialRowWiseLAMB,
}
# the subset FBGEMM's CPU kernels implement (its CPU training kernels refuse Adam and LAMB)
CPU_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


@dataclass
class Runtime:
    """This process's place in the run: its rank, the world size and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it
    local_world_size: int = 0  # processes on this host (torchrun's LOCAL_WORLD_SIZE); 0: all of them


def rank() -> int:
    """This process's rank: the process group's once one exists, else torchrun's ``RANK``
    (0 outside torchrun), so it holds before ``init_runtime`` and after ``close_runtime``.

    Example::

        >>> from engagerec.distributed import rank
        >>> rank()  # one process, no group
        0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes in the run: the process group's once one exists, else torchrun's
    ``WORLD_SIZE`` (1 outside torchrun).

    Example::

        >>> from engagerec.distributed import world_size
        >>> world_size()
        1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    """Whether this process is rank 0, the one that writes a run's logs and results and prints:
    the one test of it in engagerec (``rank() == 0``), before or after a process group exists.

    Example::

        >>> from engagerec.distributed import is_rank_zero
        >>> is_rank_zero()
        True
    """
    return rank() == 0


def resolve_device(requested: str = "auto") -> str:
    """
    The device type a run computes on: ``cuda`` when asked for or (``auto``) when a GPU is
    visible, else ``cpu``.

    Args:
        requested (str): ``train.device``: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        str: ``"cuda"`` or ``"cpu"``.

    Raises:
        ConfigError: for ``cuda`` on a machine where torch sees no GPU, or an unknown name.

    Example::

        >>> from engagerec.distributed import resolve_device
        >>> resolve_device("cpu")
        'cpu'
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device '{requested}', expected auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is cuda, but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use cpu or auto"
        )
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def init_runtime(device: str = "auto") -> Runtime:
    """
    Join torchrun's process group, or make a one-process one, on ``device``.

    CUDA: the process is bound to GPU ``LOCAL_RANK`` first, then joins an NCCL group (NCCL
    needs the device set before its communicator exists). CPU: gloo, whatever GPUs exist.

    Args:
        device (str): ``train.device``: ``auto``, ``cpu`` or ``cuda``. Default: ``"auto"``.

    Returns:
        Runtime: rank, world size, local world size and the torch device of this process.

    Example::

        >>> from engagerec.distributed import close_runtime, init_runtime
        >>> runtime = init_runtime("cpu")
        >>> runtime.rank, runtime.world_size, runtime.device.type
        (0, 1, 'cpu')
        >>> close_runtime(runtime)
    """
    kind = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    backend = "nccl" if kind == "cuda" else "gloo"
    if dist.is_initialized():
        owns = False
    else:
        # on CUDA the group is bound to this process's GPU at once (collectives know their device)
        bound = {"device_id": torch_device} if kind == "cuda" else {}
        if world_size() > 1:  # launched by torchrun with several processes
            dist.init_process_group(backend=backend, **bound)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **bound)
        owns = True
    size = dist.get_world_size()
    return Runtime(
        rank=dist.get_rank(),
        world_size=size,
        device=torch_device,
        owns_group=owns,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))),
    )


def any_rank(flag: bool) -> bool:
    """
    Whether ``flag`` holds on any rank: a collective (every rank calls it at the same point),
    so all ranks take the same branch after it; no collective on one rank.

    Args:
        flag (bool): this rank's value.

    Returns:
        bool: the OR over ranks.

    Example::

        >>> from engagerec.distributed import any_rank
        >>> any_rank(True), any_rank(False)  # one process
        (True, False)
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def close_runtime(runtime: Runtime) -> None:
    """Destroy the process group if ``init_runtime`` created it; one that already existed is left."""
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _constraints(
    model: MultiTaskModel, sharding: Dict[str, List[str]], world_size: int = 1, device_type: str = "cpu"
) -> Dict[str, ParameterConstraints]:
    tables = {t.name: t for t in model.tables}
    by_space: Dict[str, List[str]] = {}  # a space's tables: its own, and its features' own tables
    for table in model.tables:
        by_space.setdefault(table_space(table), []).append(table.name)
    out = {}
    for key, types in sharding.items():
        unknown = [t for t in types if t not in SHARDING_TYPES]
        if unknown:
            raise ConfigError(
                f"train.sharding.{key}: unknown sharding types {unknown}, expected some of {SHARDING_TYPES}"
            )
        cuda_only = [t for t in types if t in CUDA_ONLY_SHARDING]
        if cuda_only and device_type != "cuda":
            raise ConfigError(
                f"train.sharding.{key}: {', '.join(cuda_only)} sharding needs CUDA devices; on CPU "
                "ranks use table_wise, column_wise or data_parallel"
            )
        if key == "*":
            names = list(tables)
        elif key in tables or key in by_space:
            names = [key] if key in tables else by_space[key]
        else:
            raise ConfigError(
                f"train.sharding names '{key}', which is no table or id space ({sorted(by_space)})"
            )
        for name in names:
            # column-wise: shards of dim / world_size columns (a multiple of 4, as FBGEMM wants), so
            # a table can spread over every rank; torchrec's default minimum keeps small dims whole
            dim = tables[name].embedding_dim
            min_partition = max(4, dim // max(world_size, 1) // 4 * 4) if "column_wise" in types else None
            out[name] = ParameterConstraints(sharding_types=list(types), min_partition=min_partition)
    return out


class _OneRankDataParallel(DataParallelWrapper):
    """Leaves the dense part unwrapped: on one rank DistributedDataParallel would only copy every
    gradient into buckets and all-reduce them with itself, every step, for nothing."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        """Move the dense part to ``device`` (what DDP's wrapping would have done; sharded
        modules are left where DMP put them); one rank's gradients are already the global ones."""
        dmp._dmp_wrapped_module.to(device)


def topology(runtime: Runtime) -> Topology:
    """
    What the planner may place tables on: every rank, how many share a host (intra-host
    bandwidth is higher), and on CUDA each GPU's memory, so a table that fits no GPU is
    sharded or refused at planning time rather than failing at allocation.

    Args:
        runtime (Runtime): this process's rank, world and device.

    Returns:
        Topology: the planner's view of the machines.

    Example::

        >>> import torch
        >>> from engagerec.distributed import Runtime, topology
        >>> cpu = Runtime(rank=0, world_size=2, device=torch.device("cpu"), owns_group=False)
        >>> found = topology(cpu)
        >>> found.world_size, found.compute_device
        (2, 'cpu')
    """
    hbm_cap = None
    if runtime.device.type == "cuda":
        hbm_cap = torch.cuda.get_device_properties(runtime.device).total_memory
    return Topology(
        world_size=runtime.world_size,
        local_world_size=runtime.local_world_size or runtime.world_size,
        compute_device=runtime.device.type,
        hbm_cap=hbm_cap,
    )


def planner_proposers(world_size: int) -> Optional[List[Proposer]]:
    """
    The planner's proposers: on one rank TorchRec's default ones without its exhaustive grid
    search; on several, TorchRec's defaults.

    The grid search tries every combination of every table's options (TorchRec skips it by itself
    above 10,000 of them, about seven tables). On one rank every table lands on that rank and a
    plan's cost is the sum of its tables' costs, so the greedy proposer's first proposal (each
    table's cheapest option) is already the optimum the search would find: there the search
    only cost time, up to 1 s per start for a model of few tables, and every train, evaluate,
    predict and export plans once. On several ranks the cost is the busiest rank's, the greedy
    proposers can miss the balanced plan, and the search stays (tests/test_planner.py).

    Args:
        world_size: the number of ranks the tables are planned for.

    Returns:
        Optional[List[Proposer]]: greedy by depth, greedy by table and uniform on one rank;
        None (TorchRec's defaults) on several.

    Example::

        >>> [type(p).__name__ for p in planner_proposers(1)]
        ['GreedyProposer', 'GreedyProposer', 'UniformProposer']
        >>> planner_proposers(2) is None
        True
    """
    if world_size > 1:
        return None
    return [GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer()]


def shard_model(
    model: MultiTaskModel,
    runtime: Runtime,
    batch_size: int,
    sharding: Dict[str, List[str]],
    sparse_optimizer: str,
    sparse_lr: float,
) -> DistributedModelParallel:
    """Fuse the sparse optimiser into backward, plan the sharding, wrap in DMP (which materialises
    the meta-device tables on their ranks)."""
    offered = SPARSE_OPTIMIZERS if runtime.device.type == "cuda" else CPU_SPARSE_OPTIMIZERS
    if sparse_optimizer not in offered:
        cuda_only = (
            " (it needs CUDA: FBGEMM's CPU kernels lack it)" if sparse_optimizer in SPARSE_OPTIMIZERS else ""
        )
        raise ConfigError(
            f"train.sparse_optimizer '{sparse_optimizer}'{cuda_only}; on {runtime.device.type} "
            f"expected one of {', '.join(sorted(offered))}"
        )
    if model.has_sparse:
        apply_optimizer_in_backward(
            SPARSE_OPTIMIZERS[sparse_optimizer], model.sparse_arch.parameters(), {"lr": sparse_lr}
        )
    sharders = get_default_sharders()
    planner = EmbeddingShardingPlanner(
        topology=topology(runtime),
        batch_size=batch_size,
        proposer=planner_proposers(runtime.world_size),
        constraints=(
            _constraints(model, sharding, runtime.world_size, runtime.device.type)
            if model.has_sparse
            else None
        ),
    )
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg) if model.has_sparse else ShardingPlan(plan={})
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(pg),
        device=runtime.device,
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=_OneRankDataParallel() if runtime.world_size == 1 else None,
    )
    for tables in managed_tables(model):
        tables.remap.place(runtime.device)  # DMP materialises parameters; the remapping is buffers
    return dmp


def build_optimizer(dmp: DistributedModelParallel, dense_lr: float) -> CombinedOptimizer:
    """The fused sparse optimiser (already applied in backward) beside Adam for everything dense."""
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=dense_lr, fused=True),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def plan_table(dmp: DistributedModelParallel) -> Dict[str, Dict]:
    """table -> {sharding_type, compute_kernel, ranks}: what the planner chose, for logs and tests."""
    out = {}
    for module_plan in dmp.plan.plan.values():
        for table, option in module_plan.items():
            out[table] = {
                "sharding_type": option.sharding_type,
                "compute_kernel": option.compute_kernel,
                "ranks": list(option.ranks or []),
            }
    return out
