"""The task-correlation study (Ma et al., KDD 2018, section 3.2 and Figure 4): two regression
tasks generated with a set correlation p between their weight vectors (the synthetic ``mmoe``
source), each tower trained on both, test loss against p. Shared-bottom shares everything and
should lose most as the tasks drift apart; gated towers (MMoE, PLE) may route them to
different experts; single-task towers share only the (here empty) embeddings, a reference
that the correlation should not move."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from engagerec.config import load_config
from engagerec_study.report import saved_figure
from engagerec_study.sections.common import Section, cell, config_spec, mean_ci, p_text, prepared

CONFIG = "synthetic_mmoe"
CORRELATIONS = (1.0, 0.9, 0.5, 0.0, -0.5)
TOWERS = ["shared_bottom", "mmoe", "ple", "single_task"]


def mean_task_loss(test: Dict[str, float]) -> float:
    """The mean over tasks of the test MSE relative to the constant predictor's (the train mean):
    1 - R². Each seed draws its own data, whose label variance differs (1.3 to 6.2 here), so raw
    MSEs of different seeds are not on one scale; relative ones are. Raw MSE when no baseline.

    Example::

        >>> mean_task_loss({"y1/mse": 0.2, "y1/baseline_mse_train_mean": 2.0,
        ...                 "y2/mse": 0.4, "y2/baseline_mse_train_mean": 1.0})
        0.25
        >>> mean_task_loss({"y1/mse": 0.2, "y2/mse": 0.4})
        0.30000000000000004
    """
    tasks = [k[: -len("/mse")] for k in test if k.endswith("/mse")]
    if all(f"{t}/baseline_mse_train_mean" in test for t in tasks):
        return float(np.mean([test[f"{t}/mse"] / test[f"{t}/baseline_mse_train_mean"] for t in tasks]))
    return float(np.mean([test[f"{t}/mse"] for t in tasks]))


def losses(point: Dict[str, Any], tower: str) -> List[float]:
    """A tower's mean task loss per seed (seed order) at one correlation.

    Args:
        point: one correlation's ``{"correlation", "runs"}`` (each run: tower, seed, test).
        tower: the tower.

    Example::

        >>> point = {"runs": [{"tower": "mmoe", "seed": 1, "test": {"y1/mse": 0.4, "y2/mse": 0.2}},
        ...                   {"tower": "mmoe", "seed": 0, "test": {"y1/mse": 0.1, "y2/mse": 0.3}}]}
        >>> [round(v, 2) for v in losses(point, "mmoe")]
        [0.2, 0.3]
    """
    runs = sorted((r for r in point["runs"] if r["tower"] == tower), key=lambda r: r["seed"])
    return [mean_task_loss(r["test"]) for r in runs]


def _stuck(test: Dict[str, float]) -> bool:
    """A run that did not learn: its test MSE at least half the constant predictor's."""
    return mean_task_loss(test) >= 0.5


def learned_seeds(data: Dict[str, Any], towers: List[str]) -> List[int]:
    """Seeds at which every one of ``towers`` learned at both the highest and the lowest correlation.

    Example::

        >>> run = lambda seed, mse: {"tower": "sb", "seed": seed,
        ...                          "test": {"y1/mse": mse, "y1/baseline_mse_train_mean": 1.0}}
        >>> data = {"points": [{"correlation": 1.0, "runs": [run(0, 0.1), run(1, 0.9)]},
        ...                    {"correlation": -0.5, "runs": [run(0, 0.3), run(1, 0.4)]}]}
        >>> learned_seeds(data, ["sb"])
        [0]
    """
    ends = sorted(data["points"], key=lambda p: p["correlation"])
    ends = [ends[0], ends[-1]]
    seeds = sorted({r["seed"] for r in ends[0]["runs"]})
    return [
        seed
        for seed in seeds
        if not any(
            _stuck(r["test"]) for p in ends for r in p["runs"] if r["seed"] == seed and r["tower"] in towers
        )
    ]


