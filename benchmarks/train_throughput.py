"""Training throughput: engagerec's TorchRec path beside a plain nn.EmbeddingBag model, same run.

    .venv/bin/python benchmarks/train_throughput.py [--towers mmoe ple] [--batch-size 4096] [--steps 60]

Both sides train the same tower on the same prepared batches of the bundled KuaiRand data
(configs/kuairand_random.yaml), end to end: reading shards, building batches, forward,
backward and optimiser steps, one process, all cores the machine has.

* engagerec: MultiTaskModel on the meta device -> DistributedModelParallel (FBGEMM TBE
  kernels, fused row-wise Adagrad in backward) -> TrainPipelineSparseDist.
* plain: one torch.nn.EmbeddingBag per id space (the same tables), the same tower and
  heads, Adam on every parameter, a plain loop; what a PyTorch user writes without TorchRec.

samples/s are measured after --warmup steps; the two sides alternate --repeats times and the
median is reported (this machine's speed drifts between minutes). Writes the section "train" of
benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from results import machine_block, write_section  # noqa: E402
from torch import nn  # noqa: E402


class PlainEmbeddingBagModel(nn.Module):
    """The same features, tower and heads with torch.nn.EmbeddingBag tables and no TorchRec."""

    def __init__(self, reference) -> None:
        super().__init__()
        self.reference_tasks = reference.tasks
        self.features = []  # (feature, table) in the reference's concatenation order
        self.tables = nn.ModuleDict()
        for table in reference.spec.tables:
            mode = "mean" if table.pooling.name == "MEAN" else "sum"
            self.tables[table.name] = nn.EmbeddingBag(
                table.num_embeddings, table.embedding_dim, mode=mode, include_last_offset=True
            )
            self.features += [(name, table.name) for name in table.feature_names]
        self.tower = reference.tower
        self.heads = reference.heads

    def forward(self, batch):
        kjt = batch.sparse_features
        pooled = []
        for name, table in self.features:
            jagged = kjt[name]
            pooled.append(self.tables[table](jagged.values(), jagged.offsets()))
        reps = self.tower(torch.cat(pooled + [batch.dense_features], dim=1))
        loss = 0
        for i, task in enumerate(self.reference_tasks):
            loss = loss + task.weight * task.loss(
                self.heads[i](reps[i]), batch.labels[task.label], batch.label_weights[task.label]
            )
        return loss


def _batches(data_dir: Path, batch_size: int) -> Iterator:
    from engagerec.data.reader import ShardReader

    reader = ShardReader(data_dir, "train", batch_size=batch_size, shuffle=True, drop_last=True)
    epoch = 0
    while True:
        reader.set_epoch(epoch)
        yield from reader
        epoch += 1


def _timed(step_fn, batches: Iterator, steps: int, warmup: int, batch_size: int) -> float:
    for _ in range(warmup):
        step_fn(batches)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(batches)
    return steps * batch_size / (time.perf_counter() - start)


def engagerec_rate(cfg, data_dir: Path, batch_size: int, steps: int, warmup: int) -> float:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from engagerec.data.schema import DatasetSchema
    from engagerec.distributed import build_optimizer, close_runtime, init_runtime, shard_model
    from engagerec.model import MultiTaskModel

    runtime = init_runtime()
    try:
        torch.manual_seed(0)
        model = MultiTaskModel.from_config(
            DatasetSchema.load(data_dir), cfg.model, device=torch.device("meta")
        )
        dmp = shard_model(
            model, runtime, batch_size, cfg.train.sharding, cfg.train.sparse_optimizer, cfg.train.sparse_lr
        )
        pipeline = TrainPipelineSparseDist(
            dmp, build_optimizer(dmp, cfg.train.dense_lr), runtime.device, execute_all_batches=True
        )
        return _timed(
            lambda it: pipeline.progress(it), _batches(data_dir, batch_size), steps, warmup, batch_size
        )
    finally:
        close_runtime(runtime)


def plain_rate(cfg, data_dir: Path, batch_size: int, steps: int, warmup: int) -> float:
    from engagerec.data.schema import DatasetSchema
    from engagerec.model import MultiTaskModel

    torch.manual_seed(0)
    model = PlainEmbeddingBagModel(MultiTaskModel.from_config(DatasetSchema.load(data_dir), cfg.model))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.dense_lr)

    def step(batches):
        loss = model(next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _timed(step, _batches(data_dir, batch_size), steps, warmup, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--towers", nargs="+", default=["mmoe", "ple"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "configs/kuairand_random.yaml"))
    args = parser.parse_args()

    from engagerec.cli import quiet_library_noise
    from engagerec.config import load_config, with_tower
    from engagerec.data.prepare import prepare

    quiet_library_noise()
    os.chdir(REPO)
    base = load_config(args.config)
    batch_size = args.batch_size or base.train.batch_size
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prepare(base.data, data_dir)
        for tower in args.towers:
            cfg = with_tower(base, tower)
            ours, plain = [], []
            for _ in range(args.repeats):  # alternate, so drift hits both sides alike
                ours.append(engagerec_rate(cfg, data_dir, batch_size, args.steps, args.warmup))
                plain.append(plain_rate(cfg, data_dir, batch_size, args.steps, args.warmup))
            ratios = sorted(o / p for o, p in zip(ours, plain, strict=True))
            ours, plain = statistics.median(ours), statistics.median(plain)
            rows.append({"tower": tower, "engagerec": ours, "plain": plain, "ratios": ratios})
            print(
                f"{tower}: engagerec {ours:,.0f} samples/s, plain nn.EmbeddingBag {plain:,.0f} samples/s, "
                f"ratio {ours / plain:.2f}",
                flush=True,
            )
    lines = [
        f"### End-to-end training, bundled KuaiRand, batch {batch_size}, {torch.get_num_threads()} threads",
        "",
        f"{args.steps} timed steps after {args.warmup} warm-up steps per side.",
        "",
        f"Medians of {args.repeats} alternating repeats; "
        "ratio = per-repeat engagerec / plain (min, median, max).",
        "",
        "| tower | engagerec (TorchRec) samples/s | plain nn.EmbeddingBag samples/s "
        "| ratio min / median / max |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['tower']} | {r['engagerec']:,.0f} | {r['plain']:,.0f} | "
        f"{r['ratios'][0]:.2f} / {statistics.median(r['ratios']):.2f} / {r['ratios'][-1]:.2f} |"
        for r in rows
    ]
    command = ".venv/bin/python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    text = "\n".join([machine_block(command), "", *lines])
    write_section("train", text)
    print(text)


if __name__ == "__main__":
    main()
