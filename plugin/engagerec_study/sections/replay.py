"""The day-by-day replay: how fast a model left alone decays on a growing log, and what a daily
warm start buys against a daily retrain from scratch.

The bundled KuaiRand log spans 14 days (24-hour days of ``time_ms`` from its first view). A
first model trains on the first ``FIRST_DAYS``; then, for each later day d, three models score
all of day d's rows:

  frozen   the first model, never retrained: its weights, vocabularies and normalisation stay
           those of the first days, and every id first seen after them scores on the
           out-of-vocabulary row (``engagerec predict`` on a later window); its features do not
           freeze: histories and id statistics carry on through the days, as a serving
           system's live feature pipeline would;
  warm     yesterday's warm model trained on day d-1 alone, started from its own yesterday's
           (``engagerec train --init-from``; the first one is the first model), with the
           retraining settings chosen among a few candidates (the first model's learning rates
           and early stopping, a third of both learning rates, one epoch) before the replay, on
           rows it never scores: a model of days 1..first-2 warm-started on days first-1 and
           first with each, the lowest mean validation loss chosen;
  scratch  a model trained from scratch on days 1..d-1.

Every day's data is prepared against the day before's (``engagerec prepare --base``), so the
warm and frozen lines share one chain of preparations whose vocabularies only grow; each
scratch model has its own preparation of days 1..d-1, and day d prepared against it. Features,
statistics and histories therefore carry across days in every line, as a serving system's
would. Every line validates (early stopping) on the same rows, the last 10% by time of its
newest day, and no preparation has a test split: the next day is the test. A video needs two
training views to get its own row (``min_count: 2``), so the out-of-vocabulary row, where new
videos score, is trained.

Per day and line: the watch-ratio MSE and the skip AUC on day d, mean ± 95% CI over seeds (day
d's rows are the same for every seed: the interval covers training randomness only); the share
of day d's rows whose video the line's model never trained on (its out-of-vocabulary row); the
samples the line's newest model trained on (steps x batch size, one rank) and its seconds. The
samples are one day's retraining cost: the warm line's cumulative cost is one day's per day,
the scratch line's grows with the days.

Caveats: the bundled log is KuaiRand's 15-core subset, filtered over all 14 days (every video
and user has at least 15 views in the whole log), so a video new on day d is known to come back;
and each day's ids first seen in its validation rows join the chain's vocabularies only when
they reappear in a later day's training rows (engagerec.data.growth).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from engagerec.config import load_config
from engagerec.data.tables import sniff_separator
from engagerec.errors import ConfigError
from engagerec_study.report import saved_figure
from engagerec_study.sections.common import Section, cell, config_spec, mean_ci

BASE = "kuairand_temporal"
# one day's views from a user count (no minimum per window); the next day is the test; a video
# seen once in training shares the out-of-vocabulary row, so that row learns what a new video
# does (with min_count 1 it is never trained, and most of a day's rows are new videos)
OVERRIDES = [
    "data.filters.min_user_views=0",
    "data.split.test_fraction=0.0",
    "data.split.val_fraction=0.1",
    "data.features.content_id.min_count=2",
]
FIRST_DAYS = 7
LINES = (
    ("frozen", "frozen"),
    ("warm", "warm start on the day before"),
    ("scratch", "from scratch on every day before"),
)
DAY_MS = 86_400_000


def day_files(log: str | Path, out: Path, last_day: Optional[int] = None) -> List[Path]:
    """
    The log cut into one file per day (24 hours of ``time_ms`` from the first view; the log's
    ``date`` column overlaps by up to half an hour between dates), in order, plus for every day
    the file of all days up to it (``upto_<k>.csv``, for the from-scratch models).

    Args:
        log (str | Path): the KuaiRand log (a file, a directory of them or a glob, in time order,
            tab- or comma-separated, with ``time_ms``); the day files keep its separator.
        out (Path): where the files go.
        last_day (Optional[int]): the last day written (default: every day).

    Returns:
        List[Path]: the day files, oldest first.

    Example::

        >>> # day_files("datasets/kuairand/processed_standard_kcore_15.csv", Path("runs/replay/days"))
    """
    import pandas as pd

    pattern = Path(log) / "*.csv" if Path(log).is_dir() else Path(log)
    files = sorted(glob.glob(str(pattern))) or [str(log)]
    sep = sniff_separator(Path(files[0]))
    frame = pd.concat([pd.read_csv(name, sep=sep) for name in files], ignore_index=True)
    since = frame["time_ms"] - frame["time_ms"].min()
    # 24-hour days from the first view; minutes past the last whole day (the bundled log spans 14
    # days and 7 minutes) go to the last day
    days = max(1, int(round(since.max() / DAY_MS)))
    day = (since // DAY_MS).clip(upper=days - 1)
    out.mkdir(parents=True, exist_ok=True)
    days_out = []
    for k, value in enumerate(sorted(day.unique())[:last_day]):
        days_out.append(out / f"day_{k + 1:02d}.csv")
        frame[day == value].to_csv(days_out[-1], sep=sep, index=False)
        frame[day <= value].to_csv(out / f"upto_{k + 1:02d}.csv", sep=sep, index=False)
    return days_out


def _prepare(config: List[str], log: Path, out: Path, base: Optional[Path] = None) -> Path:
    """``config`` (a config and its overrides) prepared from ``log`` into ``out``, against
    ``base`` (kept when done before: the replay resumes)."""
    from engagerec.data.prepare import prepare

    if not (out / "manifest.json").is_file():
        cfg = load_config(config[0], config[1:] + [f"data.source.interactions={log}"])
        with contextlib.redirect_stdout(io.StringIO()):
            prepare(cfg.data, out, base=base)
    return out


def _train(
    config: List[str], data: Path, run: Path, seed: int, init_from: Optional[Path] = None
) -> Dict[str, Any]:
    """One run (kept when it finished before: the replay resumes), and what it cost."""
    from engagerec.train import train

    results = run / "results.json"
    if not results.is_file():
        sets = [f"train.data_dir={data}", f"train.seed={seed}", "train.progress_bar=false"]
        if init_from is not None:
            sets.append(f"train.init_from={json.dumps(str(init_from))}")
        with contextlib.redirect_stdout(io.StringIO()):
            train(load_config(config[0], config[1:] + sets), run)
    done = json.loads(results.read_text())
    if not done["steps"]:  # its model would be the one it started from: no retraining to compare
        raise RuntimeError(f"{run} trained no step: {data}'s training rows are fewer than a batch")
    batch = load_config(config[0], config[1:]).train.batch_size
    return {
        "samples": int(done["steps"]) * batch,
        "seconds": float(done["train_seconds"]),
        "val_loss": float(done["history"][done["best_epoch"]]["loss"]),  # at the epoch validation chose
    }


def _score(run: Path, data: Path, out: Path) -> Dict[str, float]:
    """A run's metrics on every row of a day's preparation (its train and val splits), and the
    shares of rows whose video, and whose user, the run never trained on."""
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from engagerec.data.schema import DatasetSchema
    from engagerec.predict import predict

    schema = DatasetSchema.load(data)
    ratio, skip, truth_ratio, truth_skip, rows = [], [], [], [], 0
    oov = {"content_id": 0, "user_id": 0}
    for split in ("train", "val"):
        with contextlib.redirect_stdout(io.StringIO()):
            summary = predict(run, data, out / f"{split}.parquet", split=split)
        scores = pq.read_table(out / f"{split}.parquet")
        files = [data / split / name for name in schema.meta["splits"][split]["files"]]
        labels = pq.read_table(files, columns=["watch_ratio", "skip"])
        ratio.append(scores.column("watch_ratio").to_numpy())
        skip.append(scores.column("skip_probability").to_numpy())
        truth_ratio.append(labels.column("watch_ratio").to_numpy())
        truth_skip.append(labels.column("skip").to_numpy())
        # an id unseen in the run's training (or missing); none where the space has no vocabulary
        for space in oov:
            oov[space] += summary.get("oov_rows", {}).get(space, 0)
        rows += scores.num_rows
    predicted, truth = np.concatenate(ratio), np.concatenate(truth_ratio)
    return {
        "mse": float(np.mean((predicted - truth) ** 2)),
        "auc": float(roc_auc_score(np.concatenate(truth_skip), np.concatenate(skip))),
        "unseen": oov["content_id"] / rows,
        "unseen_users": oov["user_id"] / rows,
        "rows": rows,
    }


def _compute(spec: Dict[str, Any], work: Path) -> Dict[str, Any]:
    """Every day's preparations, every line's runs for every seed, and their scores."""
    config = spec["config_args"]
    cfg = load_config(config[0], config[1:])
    days = day_files(cfg.data.source.interactions, work / "days", spec["last_day"])
    first = spec["first_days"]

    def upto(k: int) -> Path:  # days 1..k in one file
        return work / "days" / f"upto_{k:02d}.csv"

    # the chain (warm, frozen): the first days, then each day against the day before
    chain = {first: _prepare(config, upto(first), work / "data" / f"chain_{first:02d}")}
    for d in range(first + 1, len(days) + 1):
        chain[d] = _prepare(config, days[d - 1], work / "data" / f"chain_{d:02d}", chain[d - 1])
    # the scratch line: days 1..k from scratch, and day k + 1 against it. Its validation rows are
    # the chain's of day k (the same last rows by time), so both lines train as fresh: a fraction
    # of days 1..k would hold out most of day k from the scratch model alone
    scratch, scored_by_scratch = {first: chain[first]}, {first + 1: chain[first + 1]}
    scratch_config: Dict[int, List[str]] = {}
    kept = np.cumsum([_split_rows(chain[d]) for d in sorted(chain)])  # rows of days 1..k
    for k in range(first + 1, len(days)):
        validate = [f"data.split.val_fraction={_split_rows(chain[k], 'val') / int(kept[k - first])!r}"]
        scratch_config[k] = config + validate
        scratch[k] = _prepare(scratch_config[k], upto(k), work / "data" / f"scratch_{k:02d}")
        scored_by_scratch[k + 1] = _prepare(
            scratch_config[k], days[k], work / "data" / f"scratch_{k:02d}_next", scratch[k]
        )
    # the warm line's retraining settings, chosen before the replay on rows it never scores: a model
    # of days 1..first-2 is warm-started on day first-1, then on day first, with each candidate;
    # the candidate whose runs have the lowest mean validation loss (each day's last rows) is replayed
    tune_days = (first - 1, first)
    tuning = {first - 2: _prepare(config, upto(first - 2), work / "data" / f"tune_{first - 2:02d}")}
    for d in tune_days:
        tuning[d] = _prepare(config, days[d - 1], work / "data" / f"tune_{d:02d}", tuning[d - 1])
    val_loss: Dict[str, float] = {}
    for candidate, changes in spec["warm_candidates"].items():
        losses = []
        for seed in spec["seeds"]:
            runs = work / "runs" / f"seed{seed}"
            run = runs / f"tune_first_{first - 2:02d}"
            _train(config, tuning[first - 2], run, seed)
            for d in tune_days:
                name = f"tune_{candidate}_{d:02d}"
                losses.append(
                    _train(config + changes, tuning[d], runs / name, seed, init_from=run)["val_loss"]
                )
                run = runs / name
        val_loss[candidate] = float(np.mean(losses))
    chosen = min(val_loss, key=val_loss.get)
    changes = spec["warm_candidates"][chosen]
    warm_runs: Dict[int, Dict[int, Any]] = {}  # seed -> day scored -> (the run scoring it, its cost)
    for seed in spec["seeds"]:
        runs = work / "runs" / f"seed{seed}"
        run = runs / f"first_{first:02d}"
        warm_runs[seed] = {first + 1: (run, _train(config, chain[first], run, seed))}
        for d in range(first + 2, len(days) + 1):  # the model that scores day d trained on d - 1
            name = f"warm_{d - 1:02d}" if not changes else f"warm_{chosen}_{d - 1:02d}"
            cost = _train(config + changes, chain[d - 1], runs / name, seed, init_from=run)
            run = runs / name
            warm_runs[seed][d] = (run, cost)
    per_day: Dict[int, Dict[str, List[Dict[str, float]]]] = {}
    for seed in spec["seeds"]:
        runs = work / "runs" / f"seed{seed}"
        first_run, first_cost = warm_runs[seed][first + 1]
        for d in range(first + 1, len(days) + 1):
            warm, warm_cost = warm_runs[seed][d]
            scratch_run, scratch_cost = first_run, first_cost
            if d > first + 1:  # yesterday's scratch model
                scratch_run = runs / f"scratch_{d - 1:02d}"
                scratch_cost = _train(scratch_config[d - 1], scratch[d - 1], scratch_run, seed)
            day = per_day.setdefault(d, {name: [] for name, _ in LINES})
            for name, run, data, cost in (
                ("frozen", first_run, chain[d], first_cost),
                ("warm", warm, chain[d], warm_cost),
                ("scratch", scratch_run, scored_by_scratch[d], scratch_cost),
            ):
                scores = _score(run, data, work / "scores" / f"seed{seed}" / f"{name}_{d:02d}")
                day[name].append({**scores, **cost, "seed": seed})
    return {
        "days": {str(d): lines for d, lines in sorted(per_day.items())},
        "first_days": first,
        "warm_val_loss": val_loss,
        "warm_chosen": chosen,
    }


def _split_rows(data: Path, split: Optional[str] = None) -> int:
    """Rows of a preparation (all of them, or one split's), from its schema.json."""
    from engagerec.data.schema import DatasetSchema

    splits = DatasetSchema.load(data).meta["summary"]["split"]
    return sum(splits[name]["rows"] for name in ([split] if split else ["train", "val", "test"]))


def _summary(values: List[Dict[str, float]], key: str) -> Dict[str, float]:
    return mean_ci([v[key] for v in values])


def render(data: Dict[str, Any], _: Dict[str, Dict[str, Any]], figures: Path) -> str:
    """The per-day table, the headline (warm against scratch and frozen on the last days) and
    the plot."""
    days = {int(d): lines for d, lines in data["days"].items()}
    header = (
        "| day | new videos | new users | "
        + " | ".join(f"MSE {name}" for name, _ in LINES)
        + " | "
        + " | ".join(f"AUC {name}" for name, _ in LINES)
        + " | samples warm / scratch |"
    )
    lines = [header, "|" + "---|" * (3 + 2 * len(LINES) + 1)]
    for d, day in days.items():
        warm = _summary(day["warm"], "samples")["mean"]
        scratch = _summary(day["scratch"], "samples")["mean"]
        lines.append(
            f"| {d} | {_summary(day['scratch'], 'unseen')['mean']:.1%} | "
            f"{_summary(day['scratch'], 'unseen_users')['mean']:.1%} | "
            + " | ".join(cell(_summary(day[name], "mse")) for name, _ in LINES)
            + " | "
            + " | ".join(cell(_summary(day[name], "auc")) for name, _ in LINES)
            + f" | {warm:,.0f} / {scratch:,.0f} |"
        )
    last = max(days)
    retrained = [d for d in days if d > data["first_days"] + 1]  # the days whose lines differ
    paragraphs = [
        _versus(days, [last], f"On day {last}"),
        _versus(days, retrained, f"Over days {retrained[0]}..{last}, each seed's mean over the days")
        if retrained
        else "",
    ]
    n = len(days[last]["warm"])
    plot_by_day(days, LINES, figures / "replay.png")
    choice = ", ".join(f"{name} {loss:.4f}" for name, loss in data["warm_val_loss"].items())
    paragraphs.insert(
        0,
        "The warm line's retraining settings were chosen before the replay, on rows it never "
        f"scores: a model of days 1..{data['first_days'] - 2} warm-started on each of days "
        f"{data['first_days'] - 1} and {data['first_days']} with each candidate, mean validation loss "
        f"{choice} (`first`: the first model's learning rates and early stopping, `lr_third`: a third "
        f"of both learning rates, `one_epoch`: one epoch); chosen: **{data['warm_chosen']}**.",
    )
    return "\n".join(
        [
            f"The first model trains on days 1..{data['first_days']}; each later day is scored by the "
            "three lines below (module docstring of `engagerec_study.sections.replay`). "
            f'Mean ± 95% CI over {n} seeds; "new videos" ("new users"): the share of the day\'s rows '
            "whose video (user) the from-scratch model never trained on (its out-of-vocabulary row); "
            "samples: what the "
            "newest model of the line trained on (one retraining).",
            "",
            *lines,
            "",
            *(f"{text}\n" for text in paragraphs if text),
            "![quality against day](figures/replay.png)",
        ]
    )


def _versus(days: Dict[int, Dict[str, List[Dict[str, float]]]], chosen: List[int], what: str) -> str:
    """Warm against scratch and frozen over the ``chosen`` days, paired by seed (each seed's mean
    over the days, then mean ± 95% CI over seeds), and the samples each line trained on."""

    def per_seed(line: str, metric: str) -> np.ndarray:
        return np.mean([[r[metric] for r in days[d][line]] for d in chosen], axis=0)

    gap = {m: mean_ci(per_seed("warm", m) - per_seed("scratch", m)) for m in ("mse", "auc")}
    ahead = {m: mean_ci(per_seed("frozen", m) - per_seed("warm", m)) for m in ("mse", "auc")}
    ratio = per_seed("scratch", "samples").mean() / max(per_seed("warm", "samples").mean(), 1)
    return (
        f"{what}, warm minus scratch: MSE {cell(gap['mse'])}, AUC {cell(gap['auc'])} (goal: within "
        f"+0.002 MSE and -0.003 AUC) for {ratio:.1f}x fewer training samples (goal: 5x); frozen minus "
        f"warm: MSE {cell(ahead['mse'])} (positive: warm is ahead), AUC {cell(ahead['auc'])} "
        "(negative: warm is ahead)."
    )


def plot_by_day(days: Dict[int, Dict[str, List[Dict[str, float]]]], lines, path: Path) -> None:
    """Watch-ratio MSE and skip AUC against the day scored, one curve per line (mean and its
    95% CI over seeds).

    Args:
        days: day -> line -> one result per seed (``mse``, ``auc``).
        lines: (line, its label) pairs, in legend order.
        path (Path): the PNG to write.
    """
    x = sorted(days)
    with saved_figure(path, (10, 3.6), ncols=2) as (_, axes):
        for axis, metric, title in (
            (axes[0], "mse", "watch-ratio MSE (lower is better)"),
            (axes[1], "auc", "skip AUC"),
        ):
            for name, text in lines:
                stats = [_summary(days[d][name], metric) for d in x]
                mean = np.array([s["mean"] for s in stats])
                ci = np.array([s["ci95"] for s in stats])
                axis.plot(x, mean, marker="o", label=text)
                axis.fill_between(x, mean - ci, mean + ci, alpha=0.2)
            axis.set_xlabel("day scored")
            axis.set_title(title)
        axes[0].legend(fontsize=8)


def section(
    base: str = BASE, overrides: Optional[List[str]] = None, first_days: int = FIRST_DAYS,
    last_day: Optional[int] = None,
) -> Section:  # fmt: skip
    """The replay as a Section.

    Args:
        base: a KuaiRand config (its log read by ``day_files``; labels watch_ratio, then skip).
        overrides: ``key=value`` changes to it (after ``OVERRIDES``).
        first_days: the first model's days (at least 3: the warm line's settings are chosen on
            the last two of them, from a model of the others).
        last_day: the last day scored (default: the log's last).

    Raises:
        ConfigError: ``first_days`` below 3.
    """
    if first_days < 3:
        raise ConfigError(f"the replay's first model needs at least 3 days, got {first_days}")
    config = [base, *OVERRIDES, *(overrides or [])]

    def spec(seeds: List[int]) -> Dict[str, Any]:
        train = load_config(config[0], config[1:]).train
        lower = [f"train.dense_lr={train.dense_lr / 3!r}", f"train.sparse_lr={train.sparse_lr / 3!r}"]
        candidates = {"first": [], "lr_third": lower, "one_epoch": ["train.epochs=1"]}
        return {"config": config_spec(load_config(config[0], config[1:])), "config_args": config,
                "first_days": first_days, "last_day": last_day, "seeds": list(seeds),
                "warm_candidates": candidates}  # fmt: skip

    return Section(
        "replay", "Retraining day by day: frozen, warm start, from scratch", spec, _compute, render, version=4
    )


SECTION = section()
