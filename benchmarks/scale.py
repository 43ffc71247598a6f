"""Scale: engagerec's TorchRec path beside the plain-PyTorch references as the tables grow.

    .venv/bin/python benchmarks/scale.py [--rows 100000 1000000 10000000] [--source shards]
        [--device cpu] [--batch-size 4096] [--steps 30] [--warmup 5] [--repeats 3] [--history-table]
        [--set KEY=VALUE ...]

For each video-table size R (author table R / 5, 1,000 users, a 20-long history sharing the
video table, or with ``--history-table`` a table of R rows of its own;
benchmarks/synthetic_tables.py), the MMoE model of configs/kuairand_random.yaml is trained by
three sides, each in a fresh process (so its peak RSS is its own), alternating over
``--repeats`` rounds so that this machine's drift hits every side alike, every side with the
malloc setting the `engagerec` command applies (engagerec.host_memory):

* engagerec: DistributedModelParallel (FBGEMM TBE kernels, fused row-wise Adagrad in backward)
  driven by TrainPipelineSparseDist, what `engagerec train` runs;
* plain sparse: nn.EmbeddingBag(sparse=True) + Adagrad on the tables, Adam on the rest: the
  strongest plain-PyTorch reference;
* plain dense: nn.EmbeddingBag + Adam on everything, up to ``--dense-max-rows``.

``--source shards`` (default) reads prepared parquet shards of ``--train-rows`` rows with
engagerec's ShardReader, end to end; ``--source prebuilt`` cycles pre-built batches (the model
alone). Every ``--window`` steps make one throughput sample: the table gives P10 / P50 / P90 over
all samples of all rounds. Then the per-rank table memory is measured for 1 process and 2 gloo
ranks (table-wise, column-wise) by benchmarks/table_memory.py. Writes the section ``scale``
(``scale_<device>`` off CPU) of benchmarks/RESULTS.md, or of ``--results``, and a plot beside it.
A side whose estimated memory exceeds what the machine has free is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import PEAK_RSS, RESULTS, machine_block, run_child, write_section  # noqa: E402

SIDES = ("engagerec", "plain sparse", "plain dense")
DIM = 16  # the config's embedding width for the id tables
# bytes per table row each side holds, at D=16 float32: engagerec keeps the weights and one
# row-wise Adagrad float; plain sparse the weights and Adagrad's full-width state; plain dense
# the weights, their dense gradient and Adam's two moments
BYTES_PER_ROW = {"engagerec": 4 * DIM + 4, "plain sparse": 2 * 4 * DIM, "plain dense": 4 * 4 * DIM}
# HBM bandwidth of the cards a GPU run may land on (bytes/s), for the roofline fraction
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}

CHILD = (
    PEAK_RSS
    + """