def degradation(data: Dict[str, Any], tower: str, seeds: Optional[List[int]] = None) -> np.ndarray:
    """How much a tower's loss grows from the highest correlation to the lowest, per seed.

    Args:
        data: the section's data (``points`` per correlation).
        tower: the tower.
        seeds: the seeds to use (default all).

    Example::

        >>> run = lambda seed, mse: {"tower": "sb", "seed": seed, "test": {"y1/mse": mse}}
        >>> data = {"points": [{"correlation": 1.0, "runs": [run(0, 0.1), run(1, 0.2)]},
        ...                    {"correlation": -0.5, "runs": [run(0, 0.3), run(1, 0.4)]}]}
        >>> degradation(data, "sb").round(4).tolist()
        [0.2, 0.2]
    """
    points = sorted(data["points"], key=lambda p: p["correlation"])

    def at(point: Dict[str, Any]) -> Dict[int, float]:
        return {r["seed"]: mean_task_loss(r["test"]) for r in point["runs"] if r["tower"] == tower}

    low, high = at(points[0]), at(points[-1])
    chosen = sorted(high) if seeds is None else seeds
    return np.array([low[s] - high[s] for s in chosen])


def _figure(data: Dict[str, Any], path: Path) -> None:
    points = sorted(data["points"], key=lambda p: p["correlation"])
    xs = [p["correlation"] for p in points]
    with saved_figure(path, (6, 4)) as (_, ax):
        for tower in data["towers"]:
            stats = [mean_ci(losses(p, tower)) for p in points]
            ax.errorbar(xs, [s["mean"] for s in stats], yerr=[s["ci95"] for s in stats], marker="o",
                        capsize=3, label=tower)  # fmt: skip
        ax.set_xlabel("task correlation p (Ma et al. 2018 generator)")
        ax.set_ylabel("test MSE / constant's MSE (1 - R²), mean of the tasks")
        ax.set_title("loss against task correlation")
        ax.legend()


def _verdict(values: np.ndarray, p: float, up: str, down: str, neither: str) -> str:
    """A paired difference in words: which way when significant at 5%, else ``neither``.

    Example::

        >>> _verdict(np.array([0.1, 0.2, 0.3]), 0.01, "grows", "falls", "no change")
        'grows, 0.2000 ± 0.2484 (p = 0.01)'
        >>> _verdict(np.array([0.1, -0.1]), 0.9, "grows", "falls", "no change")
        'no change, 0.0000 ± 1.2706 (p = 0.9)'
    """
    stats = mean_ci(values)
    word = neither if not p < 0.05 else (up if stats["mean"] > 0 else down)
    return f"{word}, {cell(stats)} ({p_text(p)})"


def _render(data: Dict[str, Any], figures: Path, name: str, intro: bool) -> str:
    from scipy import stats

    _figure(data, figures / f"{name}.png")
    points = sorted(data["points"], key=lambda p: -p["correlation"])
    towers = data["towers"]
    lines = [__doc__.replace("\n", " ").strip(), ""] if intro else []
    lines += [
        f"`{data['config']}` ({data['rows']:,} generated rows) at each "
        f"correlation; {len(data['seeds'])} seeds per tower and correlation, each seed drawing its "
        "own data (the generator's seed) and initialising the towers, mean ± 95% CI of the "
        "tasks' test MSE relative to the constant predictor's (1 - R²: each data draw has its own "
        f"label variance); {data['seconds']:.0f} s. Same as `engagerec results --sections {name}`.",
        "",
        "| correlation p | " + " | ".join(towers) + " |",
        "|---:|" + "---:|" * len(towers),
    ]
    for point in points:
        lines.append(f"| {point['correlation']:g} | "
                     + " | ".join(cell(mean_ci(losses(point, t))) for t in towers) + " |")  # fmt: skip
    highest, lowest = points[0]["correlation"], points[-1]["correlation"]
    by_run: Dict[tuple, List[str]] = {}  # (seed, tower) -> the correlations where it did not learn
    for point in points:
        for r in point["runs"]:
            if _stuck(r["test"]):
                by_run.setdefault((r["seed"], r["tower"]), []).append(f"{point['correlation']:g}")
    stuck = [
        f"{tower} at p = {', '.join(rhos)}, seed {seed}" for (seed, tower), rhos in sorted(by_run.items())
    ]
    lines += ["", f"![loss against task correlation](figures/{name}.png)", "",
              "Findings (read off the table):", ""]  # fmt: skip
    if stuck:
        lines.append(
            f"- runs that did not learn (test MSE at least half the constant predictor's): "
            f"{'; '.join(stuck)}; in the table's means, left out of every comparison below"
        )
    grows = []
    for tower in towers:
        seeds = learned_seeds(data, [tower])
        growth = degradation(data, tower, seeds)
        if len(growth) < 2:
            lines.append(f"- {tower}: fewer than 2 seeds learned at both ends")
            continue
        p = stats.ttest_1samp(growth, 0.0).pvalue if np.ptp(growth) > 0 else float("nan")
        if p < 0.05 and growth.mean() > 0:
            grows.append(tower)
        lines.append(
            f"- {tower}: loss change from p = {highest:g} to p = {lowest:g}, paired by seed: "
            + _verdict(growth, p, "grows", "falls", "no significant change")
            + f", n = {len(seeds)}"
        )
    if not grows:
        lines.append(
            "- no tower's loss grows significantly as the correlation falls at this data size: "
            "there is no degradation here for gated towers to resist (Ma et al.'s effect does not show)"
        )
    for tower in ("mmoe", "ple"):
        if tower not in towers or "shared_bottom" not in towers:
            continue
        seeds = learned_seeds(data, [tower, "shared_bottom"])
        if len(seeds) < 2:
            lines.append(f"- {tower} against shared-bottom: fewer than 2 seeds where both learned")
            continue
        diff = degradation(data, tower, seeds) - degradation(data, "shared_bottom", seeds)
        p = stats.ttest_1samp(diff, 0.0).pvalue if np.ptp(diff) > 0 else float("nan")
        lines.append(
            f"- does {tower} degrade less than shared-bottom? its loss change minus shared-bottom's: "
            + _verdict(diff, p, "degrades more", "degrades less", "no significant difference")
            + f", n = {len(seeds)}"
        )
    return "\n".join(lines)


