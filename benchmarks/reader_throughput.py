"""Reader benchmark: prepared parquet -> Batch throughput, and peak memory vs. row count.

    .venv/bin/python benchmarks/reader_throughput.py [--rows 1000000 10000000] [--repeats 5]

1. Throughput on the bundled KuaiRand schema (36 sparse features incl. a 20-long
   history and multi-hot genres, 5 dense, 2 labels): the train split is streamed
   epoch after epoch on one core, in the training order (shuffled) and in the
   evaluation order (not shuffled). Median over repeats.
2. Memory: synthetic study-schema datasets of each --rows size are written in
   chunks, then streamed end to end in a fresh process; its peak RSS is reported
   beside the RSS of the same process right after imports. Flat = bounded.
3. The generators' own peak RSS: writing each --rows size as prepared shards
   (prepare, synthetic adapter) and each --generator-rows size as raw study tables
   (write_study_tables); both must be flat too.

Writes benchmarks/RESULTS.md (section "reader") with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import PEAK_RSS, machine_block, run_child, write_section  # noqa: E402

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the children measure one core

STREAM_CHILD = (
    PEAK_RSS
    + r"""
import sys, time, json
import torch
torch.set_num_threads(1)
from engagerec.data.reader import ShardReader
import_rss = hwm_kb()
reader = ShardReader(sys.argv[1], "train", batch_size=8192, shuffle=True)
rows, start = 0, time.perf_counter()
for batch in reader:
    rows += batch.batch_size
seconds = time.perf_counter() - start
print(json.dumps({"rows": rows, "seconds": seconds, "import_rss_kb": import_rss,
                  "peak_rss_kb": hwm_kb()}))
"""
)

WRITE_CHILD = (
    PEAK_RSS
    + r"""
import sys, json
from engagerec.config import config_from_dict
from engagerec.data.prepare import prepare
cfg = config_from_dict({"data": {
    "source": {"adapter": "synthetic", "synthetic": {"num_rows": int(sys.argv[2]), "num_users": 100000,
                                                     "num_contents": 20000, "num_genres": 30}},
    "features": [{"name": "user_id"}, {"name": "content_id"}, {"name": "gender"},
                 {"name": "genres", "kind": "multi_hot"}, {"name": "age", "kind": "numeric", "buckets": 8},
                 {"name": "rating", "kind": "numeric"},
                 {"name": "duration", "kind": "numeric", "transform": "log1p", "buckets": 16}],
    "filters": {"min_user_views": 0}, "split": {"test_fraction": 0.0, "val_fraction": 0.0}}})
prepare(cfg.data, sys.argv[1])
print(json.dumps({"peak_rss_kb": hwm_kb()}))
"""
)


GENERATE_CHILD = (
    PEAK_RSS
    + r"""
import sys, json
from engagerec.config import SyntheticConfig
from engagerec.data.synthetic import write_study_tables
config = SyntheticConfig(num_rows=int(sys.argv[2]), num_users=1000000, num_contents=100000)
write_study_tables(sys.argv[1], config)
print(json.dumps({"peak_rss_kb": hwm_kb()}))
"""
)


def throughput(prepared: Path, repeats: int, epochs: int) -> dict:
    import torch

    from engagerec.data.reader import ShardReader

    torch.set_num_threads(1)
    results = {}
    for shuffle in (True, False):
        rates = []
        for _ in range(repeats):
            reader = ShardReader(prepared, "train", batch_size=8192, shuffle=shuffle)
            rows, start = 0, time.perf_counter()
            for epoch in range(epochs):
                reader.set_epoch(epoch)
                for batch in reader:
                    rows += batch.batch_size
            rates.append(rows / (time.perf_counter() - start))
        results["shuffled (train order)" if shuffle else "in file order (eval)"] = {
            "median_rows_per_s": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--generator-rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    from engagerec.config import load_config
    from engagerec.data.prepare import prepare

    os.chdir(REPO)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "kuairand"
        summary = prepare(load_config(REPO / "configs/kuairand_random.yaml").data, prepared)
        rates = throughput(prepared, args.repeats, args.epochs)
        lines += [
            "### Throughput, bundled KuaiRand schema, one core, batch 8192",
            "",
            f"Train split of `configs/kuairand_random.yaml`: {summary['split']['train']['rows']:,} rows, "
            f"{len(summary['sparse_features'])} sparse features, {len(summary['dense_features'])} dense; "
            f"{args.epochs} epochs per repeat, {args.repeats} repeats.",
            "",
            "| order | median rows/s | min | max |",
            "|---|---:|---:|---:|",
        ]
        for name, r in rates.items():
            lines.append(f"| {name} | {r['median_rows_per_s']:,.0f} | {r['min']:,.0f} | {r['max']:,.0f} |")

        lines += [
            "",
            "### Peak memory while streaming synthetic study-schema rows (fresh process each)",
            "",
            "| rows | shard writer peak RSS (MiB) | reader peak RSS after imports (MiB) "
            "| reader peak RSS (MiB) | streaming rows/s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for rows in args.rows:
            data = Path(tmp) / f"synthetic_{rows}"
            written = run_child(WRITE_CHILD, str(data), str(rows), env=ONE_THREAD)
            streamed = run_child(STREAM_CHILD, str(data), env=ONE_THREAD)
            assert streamed["rows"] == rows, streamed
            lines.append(
                f"| {rows:,} | {written['peak_rss_kb'] / 1024:,.0f} "
                f"| {streamed['import_rss_kb'] / 1024:,.0f} | {streamed['peak_rss_kb'] / 1024:,.0f} "
                f"| {rows / streamed['seconds']:,.0f} |"
            )
        lines += [
            "",
            "### Peak memory of the raw study-table generator (write_study_tables, 1M-row chunks)",
            "",
            "| rows | peak RSS (MiB) | seconds |",
            "|---:|---:|---:|",
        ]
        for rows in args.generator_rows:
            start = time.perf_counter()
            tables = str(Path(tmp) / f"tables_{rows}")
            generated = run_child(GENERATE_CHILD, tables, str(rows), env=ONE_THREAD)
            lines.append(
                f"| {rows:,} | {generated['peak_rss_kb'] / 1024:,.0f} | {time.perf_counter() - start:,.0f} |"
            )
    command = (
        "make bench  (= .venv/bin/python benchmarks/reader_throughput.py " + " ".join(sys.argv[1:]) + ")"
    )
    text = "\n".join([machine_block(command), "", *lines])
    write_section("reader", text)
    print(text)


if __name__ == "__main__":
    main()
