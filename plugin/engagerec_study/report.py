"""Comparison reports: several towers x seeds -> a markdown table (each task's metrics, the
study's Table 1 generalised to any number of tasks), a JSON file and a plot per task. Mean +-
the 95% confidence interval over seeds (Student's t), with the constant baselines, and paired
comparisons against a reference model (same seeds, same split): the mean difference, its
interval and the paired t-test's p-value, so that "indistinguishable" is a tested statement."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from engagerec.errors import ConfigError

GBDT = "gbdt (scikit-learn)"  # the reference model's row

# per task kind: (metric, column title, constant baseline's metric or a fixed value)
KIND_COLUMNS = {
    "regression": [("mse", "MSE", "baseline_mse_train_mean"), ("mae", "MAE", None), ("xauc", "XAUC", 0.5)],
    "binary": [("auc", "AUC", 0.5), ("accuracy", "accuracy", "baseline_accuracy_majority")],
}


def task_kinds(summary: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """task -> "regression" | "binary", read off the metric names (``<task>/mse`` or ``<task>/auc``),
    in the order the tasks first appear."""
    kinds: Dict[str, str] = {}
    for stats in summary.values():
        for key in stats:
            task, _, metric = key.partition("/")
            if metric == "mse" and task not in kinds:
                kinds[task] = "regression"
            elif metric == "auc" and task not in kinds:
                kinds[task] = "binary"
    return kinds


def columns(summary: Dict[str, Dict[str, Any]]) -> List[Tuple[str, str, Any]]:
    """(metric key, column title, baseline) for every task's metrics, tasks in order."""
    return [
        (f"{task}/{metric}", f"{task} {title}", baseline)
        for task, kind in task_kinds(summary).items()
        for metric, title, baseline in KIND_COLUMNS[kind]
    ]


def ci95(values: np.ndarray) -> float:
    """Half-width of the 95% confidence interval of the mean of ``values`` (Student's t with
    n - 1 degrees of freedom); 0 for a single value.

    Example::

        >>> round(ci95(np.array([1.0, 2.0, 3.0, 4.0, 5.0])), 4)  # 2.776 * 1.581 / sqrt(5)
        1.9632
    """
    from scipy import stats

    n = len(values)
    if n < 2:
        return 0.0
    return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """tower -> {metric: {mean, std, ci95, n}} over the seeds' test metrics."""
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
                "ci95": ci95(values),
                "n": int(len(values)),
            }
    return out


def _cell(stats: Optional[Dict[str, Any]]) -> str:
    if stats is None:
        return "–"
    return f"{stats['mean']:.4f} ± {stats['ci95']:.4f}" if stats["n"] > 1 else f"{stats['mean']:.4f}"


