"""The seed-ensemble section: a tower trained with several seeds, its predictions averaged.

Averaging models that differ only in their initialisation and batch order is the cheapest
variance reduction a trained tower has (Lakshminarayanan et al. 2017 call them deep ensembles).
Each replicate ``r`` averages the test predictions of ``members`` runs with seeds ``r, r + R,
r + 2R, ...`` (R: the largest replicate seed + 1, so replicates never share a member), so
replicate r's first member is the single run of seed r that
the comparison sections train: the ensemble is paired with that single run and with the
section's GBDT of the same seed.

Each run is also refitted on the training and validation rows together (``refit.refit_run``:
the same test rows, its own validation's epoch count), and so is the GBDT (its validation's
iteration counts): the usual last step once every choice is made, giving the weights and the id
statistics the validation rows too (a ninth more under a 10% validation split).
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from engagerec.config import load_config
from engagerec.model_builder import configured_tasks
from engagerec.runs import SplitOutputs, seed_run_dir, split_outputs
from engagerec.xauc import exact_xauc
from engagerec_study.compare import run_comparison
from engagerec_study.gbdt import gbdt_reference
from engagerec_study.refit import refit_run
from engagerec_study.report import GBDT, markdown_table, paired_comparisons, paired_table, summarise
from engagerec_study.sections.common import TARGETS, Section, config_spec, prepared
from engagerec_study.sections.comparisons import goal_findings, versus_reference

MEMBERS = 5
TOWER = "mmoe"
REFIT = "refit on train + val"  # the refitted models' name suffix
# (comparison section, its config, the project's targets there): the GBDT comes from the section
SPLITS = (
    ("random", "configs/kuairand_stats.yaml", TARGETS["random"]),
    ("temporal", "configs/kuairand_temporal_stats.yaml", TARGETS["temporal"]),
)


def averaged_outputs(outputs: Sequence[SplitOutputs]) -> SplitOutputs:
    """The mean prediction of several models over the same rows (a seed ensemble); labels and
    weights from the first (they are the split's own, the same in every member).

    Args:
        outputs: ``runs.split_outputs`` of each member, on the same prepared split.

    Example::

        >>> one = SplitOutputs({"skip": np.array([0.2, 0.6])}, {"skip": np.array([0.0, 1.0])},
        ...                    {"skip": np.ones(2)})
        >>> two = SplitOutputs({"skip": np.array([0.4, 1.0])}, one.labels, one.weights)
        >>> averaged_outputs([one, two]).predictions["skip"].round(2).tolist()
        [0.3, 0.8]
    """
    first = outputs[0]
    for other in outputs[1:]:
        for task, labels in first.labels.items():
            if not np.array_equal(other.labels[task], labels):
                raise ValueError(f"members were evaluated on different rows (task '{task}')")
    predictions = {t: np.mean([o.predictions[t] for o in outputs], axis=0) for t in first.predictions}
    return SplitOutputs(predictions, first.labels, first.weights)


def split_metrics(outputs: SplitOutputs, kinds: Dict[str, str]) -> Dict[str, float]:
    """Each task's metrics over the rows whose label is present, under evaluate's names:
    regression MSE, MAE and exact XAUC; binary AUC and accuracy (at 0.5).

    Args:
        outputs: predictions and labels of a split (``runs.split_outputs``, ``averaged_outputs``).
        kinds: task name -> "regression" or "binary".

    Example::

        >>> out = SplitOutputs({"wr": np.array([0.5, 1.0]), "skip": np.array([0.1, 0.9])},
        ...                    {"wr": np.array([0.0, 1.0]), "skip": np.array([0.0, 1.0])},
        ...                    {"wr": np.ones(2), "skip": np.ones(2)})
        >>> split_metrics(out, {"wr": "regression", "skip": "binary"})
        {'wr/mse': 0.125, 'wr/mae': 0.25, 'wr/xauc': 1.0, 'skip/auc': 1.0, 'skip/accuracy': 1.0}
    """
    from sklearn.metrics import roc_auc_score

    metrics = {}
    for task, kind in kinds.items():
        present = outputs.weights[task] > 0
        y, p = outputs.labels[task][present], outputs.predictions[task][present]
        if kind == "regression":
            metrics[f"{task}/mse"] = float(np.mean((p - y) ** 2))
            metrics[f"{task}/mae"] = float(np.mean(np.abs(p - y)))
            metrics[f"{task}/xauc"] = exact_xauc(p, y)
        else:
            metrics[f"{task}/auc"] = float(roc_auc_score(y, p))
            metrics[f"{task}/accuracy"] = float(np.mean((p >= 0.5) == (y > 0.5)))
    return metrics


def _refit_gbdt(cfg, refit_cfg, seed: int, tasks) -> Dict[str, float]:
    """The GBDT of ``seed`` refitted on ``refit_cfg``'s data (no validation rows) with the
    iteration counts that validation chose for it on ``cfg``'s; its test metrics."""
    triples = [(task.name, task.label, task.kind) for task in tasks]
    with contextlib.redirect_stderr(io.StringIO()):  # tasks left out are left out of both
        chosen = gbdt_reference(cfg.train.data_dir, seed, triples)
        iterations = {t: int(chosen[f"{t}/iterations"]) for t, _, _ in triples if f"{t}/iterations" in chosen}
        kept = [triple for triple in triples if triple[0] in iterations]
        refit = gbdt_reference(refit_cfg.train.data_dir, seed, kept, iterations)
    return {key: value for key, value in refit.items() if not key.endswith("/iterations")}


def _with_section_runs(split: Dict[str, Any], section: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The split's single and ensemble runs with its comparison section's constant baselines
    (they depend on the prepared data only, the same here), and that section's GBDT runs of the
    same seeds on the same metrics."""
    theirs = {(r["tower"], r["seed"]): r["test"] for r in section.get("runs", [])}
    baselines: Dict[int, Dict[str, float]] = {}
    for (_, seed), test in theirs.items():  # the towers' runs report them, the GBDT's do not
        baselines.setdefault(seed, {}).update({k: v for k, v in test.items() if "/baseline_" in k})
    runs = [{**run, "test": {**run["test"], **baselines.get(run["seed"], {})}} for run in split["runs"]]
    keys = set(runs[0]["test"]) if runs else set()
    for seed in split["replicates"]:
        if (GBDT, seed) in theirs:
            test = {k: v for k, v in theirs[(GBDT, seed)].items() if k in keys and "/baseline_" not in k}
            runs.append({"tower": GBDT, "seed": seed, "test": test})
    return runs


def section(
    splits=SPLITS, tower: str = TOWER, members: int = MEMBERS, overrides: Sequence[str] = ()
) -> Section:
    """The ensemble section over ``splits``.

    Args:
        splits: (comparison section, its config, targets) per split: the GBDT of each is read
            from that section's cached runs (paired by seed), the targets stated as met or not.
        tower: the tower ensembled.
        members: the runs averaged per replicate (the spec's seeds are the replicates).
        overrides: ``key=value`` changes to every config (tests run it small).

    Returns:
        Section: named ``ensemble``; it needs the named comparison sections (their GBDT runs).

    Example::

        >>> small = section(splits=(("multitask", "synthetic_study", {}),), members=2,
        ...                 overrides=["train.epochs=1"])
        >>> small.name, small.needs, small.spec([0, 1])["members"]
        ('ensemble', ('multitask',), 2)
    """
    ensemble = f"{tower}, mean of {members} seeds"
    refits = {tower: f"{tower}, {REFIT}", ensemble: f"{tower}, {REFIT}, mean of {members} seeds",
              GBDT: f"{GBDT}, {REFIT}"}  # fmt: skip

    def spec(seeds: List[int]) -> Dict[str, Any]:
        configs = {name: config_spec(load_config(config, list(overrides))) for name, config, _ in splits}
        return {"tower": tower, "members": members, "seeds": seeds, "splits": configs}

    def compute(spec: Dict[str, Any], work: Path) -> Dict[str, Any]:
        started = time.perf_counter()
        replicates = spec["seeds"]
        data: Dict[str, Any] = {"splits": {}}
        for name, config, _ in splits:
            cfg = prepared(load_config(config, list(overrides)), work / name / "data")
            # the same test rows, every other row for training: no validation split
            refit_cfg = prepared(
                load_config(config, [*overrides, "data.split.val_fraction=0"]), work / name / "refit_data"
            )
            tasks = configured_tasks(cfg)
            kinds = {task.name: task.kind for task in tasks}
            step = max(replicates) + 1  # disjoint members for any set of non-negative seeds
            groups = {r: [r + step * k for k in range(members)] for r in replicates}
            out = work / name / "compare"
            seeds = sorted(s for group in groups.values() for s in group)
            with contextlib.redirect_stdout(io.StringIO()):  # the report's table: read below instead
                run_comparison(cfg, [tower], seeds, out, resume=False)
            refitted = work / name / "refit"
            for s in seeds:
                chosen, refit = seed_run_dir(out, tower, s), seed_run_dir(refitted, tower, s)
                refit_run(chosen, refit_cfg.train.data_dir, refit, resume=False)
            runs = []
            for r, group in groups.items():
                for runs_dir, one, mean in (
                    (out, tower, ensemble),
                    (refitted, refits[tower], refits[ensemble]),
                ):
                    outputs = [split_outputs(seed_run_dir(runs_dir, tower, s), "test") for s in group]
                    runs.append({"tower": one, "seed": r, "test": split_metrics(outputs[0], kinds)})
                    runs.append(
                        {"tower": mean, "seed": r, "test": split_metrics(averaged_outputs(outputs), kinds)}
                    )
                runs.append({"tower": refits[GBDT], "seed": r, "test": _refit_gbdt(cfg, refit_cfg, r, tasks)})
            data["splits"][name] = {"runs": runs, "replicates": replicates}
        data["seconds"] = time.perf_counter() - started
        return data

    def render(data: Dict[str, Any], cached: Dict[str, Dict[str, Any]], figures: Path) -> str:
        last = members - 1
        lines = [
            f"{tower} trained with {members} seeds per replicate and its test predictions averaged (a "
            "seed ensemble: engagerec_study.sections.ensemble.averaged_outputs over runs.split_outputs). "
            f"Replicate r averages seeds r, r + R, ..., r + {last}R (R: the largest replicate seed + 1), "
            "so its first member "
            "is the single run of seed r, which it is paired with, as with the GBDT of seed r in the "
            "split's section (same prepared data). Every run and the GBDT are also refitted on the "
            "training and validation rows together (`split.val_fraction: 0`, the same test rows; "
            "engagerec_study.refit.refit_run): a run for the epochs its own validation chose, the GBDT "
            "for its validation's iteration counts, as the last step once every choice is made. "
            f"`engagerec results --sections ensemble`; "
            f"{data['seconds']:.0f} s. Test split, mean ± 95% CI over the replicates.",
        ]
        single = f"{tower} (one seed)"
        for name, config, goals in splits:
            split = data["splits"][name]
            runs = _with_section_runs(split, cached.get(name, {}))
            gbdt = [run for run in runs if run["tower"] == GBDT]
            summary = summarise(runs)
            versus_single = [row for row in paired_comparisons(runs, tower) if row["model"] == ensemble]
            versus_gbdt = (
                [r for r in paired_comparisons(runs, GBDT) if REFIT not in r["model"]] if gbdt else []
            )
            # each refitted model against itself trained on the training rows only, then the
            # refitted towers against the refitted GBDT (the same rows for both)
            versus_own = [
                row
                for model in (tower, ensemble, GBDT)
                if any(run["tower"] == model for run in runs)
                for row in paired_comparisons(runs, model)
                if row["model"] == refits[model]
            ]
            versus_refit_gbdt = [
                row
                for row in paired_comparisons(runs, refits[GBDT])
                if row["model"] in (refits[tower], refits[ensemble])
            ]
            own = "the same model on train only"
            findings = versus_reference({"reference": single, "paired": versus_single})
            findings += versus_reference({"reference": GBDT, "paired": versus_gbdt})
            findings += versus_reference({"reference": own, "paired": versus_own})
            findings += versus_reference({"reference": refits[GBDT], "paired": versus_refit_gbdt})
            findings += goal_findings({"summary": summary}, goals)
            lines += ["", f"**{name}** (`{config}`):", "", markdown_table(summary), ""]
            lines += [paired_table(versus_single, single), ""]
            lines += [paired_table(versus_gbdt, GBDT), ""] if versus_gbdt else []
            lines += [paired_table(versus_own, own), "", paired_table(versus_refit_gbdt, refits[GBDT]), ""]
            lines += ["Findings:", ""] + [f"- {line}" for line in findings]
        return "\n".join(lines)

    title = f"Seed ensembles and refits: {tower}, {members} seeds averaged, refitted on train + val"
    needs = tuple(name for name, _, _ in splits)
    return Section("ensemble", title, spec, compute, render, needs=needs, version=2)


SECTION = section()
