"""What each choice in a config (``--config``, default configs/kuairand_random.yaml) is worth,
on the VALIDATION split only.

Each variant changes the shipped config in one way (drops the id statistics or part of
them, reverts the embedding width or the batch size, switches target attention over the
history on or off, drops the id embeddings, switches the id statistics' scheme), is
prepared into its own directory when its features differ (a variant that changes nothing
in the config is skipped), and trained with ``engagerec train`` for each seed; the table
gives each variant's validation watch-ratio MSE and skip AUC at its best epoch, mean ± 95%
interval over seeds. The test metrics each run computes (train() evaluates its best
checkpoint) are left unread: validation is how the config was chosen.

    .venv/bin/python benchmarks/validation_ablation.py --seeds 0,1,2 --out runs/validation_ablation
    .venv/bin/python benchmarks/validation_ablation.py --config configs/kuairand_temporal_stats.yaml \
        --only "one hour late" --out runs/validation_ablation_lag   # one variant beside the config

It prints the markdown table and writes it, with the machine and the command, to
``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from engagerec.config import ExperimentConfig, ModelConfig, TargetAttentionConfig, TaskConfig, load_config
from engagerec.data.prepare import prepare
from engagerec.data.target_stats import STAT_KINDS
from engagerec.runs import seed_run_dir
from engagerec.train import train
from engagerec_study.report import ci95

Change = Callable[[ExperimentConfig], ExperimentConfig]


def _features(keep: Callable) -> Change:
    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        features = [f for f in cfg.data.features if keep(f)]
        kept = {f.name for f in features}  # a dropped feature's own table goes with it
        model = _own_tables(cfg.model, lambda name: name in kept)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features), model=model)

    return change


def _own_tables(model: ModelConfig, keep: Callable[[str], bool]) -> ModelConfig:
    """``model`` with only the entries of ``model.embeddings.own_table`` that ``keep`` holds for."""
    own = [name for name in model.embeddings.own_table if keep(name)]
    return dataclasses.replace(model, embeddings=dataclasses.replace(model.embeddings, own_table=own))


def _train(**changes) -> Change:
    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))

    return change


def _dim(dim: int) -> Change:
    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        embeddings = dataclasses.replace(cfg.model.embeddings, dim=dim)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embeddings=embeddings))

    return change


def _toggle_attention(cfg: ExperimentConfig) -> ExperimentConfig:
    """Target attention (DIN) over the history switched on (positional history) or off."""
    if not any(f.kind == "history" for f in cfg.data.features):
        return cfg  # no history to attend over
    on = cfg.model.target_attention is None
    features = [dataclasses.replace(f, positions=on) if f.kind == "history" else f for f in cfg.data.features]
    model = dataclasses.replace(cfg.model, target_attention=TargetAttentionConfig() if on else None)
    if on:  # the positions and the candidate share one table: no history table of its own
        histories = {f.name for f in features if f.kind == "history"}
        model = _own_tables(model, lambda name: name not in histories)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features), model=model)


def _set(where: Callable, **changes) -> Change:
    """Every feature ``where`` holds for gets ``changes`` (its other fields as they are)."""

    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        features = [dataclasses.replace(f, **changes) if where(f) else f for f in cfg.data.features]
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features))

    return change


def _toggle_live_counters(cfg: ExperimentConfig) -> ExperimentConfig:
    """The id statistics as live counters (scheme: online, every split's earlier rows), or,
    where the config has them, over training rows only (scheme: ordered)."""
    online = any(f.kind in STAT_KINDS and f.scheme == "online" for f in cfg.data.features)
    return _set(lambda f: f.kind in STAT_KINDS, scheme="ordered" if online else "online")(cfg)


def _lag(lag: float) -> Change:
    """Live counters (scheme: online) that see only views at least ``lag`` timestamp units old."""
    return _set(lambda f: f.kind in STAT_KINDS and f.scheme == "online", lag=lag)


def _folds(folds: int) -> Change:
    """Cross-fitted statistics over ``folds`` folds: a training row's statistics then come from
    a larger share of the training rows, nearer the held-out rows' (all of them)."""
    return _set(lambda f: f.kind in STAT_KINDS and f.scheme == "cross_fit", folds=folds)


def _weighting(scheme: str) -> Change:
    """The task losses combined by ``scheme`` (model.loss.weighting) instead of fixed weights."""

    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        loss = dataclasses.replace(cfg.model.loss, weighting=scheme)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss=loss))

    return change


def _regression_loss(loss: str) -> Change:
    """The config's regression tasks (``model.tasks``) trained with ``loss`` instead."""

    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        tasks = [dataclasses.replace(t, loss=loss) if t.kind == "regression" else t for t in cfg.model.tasks]
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tasks=tasks))

    return change


def _auxiliary_tasks(labels: Sequence[str], weight: float) -> Change:
    """The config's binary ``labels`` also trained as tasks of loss weight ``weight`` beside
    its own (``model.tasks``): auxiliary tasks that shape the shared experts."""

    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        declared = {label.name for label in cfg.data.labels}
        extra = [TaskConfig(name=n, label=n, kind="binary", weight=weight) for n in labels if n in declared]
        if not extra or not cfg.model.tasks:
            return cfg
        return dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, tasks=[*cfg.model.tasks, *extra])
        )

    return change


STUDY_LABELS = ("watch_ratio", "skip")  # the tasks; statistics of the other labels are extra inputs
AUXILIARY = ("long_view", "click", "like")  # the log's outcomes nearest the watch ratio
SHORT_HISTORY = 5  # history_mean windows this short or shorter: the user's last few views

