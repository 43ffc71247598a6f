"""Training throughput: engagerec's TorchRec path beside a plain nn.EmbeddingBag model, same run.

    .venv/bin/python benchmarks/train_throughput.py [--towers mmoe ple] [--batch-size 4096] [--steps 60]

Both sides train the same tower on the same prepared batches of the bundled KuaiRand data
(configs/kuairand_random.yaml), end to end: reading shards, building batches, forward,
backward and optimiser steps, one process, all cores the machine has.

* engagerec: MultiTaskModel on the meta device -> DistributedModelParallel (FBGEMM TBE
  kernels, fused row-wise Adagrad in backward) -> TrainPipelineSparseDist.
* plain sparse: one torch.nn.EmbeddingBag(sparse=True) per id space (the same tables), the
  same tower and heads, Adagrad on the tables (it takes sparse gradients: only the rows a
  batch touches are updated) and Adam on the rest; the strongest plain-PyTorch reference.
* plain dense: the same with dense gradients and Adam on every parameter: what a PyTorch
  user writes first, and what does not scale with the tables.

``--synthetic-rows R`` times the model alone on pre-built batches over an R-row video table
(the reader left out; the dense side is skipped past ``--dense-max-rows``).
``--data-dir`` times an existing prepared dataset instead (e.g. KuaiRand-1K-shaped data with
its 1.9M-row video table: ``--config configs/kuairand_1k.yaml --data-dir prepared/kuairand_1k
--section train_kuairand_1k``).

samples/s are measured after --warmup steps; the two sides alternate --repeats times and the
median is reported (this machine's speed drifts between minutes). Writes the section "train" of
benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from results import machine_block, write_section  # noqa: E402
from synthetic_tables import SyntheticSource  # noqa: E402
from torch import nn  # noqa: E402


class PlainEmbeddingBagModel(nn.Module):
    """The same features, tower and heads with torch.nn.EmbeddingBag tables and no TorchRec."""

    def __init__(self, reference, sparse: bool = False) -> None:
        super().__init__()
        self.reference_tasks = reference.tasks
        self.tables = nn.ModuleDict()
        table_of = {}
        for table in reference.tables:  # its EmbeddingBagConfigs
            mode = "mean" if table.pooling.name == "MEAN" else "sum"
            self.tables[table.name] = nn.EmbeddingBag(
                table.num_embeddings, table.embedding_dim, mode=mode, include_last_offset=True, sparse=sparse
            )
            table_of.update({name: table.name for name in table.feature_names})
        # (feature, table) in the order the reference concatenates its pooled features
        self.features = [(name, table_of[name]) for name in reference.feature_names]
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


class ShardSource:
    """Batches read from a prepared dataset's train split, as training reads them (through
    engagerec's loader, ``num_workers`` reader processes as ``train.num_workers``)."""

    def __init__(
        self, data_dir: Path, batch_size: int, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        from engagerec.data.schema import DatasetSchema

        self.data_dir, self.batch_size, self.num_workers = data_dir, batch_size, num_workers
        self.pin_memory = pin_memory
        self.schema = DatasetSchema.load(data_dir)
        self.description = f"`{data_dir}` ({self.schema.meta['splits']['train']['rows']:,} train rows)"

    def batches(self) -> Iterator:
        """Epoch after epoch of the train split."""
        from engagerec.data.reader import ShardReader, make_loader

        reader = ShardReader(self.data_dir, "train", batch_size=self.batch_size, shuffle=True, drop_last=True)
        epoch = 0
        while True:
            reader.set_epoch(epoch)
            yield from make_loader(reader, self.num_workers, self.pin_memory)
            epoch += 1


def _timed(step_fn, batches: Iterator, steps: int, warmup: int, batch_size: int, settle=None) -> float:
    """Samples/s of ``steps`` steps after ``warmup``; ``settle`` waits for what a step left running."""
    settle = settle or (lambda: None)
    for _ in range(warmup):
        step_fn(batches)
    settle()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(batches)
    settle()
    return steps * batch_size / (time.perf_counter() - start)


def engagerec_stepper(cfg, schema, batch_size: int, device: str = "cpu"):
    """engagerec's training step as users run it: the model on the meta device, sharded by DMP
    (FBGEMM kernels, fused sparse optimiser), driven by TrainPipelineSparseDist, with
    train.embedding_backward and train.embedding_backward_thread as `engagerec train` resolves
    them. Returns (step(batches), close(), settle()): settle waits for the embedding backward a
    step left running on the worker thread, which a timed window must include."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from engagerec.backward_overlap import overlap_if_used
    from engagerec.distributed import build_optimizer, close_runtime, init_runtime, shard_model
    from engagerec.embedding_backward import add_empty_keys, loop_features, loop_keys
    from engagerec.model_builder import build_model
    from engagerec.runs import resolve_loop_backward

    runtime = init_runtime(device)
    torch.manual_seed(0)
    # train.embedding_backward as `engagerec train` resolves it (engagerec.runs.sharded_model)
    loop = resolve_loop_backward(cfg, schema, runtime)
    model = build_model(schema, cfg.model, device=torch.device("meta"), loop_backward=loop)
    dmp = shard_model(
        model, runtime, batch_size, cfg.train.sharding, cfg.train.sparse_optimizer, cfg.train.sparse_lr
    )
    # train.embedding_backward_thread as engagerec.train.Trainer resolves it
    overlap = overlap_if_used(
        dmp, cfg.train.embedding_backward_thread, runtime.device, bool(loop_features(model.tables))
    )
    settle = overlap.wait if overlap is not None else (lambda: None)

    def close() -> None:
        if overlap is not None:
            overlap.close()
        close_runtime(runtime)

    pipeline = TrainPipelineSparseDist(
        dmp, build_optimizer(dmp, cfg.train.dense_lr), runtime.device, execute_all_batches=True
    )
    keys = loop_keys(model.tables)
    if not keys:
        return pipeline.progress, close, settle
    adapted: dict = {}  # the caller's batch iterator -> it with the companions' keys added

    def step(batches: Iterator) -> None:
        # the keys engagerec's reader adds itself, added to batches from any source: a KJT
        # rebuilt around the same values, inside engagerec's timing
        if adapted.get("from") is not batches:
            extended = (
                dataclasses.replace(b, sparse_features=add_empty_keys(b.sparse_features, keys))
                for b in batches
            )
            adapted.update({"from": batches, "to": extended})
        pipeline.progress(adapted["to"])

    return step, close, settle


def plain_stepper(cfg, schema, sparse: bool = False, device: str = "cpu"):
    """The plain-PyTorch reference's training step (see PlainEmbeddingBagModel). Returns
    (step(batches), close())."""
    from engagerec.model_builder import build_model

    torch.manual_seed(0)
    reference = build_model(schema, cfg.model)
    model = PlainEmbeddingBagModel(reference, sparse=sparse).to(device)
    if sparse:  # row-sparse updates for the tables, Adam for the tower and heads
        tables = list(model.tables.parameters())
        dense = [p for name, p in model.named_parameters() if not name.startswith("tables.")]
        optimizers = [
            torch.optim.Adagrad(tables, lr=cfg.train.sparse_lr),
            torch.optim.Adam(dense, lr=cfg.train.dense_lr),
        ]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=cfg.train.dense_lr)]

    def step(batches):
        loss = model(next(batches).to(torch.device(device), non_blocking=True))
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step, lambda: None


def engagerec_rate(cfg, source, batch_size: int, steps: int, warmup: int) -> float:
    step, close, settle = engagerec_stepper(cfg, source.schema, batch_size)
    try:
        return _timed(step, source.batches(), steps, warmup, batch_size, settle)
    finally:
        close()


def plain_rate(cfg, source, batch_size: int, steps: int, warmup: int, sparse: bool = False) -> float:
    step, _ = plain_stepper(cfg, source.schema, sparse)
    return _timed(step, source.batches(), steps, warmup, batch_size)


SIDES = ("engagerec", "plain sparse", "plain dense")


def main() -> None:
    """Time the three sides, alternating, and write a section of benchmarks/RESULTS.md."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--towers", nargs="+", default=["mmoe", "ple"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(REPO / "configs/kuairand_random.yaml"))
    parser.add_argument(
        "--data-dir", help="an existing prepared dataset (default: prepare the config's data)"
    )
    parser.add_argument("--section", default="train", help="the section of benchmarks/RESULTS.md to write")
    parser.add_argument(
        "--synthetic-rows", type=int, help="pre-built batches over a video table of this many rows"
    )
    parser.add_argument(
        "--dense-max-rows", type=int, default=5_000_000, help="skip the dense side past this table"
    )
    args = parser.parse_args()

    from engagerec.cli import quiet_library_noise
    from engagerec.config import load_config, with_tower
    from engagerec.data.prepare import prepare
    from engagerec.host_memory import keep_freed_memory

    quiet_library_noise()
    keep_freed_memory()  # what the engagerec command sets; every side gets the same allocator
    os.chdir(REPO)
    base = load_config(args.config)
    batch_size = args.batch_size or base.train.batch_size
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_rows:
            source = SyntheticSource(args.synthetic_rows, batch_size)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
            if not args.data_dir:
                prepare(base.data, data_dir)
            source = ShardSource(data_dir, batch_size)
        schema = source.schema
        largest = max(schema.num_embeddings(f.id_space) for f in schema.sparse)
        sides = [side for side in SIDES if not (side == "plain dense" and largest > args.dense_max_rows)]
        for tower in args.towers:
            cfg = with_tower(base, tower)
            rates: Dict[str, List[float]] = {side: [] for side in sides}
            for _ in range(args.repeats):  # alternate, so drift hits every side alike
                rates["engagerec"].append(engagerec_rate(cfg, source, batch_size, args.steps, args.warmup))
                for side in sides[1:]:
                    sparse = side == "plain sparse"
                    rates[side].append(plain_rate(cfg, source, batch_size, args.steps, args.warmup, sparse))
            ratios = {
                side: sorted(o / p for o, p in zip(rates["engagerec"], rates[side], strict=True))
                for side in sides[1:]
            }
            medians = {side: statistics.median(values) for side, values in rates.items()}
            rows.append({"tower": tower, **medians, "ratios": ratios})
            print(
                f"{tower}: " + ", ".join(f"{side} {rate:,.0f} samples/s" for side, rate in medians.items()),
                flush=True,
            )
    lines = [
        f"### Training, batch {batch_size}, {torch.get_num_threads()} threads",
        "",
        f"Data: {source.description}; largest table {largest:,} rows.",
        f"{args.steps} timed steps after {args.warmup} warm-up steps per side; medians of {args.repeats} "
        "alternating repeats; ratio = per-repeat engagerec / plain (min / median / max).",
        "",
        "| tower | engagerec (TorchRec) | plain sparse (EmbeddingBag, Adagrad) | plain dense (Adam) "
        "| ratio to sparse | ratio to dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def spread(values: Optional[List[float]]) -> str:
        if not values:
            return f"not run (table > {args.dense_max_rows:,} rows)"
        return f"{values[0]:.2f} / {statistics.median(values):.2f} / {values[-1]:.2f}"

    lines += [
        f"| {r['tower']} | {r['engagerec']:,.0f} | {r['plain sparse']:,.0f} | {r.get('plain dense', 0):,.0f} "
        f"| {spread(r['ratios'].get('plain sparse'))} | {spread(r['ratios'].get('plain dense'))} |"
        for r in rows
    ]
    command = ".venv/bin/python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
    what = "the model alone (pre-built batches)" if args.synthetic_rows else "end to end (reader included)"
    text = "\n".join([machine_block(command), "", f"samples/s, {what}:", "", *lines])
    write_section(args.section, text)
    print(text)


if __name__ == "__main__":
    main()
