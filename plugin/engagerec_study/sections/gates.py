"""The gates section: how MMoE and PLE spread each task over their experts on KuaiRand.

Experts are interchangeable between seeds (expert 2 of one seed is no expert of another), so
what is averaged over seeds is what does not depend on the experts' order: the entropy of a
task's gate (per row, and of its mean over rows), how far two tasks' mean gates lie apart
(Jensen-Shannon divergence), and for PLE the share of weight on the shared experts."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from engagerec.config import ExperimentConfig
from engagerec_study.report import saved_figure
from engagerec_study.sections.common import Section, cell, mean_ci


def entropy(weights) -> float:
    """Shannon entropy in nats of a weight vector summing to 1.

    Example::

        >>> round(entropy([0.5, 0.5]), 4), entropy([1.0, 0.0])
        (0.6931, 0.0)
    """
    w = np.asarray(weights, dtype=float)
    w = w[w > 0]
    return float(-(w * np.log(w)).sum()) + 0.0  # + 0.0: no -0.0


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in nats (0: the same mixture; at most log 2).

    Example::

        >>> js_divergence([0.5, 0.5], [0.5, 0.5]), round(js_divergence([1, 0], [0, 1]), 4)
        (0.0, 0.6931)
    """
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    m = (p + q) / 2
    return max(0.0, entropy(m) - (entropy(p) + entropy(q)) / 2)


def run_gates(run_dir: Path, cfg: ExperimentConfig) -> Dict[str, Any]:
    """A run's gates on its test split: per task, the gate the task's head reads (MMoE's, PLE's
    last level) as its mean weights and mean per-row entropy; for PLE the number of
    task-specific experts that lead each task gate's candidates (the rest are shared).

    Args:
        run_dir: a trained run of a gated tower.
        cfg: its config with its tower (PLE's ``num_specific`` is read from it).

    Example: ``tests/test_results.py`` (a trained run is needed).
    """
    from engagerec.runs import split_outputs

    return gates_of(split_outputs(run_dir, "test"), cfg)


def gates_of(out, cfg: ExperimentConfig) -> Dict[str, Any]:
    """``run_gates`` from a run's ``SplitOutputs`` already at hand.

    Args:
        out: ``runs.split_outputs`` of the run.
        cfg: its config with its tower.

    Example::

        >>> import numpy as np
        >>> from engagerec.config import load_config
        >>> from engagerec.runs import SplitOutputs
        >>> out = SplitOutputs(predictions={"a": np.zeros(2), "b": np.zeros(2)}, labels={}, weights={},
        ...                    gate_means={"task0": np.array([0.5, 0.5]), "task1": np.array([1.0, 0.0])},
        ...                    gate_entropy={"task0": 0.69, "task1": 0.0})
        >>> gates_of(out, load_config("synthetic_study"))["tasks"]["b"]
        {'mean': [1.0, 0.0], 'row_entropy': 0.0}
    """
    from engagerec.towers import TOWERS

    tasks = list(out.predictions)
    names = sorted(out.gate_means)
    levels = {n.split("/")[0] for n in names if "/" in n}  # PLE: "level<j>/task<k>"
    last = max(levels, key=lambda level: int(level.removeprefix("level")), default="")
    gates = {}
    for k, task in enumerate(tasks):
        key = f"{last}/task{k}" if last else f"task{k}"
        gates[task] = {"mean": out.gate_means[key].tolist(), "row_entropy": out.gate_entropy[key]}
    layout = {}
    if cfg.model.tower.name == "ple":
        default = inspect.signature(TOWERS["ple"]).parameters["num_specific"].default
        layout["num_specific"] = int(cfg.model.tower.params.get("num_specific", default))
    return {"tasks": gates, **layout}