ID_EMBEDDINGS = ("user_id", "content_id", "history", "author_id")  # kuairand_random's id features
VIDEO_EMBEDDINGS = ("content_id", "history")  # the video table's features


def _min_count(names, count: int) -> Change:
    """Ids of these features seen in fewer than ``count`` training rows go to the OOV row."""
    return _set(lambda f: f.name in names, min_count=count)


VARIANTS: List[Tuple[str, Change]] = [
    ("shipped config", lambda cfg: cfg),
    ("without id statistics", _features(lambda f: f.kind not in STAT_KINDS)),
    ("id counts only (no target means)", _features(lambda f: f.kind != "target_mean")),
    ("target means only (no id counts)", _features(lambda f: f.kind != "id_count")),
    ("embedding width 16 (was 8)", _dim(16)),
    ("batch 1024 (was 256)", _train(batch_size=1024)),
    ("target attention (DIN) switched on, or off where the config has it", _toggle_attention),
    ("dense lr 0.003 (was 0.001)", _train(dense_lr=0.003)),
    ("without the video embeddings and the id history", _features(lambda f: f.name not in VIDEO_EMBEDDINGS)),
    ("video ids with fewer than 20 training views to the OOV row", _min_count(VIDEO_EMBEDDINGS, 20)),
    (
        "without id embeddings (user, video, author, history)",
        _features(lambda f: f.name not in ID_EMBEDDINGS),
    ),
    (
        "without id embeddings, dense lr 0.003 (the *_stats configs)",
        lambda cfg: _train(dense_lr=0.003)(_features(lambda f: f.name not in ID_EMBEDDINGS)(cfg)),
    ),
    (
        "without the id statistics of the other outcomes (like, click, long view, ...)",
        _features(lambda f: not (f.kind == "target_mean" and f.of not in STUDY_LABELS)),
    ),
    (
        "without the last and last-five watch ratios",
        _features(lambda f: not (f.kind == "history_mean" and f.length <= SHORT_HISTORY)),
    ),
    (
        "id statistics as live counters (scheme: online), or over training rows only (ordered)",
        _toggle_live_counters,
    ),
    (
        "live counters without delay (lag 0: a view still playing counts; configs with scheme: online)",
        _lag(0.0),
    ),
    ("live counters five minutes late (lag: 300,000 ms; configs with scheme: online)", _lag(300_000.0)),
    ("live counters one hour late (lag: 3,600,000 ms; configs with scheme: online)", _lag(3_600_000.0)),
    ("id statistics cross-fitted over 10 folds (was 5)", _folds(10)),
    ("task losses weighted by uncertainty (Kendall et al. 2018)", _weighting("uncertainty")),
    ("task losses balanced by GradNorm (Chen et al. 2018)", _weighting("gradnorm")),
    ("watch ratio trained with cross-entropy on the ratio (was MSE)", _regression_loss("cross_entropy")),
    (
        "every computed input (id statistics, recent means) also as 16 quantile buckets, embedded",
        _set(lambda f: f.kind in (*STAT_KINDS, "history_mean") and not f.buckets, buckets=16),
    ),
    ("long view, click and like as auxiliary tasks, weight 0.1", _auxiliary_tasks(AUXILIARY, 0.1)),
    ("long view, click and like as auxiliary tasks, weight 0.5", _auxiliary_tasks(AUXILIARY, 0.5)),
]


def main(argv=None) -> int:
    """Run every variant for every seed; print and write the validation table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/kuairand_random.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/validation_ablation")
    parser.add_argument(
        "--only",
        default="",
        help="run only the variants whose name contains this text (and the shipped config)",
    )
    args = parser.parse_args(argv)
    base = load_config(args.config)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    rows, prepared = [], {}
    started = time.perf_counter()
    for name, change in VARIANTS:
        cfg = change(base)
        if rows and args.only not in name:
            continue
        if rows and cfg == base:
            print(f"skipped (changes nothing in {args.config}): {name}", file=sys.stderr)
            continue
        data_key = repr(cfg.data)  # variants with the shipped data config share its prepared data
        if data_key not in prepared:
            data_dir = out / f"data{len(prepared)}"
            with open(out / "prepare.out", "a") as sink, redirect_stdout(sink):
                prepare(cfg.data, data_dir)
            prepared[data_key] = str(data_dir)
        values: Dict[str, List[float]] = {"watch_ratio/mse": [], "skip/auc": []}
        for seed in seeds:
            run_cfg = _train(seed=seed, data_dir=prepared[data_key], progress_bar=False)(cfg)
            run_dir = seed_run_dir(out, f"variant{len(rows)}", seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "train.out", "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
                results = train(run_cfg, run_dir, resume=False)
            for key in values:
                values[key].append(results["val"][key])
        cells = [f"{np.mean(v):.4f} ± {ci95(np.array(v)):.4f}" for v in values.values()]
        rows.append(f"| {name} | {' | '.join(cells)} | {len(seeds)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    header = f"| variant ({args.config}, mmoe) | val watch_ratio MSE | val skip AUC | seeds |"
    table = "\n".join([header, "|---|---:|---:|---:|"] + rows)
    command = (
        f".venv/bin/python benchmarks/validation_ablation.py --config {args.config} "
        f"--seeds {args.seeds} --out {args.out}" + (f" --only {shlex.quote(args.only)}" if args.only else "")
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import machine_block

    text = f"{machine_block(command)}\n- seconds: {time.perf_counter() - started:.0f}\n\n{table}\n"
    (out / "ablation.md").write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