import json, sys
sys.path.insert(0, sys.argv[1])
from scale import measure_side
result = measure_side(json.loads(sys.argv[2]))
result["peak_rss_kb"] = hwm_kb()
print(json.dumps(result))
"""
)


def measure_side(job: Dict) -> Dict:
    """One side on one table size, in this (fresh) process: throughput samples (samples/s per
    ``window`` steps, after ``warmup``) and, on CUDA, the peak device memory."""
    import torch
    from synthetic_tables import SyntheticSource, write_synthetic_shards
    from train_throughput import ShardSource, engagerec_stepper, plain_stepper

    from engagerec.cli import quiet_library_noise
    from engagerec.config import load_config, with_tower
    from engagerec.host_memory import keep_freed_memory

    quiet_library_noise()
    keep_freed_memory()  # what the engagerec command sets; every side gets the same allocator
    os.chdir(REPO)
    cfg = with_tower(
        load_config(REPO / "configs" / "kuairand_random.yaml", job.get("sets", [])), job["tower"]
    )
    batch, device = job["batch_size"], job["device"]
    cuda = device == "cuda"
    if job["source"] == "shards":
        own = job.get("history_table", False)
        data = write_synthetic_shards(
            Path(job["work_dir"]) / f"rows_{job['rows']}{'_history_table' if own else ''}",
            job["rows"],
            job["train_rows"],
            history_table=own,
        )
        source = ShardSource(data, batch, pin_memory=cuda)
    else:
        source = SyntheticSource(job["rows"], batch)
        if cuda:  # page-locked, as engagerec's loader makes them for a GPU: asynchronous copies
            source.prebuilt = [b.pin_memory() for b in source.prebuilt]
    if job["side"] == "engagerec":
        step, close, settle = engagerec_stepper(cfg, source.schema, batch, device)
    else:
        step, close = plain_stepper(cfg, source.schema, job["side"] == "plain sparse", device)
        settle = lambda: None  # noqa: E731
    device_sync = torch.cuda.synchronize if cuda else (lambda: None)

    def sync() -> None:  # a window ends when the device and engagerec's embedding worker are done
        device_sync()
        settle()

    batches = source.batches()
    try:
        for _ in range(job["warmup"]):
            step(batches)
        samples = []
        for _ in range(job["steps"] // job["window"]):
            sync()
            start = time.perf_counter()
            for _ in range(job["window"]):
                step(batches)
            sync()
            samples.append(job["window"] * batch / (time.perf_counter() - start))
    finally:
        close()
    peak_device = torch.cuda.max_memory_allocated() if cuda else 0
    return {"samples_per_s": samples, "peak_device_bytes": peak_device}


def _available_bytes(device: str = "cpu") -> int:
    """Free memory where the tables will live: the GPU's, or the host's (MemAvailable)."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _table_rows(rows: int) -> int:
    return rows + rows // 5 + 1_000 + 3  # video, author, user tables (+ their OOV rows)


def _plot(results: Dict, memory: Dict, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, space) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted(results)
    for side in SIDES:
        ran = [r for r in sizes if results[r].get(side)]
        if not ran:
            continue
        p50 = [results[r][side]["p50"] for r in ran]
        low = [p50[i] - results[r][side]["p10"] for i, r in enumerate(ran)]
        high = [results[r][side]["p90"] - p50[i] for i, r in enumerate(ran)]
        speed.errorbar(ran, p50, yerr=[low, high], marker="o", capsize=3, label=side)
        space.plot(
            ran, [results[r][side]["peak_rss_kb"] / 2**20 for r in ran], marker="o", label=f"{side}: peak RSS"
        )
    for (world, sharding), label in (
        ((1, "table_wise"), "1 process"),
        ((2, "column_wise"), "2 ranks column-wise"),
    ):
        ran = [r for r in sizes if (world, sharding) in memory.get(r, {})]
        largest = [max(x["tables"] for x in memory[r][(world, sharding)]) / 2**30 for r in ran]
        space.plot(ran, largest, linestyle="--", marker="s", label=f"tables per rank, {label}")
    speed.set(xscale="log", yscale="log", xlabel="video-table rows", ylabel="samples/s (P10-P50-P90)")
    speed.set_title(f"training throughput ({device})")
    space.set(xscale="log", yscale="log", xlabel="video-table rows", ylabel="GiB")
    space.set_title("memory")
    for axis in (speed, space):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _roofline(rows_result: Dict, device: str) -> str:
    """The share of the card's HBM bandwidth engagerec's P50 moves, counting per sample the
    embedding rows read forward and read + written backward (weights; the row-wise optimiser
    state is one float a row), 4 byte floats, and nothing for the tower."""
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else ""
    bandwidth = next((bw for card, bw in HBM_BANDWIDTH.items() if card in name), None)
    if bandwidth is None or not rows_result.get("engagerec"):
        return "-"
    lookups = 3 + 20  # user, video, author, 20 history ids
    bytes_per_sample = lookups * (3 * DIM * 4 + 2 * 4)
    return f"{rows_result['engagerec']['p50'] * bytes_per_sample / bandwidth:.1%}"


