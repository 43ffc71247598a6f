"""Where `engagerec train`'s step time goes, as shipped, with the host-memory setting off and on
(or, with ``--compare precision``, with the tower in float32 and in bf16; with ``--compare
thread``, with the fused tables' backward on the main thread and on a worker thread; with
``--compare data``, as shipped on each of several preparations, e.g. two data shapes, with the
distinct ids a training batch holds of each large id space).

    .venv/bin/python benchmarks/profile_train.py --config configs/kuairand_1k.yaml \\
        --data-dir prepared/kuairand_1k [--steps 200] [--profile-steps 30] [--rounds 2] \\
        [--compare malloc|precision|thread] [--section profile]
    .venv/bin/python benchmarks/profile_train.py --compare data \\
        --data-dir prepared/kuairand_1k PREPARED_FLAT --section profile_shapes

Runs the `engagerec train` command (metrics on, as a user runs it) for ``--steps`` steps with
``train.profile_steps`` (engagerec.profiling: torch.profiler over steps 21-50 by default), once
per variant, alternating ``--rounds`` times. With ``--compare malloc`` (the default) the variants
are ``ENGAGEREC_MALLOC_TUNING=0`` (glibc's default malloc: "before") and the setting engagerec
applies ("after"; engagerec.host_memory); with ``--compare data``, the preparations. Reports the
per-part breakdown (ms per step, the medians over rounds) and the command's own samples/s from
its log.csv (its last logged window, which the profiler does not overlap). Writes the section
``--section`` (default ``profile``) of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import FLOAT32, record_section  # noqa: E402

# what --compare sets side by side: label -> (environment, --set overrides)
COMPARISONS = {
    "malloc": {
        "before (glibc malloc defaults)": ({"ENGAGEREC_MALLOC_TUNING": "0"}, []),
        "after (engagerec.host_memory)": ({"ENGAGEREC_MALLOC_TUNING": "1"}, []),
    },
    "precision": {
        "float32 tower": ({}, [FLOAT32]),
        "bf16 tower (train.tower_precision)": ({}, ["train.tower_precision=bf16"]),
    },
    "thread": {
        "embedding backward, main thread": ({}, ["train.embedding_backward_thread=main"]),
        "worker thread (train.embedding_backward_thread)": ({}, ["train.embedding_backward_thread=worker"]),
    },
}
DATA = "data"  # --compare data: one variant per --data-dir, as shipped


def variants_of(args: argparse.Namespace) -> dict:
    """label -> (environment, --set overrides, data directory) for ``args.compare``."""
    if args.compare == DATA:
        if len(args.data_dir) < 2:
            raise SystemExit("--compare data needs two or more --data-dir preparations")
        return {f"`{path}`": ({}, [], path) for path in args.data_dir}
    if len(args.data_dir) != 1:
        raise SystemExit(f"--compare {args.compare} runs on one --data-dir")
    return {label: (env, sets, args.data_dir[0]) for label, (env, sets) in COMPARISONS[args.compare].items()}


def one_run(args: argparse.Namespace, environment: dict, sets: list, data_dir: str, run_dir: Path) -> dict:
    """One `engagerec train` run on ``data_dir`` with ``environment`` and ``--set`` ``sets``
    added; returns its profile breakdown and last logged samples/s."""
    command = [
        sys.executable, "-m", "engagerec", "train", "--config", args.config,
        "--out", str(run_dir), "--no-resume",
        "--set", f"train.data_dir={data_dir}", "--set", f"train.max_steps={args.steps}",
        "--set", f"train.profile_steps={args.profile_steps}", "--set", "train.progress_bar=false",
        "--set", f"train.batch_size={args.batch_size}", "--set", f"train.log_every_steps={args.log_every}",
    ]  # fmt: skip
    command += [arg for kv in sets for arg in ("--set", kv)]
    env = {**os.environ, **environment}
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=env)
    parts = json.loads((run_dir / "profile.json").read_text())["ms_per_step"]
    rows = [r for r in csv.DictReader(open(run_dir / "log.csv")) if r["phase"] == "train"]
    return {"parts": parts, "samples_per_s": float(rows[-1]["samples_per_s"])}


def distinct_rows(data_dir: str, batch_size: int, batches: int = 20, min_rows: int = 100_000) -> dict:
    """feature -> (ids, distinct ids) per training batch, the means over the first ``batches``
    shuffled batches, for the sparse features of id spaces of at least ``min_rows`` rows: the rows
    the fused optimiser updates per step (row-wise Adagrad touches each distinct row once)."""
    import torch

    from engagerec.data.reader import ShardReader
    from engagerec.data.schema import DatasetSchema

    schema = DatasetSchema.load(data_dir)
    wanted = [f.name for f in schema.sparse if schema.vocab_sizes.get(f.id_space, 0) >= min_rows]
    found = {name: [0, 0] for name in wanted}
    stream = iter(ShardReader(data_dir, "train", batch_size=batch_size, shuffle=True))
    for _ in range(batches):
        features = next(stream).sparse_features
        for name in wanted:
            ids = features[name].values()
            found[name][0] += ids.numel()
            found[name][1] += torch.unique(ids).numel()
    return {name: (count / batches, distinct / batches) for name, (count, distinct) in found.items()}


def main() -> None:
    """Alternate the variants, then write the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/kuairand_1k.yaml")
    parser.add_argument("--data-dir", nargs="+", default=["prepared/kuairand_1k"])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", choices=sorted([*COMPARISONS, DATA]), default="malloc")
    parser.add_argument("--section", default="profile")
    args = parser.parse_args()

    variants = variants_of(args)
    found = {label: [] for label in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for index, (label, (environment, sets, data_dir)) in enumerate(variants.items()):
                run_dir = Path(tmp) / f"{round_}-{index}"
                found[label].append(one_run(args, environment, sets, data_dir, run_dir))
                print(label, found[label][-1], flush=True)
    parts = list(next(iter(found.values()))[0]["parts"])
    median = {
        label: {part: statistics.median(r["parts"][part] for r in runs) for part in parts}
        for label, runs in found.items()
    }
    speed = {label: statistics.median(r["samples_per_s"] for r in runs) for label, runs in found.items()}
    labels = list(variants)
    lines = [
        f"`engagerec train --config {args.config}` on `{'` and `'.join(args.data_dir)}`, "
        f"batch {args.batch_size}, metrics on, {args.steps} steps; torch.profiler over "
        f"{args.profile_steps} steps (after 20) in each run; medians of {args.rounds} alternating rounds. "
        "ms per step by part "
        "(engagerec.profiling); samples/s from the command's own log.csv (its last window of "
        f"{args.log_every} steps, not profiled).",
        "",
        f"| part | {' | '.join(labels)} |",
        "|---|" + "---:|" * len(labels),
    ]
    lines += [
        f"| {part} | {' | '.join(f'{median[label][part]:.2f}' for label in labels)} |" for part in parts
    ]
    lines.append(f"| **samples/s (log.csv)** | {' | '.join(f'{speed[label]:,.0f}' for label in labels)} |")
    if args.compare == DATA:
        touched = [distinct_rows(data_dir, args.batch_size) for _, _, data_dir in variants.values()]
        lines += [
            f"| distinct `{name}` ids per batch (of all its ids; mean of 20 training batches) | "
            + " | ".join(f"{rows[name][1]:,.0f} (of {rows[name][0]:,.0f})" for rows in touched)
            + " |"
            for name in touched[0]
            if all(name in rows for rows in touched)  # an id space large in every preparation
        ]
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
