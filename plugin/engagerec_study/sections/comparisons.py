"""Sections that compare towers on one config: every tower x seed trained, the GBDT beside them,
the constant baselines, paired tests against a reference (``engagerec compare``'s report), and
findings read off the numbers (never written by hand, so they cannot go stale)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from engagerec.config import TASK_METRICS, load_config, with_tower
from engagerec_study.compare import run_comparison
from engagerec_study.report import GBDT, markdown_table, paired_table, plot
from engagerec_study.sections.common import Section, config_spec, p_text, prepared

TOWERS = ["cross_stitch", "mmoe", "ple", "shared_bottom", "single_task"]
GATED = ("mmoe", "ple")  # towers with softmax gates (engagerec_study.sections.gates reads them)


def versus_reference(data: Dict[str, Any]) -> List[str]:
    """One finding per (model, main metric) paired against the reference: which is better and
    whether the difference is significant at 5%.

    Example::

        >>> data = {"reference": "gbdt", "paired": [{"model": "mmoe", "metric": "skip/auc",
        ...     "difference": 0.002, "ci95": 0.001, "p_value": 0.01, "seeds": 5}]}
        >>> versus_reference(data)
        ['mmoe vs gbdt, skip/auc: better by 0.0020 ± 0.0010 (p = 0.01)']
    """
    lines = []
    for row in data["paired"]:
        lower_better = row["metric"].endswith("/mse")
        diff, p = row["difference"], row["p_value"]
        if not p < 0.05:
            verdict = f"no significant difference ({diff:+.4f} ± {row['ci95']:.4f}, {p_text(p)})"
        else:
            better = (diff < 0) == lower_better
            verdict = (
                f"{'better' if better else 'worse'} by {abs(diff):.4f} ± {row['ci95']:.4f} ({p_text(p)})"
            )
        lines.append(f"{row['model']} vs {data['reference']}, {row['metric']}: {verdict}")
    return lines


def _same_runs(data: Dict[str, Any], other: Dict[str, Any], model: str) -> bool:
    """Whether ``model``'s per-seed test metrics are the same in both sections."""

    def tests(section: Dict[str, Any]) -> Dict[int, Dict[str, float]]:
        return {r["seed"]: r["test"] for r in section["runs"] if r["tower"] == model}

    return tests(data) == tests(other)


def versus_section(data: Dict[str, Any], other: Dict[str, Any], name: str) -> List[str]:
    """Each tower against the same tower of another section (same seeds and split, e.g. without
    an input arch) and against that section's GBDT, paired by seed on each main metric.

    Example::

        >>> run = lambda tower, seed, auc: {"tower": tower, "seed": seed, "test": {"skip/auc": auc}}
        >>> data = {"runs": [run("mmoe", 0, 0.81), run("mmoe", 1, 0.82)]}
        >>> other = {"runs": [run("mmoe", 0, 0.80), run("mmoe", 1, 0.80)]}
        >>> versus_section(data, other, "plain")
        ['mmoe vs mmoe of plain, skip/auc: no significant difference (+0.0150 ± 0.0635, p = 0.2)']
    """
    from engagerec_study.report import paired_comparisons

    lines = []
    for tower in dict.fromkeys(r["tower"] for r in data["runs"]):
        if tower == GBDT:
            continue
        # the same tower there, and the GBDT there (a reference that may read other inputs)
        for theirs in (tower, GBDT):
            if not any(r["tower"] == theirs for r in other["runs"]):
                continue
            if theirs == GBDT and _same_runs(data, other, GBDT):
                continue  # the same GBDT as this section's own (same prepared inputs): already paired
            runs = [r for r in data["runs"] if r["tower"] == tower]
            runs += [{**r, "tower": "__other"} for r in other["runs"] if r["tower"] == theirs]
            rows = [{**row, "model": tower} for row in paired_comparisons(runs, "__other")]
            lines += versus_reference({"reference": f"{theirs} of {name}", "paired": rows})
    return lines


RUN_KEYS = ("tower", "seed", "best_epoch", "steps", "train_seconds", "val", "test")