def section(
    config: str = CONFIG,
    overrides: Optional[List[str]] = None,
    correlations=CORRELATIONS,
    towers=TOWERS,
    name: str = "correlation",
    title: str = "Task-correlation study",
    replicates: int = 1,
) -> Section:
    """The study as a Section.

    Args:
        name: the section's name (cache, figure); the first section of this study (the default
            name) also states what the study is.
        title: its heading.
        config: a config with a synthetic ``mmoe`` source and its two regression tasks.
        overrides: ``key=value`` changes to it.
        correlations: the task correlations p generated.
        towers: the towers trained at each.
        replicates: runs (data draw and initialisation) per seed: seed s runs seeds
            s * replicates ... s * replicates + replicates - 1, for more power where one seed
            is cheap.
    """
    overrides = list(overrides or [])

    def spec(seeds: List[int]) -> Dict[str, Any]:
        if replicates > 1:
            seeds = [s * replicates + j for s in seeds for j in range(replicates)]
        return {"seeds": seeds, "correlations": list(correlations), "towers": list(towers),
                **config_spec(load_config(config, overrides))}  # fmt: skip

    def compute(spec: Dict[str, Any], work: Path) -> Dict[str, Any]:
        from engagerec_study.compare import run_comparison

        started = time.perf_counter()
        points = []
        for rho in spec["correlations"]:
            kept = []
            for seed in spec["seeds"]:  # each seed draws its own data too: the interval covers both
                changed = overrides + [f"data.source.synthetic.task_correlation={rho}",
                                       f"data.source.synthetic.seed={seed}"]  # fmt: skip
                cfg = prepared(load_config(config, changed), work / f"data{rho:g}_{seed}")
                out = work / f"p{rho:g}_{seed}"
                run_comparison(cfg, spec["towers"], [seed], out, resume=False)
                runs = json.loads((out / "compare.json").read_text())["runs"]
                kept += [{"tower": r["tower"], "seed": r["seed"], "test": r["test"]} for r in runs]
            points.append({"correlation": rho, "runs": kept})
        rows = load_config(config, overrides).data.source.synthetic.num_rows
        return {"points": points, "seeds": spec["seeds"], "towers": spec["towers"], "config": config,
                "rows": rows, "seconds": time.perf_counter() - started}  # fmt: skip

    def render(data: Dict[str, Any], _: Dict[str, Dict[str, Any]], figures: Path) -> str:
        return _render(data, figures, name, intro=name == "correlation")

    return Section(name, title, spec, compute, render, version=2)


SECTION = section()
# the same study on a tenth of the data: too easy at 100,000 rows for any tower to lose
# anything as the tasks drift apart, so a smaller draw asks whether sharing then matters
SMALL_SECTION = section(
    overrides=["data.source.synthetic.num_rows=10000"],
    name="correlation_small",
    title="Task-correlation study on 10,000 rows",
    replicates=4,  # a run is cheap at this size, and 4 seeds left the question open
)
