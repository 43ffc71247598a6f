"""Per-rank embedding-table memory: 1 process against 2 gloo ranks, table-wise and column-wise.

    .venv/bin/python benchmarks/table_memory.py [--rows 10000000] [--ranks 1 2]

The tables of benchmarks/synthetic_tables.py's model (video table of
``--rows`` rows, author table of rows / 5, 1,000 users; D=16; the 20-long history shares the
video table) are planned and sharded by DistributedModelParallel under torchrun, once per
(world size, sharding type). Each rank reports the bytes of the table shards it holds (the
weights in dmp.state_dict()'s ShardedTensors) and of its fused optimiser's state, and the
table memory is compared with the one-process run. Writes the section "table_memory" of
benchmarks/RESULTS.md with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import record_section  # noqa: E402

SHARDING = ("table_wise", "column_wise")


def _child(rows: int, sharding: str, out: Path) -> None:
    """One rank: shard the model and write the bytes this rank holds to ``out/<rank>.json``."""
    import torch
    from synthetic_tables import synthetic_schema
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from engagerec.cli import quiet_library_noise
    from engagerec.config import load_config
    from engagerec.distributed import close_runtime, init_runtime, shard_model
    from engagerec.model_builder import build_model

    quiet_library_noise()
    runtime = init_runtime("cpu")  # table bytes do not depend on the device
    # its model's history shares the video table (synthetic_tables.py's schema), as measured so far
    cfg = load_config(REPO / "configs" / "kuairand_1k.yaml", ["model.embeddings.own_table=[]"])
    model = build_model(synthetic_schema(rows), cfg.model, device=torch.device("meta"))
    dmp = shard_model(
        model, runtime, 4096, {"*": [sharding]}, cfg.train.sparse_optimizer, cfg.train.sparse_lr
    )
    tables = 0
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor) and "sparse_arch" in key:
            tables += sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    state = 0
    for value in dmp.fused_optimizer.state_dict()["state"].values():
        for tensor in value.values():
            if isinstance(tensor, ShardedTensor):
                state += sum(s.tensor.numel() * s.tensor.element_size() for s in tensor.local_shards())
            elif isinstance(tensor, torch.Tensor):
                state += tensor.numel() * tensor.element_size()
    (out / f"{runtime.rank}.json").write_text(json.dumps({"tables": tables, "optimizer": state}))
    close_runtime(runtime)


def measure(rows: int, ranks=(1, 2)) -> dict:
    """(world size, sharding) -> one {"tables", "optimizer"} byte count per rank, each sharded
    under torchrun in fresh processes (1 process: table-wise only)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    results = {}
    for world in ranks:
        for sharding in SHARDING if world > 1 else ("table_wise",):
            with tempfile.TemporaryDirectory() as tmp:
                command = [str(torchrun), "--nproc-per-node", str(world), "--master-port", str(29700 + world),
                           __file__, "--child", str(rows), sharding, tmp]  # fmt: skip
                subprocess.run(command, check=True, capture_output=True, cwd=REPO, env={**os.environ})
                results[(world, sharding)] = [
                    json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(world)
                ]
            print(world, sharding, results[(world, sharding)], flush=True)
    return results


def main() -> None:
    """Run every (world size, sharding) under torchrun and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", nargs=3, metavar=("ROWS", "SHARDING", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(int(args.child[0]), args.child[1], Path(args.child[2]))
        return
    results = measure(args.rows, args.ranks)
    one = results[(1, "table_wise")][0]
    mib = 1024**2
    lines = [
        f"Video table {args.rows:,} rows, author {args.rows // 5:,}, users 1,000; D=16; fused row-wise "
        "Adagrad. Per rank: the table shards it holds, and its optimiser state.",
        "",
        "| ranks | sharding | tables per rank (MiB) | largest / 1-process tables "
        "| optimiser state per rank (MiB) |",
        "|---:|---|---|---:|---|",
    ]
    for (world, sharding), ranks in results.items():
        tables = [r["tables"] for r in ranks]
        state = [r["optimizer"] for r in ranks]
        lines.append(
            f"| {world} | {sharding if world > 1 else '-'} | {' / '.join(f'{t / mib:,.0f}' for t in tables)} "
            f"| {max(tables) / one['tables']:.2f} | {' / '.join(f'{s / mib:,.1f}' for s in state)} |"
        )
    record_section("table_memory", lines)


if __name__ == "__main__":
    main()