def kept_run(run: Dict[str, Any]) -> Dict[str, Any]:
    """What the cache keeps of a run's results: no per-epoch history (it is in the run's log.csv).

    Example::

        >>> kept_run({"tower": "mmoe", "seed": 0, "history": [{"loss": 1.0}], "test": {"skip/auc": 0.8}})
        {'tower': 'mmoe', 'seed': 0, 'test': {'skip/auc': 0.8}}
    """
    return {key: run[key] for key in RUN_KEYS if key in run}


def _compute_comparison(
    config: str, towers: List[str], reference: Optional[str], overrides: List[str]
) -> Callable[[Dict[str, Any], Path], Dict[str, Any]]:
    """The compute step of a comparison section: prepare, train towers x seeds and the GBDT, and
    read each gated tower's gates off the test split."""

    def compute(spec: Dict[str, Any], work: Path) -> Dict[str, Any]:
        from engagerec.runs import seed_run_dir
        from engagerec_study.sections.gates import run_gates

        started = time.perf_counter()
        cfg = prepared(load_config(config, overrides), work / "data")
        out = work / "compare"
        run_comparison(cfg, towers, spec["seeds"], out, resume=False, gbdt=True, reference=reference)
        report = json.loads((out / "compare.json").read_text())
        gates = {
            tower: [
                run_gates(seed_run_dir(out, tower, seed), with_tower(cfg, tower)) for seed in spec["seeds"]
            ]
            for tower in towers
            if tower in GATED
        }
        return {
            "summary": report["summary"],
            "paired": report["paired"]["rows"],
            "reference": report["paired"]["reference"],
            "runs": [kept_run(run) for run in report["runs"]],
            "gates": gates,
            "best_epochs": {f"{r['tower']}/{r['seed']}": r.get("best_epoch") for r in report["runs"]},
            "epochs": cfg.train.epochs,
            "seconds": time.perf_counter() - started,
        }

    return compute


def comparison_section(
    name: str,
    title: str,
    config: str,
    about: str,
    towers: List[str] = TOWERS,
    reference: Optional[str] = None,
    overrides: Optional[List[str]] = None,
    findings: Optional[Callable[[Dict[str, Any]], List[str]]] = None,
    versus: Optional[str] = None,
    goals: Optional[Dict[str, float]] = None,
) -> Section:
    """A Section comparing ``towers`` (and the GBDT) on ``config`` over the seeds.

    Args:
        name: the section's name (cache, figure).
        title: its heading.
        config: a config path or shipped name.
        about: what the section measures (markdown, before the table).
        towers: the towers trained.
        reference: the model the others are paired with (default the GBDT).
        overrides: ``key=value`` changes to the config.
        findings: data -> extra finding lines (the paired verdicts are always listed).
        versus: another comparison section (same split and seeds) whose towers each tower is
            also paired with.
        goals: metric -> the project's target (issue 9's quality goals; the direction is the
            metric's own, from ``config.TASK_METRICS``), stated as met or not by the best tower's
            mean.
    """
    overrides = list(overrides or [])

    def spec(seeds: List[int]) -> Dict[str, Any]:
        cfg = load_config(config, overrides)
        return {"towers": towers, "seeds": seeds, "reference": reference, **config_spec(cfg)}

    def render(data: Dict[str, Any], cached: Dict[str, Dict[str, Any]], figures: Path) -> str:
        seeds = sorted({run["seed"] for run in data["runs"]})
        command = (
            f"`engagerec prepare --config {config}` then `engagerec compare --config {config} "
            f"--towers {','.join(towers)} --seeds {','.join(map(str, seeds))} --no-resume --gbdt"
            + (f" --reference {reference}" if reference else "")
            + "`"
            + (f" (with {' '.join(f'`--set {o}`' for o in overrides)})" if overrides else "")
        )
        plot(data["summary"], figures / f"{name}.png")
        lines = [
            about.strip(),
            "",
            f"Same as {command}; {data['seconds']:.0f} s. Test split, mean ± 95% CI over "
            f"{len(seeds)} seeds (Student's t).",
            "",
            markdown_table(data["summary"]),
            "",
            f"Paired by seed against {data['reference']} (per-seed differences: mean ± 95% CI, "
            "two-sided paired t-test):",
            "",
            paired_table(data["paired"], data["reference"]),
            "",
            f"![{title}](figures/{name}.png)",
            "",
            "Findings (read off the tables above):",
            "",
        ]
        extra = (
            (findings(data) if findings else [])
            + goal_findings(data, goals or {})
            + (versus_section(data, cached[versus], versus) if versus in cached else [])
        )
        lines += [f"- {line}" for line in versus_reference(data) + extra]
        return "\n".join(lines)

    compute = _compute_comparison(config, towers, reference, overrides)
    return Section(name, title, spec, compute, render, needs=(versus,) if versus else ())


