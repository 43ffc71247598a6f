"""New ids day by day: a growing vocabulary, managed collisions, or hashing, each retrained daily.

The replay's warm line (engagerec_study.sections.replay) three times over, on one CPU rank, with
the video id space (the ``content_id`` feature and the history of videos that shares its table)
held three ways:

  vocabulary  every day's data prepared against the day before's (``prepare --base``): a video
              first seen in a day's training rows (twice: ``min_count: 2``) gets a row appended
              to the table, the warm start moves each known video's row to where it now is,
              and a video the model never trained on scores on the out-of-vocabulary row;
  managed     ``managed_collisions``: no vocabulary; the model's torchrec managed-collision
              module admits the videos its batches bring into a table of ``ROWS`` rows
              (distance-weighted LFU eviction, admissions every step), so a new video gets a
              row while the model trains, without any re-preparation of vocabularies; a video
              it never admitted shares the table's last row;
  hashed      ``hash_buckets``: every video on row 1 + hash(id) % ``ROWS``, shared with the
              videos hashed there too.

Managed and hashed tables have the same ``ROWS`` rows, fewer than the first model's vocabulary
(so the hashed space is hashed from the first day: ``hash_buckets`` hashes only a larger space).
Each line: a first model on days 1..``FIRST_DAYS``, then every day a warm start on the day
before from yesterday's model, with the settings the replay section chose on validation rows
before its replay (``WARM``: a third of both learning rates); day d is scored by the model that
trained on day d - 1. Mean ± 95% CI over seeds per day, and the mean over the days of each
seed's difference to the vocabulary line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from engagerec.config import load_config
from engagerec.data.schema import DatasetSchema
from engagerec.errors import ConfigError
from engagerec_study.sections.common import Section, cell, config_spec, mean_ci
from engagerec_study.sections.replay import (
    BASE,
    FIRST_DAYS,
    OVERRIDES,
    _prepare,
    _score,
    _train,
    day_files,
    plot_by_day,
)

# below the first days' vocabulary (1,073 videos seen twice in days 1..7): hash_buckets hashes only
# an id space larger than it, and both bounded tables hold fewer rows than the videos to place
ROWS = 1024
VIDEO_FEATURES = ("content_id", "history")  # the video table's features
OPTIONS = {
    "vocabulary": [],
    "managed": [f"data.features.{name}.managed_collisions={ROWS}" for name in VIDEO_FEATURES],
    "hashed": [f"data.features.{name}.hash_buckets={ROWS}" for name in VIDEO_FEATURES],
}
WARM = "lr_third"  # the replay section's choice (module docstring)


def _warm_changes(config: List[str]) -> List[str]:
    train = load_config(config[0], config[1:]).train
    return [f"train.dense_lr={train.dense_lr / 3!r}", f"train.sparse_lr={train.sparse_lr / 3!r}"]


def _compute(spec: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Every option's chain of daily preparations, its daily warm starts for every seed, and
    their scores of the next day."""
    base = spec["config_args"]
    cfg = load_config(base[0], base[1:])
    days = day_files(cfg.data.source.interactions, work / "days", spec["last_day"])
    first = spec["first_days"]
    first_file = work / "days" / f"upto_{first:02d}.csv"
    per_day: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for option, overrides in OPTIONS.items():
        config = base + overrides
        chain = {first: _prepare(config, first_file, work / option / "data" / f"chain_{first:02d}")}
        for d in range(first + 1, len(days) + 1):
            chain[d] = _prepare(config, days[d - 1], work / option / "data" / f"chain_{d:02d}", chain[d - 1])
        held = DatasetSchema.load(chain[first])
        if option != "vocabulary" and "content_id" not in {**held.hashed, **held.managed}:
            raise ConfigError(f"the {option} line's video ids were not {option}: {OPTIONS[option]}")
        changes = _warm_changes(config)
        for seed in spec["seeds"]:
            runs = work / option / "runs" / f"seed{seed}"
            run = runs / f"first_{first:02d}"
            cost = _train(config, chain[first], run, seed)
            for d in range(first + 1, len(days) + 1):
                if d > first + 1:  # yesterday's model, warm-started on day d - 1
                    name = runs / f"warm_{d - 1:02d}"
                    cost = _train(config + changes, chain[d - 1], name, seed, init_from=run)
                    run = name
                scores = _score(run, chain[d], work / option / "scores" / f"seed{seed}" / f"{d:02d}")
                if option == "hashed":  # every id has a row: nothing tells an unseen one
                    scores["unseen"] = None
                per_day.setdefault(str(d), {o: [] for o in OPTIONS})[option].append(
                    {**scores, **cost, "seed": seed}
                )
    return {"days": per_day, "first_days": first, "rows": ROWS, "warm": WARM}


