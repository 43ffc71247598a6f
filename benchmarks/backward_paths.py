"""FBGEMM's two CPU backward paths for a row-wise Adagrad table, timed side by side on this CPU.

    .venv/bin/python benchmarks/backward_paths.py [--rows 1886839] [--pool 116000] [--rounds 5]

FBGEMM's CPU TBE backward with row-wise Adagrad (the fused optimizer engagerec's id tables use)
takes one of two code paths (fbgemm_gpu's embedding_backward_split_cpu_template.cpp):

- **JIT kernel**: a float32 table read by one feature. asmjit-generated SpMDM and row-wise
  Adagrad kernels, run in blocks of 64 rows under ``at::parallel_for``;
- **loop**: a table read by several features (the video table shared with the history, as
  ``model.embeddings.own_table: []`` makes it), or one with fp16 weights. Plain C++, one thread.

Which is faster depends on the CPU: this times both on the same work, in one process,
alternating rounds. The table is KuaiRand-1K's history table (``--rows`` video rows, 16 wide),
read by a 20-long history per row of a 4096-row batch whose ids are drawn from ``--pool`` ids:
116,000 give about 58,500 distinct ids a batch, as KuaiRand-1K's batches hold 58,988
(benchmarks/RESULTS.md, profile_shapes); sum pooling. Variants:

1. ``JIT kernel``: the table read by the history alone;
2. ``loop``: the same table and batch with a second feature on the table that holds no ids in
   any row, so FBGEMM sees a shared table: the same update as 1 (``make_variant``;
   tests/test_benchmark_references.py checks it), through the loop;
3. ``loop, fp16 weights``: 1 with the weights and momentum stored in fp16 (output float32):
   the loop too, half the bytes, different numerics.

Reports the forward and the backward (with the fused optimizer step) in ms, medians of
``--steps`` steps after 3 warm-up steps, the median over rounds, and the backward's ratio to the
JIT kernel within each round (min / median / max). Writes the section ``--section`` (default
``backward_paths``) of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

from engagerec.embedding_backward import bag_offsets, fbgemm_table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import record_section  # noqa: E402

JIT, LOOP, LOOP_FP16 = "JIT kernel", "loop", "loop, fp16 weights"
VARIANTS = (JIT, LOOP, LOOP_FP16)


def make_variant(name: str, rows: int, dim: int, learning_rate: float = 0.01):
    """The table of variant ``name`` (``VARIANTS``): ``rows`` x ``dim``, row-wise Adagrad, on CPU.
    ``LOOP``'s table is read by a second, always empty feature (``batch_of``): FBGEMM then treats
    it as shared and runs its loop."""
    return fbgemm_table(rows, dim, loop=name == LOOP, fp16=name == LOOP_FP16, learning_rate=learning_rate)


def batch_of(name: str, ids: torch.Tensor, bag: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices, offsets) of one batch for variant ``name``: ``ids`` in bags of ``bag``, then,
    for ``LOOP``, as many empty bags of the second feature."""
    return ids, bag_offsets(ids.numel() // bag, bag, loop=name == LOOP)


def one_round(
    tables: Dict[str, SplitTableBatchedEmbeddingBagsCodegen], batches: List[torch.Tensor], bag: int, dim: int
) -> Dict[str, Tuple[float, float]]:
    """variant -> (forward ms, backward ms), the medians over ``batches`` after 3 warm-up steps;
    the loss is the sum of the history's pooled columns (the first ``dim``)."""
    found = {}
    for name, table in tables.items():
        forward, backward = [], []
        for step, ids in enumerate(batches):
            indices, offsets = batch_of(name, ids, bag)
            start = time.perf_counter()
            pooled = table(indices, offsets)
            middle = time.perf_counter()
            pooled[:, :dim].sum().backward()
            end = time.perf_counter()
            if step >= 3:
                forward.append(middle - start)
                backward.append(end - middle)
        found[name] = (1e3 * statistics.median(forward), 1e3 * statistics.median(backward))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_886_839, help="table rows (KuaiRand-1K's videos)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--bag", type=int, default=20, help="ids per row (the history's length)")
    parser.add_argument("--pool", type=int, default=116_000, help="ids a batch draws from")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--section", default="backward_paths")
    args = parser.parse_args()
    torch.manual_seed(0)
    tables = {name: make_variant(name, args.rows, args.dim) for name in VARIANTS}
    pool = torch.randperm(args.rows)[: args.pool]
    batches = [
        pool[torch.randint(0, args.pool, (args.batch_size * args.bag,))] for _ in range(args.steps + 3)
    ]
    distinct = statistics.mean(torch.unique(ids).numel() for ids in batches)
    rounds = []
    for number in range(args.rounds):
        rounds.append(one_round(tables, batches, args.bag, args.dim))
        print(
            f"round {number}: " + ", ".join(f"{k} {v[1]:.2f} ms" for k, v in rounds[-1].items()), flush=True
        )
    lines = [
        f"One table of {args.rows:,} rows x {args.dim}, row-wise Adagrad, on CPU with "
        f"{torch.get_num_threads()} threads; a batch of {args.batch_size} rows x {args.bag} ids "
        f"(sum pooling), {distinct:,.0f} distinct ids a batch on average. ms: medians of "
        f"{args.steps} steps, then the median over {args.rounds} alternating rounds; the backward "
        "includes the fused optimizer step. Ratio: the JIT kernel's backward over the variant's "
        "within each round (min / median / max; above 1: faster than the JIT kernel).",
        "",
        "| FBGEMM path | forward ms | backward ms | backward: JIT kernel / this |",
        "|---|---:|---:|---|",
    ]
    for name in VARIANTS:
        ratios = sorted(found[JIT][1] / found[name][1] for found in rounds)
        forward = statistics.median(found[name][0] for found in rounds)
        backward = statistics.median(found[name][1] for found in rounds)
        lines.append(
            f"| {name} | {forward:.2f} | {backward:.2f} "
            f"| {ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f} |"
        )
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
