"""Adapters: each turns one source layout into RawTables with canonical column names.

tables     generic files + ``source.columns`` mapping (canonical -> file column)
study      the study's schema: users(age, gender), content(genres, rating, duration)
kuairand   KuaiRand's official layout, and the bundled tab-separated subset
synthetic  generated in the study's schema (engagerec.data.synthetic)
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, Dict, List

import pandas as pd

from engagerec.config import SourceConfig
from engagerec.data.errors import DataError
from engagerec.data.raw import CONTENT_ID, DURATION, TIMESTAMP, USER_ID, WATCH_TIME, RawTables
from engagerec.data.tables import read_table

AdapterFn = Callable[[SourceConfig], RawTables]
ADAPTERS: Dict[str, AdapterFn] = {}


def register_adapter(name: str) -> Callable[[AdapterFn], AdapterFn]:
    def wrap(fn: AdapterFn) -> AdapterFn:
        ADAPTERS[name] = fn
        return fn

    return wrap


def load_tables(source: SourceConfig) -> RawTables:
    if source.adapter not in ADAPTERS:
        raise DataError(f"unknown data adapter '{source.adapter}'", expected=f"one of {sorted(ADAPTERS)}")
    return ADAPTERS[source.adapter](source)


def _need(source: SourceConfig, attribute: str) -> str:
    value = getattr(source, attribute)
    if not value:
        raise DataError(f"data.source.{attribute} is not set", expected=f"a path for the {attribute} table")
    return value


def _mapping(source: SourceConfig, names) -> Dict[str, str]:
    return {name: source.columns.get(name, name) for name in names}


@register_adapter("tables")
def tables_adapter(source: SourceConfig) -> RawTables:
    """Generic: any three files; ``columns`` maps canonical names to the files' names."""
    rename = _mapping(source, (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP))
    interactions = read_table(
        _need(source, "interactions"), required=(USER_ID, CONTENT_ID, WATCH_TIME), rename=rename
    )
    users = read_table(source.users, required=(USER_ID,), rename=rename) if source.users else None
    content = read_table(source.content, required=(CONTENT_ID,), rename=rename) if source.content else None
    return RawTables(interactions, users, content)


@register_adapter("study")
def study_adapter(source: SourceConfig) -> RawTables:
    """The study's three sources: watch histories, user attributes, content metadata."""
    rename = _mapping(
        source, (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP, "age", "gender", "genres", "rating")
    )
    interactions = read_table(
        _need(source, "interactions"), required=(USER_ID, CONTENT_ID, WATCH_TIME), rename=rename
    )
    users = read_table(_need(source, "users"), required=(USER_ID, "age", "gender"), rename=rename)
    content = read_table(
        _need(source, "content"), required=(CONTENT_ID, "genres", "rating", DURATION), rename=rename
    )
    return RawTables(interactions, users, content)


# ------------------------------------------------------------------ KuaiRand

# Observed during or after the view (see datasets/README.md): labels or leaks.
KUAIRAND_POST_EXPOSURE = frozenset(
    {
        "is_click",
        "is_like",
        "is_follow",
        "is_comment",
        "is_forward",
        "is_hate",
        "long_view",
        "play_time_ms",
        "comment_stay_time",
        "profile_stay_time",
        "is_profile_enter",
        "label",
    }
)
# Pre-exposure context columns of the log that may be kept as features.
KUAIRAND_LOG_CONTEXT = ("tab", "date")
KUAIRAND_MISSING = -124  # the dataset's own missing-value marker


def _log_files(spec: str) -> List[Path]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("log_*.csv"))
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec))]
    else:
        files = [path]
    if not files:
        raise DataError("no KuaiRand log files found", file=spec, expected="log_*.csv files")
    return files


@register_adapter("kuairand")
def kuairand_adapter(source: SourceConfig) -> RawTables:
    """KuaiRand (Gao et al., CIKM 2022): log_*.csv, user_features_*.csv, video_features_basic_*.csv.

    ``interactions`` may be one log file, a directory of log_*.csv, or a glob. Post-exposure
    columns are dropped here so that they cannot reach the features.
    """
    log_rename = {
        USER_ID: "user_id",
        CONTENT_ID: "video_id",
        WATCH_TIME: "play_time_ms",
        DURATION: "duration_ms",
        TIMESTAMP: "time_ms",
    }
    frames = []
    for file in _log_files(_need(source, "interactions")):
        frame = read_table(file, required=(USER_ID, CONTENT_ID, WATCH_TIME), rename=log_rename)
        keep = [
            c
            for c in (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP, "hourmin", *KUAIRAND_LOG_CONTEXT)
            if c in frame.columns
        ]
        frames.append(frame[keep])
    interactions = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    interactions.attrs["source_file"] = (
        frames[0].attrs["source_file"] if len(frames) == 1 else _need(source, "interactions")
    )
    if "hourmin" in interactions.columns:  # e.g. 1730 -> hour 17
        interactions["hour"] = pd.to_numeric(interactions.pop("hourmin"), errors="coerce") // 100
    users = None
    if source.users:
        users = read_table(source.users, required=(USER_ID,), rename={USER_ID: "user_id"})
        users = users.mask(users.isin([KUAIRAND_MISSING]))
        users.attrs["source_file"] = str(source.users)
    content = None
    if source.content:
        content = read_table(
            source.content,
            required=(CONTENT_ID,),
            rename={CONTENT_ID: "video_id", "genres": "tag", "content_duration": "video_duration"},
        )
        if DURATION not in interactions.columns:
            content[DURATION] = content["content_duration"]
    return RawTables(
        interactions,
        users,
        content,
        post_exposure=KUAIRAND_POST_EXPOSURE,
        notes={
            "leak_guard": "post-exposure log columns dropped: " + ", ".join(sorted(KUAIRAND_POST_EXPOSURE))
        },
    )


@register_adapter("synthetic")
def synthetic_adapter(source: SourceConfig) -> RawTables:
    from engagerec.data.synthetic import study_tables

    return study_tables(source.synthetic)