def main() -> None:
    """Measure every (table size, side, round), then the per-rank table memory; write the section."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--source", choices=["shards", "prebuilt"], default="shards")
    parser.add_argument("--train-rows", type=int, default=1_048_576, help="rows in the shards read")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tower", default="mmoe")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=5, help="steps per throughput sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-max-rows", type=int, default=10_000_000)
    parser.add_argument(
        "--history-table",
        action="store_true",
        help="the history in a table of its own on every side (shards only): no table read by two features",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-rank table memory")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for every side, e.g. train.embedding_backward_thread=main",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="write the table only")
    parser.add_argument("--work-dir", default=str(REPO / "generated" / "scale"), help="where shards go")
    parser.add_argument("--results", default=str(RESULTS), help="the markdown file to write the section in")
    parser.add_argument("--section", help="its name (default: scale, or scale_<device> off CPU); the plot's")
    args = parser.parse_args()
    if args.history_table and args.source != "shards":
        parser.error("--history-table reads shards (--source shards)")

    results: Dict[int, Dict] = {rows: {} for rows in args.rows}
    for rows in args.rows:
        sides = [s for s in SIDES if not (s == "plain dense" and rows > args.dense_max_rows)]
        for side in list(sides):
            tables = _table_rows(rows) + (rows if args.history_table else 0)
            need = tables * BYTES_PER_ROW[side] * (1.0 if args.device == "cuda" else 1.3)
            if need > 0.8 * _available_bytes(args.device):
                print(f"{rows:,} rows, {side}: not run (needs ~{need / 2**30:.1f} GiB)", flush=True)
                sides.remove(side)
        runs: Dict[str, List[Dict]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side in sides:
                job = {"side": side, "rows": rows, "source": args.source, "train_rows": args.train_rows,
                       "device": args.device, "tower": args.tower, "batch_size": args.batch_size,
                       "steps": args.steps, "warmup": args.warmup, "window": args.window,
                       "work_dir": args.work_dir, "history_table": args.history_table,
                       "sets": args.set}  # fmt: skip
                runs[side].append(run_child(CHILD, str(REPO / "benchmarks"), json.dumps(job)))
        for side, rounds in runs.items():
            samples = [s for r in rounds for s in r["samples_per_s"]]
            results[rows][side] = {
                "p10": _percentile(samples, 0.1),
                "p50": _percentile(samples, 0.5),
                "p90": _percentile(samples, 0.9),
                "peak_rss_kb": max(r["peak_rss_kb"] for r in rounds),
                "peak_device_bytes": max(r["peak_device_bytes"] for r in rounds),
            }
            print(f"{rows:,} rows, {side}: {results[rows][side]}", flush=True)
        # engagerec's window over a reference's window at the same round and position (the sides
        # run one after another): a low P10 says some of one side's windows were slow, which the
        # ratio of the medians hides
        references = [s for s in sides if s != "engagerec"] if "engagerec" in runs else []
        for side in references:
            paired = [
                ours / theirs
                for our_round, their_round in zip(runs["engagerec"], runs[side], strict=True)
                for ours, theirs in zip(our_round["samples_per_s"], their_round["samples_per_s"], strict=True)
            ]
            results[rows][side]["paired_ratio_p10"] = _percentile(paired, 0.1)
            # each round's ratio of the two sides' overall rates (all its windows' rows over their
            # time, slow windows included): the spread of the ratio itself over rounds, without
            # the pairing of one side's window k with the other's, which were not run together
            rate = statistics.harmonic_mean  # of windows of equal rows: total rows over total time
            results[rows][side]["round_ratios"] = [
                rate(ours["samples_per_s"]) / rate(theirs["samples_per_s"])
                for ours, theirs in zip(runs["engagerec"], runs[side], strict=True)
            ]
            results[rows][side]["round_ratio_p10"] = _percentile(results[rows][side]["round_ratios"], 0.1)

    memory: Dict[int, Dict] = {}
    if not args.no_memory:
        from table_memory import measure as table_memory

        for rows in args.rows:
            if _table_rows(rows) * BYTES_PER_ROW["engagerec"] * 2 < 0.8 * _available_bytes():
                memory[rows] = table_memory(rows)

    results_path = Path(args.results)
    section = args.section or ("scale" if args.device == "cpu" else f"scale_{args.device}")
    plot = results_path.with_name(f"{section}.png")
    if not args.no_plot:
        _plot(results, memory, plot, args.device)
    what = "end to end from shards (reader included)" if args.source == "shards" else "pre-built batches"
    if args.history_table:
        what += ", the history in a table of its own on every side"
    lines = [
        f"samples/s training {args.tower}, batch {args.batch_size}, {what}, device {args.device}; "
        f"P10 / P50 / P90 over {args.steps // args.window} samples of {args.window} steps x {args.repeats} "
        f"rounds per side, after {args.warmup} warm-up steps; each side in a fresh process. Ratio: P50s "
        "(in brackets: the P10 over rounds of each round's ratio of the two sides' overall rates, all "
        "windows' rows over their time; then the P10 of engagerec's window over the reference's at the "
        "same round and position, which, as the sides run one after another, also holds both sides' "
        "window-to-window spread)." + ("" if args.no_plot else f" Plot: {plot.name}."),
        "",
        "| video-table rows | engagerec | plain sparse | plain dense | engagerec / sparse "
        "| engagerec / dense | peak RSS GiB (engagerec / sparse / dense) | HBM roofline |",
        "|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def cell(row: Dict, side: str) -> str:
        if side not in row:
            return "not run"
        return f"{row[side]['p10']:,.0f} / **{row[side]['p50']:,.0f}** / {row[side]['p90']:,.0f}"

    def ratio(row: Dict, side: str) -> str:
        if side not in row or "engagerec" not in row:
            return "-"
        return (
            f"{row['engagerec']['p50'] / row[side]['p50']:.2f}x "
            f"(rounds {row[side]['round_ratio_p10']:.2f}x; windows {row[side]['paired_ratio_p10']:.2f}x)"
        )

    for rows in args.rows:
        row = results[rows]
        rss = " / ".join(f"{row[s]['peak_rss_kb'] / 2**20:.2f}" if s in row else "-" for s in SIDES)
        speeds = " | ".join(cell(row, side) for side in SIDES)
        ratios = f"{ratio(row, 'plain sparse')} | {ratio(row, 'plain dense')}"
        lines.append(f"| {rows:,} | {speeds} | {ratios} | {rss} | {_roofline(row, args.device)} |")
    if memory:
        lines += [
            "",
            "Per-rank table memory (MiB: the embedding-table shards each rank holds; "
            "benchmarks/table_memory.py):",
            "",
            "| video-table rows | 1 process | 2 ranks table-wise | 2 ranks column-wise "
            "| largest 2-rank / 1-process |",
            "|---:|---:|---|---|---:|",
        ]
        for rows, found in memory.items():
            one = found[(1, "table_wise")][0]["tables"]

            def per_rank(key, found=found):
                return " / ".join(f"{r['tables'] / 2**20:,.0f}" for r in found[key])

            best = min(max(r["tables"] for r in found[(2, s)]) for s in ("table_wise", "column_wise"))
            lines.append(
                f"| {rows:,} | {one / 2**20:,.0f} | {per_rank((2, 'table_wise'))} "
                f"| {per_rank((2, 'column_wise'))} | {best / one:.2f}x |"
            )
    tuning = os.environ.get("ENGAGEREC_MALLOC_TUNING")
    command = (
        f"ENGAGEREC_MALLOC_TUNING={tuning} " if tuning else ""
    ) + ".venv/bin/python benchmarks/scale.py "
    command += " ".join(sys.argv[1:])
    text = "\n".join([machine_block(command), "", *lines])
    write_section(section, text, results_path)
    print(text)


if __name__ == "__main__":
    main()
