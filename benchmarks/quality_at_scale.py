"""Quality at KuaiRand-1K scale: the configured tower over seeds against the GBDT reference, on
one prepared KuaiRand-1K-shaped dataset (the generator's noise floor known).

    .venv/bin/python benchmarks/quality_at_scale.py --data-dir D --noise-floor RAW/noise_floor.json \\
        [--config configs/kuairand_1k.yaml] [--seeds 0 1 2 3 4] [--epochs 1] [--gbdt-rows 300000]
        [--runs DIR] [--section quality_at_scale]

For each seed: `engagerec train --config C` (``--config``) on D for ``--epochs`` epochs in
a fresh process (the best epoch on validation is tested; a run directory under ``--runs`` with a
results.json of the same data, seed and settings is read instead of trained again, whatever its epochs:
its validation chose its best), and the GBDT reference
(engagerec_study.gbdt: one HistGradientBoosting model per task, ids target-encoded, iterations
chosen on validation) fitted on a seeded sample of ``--gbdt-rows`` training rows. Reports per
model and task the test metrics, mean ± 95% CI over seeds, beside the train-mean constant, and
for the watch ratio the share of the explainable variance recovered, (constant - model) /
(constant - noise floor). Writes the section ``--section`` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import FLOAT32, machine_block, other_settings, write_section  # noqa: E402

TASKS = [
    ("watch_ratio", "watch_ratio", "regression"),
    ("skip", "skip", "binary"),
    ("long_view", "long_view", "binary"),
    ("click", "click", "binary"),
]
METRICS = ["watch_ratio/mse", "skip/auc", "long_view/auc", "click/auc"]


def tower_run(config: Path, data_dir: Path, run: Path, seed: int, epochs: int) -> Dict:
    """One seed's run (trained unless ``run`` already holds its results.json): test metrics,
    the epoch validation chose, and the seconds it trained."""
    from engagerec.config import load_config

    if (run / "results.json").is_file():  # read back only if the config's run on these data and seed
        wanted = load_config(str(config), [f"train.seed={seed}", f"train.data_dir={data_dir}", FLOAT32])
        other = other_settings(run, wanted, ignored=("epochs", "progress_bar"))
        if other:
            raise SystemExit(
                f"{run} holds a run of other data or settings than {config.name}'s with seed {seed} "
                f"({', '.join(other)}): give another --runs"
            )
    else:
        subprocess.run(
            [sys.executable, "-m", "engagerec", "train", "--config", str(config), "--out", str(run),
             "--set", f"train.data_dir={data_dir}", "--set", f"train.seed={seed}",
             "--set", f"train.epochs={epochs}", "--set", "train.progress_bar=false", "--set", FLOAT32],
            check=True, cwd=REPO,
        )  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    val = [round(epoch["loss"], 4) for epoch in results["history"]]
    return {"test": results["test"], "best_epoch": results["best_epoch"], "val_loss": val}


def interval(values: List[float]) -> str:
    """``mean ± half-width`` of a 95% Student's t interval (0 for one value)."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    half = 0.0 if len(array) < 2 else float(stats.t.ppf(0.975, len(array) - 1) * stats.sem(array))
    return f"{array.mean():.4f} ± {half:.4f}"


def main() -> None:
    from engagerec.config import load_config
    from engagerec.data.schema import DatasetSchema
    from engagerec_study.gbdt import gbdt_reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/kuairand_1k.yaml", help="the tower's config")
    parser.add_argument("--data-dir", required=True, help="a KuaiRand-1K-shaped preparation")
    parser.add_argument("--noise-floor", required=True, help="the generator's noise_floor.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=1, help="at most this many (validation picks the best)")
    parser.add_argument("--gbdt-rows", type=int, default=300_000)
    parser.add_argument("--runs", help="where the tower's runs go (and are read back from)")
    parser.add_argument("--section", default="quality_at_scale", help="the RESULTS.md section written")
    args = parser.parse_args()
    data_dir, config = Path(args.data_dir).resolve(), Path(args.config).resolve()
    runs = Path(args.runs or REPO / "runs" / args.section)
    towers = {
        seed: tower_run(config, data_dir, runs / f"seed{seed}", seed, args.epochs) for seed in args.seeds
    }
    gbdt = {seed: gbdt_reference(data_dir, seed, TASKS, train_rows=args.gbdt_rows) for seed in args.seeds}
    summary = DatasetSchema.load(data_dir).meta["summary"]
    constant = summary["baselines_on_test"]["watch_ratio"]["mse_train_mean"]
    floor = json.loads(Path(args.noise_floor).read_text())["watch_ratio"]["mse"]

    def explained(mse: float) -> float:
        return (constant - mse) / (constant - floor)

    command = (
        f".venv/bin/python benchmarks/quality_at_scale.py --config {args.config} --section {args.section} "
        f"--data-dir <{summary['rows_kept']:,}-row preparation> --noise-floor <its noise_floor.json> "
        f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} --gbdt-rows {args.gbdt_rows}"
    )
    split = summary["split"]
    model = load_config(str(config)).model
    tower = model.tower.name + (", dot interactions" if model.dot_interactions else "")
    lines = [
        machine_block(command),
        "",
        f"{args.config} ({tower}) on {split['train']['rows']:,} / {split['val']['rows']:,} / "
        f"{split['test']['rows']:,} train / val / test rows (temporal split), {len(args.seeds)} seeds; "
        f"the GBDT fits on {args.gbdt_rows:,} training rows drawn per seed. Test metrics, mean ± 95% CI.",
        "",
        "| model | watch-ratio MSE | explainable variance recovered | skip AUC | long_view AUC | click AUC |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, found in ((tower, towers), ("gbdt (scikit-learn)", gbdt)):
        runs_test = [f["test"] if "test" in f else f for f in found.values()]
        mse = [r["watch_ratio/mse"] for r in runs_test]
        lines.append(
            f"| {name} | {interval(mse)} | {interval([explained(m) for m in mse])} | "
            + " | ".join(interval([r[m] for r in runs_test]) for m in METRICS[1:])
            + " |"
        )
    lines.append(f"| constant: train mean / 0.5 | {constant:.4f} | 0 | 0.5 | 0.5 | 0.5 |")
    lines.append(f"| noise floor (the generator's) | {floor:.4f} | 1 | | | |")
    chosen = ", ".join(
        f"seed {s}: epoch {t['best_epoch'] + 1} of {len(t['val_loss'])} (val loss {t['val_loss']})"
        for s, t in towers.items()
    )
    lines += ["", f"Epochs chosen on validation: {chosen}."]
    write_section(args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
