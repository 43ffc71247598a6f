"""engagerec in your own TorchRec job: your tables, batches and loop; our MMoE model and metrics.

Run with `torchrun --nproc-per-node 2 docs/examples/torchrec_job.py` (any number of CPU ranks).
"""

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim import KeyedOptimizerWrapper, RowWiseAdagrad, apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from engagerec import MultiTaskModel, TaskConfig, TaskMetrics, build_tower

torch.distributed.init_process_group("gloo")
B, USERS, ITEMS, DIM = 512, 1_000, 20_000, 16
appeal = torch.rand(ITEMS, generator=torch.Generator().manual_seed(0))  # what the item table must learn
torch.manual_seed(1 + torch.distributed.get_rank())  # each rank its own rows


def batch() -> Batch:
    """Your own batches: user and item ids, one dense feature, a watch share and a click per row."""
    ids, dense = torch.cat([torch.randint(USERS, (B,)), torch.randint(ITEMS, (B,))]), torch.randn(B, 1)
    dwell = (0.8 * appeal[ids[B:]] + 0.2 * torch.sigmoid(dense[:, 0])).clamp(0, 1)
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], ids, torch.ones(2 * B, dtype=torch.int32))
    return Batch(dense, kjt, labels=torch.stack([dwell, (torch.rand(B) < dwell).float()], dim=1))


user = EmbeddingBagConfig(name="user", embedding_dim=DIM, num_embeddings=USERS, feature_names=["user"])
item = EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=ITEMS, feature_names=["item"])
ebc = EmbeddingBagCollection(tables=[user, item], device=torch.device("meta"))  # DMP shards, materialises
# labels [B, 2]: task i reads column i (or name them: MultiTaskModel(..., label_columns={...}))
tasks = [TaskConfig("dwell", label="dwell"), TaskConfig("click", label="click", kind="binary")]
tower = build_tower("mmoe", input_dim=2 * DIM + 1, num_tasks=2, num_experts=4, expert_sizes=[64])
apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})  # fused into FBGEMM's backward
model = MultiTaskModel(ebc, dense_in_features=1, tower=tower, tasks=tasks)
model = DistributedModelParallel(model, device=torch.device("cpu"))
dense = dict(in_backward_optimizer_filter(model.named_parameters()))
optimizer = KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=3e-3))
pipeline = TrainPipelineSparseDist(model, optimizer, torch.device("cpu"))
train = iter([batch() for _ in range(300)])
for _ in range(300):
    pipeline.progress(train)

pipeline.detach()  # evaluation runs the model's own forward
metrics = TaskMetrics(tasks, batch_size=B, gauc_group="user")  # torchrec's metrics + exact XAUC + GAUC
model.eval()
with torch.no_grad():
    for held_out in (batch() for _ in range(20)):
        _, (_, predictions, labels, weights) = model(held_out)
        metrics.update(predictions, labels, weights, groups=held_out.sparse_features)
# every rank prints the same: {"click/auc": ..., "click/gauc": ..., "dwell/mse": ..., "dwell/xauc": ...}
print(f"rank {torch.distributed.get_rank()}: {metrics.compute()}")
