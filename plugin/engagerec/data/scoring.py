"""Rows to score -> shards encoded exactly as a run's training data was.

``encode_for_scoring`` runs prepare's own pipeline (the adapter, the join, the history
windows, the encoding SQL) over new tables, but never fits anything: vocabularies,
normalisation and bucket edges come from the training data's schema.json (``SchemaApplier``).
What differs from training data is what a scoring input may lack or hold anew, and each is
counted, never silent: ids unseen in training go to the out-of-vocabulary row, rows without
a label keep a NULL label, and the run's unjoined-id policy is the only filter.

The output is a prepared dataset with one split, ``test``, in input row order, plus
``ids.parquet``: the input's row number and raw ids, in the same order, for the predictions.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import duckdb

from engagerec.config import DataConfig
from engagerec.data.adapters import load_tables
from engagerec.data.applier import SchemaApplier
from engagerec.data.errors import DataError
from engagerec.data.events import SOURCE_ROW, build_scoring_events
from engagerec.data.manifest import check_prepared, write_manifest
from engagerec.data.prepare import build_history, rows_by_shard, write_splits
from engagerec.data.raw import CONTENT_ID, USER_ID, WATCH_TIME, RawTables
from engagerec.data.schema import DatasetSchema
from engagerec.data.tables import (
    canonical_columns,
    connect,
    has_rows,
    is_numeric,
    literal,
    quote,
    resolve_memory_limit,
    source_bytes,
    write_failure,
)

IDS_FILE = "ids.parquet"
ROW = "row"  # the input row (0-based, over the interaction files in order) a prediction is for


def check_drift(con: duckdb.DuckDBPyConnection, raw: RawTables, fitted: DatasetSchema) -> None:
    """Every column the run's features read is in the new tables, with the kind of values
    (number or text) it had in training.

    Args:
        con: the DuckDB connection (reads the files' headers).
        raw: the new tables.
        fitted: the training data's schema (its ``input_columns``).

    Raises:
        DataError: naming the file and the column that is missing or changed kind.
    """
    offered: Dict[str, Tuple[str, str, str]] = {}
    for source in (raw.interactions, raw.users, raw.content):
        if source is None:
            continue
        for canon, (_, file_type, file_column) in canonical_columns(con, source).items():
            offered.setdefault(canon, (source.files[0], file_type, file_column or canon))
    for column, kind in fitted.input_columns.items():
        if column not in offered:
            files = ", ".join(s.files[0] for s in (raw.interactions, raw.users, raw.content) if s)
            raise DataError(
                "a feature column of the trained model is missing from the input",
                file=files,
                column=column,
                expected=f"a {kind} column, as in the training data",
            )
        file, file_type, file_column = offered[column]
        now = "number" if is_numeric(file_type) else "text"
        if file_type != "DERIVED" and now != kind and not (kind == "text" and file_type == "VARCHAR"):
            raise DataError(
                "the column's type changed since training",
                file=file,
                column=file_column,
                expected=f"{kind} values, as in the training data",
                got=f"{now} ({file_type})",
            )


def scoring_source(cfg: DataConfig, interactions: str, users: Optional[str], content: Optional[str]):
    """The run's source config with the interaction log (and optionally the side tables) replaced.

    Args:
        cfg: the run's data config.
        interactions: the new rows (file, directory or glob).
        users: a users table, or None for the run's.
        content: a content table, or None for the run's.

    Raises:
        DataError: the run read synthetic data, which has no file layout.
    """
    if cfg.source.adapter == "synthetic":
        raise DataError(
            "a run on synthetic data has no file layout to read new rows in; pass a prepared data "
            "directory (engagerec prepare's output) as the input",
            file=interactions,
        )
    return dataclasses.replace(
        cfg.source,
        interactions=interactions,
        users=users if users is not None else cfg.source.users,
        content=content if content is not None else cfg.source.content,
    )


def encode_for_scoring(
    cfg: DataConfig,
    fitted_dir: str | Path,
    interactions: str,
    out_dir: str | Path,
    *,
    users: Optional[str] = None,
    content: Optional[str] = None,
) -> Dict[str, Any]:
    """Encode new interaction rows with a run's fitted schema into ``out_dir``.

    Args:
        cfg: the run's ``data`` config (adapter, column mapping, features, labels).
        fitted_dir: the training data's prepared directory (schema.json and vocabs/).
        interactions: the new rows, in the run's source layout (file, directory or glob).
        out_dir: where the encoded ``test`` split, its schema.json and ids.parquet go.
        users: the users table (default: the run's own).
        content: the content table (default: the run's own).

    Returns:
        A summary: rows read, rows scored, dropped and counted-but-kept rows by reason, and per
        id space the rows whose id is new (out-of-vocabulary row).

    Raises:
        DataError: a feature column missing or of another type than in training, or any bad
            value prepare itself refuses (named by file, column and row).
    """
    check_prepared(fitted_dir)  # its vocabularies and statistics encode the rows
    fitted = DatasetSchema.load(fitted_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = scoring_source(cfg, interactions, users, content)
    work = Path(tempfile.mkdtemp(prefix=".score-", dir=out_dir))
    try:
        raw = load_tables(source, work)
        tables = [raw.interactions, raw.users, raw.content]
        con = connect(work, resolve_memory_limit(cfg.memory_limit, source_bytes(tables)), cfg.threads)
        # rows to score need no watch time: without one, the derived labels are NULL (counted)
        log = dataclasses.replace(
            raw.interactions, required=tuple(c for c in raw.interactions.required if c != WATCH_TIME)
        )
        raw = dataclasses.replace(raw, interactions=log)
        with_rows = [file for file in log.files if has_rows(con, file)]
        if not with_rows:
            raise DataError(
                "no rows to score: the input holds a header and nothing below it",
                file=log.label,
                expected="at least one interaction row",
            )
        # a header-only file among others has no value types to compare: the drift check reads the rest
        with_values = dataclasses.replace(log, files=with_rows)
        check_drift(con, dataclasses.replace(raw, interactions=with_values), fitted)
        data = dataclasses.replace(cfg, source=source)
        events = build_scoring_events(con, raw, data)
        applier = SchemaApplier(con, events, data.features, out_dir, fitted, Path(fitted_dir))
        applier.fit_ids()
        build_history(con, applier, events, data)
        schema = applier.fit_numbers()
        files = write_splits(con, applier, events, data, out_dir, splits=("test",), order=f"e.{SOURCE_ROW}")
        unseen = _unseen_ids(con, applier)
        keys = [quote(c) for c in (USER_ID, CONTENT_ID) if c in events.columns]
        con.execute(
            f"COPY (SELECT {SOURCE_ROW} AS {ROW}, {', '.join(keys)} FROM events ORDER BY {SOURCE_ROW}) "
            f"TO {literal(str(out_dir / IDS_FILE))} (FORMAT parquet)"
        )
        con.close()
    except (duckdb.Error, OSError) as err:
        failure = write_failure(err, out_dir, "encoding the rows to score")
        if failure is None:
            raise
        raise failure from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = events.report
    if WATCH_TIME not in events.columns and any(not label.column for label in data.labels):
        report.notes["no watch time column (kept, derived labels missing)"] = events.rows
    summary = {
        "rows_read": report.rows_read,
        "rows_scored": events.rows,
        "dropped": dict(report.dropped),
        "counted_not_dropped": dict(report.notes),
        "unseen_ids": unseen,
    }
    schema.meta = {"splits": files, "summary": {"scoring": summary}, "fitted": str(fitted_dir)}
    try:
        schema.save(out_dir)
        write_manifest(out_dir, rows_by_shard(files))  # read by ShardReader like any preparation
    except OSError as err:
        failure = write_failure(err, out_dir, "encoding the rows to score")
        if failure is None:
            raise
        raise failure from None
    return summary


def _unseen_ids(con, applier: SchemaApplier) -> Dict[str, int]:
    """Per single-id sparse feature, the scored rows whose id was given but fell to the OOV
    row 0 (unseen in training, or below min_count), in one pass over the rows."""
    names = [f for f in applier.features if f.kind == "categorical"]
    if not names:
        return {}
    counts = [
        f"count(*) FILTER (WHERE e.{quote(f.column or f.name)} IS NOT NULL "
        f"AND {applier.sparse_sql[f.name]} = 0)"
        for f in names
    ]
    row = con.execute(f"SELECT {', '.join(counts)} FROM events e {' '.join(applier.joins)}").fetchone()
    return {f.name: int(n) for f, n in zip(names, row, strict=True)}