def summarise_gates(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per task, over seeds: row entropy, entropy of the mean gate, effective experts
    (exp of that entropy), the divergence from the first task's gate, PLE's shared share.

    Example::

        >>> runs = [{"tasks": {"a": {"mean": [0.5, 0.5], "row_entropy": 0.6},
        ...                    "b": {"mean": [0.9, 0.1], "row_entropy": 0.3}}}] * 2
        >>> s = summarise_gates(runs)
        >>> round(s["b"]["effective_experts"]["mean"], 3), s["a"]["divergence_from_first"]["mean"]
        (1.384, 0.0)
    """
    tasks = list(runs[0]["tasks"])
    first = tasks[0]
    out: Dict[str, Dict[str, Any]] = {}
    for task in tasks:
        means = [np.asarray(r["tasks"][task]["mean"]) for r in runs]
        stats = {
            "row_entropy": mean_ci([r["tasks"][task]["row_entropy"] for r in runs]),
            "mean_entropy": mean_ci([entropy(m) for m in means]),
            "effective_experts": mean_ci([np.exp(entropy(m)) for m in means]),
            "experts": len(means[0]),
            "divergence_from_first": mean_ci(
                [
                    js_divergence(m, np.asarray(r["tasks"][first]["mean"]))
                    for m, r in zip(means, runs, strict=True)
                ]
            ),
        }
        if "num_specific" in runs[0]:
            stats["shared_share"] = mean_ci(
                [m[r["num_specific"] :].sum() for m, r in zip(means, runs, strict=True)]
            )
        out[task] = stats
    return out


def _table(summary: Dict[str, Dict[str, Any]], tower: str) -> List[str]:
    ple = any("shared_share" in s for s in summary.values())
    lines = [
        f"| {tower}: task | experts | per-row entropy | entropy of the mean | effective experts | "
        "JS divergence from the first task |" + (" share on shared experts |" if ple else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if ple else ""),
    ]
    for task, s in summary.items():
        lines.append(
            f"| {task} | {s['experts']} | {cell(s['row_entropy'], 3)} | {cell(s['mean_entropy'], 3)} | "
            f"{cell(s['effective_experts'], 2)} | {cell(s['divergence_from_first'], 4)} |"
            + (f" {cell(s['shared_share'], 3)} |" if ple else "")
        )
    return lines


def _threshold_gates(threshold: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per label definition of the threshold study: the joint MMoE's skip gate entropy and its
    divergence from the watch-ratio gate, over seeds."""
    rows = []
    for definition in threshold["definitions"]:
        runs = definition["joint_gates"]
        summary = summarise_gates(runs)
        rows.append({"label": definition["label"], "x": definition.get("threshold"),
                     "relative_to": definition.get("relative_to"),
                     "skip_row_entropy": summary["skip"]["row_entropy"],
                     "divergence": summary["skip"]["divergence_from_first"]})  # fmt: skip
    return rows


def _figure(summaries: Dict[str, Dict[str, Any]], by_threshold: List[Dict[str, Any]], path: Path) -> None:
    with saved_figure(path, (11, 3.8), ncols=2) as (_, axes):
        width = 0.8 / max(1, len(summaries))
        for i, (tower, summary) in enumerate(summaries.items()):
            tasks = list(summary)
            x = np.arange(len(tasks)) + i * width
            effective = [summary[t]["effective_experts"] for t in tasks]
            axes[0].bar(x, [e["mean"] for e in effective], width, yerr=[e["ci95"] for e in effective],
                        capsize=3, label=tower)  # fmt: skip
            axes[0].set_xticks(np.arange(len(tasks)) + width * (len(summaries) - 1) / 2, tasks)
        axes[0].set_ylabel("effective experts, exp(entropy of the mean gate)")
        axes[0].set_title("gates per task (4-task KuaiRand, test split)")
        axes[0].legend()
        constant = [r for r in by_threshold if r["relative_to"] is None]
        if constant:
            xs = [r["x"] for r in constant]
            divergence = [r["divergence"] for r in constant]
            axes[1].errorbar(xs, [d["mean"] for d in divergence], yerr=[d["ci95"] for d in divergence],
                             marker="o", capsize=3)  # fmt: skip
            axes[1].set_xlabel("skip threshold (watch ratio)")
            axes[1].set_ylabel("JS divergence, skip vs watch-ratio gate")
            axes[1].set_title("MMoE: skip gate vs watch-ratio gate")


def _spec(seeds: List[int]) -> Dict[str, Any]:
    return {"reads": ["multitask", "threshold"]}  # computed there; nothing of its own


def _compute(spec: Dict[str, Any], work: Path) -> Dict[str, Any]:
    return {}


def _render(_: Dict[str, Any], cached: Dict[str, Dict[str, Any]], figures: Path) -> str:
    multitask, threshold = cached.get("multitask"), cached.get("threshold")
    if not multitask or not multitask.get("gates"):
        return "Not computed yet: it reads the multi-task section's MMoE and PLE runs."
    summaries = {tower: summarise_gates(runs) for tower, runs in multitask["gates"].items()}
    by_threshold = _threshold_gates(threshold) if threshold else []
    _figure(summaries, by_threshold, figures / "gates.png")
    lines = [
        "For each task, the gate its head reads (MMoE's gate; PLE's last-level task gate), averaged "
        "over the test rows of the four-task KuaiRand runs (the multi-task section's runs, the same "
        "seeds). Experts are interchangeable between seeds, so only order-free quantities are "
        "averaged: the entropy of each row's gate and of the task's mean gate (nats; log E when "
        "every expert weighs the same), the effective number of experts exp(entropy of the mean), "
        "the Jensen-Shannon divergence between a task's mean gate and the first task's (0: both "
        "tasks mix the experts alike; log 2 = 0.693 at most), and for PLE the weight on its "
        "shared experts. Mean ± 95% CI over seeds.",
        "",
    ]
    for tower, summary in summaries.items():
        lines += _table(summary, tower) + [""]
    if by_threshold:
        lines += [
            "Across the skip thresholds (the threshold section's joint MMoE runs): the skip gate's "
            "per-row entropy and its divergence from the watch-ratio gate.",
            "",
            "| skip label | skip gate per-row entropy | JS divergence from the watch-ratio gate |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['label']} | {cell(r['skip_row_entropy'], 3)} | {cell(r['divergence'], 4)} |"
                  for r in by_threshold]  # fmt: skip
        lines.append("")
    lines += ["![gates](figures/gates.png)", "", "Findings (read off the tables):", ""]
    for tower, summary in summaries.items():
        effective = [s["effective_experts"]["mean"] for s in summary.values()]
        apart = {t: s["divergence_from_first"] for t, s in list(summary.items())[1:]}
        line = (
            f"- {tower}: each task leans on {min(effective):.2f} to {max(effective):.2f} effective experts "
            f"of {next(iter(summary.values()))['experts']}"
        )
        if apart:
            ranked = sorted(apart, key=lambda t: -apart[t]["mean"])
            far, first = ranked[0], next(iter(summary))
            line += (
                f"; the task whose mean gate lies furthest from {first}'s is {far} (JS {cell(apart[far], 3)}"
            )
            if len(ranked) > 1:  # say when the runner-up's interval reaches it
                near = apart[ranked[1]]
                if near["mean"] + near["ci95"] >= apart[far]["mean"] - apart[far]["ci95"]:
                    line += f", its interval overlapping {ranked[1]}'s"
            line += ")"
        shares = [s["shared_share"]["mean"] for s in summary.values() if "shared_share" in s]
        if shares:
            line += f"; {min(shares):.2f} to {max(shares):.2f} of a task's weight goes to the shared experts"
        lines.append(line)
    return "\n".join(lines)


SECTION = Section("gates", "Gates: how MMoE and PLE share experts between tasks", _spec, _compute, _render,
                  needs=("multitask", "threshold"))  # fmt: skip
