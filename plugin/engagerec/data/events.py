"""Tables -> events: validate, join, derive labels, filter. Every dropped row is counted by reason."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from engagerec.config import DataConfig, FeatureConfig, LabelConfig
from engagerec.data.errors import DataError
from engagerec.data.raw import (
    CONTENT_ID,
    DURATION,
    KEY_COLUMNS,
    SOURCE_ROW,
    TIMESTAMP,
    USER_ID,
    WATCH_TIME,
    RawTables,
)
from engagerec.data.tables import as_numeric, check_ids

WATCH_RATIO = "watch_ratio"
SKIP = "skip"
OVER_CAP_POLICIES = ("clip", "drop", "keep")
UNJOINED_POLICIES = ("error", "keep", "drop")


@dataclass
class FilterReport:
    """Rows in, rows dropped per reason (in the order the filters ran), rows out."""

    rows_read: int = 0
    dropped: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    notes: Dict[str, int] = field(default_factory=dict)  # counted but not dropped (e.g. clipped ratios)

    def drop(self, frame: pd.DataFrame, mask: np.ndarray, reason: str) -> pd.DataFrame:
        count = int(mask.sum())
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        return frame[~mask] if count else frame

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())


def _timestamps(frame: pd.DataFrame) -> pd.Series:
    """Numbers stay as they are (e.g. ms since epoch); date strings become ms since epoch."""
    series = frame[TIMESTAMP]
    if pd.api.types.is_numeric_dtype(series):
        return as_numeric(frame, TIMESTAMP, allow_nan=False)
    parsed = pd.to_datetime(series, errors="coerce", utc=True)
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            "timestamp cannot be parsed",
            file=frame.attrs.get("source_file"),
            column=TIMESTAMP,
            row=row,
            expected="a number or a date-time string",
            got=series.iloc[row],
        )
    return pd.Series(
        parsed.astype("int64").to_numpy() // 1_000_000, index=frame.index, name=TIMESTAMP
    ).astype(np.float64)


def _check_feature_columns(table: Optional[pd.DataFrame], features: List[FeatureConfig]) -> None:
    """Numeric feature columns are checked in their own table, so errors name that file and row."""
    if table is None:
        return
    for feature in features:
        column = feature.column or feature.name
        # key columns (duration) have their own rule: a missing value drops the row, counted
        if feature.kind == "numeric" and column in table.columns and column not in KEY_COLUMNS:
            as_numeric(table, column, allow_nan=feature.missing != "error")


def _join(
    events: pd.DataFrame,
    table: Optional[pd.DataFrame],
    key: str,
    policy: str,
    report: FilterReport,
    interactions_file: Optional[str],
) -> pd.DataFrame:
    if table is None:
        return events
    if policy not in UNJOINED_POLICIES:
        raise DataError(f"unknown unjoined policy '{policy}'", expected=f"one of {UNJOINED_POLICIES}")
    check_ids(table, key, unique=True)
    known = events[key].isin(table[key]).to_numpy()
    if not known.all():
        if policy == "error":
            row = int(np.flatnonzero(~known)[0])
            raise DataError(
                f"{key} does not join the table {table.attrs.get('source_file')}",
                file=interactions_file,
                column=key,
                row=int(events[SOURCE_ROW].iloc[row]),
                expected=f"an id present in that table (or set unjoined_{key.split('_')[0]}s: keep|drop)",
                got=events[key].iloc[row],
            )
        if policy == "drop":
            events = report.drop(events, ~known, f"{key} not in its table")
        else:
            report.notes[f"{key} not in its table (kept, features missing)"] = int((~known).sum())
    overlap = [c for c in table.columns if c in events.columns and c != key]
    table = table.rename(columns={c: f"{key.split('_')[0]}_{c}" for c in overlap})
    return events.merge(table, on=key, how="left", sort=False, validate="many_to_one")


def add_labels(events: pd.DataFrame, labels: LabelConfig, report: FilterReport) -> pd.DataFrame:
    """watch_ratio = watch_time / duration, with the replay policy; skip = ratio < threshold."""
    if labels.over_cap not in OVER_CAP_POLICIES:
        raise DataError(
            f"unknown labels.over_cap '{labels.over_cap}'", expected=f"one of {OVER_CAP_POLICIES}"
        )
    ratio = (events[WATCH_TIME] / events[DURATION]).to_numpy()
    above = ratio > labels.ratio_cap
    if labels.over_cap == "drop":
        events = report.drop(events, above, f"watch ratio above {labels.ratio_cap:g}")
        ratio = ratio[~above]
    else:
        report.notes[f"watch ratio above {labels.ratio_cap:g} ({labels.over_cap})"] = int(above.sum())
        if labels.over_cap == "clip":
            ratio = np.minimum(ratio, labels.ratio_cap)
    events = events.assign(
        **{WATCH_RATIO: ratio.astype(np.float64), SKIP: (ratio < labels.skip_threshold).astype(np.float64)}
    )
    return events


def build_events(raw: RawTables, cfg: DataConfig) -> "tuple[pd.DataFrame, FilterReport]":
    """Join the three tables, derive labels and apply the filters; returns (events, report)."""
    interactions = raw.interactions
    file = interactions.attrs.get("source_file")
    report = FilterReport(rows_read=len(interactions))
    for column in (USER_ID, CONTENT_ID):
        check_ids(interactions, column, unique=False)
    events = pd.DataFrame({SOURCE_ROW: np.arange(len(interactions))}, index=interactions.index)
    for column in interactions.columns:
        events[column] = interactions[column]
    events.attrs["source_file"] = file
    events[WATCH_TIME] = as_numeric(interactions, WATCH_TIME, allow_nan=True)
    if DURATION in interactions.columns:
        events[DURATION] = as_numeric(interactions, DURATION, allow_nan=True)
    if TIMESTAMP in interactions.columns:
        events[TIMESTAMP] = _timestamps(interactions)
    _check_feature_columns(raw.users, cfg.features)
    _check_feature_columns(raw.content, cfg.features)

    content = raw.content
    if content is not None and DURATION in content.columns:
        if DURATION in events.columns:  # the log's own duration wins; the table's is kept as a feature
            content = content.rename(columns={DURATION: "content_duration"})
        else:
            content = content.copy()
            content[DURATION] = as_numeric(raw.content, DURATION, allow_nan=True)
        content.attrs = dict(raw.content.attrs)
    events = _join(events, raw.users, USER_ID, cfg.source.unjoined_users, report, file)
    events = _join(events, content, CONTENT_ID, cfg.source.unjoined_content, report, file)
    events.attrs["source_file"] = file
    if DURATION not in events.columns:
        raise DataError(
            "no duration: neither the interactions nor the content table has a duration column",
            file=file,
            expected="a 'duration' column (map it with data.source.columns)",
        )

    duration = events[DURATION].to_numpy()
    events = report.drop(events, np.isnan(duration), "missing duration")
    events = report.drop(events, events[DURATION].to_numpy() <= 0, "zero or negative duration")
    events = report.drop(events, events[WATCH_TIME].isna().to_numpy(), "missing watch time")
    events = report.drop(events, events[WATCH_TIME].to_numpy() < 0, "negative watch time")
    zero = events[WATCH_TIME].to_numpy() == 0
    if cfg.filters.drop_zero_watch_time:
        events = report.drop(events, zero, "zero watch time")
    else:
        report.notes["zero watch time (kept: ratio 0, a skip)"] = int(zero.sum())
    events = add_labels(events, cfg.labels, report)

    views = events.groupby(USER_ID, sort=False)[USER_ID].transform("size").to_numpy()
    few = views <= cfg.filters.min_user_views
    report.notes[f"users with <= {cfg.filters.min_user_views} views (dropped)"] = int(
        events.loc[few, USER_ID].nunique()
    )
    events = report.drop(events, few, f"user has <= {cfg.filters.min_user_views} views")
    if len(events) == 0:
        summary = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.items())
        raise DataError(
            f"no rows left after filtering ({report.rows_read} read; dropped {summary})",
            file=file,
            expected="at least one usable row (check the filters and the duration / watch time columns)",
        )
    events = events.reset_index(drop=True)
    events.attrs["source_file"] = file
    return events, report