def render(data: Dict[str, Any], _: Dict[str, Dict[str, Any]], figures: Path) -> str:
    """The per-day table, each option against the vocabulary over the days, and the plot."""
    days = {int(d): lines for d, lines in data["days"].items()}
    names = list(OPTIONS)
    header = (
        "| day | unseen vocabulary / managed | "
        + " | ".join(f"MSE {n}" for n in names)
        + " | "
        + " | ".join(f"AUC {n}" for n in names)
        + " |"
    )
    table = [header, "|" + "---|" * (2 + 2 * len(names))]
    for d, day in sorted(days.items()):
        unseen = " / ".join(
            f"{np.mean([r['unseen'] for r in day[n]]):.1%}" for n in ("vocabulary", "managed")
        )
        mse = " | ".join(cell(mean_ci([r["mse"] for r in day[n]])) for n in names)
        auc = " | ".join(cell(mean_ci([r["auc"] for r in day[n]])) for n in names)
        table.append(f"| {d} | {unseen} | {mse} | {auc} |")
    scored = sorted(days)

    def per_seed(option: str, metric: str) -> np.ndarray:
        return np.mean([[r[metric] for r in days[d][option]] for d in scored], axis=0)

    versus = []
    for option in names[1:]:
        mse = mean_ci(per_seed(option, "mse") - per_seed("vocabulary", "mse"))
        auc = mean_ci(per_seed(option, "auc") - per_seed("vocabulary", "auc"))
        versus.append(f"- {option} minus vocabulary: MSE {cell(mse)}, AUC {cell(auc)}")
    samples = {n: np.mean([r["samples"] for d in scored for r in days[d][n]]) for n in names}
    seconds = {n: np.mean([r["seconds"] for d in scored for r in days[d][n]]) for n in names}
    cost = ", ".join(f"{n} {samples[n]:,.0f} samples in {seconds[n]:.1f} s" for n in names)
    plot_by_day(days, [(name, name) for name in names], figures / "replay_ids.png")
    n = len(days[scored[-1]]["vocabulary"])
    return "\n".join(
        [
            f"The video table held three ways, each retrained daily by a warm start ({data['warm']}) "
            f"after a first model on days 1..{data['first_days']} (module docstring of "
            f"`engagerec_study.sections.replay_ids`): a growing vocabulary, managed collisions in "
            f"{data['rows']:,} rows, hashing into {data['rows']:,} rows. Day d is scored by the model "
            f"trained on day d - 1; mean ± 95% CI over {n} seeds. Unseen: the share of the day's rows "
            "whose video scores on the out-of-vocabulary row (vocabulary) or on the shared row "
            "(managed: a video the remapping has not admitted), mean over seeds.",
            "",
            *table,
            "",
            f"Over days {scored[0]}..{scored[-1]}, each seed's mean over the days, paired by seed:",
            "",
            *versus,
            "",
            f"A day's retraining, on average: {cost}.",
            "",
            "![quality against day by id space](figures/replay_ids.png)",
        ]
    )


def _spec(seeds: List[int]) -> Dict[str, Any]:
    config = [BASE, *OVERRIDES]
    return {
        "config": config_spec(load_config(config[0], config[1:])),
        "config_args": config,
        "options": OPTIONS,
        "first_days": FIRST_DAYS,
        "last_day": None,
        "seeds": list(seeds),
        "warm": WARM,
    }


SECTION = Section(
    "replay_ids", "New ids day by day: vocabulary, managed collisions, hashing", _spec, _compute, render
)
