"""Where `engagerec train`'s step time goes, as shipped, with the host-memory setting off and on
(or, with ``--compare precision``, with the tower in float32 and in bf16).

    .venv/bin/python benchmarks/profile_train.py --config configs/kuairand_1k.yaml \\
        --data-dir prepared/kuairand_1k [--steps 200] [--profile-steps 30] [--rounds 2] \\
        [--compare malloc|precision] [--section profile]

Runs the `engagerec train` command (metrics on, as a user runs it) for ``--steps`` steps with
``train.profile_steps`` (engagerec.profiling: torch.profiler over steps 21-50 by default), once
with ``ENGAGEREC_MALLOC_TUNING=0`` (glibc's default malloc: "before") and once with the setting
engagerec applies ("after"; engagerec.host_memory), alternating ``--rounds`` times. Reports the
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
}


def one_run(args: argparse.Namespace, environment: dict, sets: list, run_dir: Path) -> dict:
    """One `engagerec train` run with ``environment`` and ``--set`` ``sets`` added; returns its
    profile breakdown and last logged samples/s."""
    command = [
        sys.executable, "-m", "engagerec", "train", "--config", args.config,
        "--out", str(run_dir), "--no-resume",
        "--set", f"train.data_dir={args.data_dir}", "--set", f"train.max_steps={args.steps}",
        "--set", f"train.profile_steps={args.profile_steps}", "--set", "train.progress_bar=false",
        "--set", f"train.batch_size={args.batch_size}", "--set", f"train.log_every_steps={args.log_every}",
    ]  # fmt: skip
    command += [arg for kv in sets for arg in ("--set", kv)]
    env = {**os.environ, **environment}
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=env)
    parts = json.loads((run_dir / "profile.json").read_text())["ms_per_step"]
    rows = [r for r in csv.DictReader(open(run_dir / "log.csv")) if r["phase"] == "train"]
    return {"parts": parts, "samples_per_s": float(rows[-1]["samples_per_s"])}


def main() -> None:
    """Alternate the two variants, then write the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/kuairand_1k.yaml")
    parser.add_argument("--data-dir", default="prepared/kuairand_1k")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="malloc")
    parser.add_argument("--section", default="profile")
    args = parser.parse_args()

    variants = COMPARISONS[args.compare]
    found = {label: [] for label in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for index, (label, (environment, sets)) in enumerate(variants.items()):
                found[label].append(one_run(args, environment, sets, Path(tmp) / f"{round_}-{index}"))
                print(label, found[label][-1], flush=True)
    parts = list(next(iter(found.values()))[0]["parts"])
    median = {
        label: {part: statistics.median(r["parts"][part] for r in runs) for part in parts}
        for label, runs in found.items()
    }
    speed = {label: statistics.median(r["samples_per_s"] for r in runs) for label, runs in found.items()}
    labels = list(variants)
    lines = [
        f"`engagerec train --config {args.config}` on `{args.data_dir}`, batch {args.batch_size}, "
        f"metrics on, {args.steps} steps; torch.profiler over {args.profile_steps} steps (after 20) in "
        f"each run; medians of {args.rounds} alternating rounds. ms per step by part "
        "(engagerec.profiling); samples/s from the command's own log.csv (its last window of "
        f"{args.log_every} steps, not profiled).",
        "",
        f"| part | {' | '.join(labels)} |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {part} | {' | '.join(f'{median[label][part]:.2f}' for label in labels)} |" for part in parts
    ]
    lines.append(f"| **samples/s (log.csv)** | {' | '.join(f'{speed[label]:,.0f}' for label in labels)} |")
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