def markdown_table(summary: Dict[str, Dict[str, Any]]) -> str:
    """The ``summarise`` result as a markdown table: one row per tower (mean ± 95% CI over seeds) with
    each task's metrics (regression: MSE, MAE, XAUC; binary: AUC, accuracy), then the constant
    predictors' row (train mean, majority class, 0.5 for the ranking metrics). The baselines
    depend on the data only, so they come from the first model that reports them (the GBDT
    reference does not)."""
    cols = columns(summary)
    lines = [
        "| model | " + " | ".join(title for _, title, _ in cols) + " | seeds |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    for tower, stats in summary.items():
        seeds = next(iter(stats.values()))["n"]
        lines.append(
            f"| {tower} | " + " | ".join(_cell(stats.get(key)) for key, _, _ in cols) + f" | {seeds} |"
        )
    constant = []
    for key, _, baseline in cols:
        task = key.split("/")[0]
        if isinstance(baseline, str):
            reporter = next((s for s in summary.values() if f"{task}/{baseline}" in s), None)
            constant.append(f"{reporter[f'{task}/{baseline}']['mean']:.4f}" if reporter else "–")
        else:
            constant.append("–" if baseline is None else f"{baseline:.4f}")
    lines.append("| constant: train mean / majority class | " + " | ".join(constant) + " | – |")
    return "\n".join(lines)


def paired_comparisons(runs: List[Dict[str, Any]], reference: str) -> List[Dict[str, Any]]:
    """
    Each model against ``reference`` on each task's main metric (regression: MSE, binary:
    AUC), paired by seed: the mean of the per-seed differences (model - reference), its 95%
    interval and the two-sided paired t-test's p-value.

    Args:
        runs: one result per (tower, seed), each with ``"tower"``, ``"seed"`` and ``"test"``.
        reference: the tower the others are compared with.

    Returns:
        List[Dict[str, Any]]: per (model, metric): ``model``, ``metric``, ``difference``,
        ``ci95``, ``p_value`` (NaN below 2 shared seeds or when every difference is equal), ``seeds``.

    Example::

        >>> runs = [{"tower": t, "seed": s, "test": {"skip/auc": a}}
        ...         for t, aucs in (("a", [0.80, 0.81, 0.82]), ("b", [0.81, 0.83, 0.83]))
        ...         for s, a in enumerate(aucs)]
        >>> row = paired_comparisons(runs, "a")[0]
        >>> row["model"], row["metric"], round(row["difference"], 4), row["seeds"]
        ('b', 'skip/auc', 0.0133, 3)
    """
    from scipy import stats

    by_model: Dict[str, Dict[int, Dict[str, float]]] = {}
    for run in runs:
        by_model.setdefault(run["tower"], {})[run["seed"]] = run["test"]
    base = by_model.get(reference, {})
    kinds = task_kinds({run["tower"]: run["test"] for run in runs})  # reads metric names only
    rows = []
    for model, tests in by_model.items():
        if model == reference:
            continue
        seeds = sorted(set(tests) & set(base))
        for task, kind in kinds.items():
            key = f"{task}/{'mse' if kind == 'regression' else 'auc'}"
            if not seeds or any(key not in tests[s] or key not in base[s] for s in seeds):
                continue
            diffs = np.array([tests[s][key] - base[s][key] for s in seeds], dtype=float)
            p_value = float("nan")
            if len(diffs) > 1 and np.ptp(diffs) > 0:
                p_value = float(
                    stats.ttest_rel([tests[s][key] for s in seeds], [base[s][key] for s in seeds]).pvalue
                )
            rows.append({"model": model, "metric": key, "difference": float(diffs.mean()),
                         "ci95": ci95(diffs), "p_value": p_value, "seeds": len(seeds)})  # fmt: skip
    return rows


def paired_table(rows: List[Dict[str, Any]], reference: str) -> str:
    """``paired_comparisons`` as markdown: one row per model, a column per metric."""
    if not rows:
        return ""
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    lines = [
        f"| model - {reference} | " + " | ".join(f"{m} difference (p)" for m in metrics) + " | seeds |",
        "|---|" + "---:|" * (len(metrics) + 1),
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        cells, seeds = [], 0
        for metric in metrics:
            row = next((r for r in rows if r["model"] == model and r["metric"] == metric), None)
            if row is None:
                cells.append("–")
                continue
            seeds = row["seeds"]
            cells.append(f"{row['difference']:+.4f} ± {row['ci95']:.4f} (p={row['p_value']:.2g})")
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


@contextlib.contextmanager
def saved_figure(path: Path, figsize: Tuple[float, float], ncols: int = 1, **subplots: Any) -> Iterator[Any]:
    """A matplotlib figure (headless) whose ``(fig, axes)`` the block draws on, laid out, saved
    to ``path`` at 110 dpi and closed on exit: what every report and results figure does.

    Args:
        path: the PNG written.
        figsize: (width, height) in inches.
        ncols: side-by-side panels (one row).
        **subplots: more ``plt.subplots`` arguments (e.g. ``squeeze=False``).

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.png"
        >>> with saved_figure(path, (3, 2), ncols=2) as (fig, axes):
        ...     _ = axes[0].plot([0, 1], [1, 0])
        >>> path.stat().st_size > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot(summary: Dict[str, Dict[str, Any]], path: Path) -> None:
    """Save one bar chart per task (regression: MSE, binary: AUC; mean over seeds, the 95%
    interval as error bar) to ``path``."""
    towers = list(summary)
    kinds = task_kinds(summary)
    with saved_figure(path, (5 * len(kinds), 3.5), ncols=len(kinds), squeeze=False) as (_, axes):
        for ax, (task, kind) in zip(axes[0], kinds.items(), strict=True):
            key = f"{task}/{'mse' if kind == 'regression' else 'auc'}"
            shown = [t for t in towers if key in summary[t] and np.isfinite(summary[t][key]["mean"])]
            if not shown:  # e.g. a diverged run: nothing to draw for this task
                ax.set_title(f"{task}: no finite values")
                continue
            means = [summary[t][key]["mean"] for t in shown]
            errors = [summary[t][key]["ci95"] for t in shown]
            ax.bar(shown, means, yerr=errors, capsize=4, color="#4C72B0")
            better = "lower" if kind == "regression" else "higher"
            ax.set_title(f"{task} {key.split('/')[1].upper()} ({better} is better)")
            ax.set_ylim(min(means) * 0.95, max(means) * 1.03)
            ax.tick_params(axis="x", rotation=30)


def write_report(
    runs: List[Dict[str, Any]], out_dir: Path, title: str, reference: Optional[str] = None
) -> str:
    """Write compare.json (summary and runs), compare.md and compare.png to ``out_dir``.

    Args:
        runs: one result per (tower, seed), each with ``"tower"`` and its ``"test"`` metrics.
        out_dir: created if missing.
        title: the heading of compare.md.
        reference: the model every other is paired with; default the GBDT when it ran, else
            the first model.

    Returns:
        str: the markdown table.
    """
    summary = summarise(runs)
    table = markdown_table(summary)
    reference = reference or (GBDT if GBDT in summary else next(iter(summary)))
    if reference not in summary:
        raise ConfigError(f"compare --reference '{reference}' is none of the models: {sorted(summary)}")
    paired = paired_comparisons(runs, reference)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"summary": summary, "paired": {"reference": reference, "rows": paired}, "runs": runs}
    (out_dir / "compare.json").write_text(json.dumps(report, indent=1))
    text = f"# {title}\n\nTest split; mean ± 95% confidence interval over seeds (Student's t).\n\n{table}\n"
    if paired:
        text += (
            f"\nPaired by seed against {reference} (same split): mean difference ± 95% CI, "
            f"two-sided paired t-test p-value.\n\n{paired_table(paired, reference)}\n"
        )
    (out_dir / "compare.md").write_text(text)
    plot(summary, out_dir / "compare.png")
    return table
