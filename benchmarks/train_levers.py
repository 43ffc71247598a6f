"""Levers on `engagerec train`'s speed at the KuaiRand-1K shape, side by side in one run, and the
validation check of those that change the numbers.

    .venv/bin/python benchmarks/train_levers.py --data-dir prepared/kuairand_1k [--steps 400] \\
        [--rounds 3] [--quality-seeds 0 1 2] [--runs DIR] [--section train_levers] [--variants NAME ...] \\
        [--reference NAME] [--before REV]

Each variant is `engagerec train` as shipped (metrics on, the reader included, a fresh process)
with a global batch of 4096 rows a step, on configs/kuairand_1k.yaml (whose viewing history has
an embedding table of its own, ``model.embeddings.own_table``):

- ``float32``: ``train.tower_precision=fp32``, one process (the reference);
- ``bf16 tower``: ``train.tower_precision=bf16`` (the tower's matmuls in bf16; what the
  config's ``auto`` picks on a CPU with AVX512-BF16 or AMX);
- ``bf16 tower, shared video table``: the same with ``model.embeddings.own_table=[]``, the
  history read from the video's table (FBGEMM's scalar backward for a shared table);
- ``2 ranks, bf16 tower``: the bf16 tower under ``torchrun --nproc-per-node 2`` (gloo), 2048
  rows per rank.

``--variants`` picks among these, and the earlier sections' ``loader worker``
(``train.num_workers=1``) and ``2 ranks`` (float32), and ``bf16 tower, small tables fused`` and
its 2-rank twin (the planner not offered ``data_parallel`` by ``train.sharding``, so the 32
small bucket tables it would replicate into FBGEMM's dense kernel join the fused kernel of the
id tables), and FBGEMM's kernel or loop backward on the main or a worker thread
(``train.embedding_backward``, ``train.embedding_backward_thread``), which run only when named.

Speed: ``--steps`` steps per run; its samples/s is the median of its log.csv windows of 50 steps
after the first (start-up excluded); the variants alternate for ``--rounds`` rounds, and each
ratio to the reference (``--reference``, default ``float32``) is taken within a round (the
machine's speed drifts between rounds).

Quality: the one-process variants, which change the numbers, each train one whole epoch per
seed in ``--quality-seeds`` (the config's epochs); they are compared on the validation split:
loss and per-task metrics, mean ± 95% CI over seeds; the test split is not read for this choice.
Runs under ``--runs`` with a results.json are read, not trained again. Writes the section
``--section`` of benchmarks/RESULTS.md.

``--before REV`` also runs the reference with the code of git revision REV (its ``plugin/``
exported, on ``PYTHONPATH``), alternating with the others, and takes every ratio to it: a code
change's speed, side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import FLOAT32, exported, other_settings, record_section  # noqa: E402

CONFIG = "configs/kuairand_1k.yaml"
BATCH = 4096
BF16 = ["train.tower_precision=bf16"]
SHARED_VIDEO_TABLE = "model.embeddings.own_table=[]"
NOT_REPLICATED = 'train.sharding={"*": [table_wise, column_wise]}'
MAIN_THREAD, WORKER = "train.embedding_backward_thread=main", "train.embedding_backward_thread=worker"
# name -> (processes, --set overrides of CONFIG); REFERENCE first, the others' ratios are to it
VARIANTS = {
    "float32": (1, [FLOAT32]),
    "bf16 tower": (1, BF16),
    "bf16 tower, shared video table": (1, BF16 + [SHARED_VIDEO_TABLE]),
    "2 ranks, bf16 tower": (2, BF16),
}
# measured in earlier sections and not taken, run on request (--variants)
ON_REQUEST = {
    "loader worker": (1, [FLOAT32, "train.num_workers=1"]),  # train_levers, train_levers_amd
    "2 ranks": (2, [FLOAT32]),
    # the planner not offered data_parallel: the small bucket tables, which it replicates into
    # FBGEMM's dense kernel, join the id tables' fused kernel (train_levers_small_tables)
    "bf16 tower, small tables fused": (1, BF16 + [NOT_REPLICATED]),
    "2 ranks, bf16 tower, small tables fused": (2, BF16 + [NOT_REPLICATED]),
    "2 ranks, bf16 tower, shared video table": (2, BF16 + [SHARED_VIDEO_TABLE]),
    # FBGEMM's JIT kernel or its loop for the large tables whatever train.embedding_backward's
    # auto picks, their backward on the main thread (train_levers_intel_backward) or on a worker
    # thread beside the rest of the step (train.embedding_backward_thread; the same updates)
    "bf16 tower, kernel backward": (1, BF16 + ["train.embedding_backward=kernel", MAIN_THREAD]),
    "bf16 tower, loop backward": (1, BF16 + ["train.embedding_backward=loop", MAIN_THREAD]),
    "bf16 tower, kernel backward, worker thread": (1, BF16 + ["train.embedding_backward=kernel", WORKER]),
    "bf16 tower, loop backward, worker thread": (1, BF16 + ["train.embedding_backward=loop", WORKER]),
}
DEFAULT_VARIANTS = list(VARIANTS)
VARIANTS.update(ON_REQUEST)
REFERENCE = "float32"
VAL_KEYS = ("loss", "watch_ratio/mse", "skip/auc", "long_view/auc", "click/auc")


def overrides_of(name: str, data_dir: str, extra: List[str]) -> List[str]:
    """The ``--set`` overrides of CONFIG that variant ``name`` trains with on ``data_dir``, then ``extra``."""
    processes, sets = VARIANTS[name]
    common = [
        f"train.data_dir={data_dir}",
        f"train.batch_size={BATCH // processes}",
        "train.progress_bar=false",
    ]
    return common + sets + extra


def train_command(name: str, data_dir: str, out: Path, extra: List[str]) -> List[str]:
    """The `engagerec train` command line of variant ``name`` (under torchrun for 2 ranks), on
    ``data_dir``."""
    processes = VARIANTS[name][0]
    python = Path(sys.executable)
    launcher = (
        [str(python.parent / "torchrun"), "--nproc-per-node", str(processes), "--master-port", "29731"]
        + ["-m", "engagerec"]
        if processes > 1
        else [str(python), "-m", "engagerec"]
    )
    return [*launcher, "train", "--config", CONFIG, "--out", str(out), "--no-resume"] + [
        arg for kv in overrides_of(name, data_dir, extra) for arg in ("--set", kv)
    ]


def speed(name: str, data_dir: str, steps: int, work: Path, plugin: Optional[Path] = None) -> float:
    """The median samples/s of a ``steps``-step run's log windows after the first; with the code
    of ``plugin`` (an exported revision) when given."""
    out = work / "speed"
    shutil.rmtree(out, ignore_errors=True)
    extra = [f"train.max_steps={steps}", "train.log_every_steps=50"]
    env = None if plugin is None else {**os.environ, "PYTHONPATH": str(plugin)}
    command = train_command(name, data_dir, out, extra)
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=env)
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r["phase"] == "train"]
    return statistics.median(float(r["samples_per_s"]) for r in rows[1:])


def validation(name: str, data_dir: str, seed: int, runs: Path) -> Dict[str, float]:
    """Validation metrics of the best epoch of variant ``name`` with ``seed`` (trained if missing)."""
    from engagerec.config import load_config

    out = runs / name.replace(" ", "_").replace(",", "") / f"seed{seed}"
    seeded = [f"train.seed={seed}"]
    if not (out / "results.json").is_file():
        command = train_command(name, data_dir, out, seeded)
        subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    wanted = load_config(str(REPO / CONFIG), overrides_of(name, data_dir, seeded))
    other = other_settings(out, wanted, ignored=("progress_bar",))
    if other:  # e.g. a run of this name from before the config changed
        raise SystemExit(f"{out} holds a run of other settings than variant '{name}' ({', '.join(other)})")
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
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANTS,
        help="the reference always runs",
    )
    parser.add_argument(
        "--reference", choices=list(VARIANTS), default=REFERENCE, help="the variant the ratios are to"
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also run the reference with the code of git revision REV, and take the ratios to it",
    )
    args = parser.parse_args()
    reference = args.reference
    names = [reference] + [name for name in args.variants if name != reference]
    before = f"{reference}, the code of {args.before}" if args.before else None
    found: Dict[str, List[float]] = {name: [] for name in ([before] if before else []) + names}
    with tempfile.TemporaryDirectory() as tmp:
        plugin = exported(args.before, Path(tmp)) if args.before else None
        for round_ in range(args.rounds):
            for name in found:
                code = plugin if name == before else None
                variant = reference if name == before else name
                found[name].append(speed(variant, args.data_dir, args.steps, Path(tmp), code))
                print(f"round {round_}: {name} {found[name][-1]:,.0f} samples/s", flush=True)
    base = before or reference
    runs = Path(args.runs or tempfile.mkdtemp(prefix="train_levers-"))
    # one process only: the 2-rank variants (each rank reads its own half of the epoch) are not
    # checked on validation here
    # nor the loader worker, which reads float32's batches in float32's order
    checked = [name for name in names if VARIANTS[name][0] == 1 and name != "loader worker"]
    val = {name: [validation(name, args.data_dir, s, runs) for s in args.quality_seeds] for name in checked}
    lines = [
        f"`engagerec train --config {CONFIG}` on `{args.data_dir}`, {BATCH} rows a step, "
        f"metrics on, {args.steps} steps a run; samples/s: the median of a run's log windows after "
        f"the first; {args.rounds} alternating rounds (median over rounds; ratio to {base} "
        "within each round: min / median / max).",
        "",
        f"| variant | samples/s | ratio to {base} |",
        "|---|---:|---|",
    ]
    for name, values in found.items():
        ratios = sorted(v / d for v, d in zip(values, found[base], strict=True))
        lines.append(
            f"| {name} | {statistics.median(values):,.0f} | "
            f"{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f} |"
        )
    lines += (
        []
        if not args.quality_seeds
        else [
            "",
            "Validation split, the best epoch of one epoch's training, "
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
