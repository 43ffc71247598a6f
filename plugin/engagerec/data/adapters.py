"""Adapters: each says where one source layout's tables are and how their columns map to
canonical names (a RawTables of TableSources). The dataset writer reads the files.

  tables     generic files + ``source.columns`` mapping (canonical -> file column)
  study      the study's schema: users(age, gender), content(genres, rating, duration)
  kuairand   KuaiRand's official layout, and the bundled tab-separated subset
  synthetic  generated data (engagerec.data.synthetic), written to files first
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Callable, Dict, List, Optional

from engagerec.config import SourceConfig
from engagerec.data.errors import DataError
from engagerec.data.raw import CONTENT_ID, DURATION, TIMESTAMP, USER_ID, WATCH_TIME, RawTables, TableSource
from engagerec.data.synthetic import synthetic_tables

AdapterFn = Callable[[SourceConfig, Path], RawTables]
ADAPTERS: Dict[str, AdapterFn] = {}
LOG_KEYS = (USER_ID, CONTENT_ID, WATCH_TIME)


def register_adapter(name: str) -> Callable[[AdapterFn], AdapterFn]:
    """Register ``fn(source: SourceConfig, workdir: Path) -> RawTables`` as ``data.source.adapter: name``.

    ``workdir`` is a scratch directory the adapter may write to (generated data goes there).

    Example::

        @register_adapter("my_logs")
        def my_logs(source, workdir):
            return RawTables(TableSource("interactions", [source.interactions], required=LOG_KEYS))
    """

    def wrap(fn: AdapterFn) -> AdapterFn:
        ADAPTERS[name] = fn
        return fn

    return wrap


def load_tables(source: SourceConfig, workdir: Path) -> RawTables:
    """The RawTables of ``source`` by its adapter."""
    if source.adapter not in ADAPTERS:
        raise DataError(f"unknown data adapter '{source.adapter}'", expected=f"one of {sorted(ADAPTERS)}")
    return ADAPTERS[source.adapter](source, Path(workdir))


def _need(source: SourceConfig, attribute: str) -> str:
    value = getattr(source, attribute)
    if not value:
        raise DataError(f"data.source.{attribute} is not set", expected=f"a path for the {attribute} table")
    return value


def _mapping(source: SourceConfig, names) -> Dict[str, str]:
    return {name: source.columns.get(name, name) for name in names}


def _files(spec: str) -> List[str]:
    """One file, or the files a glob names (a log split by date), in sorted order."""
    if not any(ch in spec for ch in "*?["):
        return [spec]
    files = sorted(glob.glob(spec))
    if not files:
        raise DataError("no file matches", file=spec, expected="at least one CSV/TSV/Parquet file")
    return files


def _table(name: str, path: Optional[str], columns: Dict[str, str], required=()) -> Optional[TableSource]:
    return TableSource(name, _files(path), columns=columns, required=tuple(required)) if path else None


@register_adapter("tables")
def tables_adapter(source: SourceConfig, workdir: Path) -> RawTables:
    """Generic: any three files; ``columns`` maps canonical names to the files' names."""
    columns = _mapping(source, (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP))
    return RawTables(
        _table("interactions", _need(source, "interactions"), columns, LOG_KEYS),
        _table("users", source.users, columns, (USER_ID,)),
        _table("content", source.content, columns, (CONTENT_ID,)),
    )


@register_adapter("study")
def study_adapter(source: SourceConfig, workdir: Path) -> RawTables:
    """The study's three sources: watch histories, user attributes, content metadata."""
    names = (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP, "age", "gender", "genres", "rating")
    columns = _mapping(source, names)
    return RawTables(
        _table("interactions", _need(source, "interactions"), columns, LOG_KEYS),
        _table("users", _need(source, "users"), columns, (USER_ID, "age", "gender")),
        _table("content", _need(source, "content"), columns, (CONTENT_ID, "genres", "rating", DURATION)),
    )


# ------------------------------------------------------------------ KuaiRand

# Observed during or after the view (see datasets/README.md): labels, never features.
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
KUAIRAND_MISSING = -124  # the dataset's own missing-value marker


def _log_files(spec: str) -> List[str]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("log_*.csv"))
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec))]
    else:
        files = [path]
    if not files:
        raise DataError("no KuaiRand log files found", file=spec, expected="log_*.csv files")
    return [str(f) for f in files]


@register_adapter("kuairand")
def kuairand_adapter(source: SourceConfig, workdir: Path) -> RawTables:
    """KuaiRand (Gao et al., CIKM 2022): log_*.csv, user_features_*.csv, video_features_basic_*.csv.

    ``interactions`` may be one log file, a directory of log_*.csv, or a glob. Post-exposure
    columns may be labels (``data.labels[*].column``) and are refused as features.
    """
    log_columns = {
        USER_ID: "user_id",
        CONTENT_ID: "video_id",
        WATCH_TIME: "play_time_ms",
        DURATION: "duration_ms",
        TIMESTAMP: "time_ms",
    }
    interactions = TableSource(
        "interactions",
        _log_files(_need(source, "interactions")),
        columns=log_columns,
        derived={"hour": ("hourmin", "TRY_CAST({} AS BIGINT) // 100")},  # e.g. 1730 -> hour 17
        drop=("hourmin",),
        required=LOG_KEYS,
    )
    users = content = None
    if source.users:
        users = TableSource(
            "users",
            [source.users],
            columns={USER_ID: "user_id"},
            missing_marker=KUAIRAND_MISSING,
            required=(USER_ID,),
        )
    if source.content:
        content = TableSource(
            "content",
            [source.content],
            columns={CONTENT_ID: "video_id", "genres": "tag", DURATION: "video_duration"},
            required=(CONTENT_ID,),
        )
    return RawTables(
        interactions,
        users,
        content,
        post_exposure=KUAIRAND_POST_EXPOSURE,
        notes={
            "leak_guard": "post-exposure columns (never features): "
            + ", ".join(sorted(KUAIRAND_POST_EXPOSURE))
        },
    )


@register_adapter("synthetic")
def synthetic_adapter(source: SourceConfig, workdir: Path) -> RawTables:
    """Generated data (``source.synthetic``), written as parquet under ``workdir`` first."""
    return synthetic_tables(source.synthetic, workdir / "synthetic")
