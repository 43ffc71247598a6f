"""Dataset-writer benchmark at KuaiRand scale: generate, prepare, stream.

    .venv/bin/python benchmarks/prepare_scale.py [--scales 0.1 1] [--keep DIR]

For each scale S (1 = KuaiRand-1K: 1,000 users, 4,369,953 videos, 11,713,045 views):

1. `engagerec synthesize --shape kuairand-1k --scale S` writes KuaiRand's official layout;
2. `engagerec prepare --config configs/kuairand_1k.yaml` (history of 20, history_mean
   features, four labels, temporal split) prepares it: wall time per stage and the peak
   RSS of that process (DuckDB's threads included);
3. the prepared train split is streamed to Batches on one core (ShardReader, batch 8192,
   shuffled order as in training): rows/s (median of 3 epochs) and peak RSS;
4. what trusting the prepared data costs (engagerec.data.manifest): the check every reader
   makes on open (sizes against the manifest, shard rows against the footers: opening the three
   splits, median of 5), the full verification (`engagerec prepare --verify`: CRC-32 of every
   byte, with the files in the page cache as after a prepare), and decoding every row group of
   the validation split with the parquet page checksums verified (as ShardReader reads) against
   without (median of 3 each, alternating).

Each step runs in a fresh process whose own high-water mark (VmHWM) is its peak RSS.
Writes benchmarks/RESULTS.md (section "prepare") with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import PEAK_RSS, machine_block, run_child, write_section  # noqa: E402

GENERATE = (
    PEAK_RSS
    + r"""
import sys, json, time
from engagerec.data.kuairand_generator import write_kuairand_1k
start = time.perf_counter()
shape = {"popularity_skew": float(sys.argv[3])} if len(sys.argv) > 3 else {}  # the generator's default
floors = write_kuairand_1k(sys.argv[1], scale=float(sys.argv[2]), seed=0, **shape)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_kb": hwm_kb(), "floors": floors}))
"""
)

PREPARE = (
    PEAK_RSS
    + r"""
import sys, json, time
from engagerec.config import load_config
from engagerec.data.prepare import prepare
data = sys.argv[1]
cfg = load_config(sys.argv[3], [f"data.source.interactions={data}",
                                f"data.source.users={data}/user_features_1k.csv",
                                f"data.source.content={data}/video_features_basic_1k.csv"]
                  + sys.argv[4:])  # further overrides, e.g. data.memory_limit=4GB
