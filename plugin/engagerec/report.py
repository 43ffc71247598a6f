"""Comparison reports: several towers x seeds -> a markdown table (the study's Table 1 with
AUC and MAE beside it), a JSON file and a plot. Mean +- standard deviation over seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

COLUMNS = [
    ("skip/accuracy", "skip accuracy"),
    ("watch_ratio/mse", "watch-ratio MSE"),
    ("skip/auc", "skip AUC"),
    ("watch_ratio/mae", "watch-ratio MAE"),
]


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """tower -> {metric: (mean, std, n)} over the seeds' test metrics."""
    by_tower: Dict[str, List[Dict[str, float]]] = {}
    for run in runs:
        by_tower.setdefault(run["tower"], []).append(run["test"])
    out = {}
    for tower, tests in by_tower.items():
        out[tower] = {}
        for key in tests[0]:
            values = np.array([t[key] for t in tests], dtype=float)
            out[tower][key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "n": int(len(values)),
            }
    return out


def _cell(stats: Dict[str, Any]) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}" if stats["n"] > 1 else f"{stats['mean']:.4f}"


def markdown_table(summary: Dict[str, Dict[str, Any]]) -> str:
    """The ``summarise`` result as a markdown table: one row per tower (mean ± std over seeds), then
    the constant predictors' row (train majority class, train mean, AUC 0.5). The baselines depend on
    the data only, so they come from the first tower that reports them (the GBDT reference does not)."""
    lines = [
        "| model | " + " | ".join(title for _, title in COLUMNS) + " | seeds |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for tower, stats in summary.items():
        seeds = next(iter(stats.values()))["n"]
        lines.append(f"| {tower} | " + " | ".join(_cell(stats[key]) for key, _ in COLUMNS) + f" | {seeds} |")
    any_tower = next(s for s in summary.values() if "skip/baseline_accuracy_majority" in s)
    lines.append(
        "| constant: train mean / majority class | "
        f"{any_tower['skip/baseline_accuracy_majority']['mean']:.4f} | "
        f"{any_tower['watch_ratio/baseline_mse_train_mean']['mean']:.4f} | 0.5000 | – | – |"
    )
    return "\n".join(lines)


def plot(summary: Dict[str, Dict[str, Any]], path: Path) -> None:
    """Save bar charts of each tower's watch-ratio MSE and skip AUC (mean, std as error bar) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (key, title) in zip(
        axes,
        (
            ("watch_ratio/mse", "watch-ratio MSE (lower is better)"),
            ("skip/auc", "skip AUC (higher is better)"),
        ),
        strict=True,
    ):
        means = [summary[t][key]["mean"] for t in towers]
        stds = [summary[t][key]["std"] for t in towers]
        ax.bar(towers, means, yerr=stds, capsize=4, color="#4C72B0")
        ax.set_title(title)
        ax.set_ylim(min(means) * 0.95, max(means) * 1.03)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_comparison(
    cfg, towers: List[str], seeds: List[int], out_dir: Path, resume: bool = True, gbdt: bool = False
) -> str:
    """Train every tower with every seed (and the GBDT reference), then write the report;
    returns its markdown table."""
    from engagerec.config import prepared_dir, with_tower
    from engagerec.train import train

    runs = []
    for tower in towers:
        for seed in seeds:
            results = train(
                with_tower(cfg, tower, seed=seed, progress_bar=False),
                out_dir / tower / f"seed{seed}",
                resume=resume,
            )
            print(
                f"{tower} seed {seed}: test skip AUC {results['test']['skip/auc']:.4f}, "
                f"watch-ratio MSE {results['test']['watch_ratio/mse']:.4f}",
                flush=True,
            )
            runs.append(results)
    if gbdt:
        from engagerec.gbdt import gbdt_reference

        for seed in seeds:
            reference = gbdt_reference(prepared_dir(cfg), seed)
            print(
                f"gbdt seed {seed}: test skip AUC {reference['skip/auc']:.4f}, "
                f"watch-ratio MSE {reference['watch_ratio/mse']:.4f}",
                flush=True,
            )
            runs.append({"tower": "gbdt (scikit-learn)", "seed": seed, "test": reference})
    return write_report(runs, out_dir, f"{cfg.name}: towers x seeds")


def write_report(runs: List[Dict[str, Any]], out_dir: Path, title: str) -> str:
    """Write compare.json (summary and runs), compare.md and compare.png to ``out_dir``.

    Args:
        runs: one result per (tower, seed), each with ``"tower"`` and its ``"test"`` metrics.
        out_dir: created if missing.
        title: the heading of compare.md.

    Returns:
        str: the markdown table.
    """
    summary = summarise(runs)
    table = markdown_table(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    (out_dir / "compare.md").write_text(f"# {title}\n\nTest split; mean ± std over seeds.\n\n{table}\n")
    plot(summary, out_dir / "compare.png")
    return table
