"""Process group, sharding plan and DistributedModelParallel: the same code on 1 process or N.

Under torchrun the process group comes from the environment (gloo on CPU, NCCL on GPU);
without it, a single-process gloo group over an in-memory store, so DMP and the metrics
run unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from engagerec.config import ExperimentConfig, prepared_dir
from engagerec.data.schema import DatasetSchema
from engagerec.model import MultiTaskModel

SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel", "row_wise", "table_row_wise")

SPARSE_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,  # (FBGEMM's CPU kernels refuse Adam for embedding tables)
}


@dataclass
class Runtime:
    """This process's place in the run: its rank, the world size and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes the run's logs and results and prints progress."""
        return self.rank == 0


def init_runtime() -> Runtime:
    """Join torchrun's process group, or make a one-process one."""
    use_cuda = torch.cuda.is_available()
    if dist.is_initialized():
        owns = False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    else:
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=dist.get_world_size(), device=device, owns_group=owns)


def close_runtime(runtime: Runtime) -> None:
    """Destroy the process group if ``init_runtime`` created it; one that already existed is left."""
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _constraints(
    model: MultiTaskModel, sharding: Dict[str, List[str]], world_size: int = 1
) -> Dict[str, ParameterConstraints]:
    tables = {t.name: t for t in model.spec.tables}
    by_space = {name[2:]: name for name in tables}  # t_<id space>
    out = {}
    for key, types in sharding.items():
        unknown = [t for t in types if t not in SHARDING_TYPES]
        if unknown:
            raise ValueError(
                f"train.sharding.{key}: unknown sharding types {unknown}, expected some of {SHARDING_TYPES}"
            )
        if key == "*":
            names = list(tables)
        elif key in tables or key in by_space:
            names = [key if key in tables else by_space[key]]
        else:
            raise ValueError(
                f"train.sharding names '{key}', which is no table or id space ({sorted(by_space)})"
            )
        for name in names:
            # column-wise: shards of dim / world_size columns (a multiple of 4, as FBGEMM wants), so
            # a table can spread over every rank; torchrec's default minimum keeps small dims whole
            dim = tables[name].embedding_dim
            min_partition = max(4, dim // max(world_size, 1) // 4 * 4) if "column_wise" in types else None
            out[name] = ParameterConstraints(sharding_types=list(types), min_partition=min_partition)
    return out


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
    if sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"train.sparse_optimizer '{sparse_optimizer}', expected one of {sorted(SPARSE_OPTIMIZERS)}"
        )
    if model.has_sparse:
        apply_optimizer_in_backward(
            SPARSE_OPTIMIZERS[sparse_optimizer], model.sparse_arch.parameters(), {"lr": sparse_lr}
        )
    sharders = get_default_sharders()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=runtime.world_size, compute_device=runtime.device.type),
        batch_size=batch_size,
        constraints=_constraints(model, sharding, runtime.world_size) if model.has_sparse else None,
    )
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg) if model.has_sparse else ShardingPlan(plan={})
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(pg), device=runtime.device, plan=plan, sharders=sharders
    )


def sharded_model_from_config(
    cfg: ExperimentConfig, runtime: Runtime
) -> "tuple[DistributedModelParallel, MultiTaskModel]":
    """The configured model, built on the meta device for the prepared data and sharded; the
    planner gets the training batch size, so a run's plan is the same wherever it is rebuilt
    on the same world size (training, evaluation)."""
    schema = DatasetSchema.load(prepared_dir(cfg))
    model = MultiTaskModel.from_config(schema, cfg.model, device=torch.device("meta"))
    tc = cfg.train
    return shard_model(model, runtime, tc.batch_size, tc.sharding, tc.sparse_optimizer, tc.sparse_lr), model


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