start = time.perf_counter()
summary = prepare(cfg.data, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_kb": hwm_kb(), "summary": summary}))
"""
)

STREAM = (
    PEAK_RSS
    + r"""
import sys, json, time
import torch
torch.set_num_threads(1)
from engagerec.data.reader import ShardReader
import_rss = hwm_kb()
reader = ShardReader(sys.argv[1], "train", batch_size=8192, shuffle=True)
rates = []
for epoch in range(3):  # the median of three epochs: this machine drifts by up to 30%
    reader.set_epoch(epoch)
    rows, start = 0, time.perf_counter()
    for batch in reader:
        rows += batch.batch_size
    rates.append(rows / (time.perf_counter() - start))
rate = sorted(rates)[1]
print(json.dumps({"rows": rows, "seconds": rows / rate, "import_rss_kb": import_rss,
                  "peak_rss_kb": hwm_kb()}))
"""
)

CHECKS = r"""
import sys, json, time
import pyarrow.parquet as pq
from engagerec.data.manifest import check_prepared, verify_prepared
from engagerec.data.reader import ShardReader
data = sys.argv[1]

def median(values):
    return sorted(values)[len(values) // 2]

def open_all():
    start = time.perf_counter()
    check_prepared(data)  # what ShardReader does first, once per split it opens
    for split in ("train", "val", "test"):
        ShardReader(data, split, batch_size=8192, rank=0, world_size=1)
    return time.perf_counter() - start

on_open = median([open_all() for _ in range(5)])
full = verify_prepared(data)
shards = sorted(__import__("pathlib").Path(data, "val").glob("part-*.parquet"))

def decode(verify):
    start = time.perf_counter()
    for path in shards:
        handle = pq.ParquetFile(path, page_checksum_verification=verify)
        for group in range(handle.metadata.num_row_groups):
            handle.read_row_group(group, use_threads=False)
    return time.perf_counter() - start

decode(True)  # warm the page cache
timed = {True: [], False: []}
for _ in range(3):
    for verify in (True, False):
        timed[verify].append(decode(verify))
print(json.dumps({"on_open_s": on_open, "verify": full, "decode_checked_s": median(timed[True]),
                  "decode_unchecked_s": median(timed[False])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--config", default=str(REPO / "configs" / "kuairand_1k.yaml"))
    parser.add_argument("--keep", help="keep the generated and prepared data under this directory")
    args = parser.parse_args()
    command = "make bench  (= .venv/bin/python benchmarks/prepare_scale.py --scales " + " ".join(
        f"{s:g}" for s in args.scales
    )
    rows, checks = [], {}
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        for scale in args.scales:
            raw, prepared = Path(tmp) / f"raw_{scale:g}", Path(tmp) / f"prepared_{scale:g}"
            generated = run_child(GENERATE, str(raw), str(scale), cwd=REPO)
            started = time.perf_counter()
            done = run_child(PREPARE, str(raw), str(prepared), args.config, cwd=REPO)
            wall = time.perf_counter() - started
            streamed = run_child(STREAM, str(prepared), cwd=REPO)
            checks[scale] = run_child(CHECKS, str(prepared), cwd=REPO)
            rows.append((scale, generated, done, wall, streamed))
            peak = done["peak_rss_kb"] / 1024
            rate = streamed["rows"] / streamed["seconds"]
            print(f"scale {scale:g}: {done['seconds']:.1f} s, {peak:.0f} MiB; read {rate:,.0f} rows/s")
    lines = [
        machine_block(command + ")"),
        "",
        "Generated KuaiRand-1K-shaped files (`engagerec synthesize --shape kuairand-1k`), prepared with",
        "`configs/kuairand_1k.yaml`: 36 sparse features (user, video and author ids, a 20-long history",
        "sharing the video table, user and video attributes, genres), 17 dense (3 history_mean, 9 ordered "
        "id statistics: views and label means per user, video and author), 4 labels",
        "(watch_ratio, skip, long_view, click), temporal split. DuckDB memory_limit (data.memory_limit "
        "as resolved): "
        + ", ".join(
            f"{scale:g}x {done['summary'].get('memory_limit', '1GB')}" for scale, _, done, _, _ in rows
        )
        + "; 2 threads.",
        "",
        "| scale | log rows | videos | generate s | prepare s (process) "
        "| prepare peak RSS (MiB) | reader rows/s, 1 core (median of 3 epochs) | reader peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scale, generated, done, wall, streamed in rows:
        floors = generated["floors"]
        lines.append(
            f"| {scale:g} | {floors['rows']:,} | {floors['videos']:,} | {generated['seconds']:.1f} "
            f"| {done['seconds']:.1f} ({wall:.1f}) | {done['peak_rss_kb'] / 1024:,.0f} "
            f"| {streamed['rows'] / streamed['seconds']:,.0f} | {streamed['peak_rss_kb'] / 1024:,.0f} |"
        )
    lines += [
        "",
        "Seconds per prepare stage:",
        "",
        "| scale | " + " | ".join(rows[0][2]["summary"]["seconds"]) + " |",
    ]
    lines.append("|---:|" + "---:|" * len(rows[0][2]["summary"]["seconds"]))
    for scale, _, done, _, _ in rows:
        lines.append(
            f"| {scale:g} | " + " | ".join(f"{v:.1f}" for v in done["summary"]["seconds"].values()) + " |"
        )
    lines += [
        "",
        "What trusting the prepared data costs (the manifest written last is the stage above):",
        "",
        "| scale | files | MiB | check on open, 3 splits (ms) | full verification s (MiB/s) "
        "| val decode with page checksums / without (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for scale, check in checks.items():
        full = check["verify"]
        mib = full["bytes"] / 2**20
        lines.append(
            f"| {scale:g} | {full['files']} | {mib:,.0f} | {check['on_open_s'] * 1000:.1f} "
            f"| {full['seconds']:.2f} ({mib / full['seconds']:,.0f}) "
            f"| {check['decode_checked_s']:.3f} / {check['decode_unchecked_s']:.3f} |"
        )
    scale, generated, done, _, _ = rows[-1]
    summary, floors = done["summary"], generated["floors"]
    lines += [
        "",
        f"At scale {scale:g}: {summary['rows_kept']:,} rows kept, split "
        + ", ".join(f"{k} {summary['split'][k]['rows']:,}" for k in ("train", "val", "test"))
        + "; table rows incl. OOV: "
        + ", ".join(f"{k} {summary['sparse_features'][k]:,}" for k in ("user_id", "content_id", "author_id")),
        "",
        "Test-split constant baselines beside the generator's noise floors (the best any model can do,",
        "averaged over all generated rows):",
        "",
        "| label | constant on test: MSE or accuracy | constant on test: log loss, Brier | noise floor |",
        "|---|---|---|---|",
    ]
    base = summary["baselines_on_test"]
    lines.append(
        f"| watch_ratio | MSE {base['watch_ratio']['mse_train_mean']:.4f} | – "
        f"| MSE {floors['watch_ratio']['mse']:.4f} |"
    )
    for label, floor_key in (("skip", "skip"), ("long_view", "long_view"), ("click", "is_click")):
        p, q = base[label]["positive_rate_train"], summary["split"]["test"]["labels"][label]["mean"]
        log_loss = -(q * math.log(p) + (1 - q) * math.log(1 - p))  # the train rate, predicted on test
        brier = q * (1 - p) ** 2 + (1 - q) * p**2
        lines.append(
            f"| {label} (rate {q:.3f}) | accuracy {base[label]['accuracy_majority']:.4f} "
            f"| {log_loss:.4f}, {brier:.4f} "
            f"| log loss {floors[floor_key]['log_loss']:.4f}, Brier {floors[floor_key]['brier']:.4f} |"
        )
    write_section("prepare", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
