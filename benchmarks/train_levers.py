"""Levers on `engagerec train`'s speed at the KuaiRand-1K shape, side by side in one run, and the
validation check of those that change the numbers.

    .venv/bin/python benchmarks/train_levers.py --data-dir prepared/kuairand_1k \\
        [--steps 400] [--rounds 3] [--quality-seeds 0 1 2] [--runs DIR] [--section train_levers]

Each variant is `engagerec train --config configs/kuairand_1k.yaml` as shipped (metrics on, the
reader included, a fresh process), with a global batch of 4096 rows a step:

- ``default``: float32, one process;
- ``bf16 tower``: ``train.tower_precision=bf16`` (the tower's matmuls under torch.autocast);
- ``loader worker``: ``train.num_workers=1`` (batches read in a worker process);
- ``2 ranks``: ``torchrun --nproc-per-node 2`` (gloo), 2048 rows per rank;
- ``2 ranks, bf16 tower``: both.

Speed: ``--steps`` steps per run; its samples/s is the median of its log.csv windows of 50 steps
after the first (start-up excluded); the variants alternate for ``--rounds`` rounds, and each
ratio to ``default`` is taken within a round (the machine's speed drifts between rounds).

Quality: ``bf16 tower``, the one lever that changes the numbers and could be a setting's
default, trains one whole epoch per seed in ``--quality-seeds`` (the config's epochs) beside
``default``; both are compared on the validation split: loss and per-task metrics, mean ± 95%
CI over seeds; the test split is not read for this choice. Runs under ``--runs`` with a
results.json are read, not trained again. Writes the section ``train_levers`` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import record_section  # noqa: E402

CONFIG = "configs/kuairand_1k.yaml"
BATCH = 4096
# name -> (processes, --set overrides)
VARIANTS = {
    "default": (1, []),
    "bf16 tower": (1, ["train.tower_precision=bf16"]),
    "loader worker": (1, ["train.num_workers=1"]),
    "2 ranks": (2, []),
    "2 ranks, bf16 tower": (2, ["train.tower_precision=bf16"]),
}
# the levers engagerec train could turn on by itself: a worker reads the same batches in the
# same order; 2 ranks are a launch choice (torchrun), not a setting
CHECKED = ("default", "bf16 tower")
VAL_KEYS = ("loss", "watch_ratio/mse", "skip/auc", "long_view/auc", "click/auc")


def train_command(name: str, data_dir: str, out: Path, extra: List[str]) -> List[str]:
    """The `engagerec train` command line of variant ``name`` (under torchrun for 2 ranks)."""
    processes, sets = VARIANTS[name]
    python = Path(sys.executable)
    launcher = (
        [str(python.parent / "torchrun"), "--nproc-per-node", str(processes), "--master-port", "29731"]
        + ["-m", "engagerec"]
        if processes > 1
        else [str(python), "-m", "engagerec"]
    )
    overrides = [
        f"train.data_dir={data_dir}",
        f"train.batch_size={BATCH // processes}",
        "train.progress_bar=false",
    ]
    overrides += sets + extra
    return [*launcher, "train", "--config", CONFIG, "--out", str(out), "--no-resume"] + [
        arg for kv in overrides for arg in ("--set", kv)
    ]


def speed(name: str, data_dir: str, steps: int, work: Path) -> float:
    """The median samples/s of a ``steps``-step run's log windows after the first."""
    out = work / "speed"
    shutil.rmtree(out, ignore_errors=True)
    extra = [f"train.max_steps={steps}", "train.log_every_steps=50"]
    subprocess.run(train_command(name, data_dir, out, extra), check=True, capture_output=True, cwd=REPO)
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r["phase"] == "train"]
    return statistics.median(float(r["samples_per_s"]) for r in rows[1:])


def validation(name: str, data_dir: str, seed: int, runs: Path) -> Dict[str, float]:
    """Validation metrics of the best epoch of variant ``name`` with ``seed`` (trained if missing)."""
    out = runs / name.replace(" ", "_").replace(",", "") / f"seed{seed}"
    if not (out / "results.json").is_file():
        command = train_command(name, data_dir, out, [f"train.seed={seed}"])
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    results = json.loads((out / "results.json").read_text())
    return results["history"][results["best_epoch"]]


def main() -> None:
    """Alternate the variants' speed runs, then train the quality runs, and write the section."""
    from engagerec_study.sections.common import cell, mean_ci

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default="prepared/kuairand_1k")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--runs", help="where the quality runs go (kept; read again if there)")
    parser.add_argument("--section", default="train_levers", help="the RESULTS.md section written")
    args = parser.parse_args()
    found: Dict[str, List[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in VARIANTS:
                found[name].append(speed(name, args.data_dir, args.steps, Path(tmp)))
                print(f"round {round_}: {name} {found[name][-1]:,.0f} samples/s", flush=True)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="train_levers-"))
    val = {
        name: [validation(name, args.data_dir, seed, runs) for seed in args.quality_seeds] for name in CHECKED
    }
    lines = [
        f"`engagerec train --config {CONFIG}` on `{args.data_dir}`, {BATCH} rows a step, metrics on, "
        f"{args.steps} steps a run; samples/s: the median of a run's log windows after the first; "
        f"{args.rounds} alternating rounds (median over rounds; ratio to default within each round: "
        "min / median / max).",
        "",
        "| variant | samples/s | ratio to default |",
        "|---|---:|---|",
    ]
    for name, values in found.items():
        ratios = sorted(v / d for v, d in zip(values, found["default"], strict=True))
        lines.append(
            f"| {name} | {statistics.median(values):,.0f} | "
            f"{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f} |"
        )
    lines += (
        []
        if not args.quality_seeds
        else [
            "",
            f"Validation split, the best epoch of one epoch's training (configs/kuairand_1k.yaml), "
            f"mean ± 95% CI over seeds {', '.join(map(str, args.quality_seeds))}:",
            "",
            f"| variant | {' | '.join(VAL_KEYS)} |",
            "|---|" + "---:|" * len(VAL_KEYS),
        ]
    )
    for name, seeds in val.items() if args.quality_seeds else ():
        lines.append(f"| {name} | {' | '.join(cell(mean_ci([s[key] for s in seeds])) for key in VAL_KEYS)} |")
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
