"""prepare(): tables -> events -> labels -> split -> schema (train only) -> parquet shards.

Output directory layout::

    schema.json          vocabularies, buckets, normalisation, labels, the report below
    train/part-*.parquet rows shuffled (seeded) so that streaming reads are mixed
    val/part-*.parquet
    test/part-*.parquet
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd

from engagerec.config import DataConfig
from engagerec.data.adapters import load_tables
from engagerec.data.events import SKIP, WATCH_RATIO, FilterReport, build_events
from engagerec.data.history import previous_ids, previous_label_mean
from engagerec.data.raw import CONTENT_ID, USER_ID
from engagerec.data.schema import DatasetSchema, LabelSpec, history_column
from engagerec.data.shards import write_split
from engagerec.data.split import split_indices

SPLITS = ("train", "val", "test")
STUDY_LABELS = [LabelSpec(WATCH_RATIO, "regression"), LabelSpec(SKIP, "binary")]


def _label_stats(frame: pd.DataFrame) -> Dict[str, float]:
    if len(frame) == 0:
        return {"rows": 0}
    return {
        "rows": int(len(frame)),
        "users": int(frame[USER_ID].nunique()),
        "items": int(frame[CONTENT_ID].nunique()),
        "mean_watch_ratio": float(frame[WATCH_RATIO].mean()),
        "var_watch_ratio": float(frame[WATCH_RATIO].var(ddof=0)),
        "skip_rate": float(frame[SKIP].mean()),
    }


def prepare(cfg: DataConfig, out_dir: str | Path, *, overwrite: bool = True) -> Dict[str, Any]:
    """Build a prepared dataset in ``out_dir``; returns the summary also stored in schema.json."""
    out_dir = Path(out_dir)
    raw = load_tables(cfg.source)
    events, report = build_events(raw, cfg)
    for feature in cfg.features:
        if feature.kind == "history":
            events[history_column(feature)] = previous_ids(events, feature.of, feature.length)
        elif feature.kind == "history_mean":
            events[feature.name] = previous_label_mean(events, feature.of, feature.length)
    splits = split_indices(events, cfg.split)
    train = events.iloc[splits["train"]]
    schema = DatasetSchema.fit(train, cfg.features, STUDY_LABELS, raw.post_exposure)

    if out_dir.exists() and overwrite:
        for name in SPLITS:
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    shuffle = np.random.default_rng(cfg.split.seed + 1)
    files: Dict[str, Any] = {}
    for name in SPLITS:
        rows = splits[name]
        if name == "train":  # mixed order on disk, so a streaming reader need not shuffle far
            rows = rows[shuffle.permutation(len(rows))]
        encoded = schema.encode(events.iloc[rows])
        writer = write_split([encoded], out_dir / name, cfg.rows_per_file, cfg.row_group_size, encoded.schema)
        files[name] = {"rows": writer.rows, "files": writer.files}

    summary = _summary(cfg, report, events, splits, schema, raw.notes)
    schema.meta = {"summary": summary, "splits": files, "config": asdict(cfg)}
    schema.save(out_dir)
    return summary


def _summary(
    cfg: DataConfig,
    report: FilterReport,
    events: pd.DataFrame,
    splits: Dict[str, np.ndarray],
    schema: DatasetSchema,
    notes: Dict[str, str],
) -> Dict[str, Any]:
    return {
        "adapter": cfg.source.adapter,
        "rows_read": report.rows_read,
        "dropped": dict(report.dropped),
        "rows_dropped": report.rows_dropped,
        "counted_not_dropped": dict(report.notes),
        "rows_kept": int(len(events)),
        "labels": {
            "ratio_cap": cfg.labels.ratio_cap,
            "over_cap": cfg.labels.over_cap,
            "skip_threshold": cfg.labels.skip_threshold,
        },
        "all": _label_stats(events),
        "split": {
            "kind": cfg.split.kind,
            "seed": cfg.split.seed,
            **{name: _label_stats(events.iloc[idx]) for name, idx in splits.items()},
        },
        "baselines_on_test": _baselines(events.iloc[splits["train"]], events.iloc[splits["test"]]),
        "sparse_features": {f.name: schema.num_embeddings(f.id_space) for f in schema.sparse},
        "dense_features": schema.dense_names,
        "notes": notes,
    }


def _baselines(train: pd.DataFrame, test: pd.DataFrame) -> Dict[str, float]:
    """Constant predictors fitted on train: the floor every model must beat."""
    if len(test) == 0:
        return {}
    mean = float(train[WATCH_RATIO].mean())
    majority = float(train[SKIP].mean() >= 0.5)
    return {
        "watch_ratio_mse_train_mean": float(((test[WATCH_RATIO] - mean) ** 2).mean()),
        "skip_accuracy_majority": float((test[SKIP] == majority).mean()),
    }


def format_summary(summary: Dict[str, Any], out_dir: Optional[str | Path] = None) -> str:
    """The human-readable prepare summary printed by `engagerec prepare`."""
    lines = [f"engagerec prepare ({summary['adapter']})" + (f" -> {out_dir}" if out_dir else "")]
    lines.append(f"  rows read            {summary['rows_read']:>10,}")
    for reason, count in summary["dropped"].items():
        lines.append(f"  dropped: {reason:<30} {count:>8,}")
    lines.append(f"  rows kept            {summary['rows_kept']:>10,}")
    for note, count in summary["counted_not_dropped"].items():
        lines.append(f"  counted: {note:<30} {count:>8,}")
    everything = summary["all"]
    lines.append(
        f"  users {everything['users']:,}   items {everything['items']:,}   "
        f"mean watch ratio {everything['mean_watch_ratio']:.4f}   "
        f"skip rate {everything['skip_rate']:.4f} (threshold {summary['labels']['skip_threshold']:g})"
    )
    split = summary["split"]
    sizes = "   ".join(f"{name} {split[name]['rows']:,}" for name in SPLITS)
    lines.append(f"  split {split['kind']} (seed {split['seed']}): {sizes}")
    baselines = summary["baselines_on_test"]
    if baselines:
        lines.append(
            f"  constant baselines on test: watch-ratio MSE (train mean) "
            f"{baselines['watch_ratio_mse_train_mean']:.4f}, skip accuracy (majority) "
            f"{baselines['skip_accuracy_majority']:.4f}"
        )
    tables = ", ".join(f"{name}[{rows:,}]" for name, rows in summary["sparse_features"].items())
    lines.append(f"  sparse features (table rows incl. OOV): {tables}")
    lines.append(f"  dense features: {', '.join(summary['dense_features']) or '-'}")
    return "\n".join(lines)