def goal_findings(data: Dict[str, Any], goals: Dict[str, float]) -> List[str]:
    """Whether the best tower (the GBDT and its variants left out) meets each target: an MSE at
    most, an AUC at least.

    Example::

        >>> stats = lambda m: {"mean": m, "ci95": 0.0, "n": 5}
        >>> data = {"summary": {"a": {"skip/auc": stats(0.81)}, "b": {"skip/auc": stats(0.83)}}}
        >>> goal_findings(data, {"skip/auc": 0.82})
        ['project target skip/auc >= 0.82: met (best tower b, 0.8300)']
    """
    directions = {m: d for metrics in TASK_METRICS.values() for m, d in metrics.items() if d}
    lines = []
    for metric, target in goals.items():
        lower = directions[metric.split("/")[-1]] == "min"  # evaluate's own direction per metric
        means = {
            m: s[metric]["mean"] for m, s in data["summary"].items() if not m.startswith(GBDT) and metric in s
        }
        if not means:
            continue
        best = (min if lower else max)(means, key=means.get)
        met = means[best] <= target if lower else means[best] >= target
        lines.append(
            f"project target {metric} {'<=' if lower else '>='} {target:g}: {'met' if met else 'not met'} "
            f"(best tower {best}, {means[best]:.4f})"
        )
    return lines


def spread_findings(data: Dict[str, Any]) -> List[str]:
    """The study's claims, tested: how far apart the towers' means lie (GBDT left out), skip
    accuracy against the majority class, and whether the towers were still improving.

    Args:
        data: a comparison section's data (``summary``, ``best_epochs``, ``epochs``).

    Example::

        >>> stats = lambda m: {"mean": m, "ci95": 0.0, "n": 5}
        >>> data = {"summary": {"a": {"skip/auc": stats(0.65)}, "b": {"skip/auc": stats(0.66)}},
        ...         "best_epochs": {"a/0": 19, "b/0": 5}, "epochs": 20}
        >>> for line in spread_findings(data):  # doctest: +ELLIPSIS
        ...     print(line)
        the towers' skip/auc lie within 0.0100 of each other (0.6500 to 0.6600)
        1 of 2 tower runs had their best validation epoch in the last two of 20: still improving ...
    """
    summary = {m: s for m, s in data["summary"].items() if m != GBDT}
    lines = []
    for key in ("watch_ratio/mse", "skip/auc", "skip/accuracy"):
        means = {m: s[key]["mean"] for m, s in summary.items() if key in s}
        if means:
            lines.append(
                f"the towers' {key} lie within {max(means.values()) - min(means.values()):.4f} of each "
                f"other ({min(means.values()):.4f} to {max(means.values()):.4f})"
            )
    majority = next(
        (s["skip/baseline_accuracy_majority"]["mean"] for s in summary.values()
         if "skip/baseline_accuracy_majority" in s), None,
    )  # fmt: skip
    if majority is not None:
        best = max(s["skip/accuracy"]["mean"] for s in summary.values())
        lines.append(
            f"skip accuracy of the best tower {best:.4f} against {majority:.4f} for the majority class"
        )
    gbdt = data["summary"].get(GBDT, {})
    if gbdt and all(stats["ci95"] == 0 for stats in gbdt.values()):
        lines.append(
            "the GBDT gave the same model for every seed (no id to target-encode, so no folds): "
            "its interval is 0"
        )
    epochs = [epoch for epoch in data["best_epochs"].values() if epoch is not None]  # the GBDT has none
    late = [epoch for epoch in epochs if epoch >= data["epochs"] - 2]  # 0-based
    if late:
        lines.append(
            f"{len(late)} of {len(epochs)} tower runs had their best validation epoch in the last two "
            f"of {data['epochs']}: still improving when the protocol stops them"
        )
    return lines
