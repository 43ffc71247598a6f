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
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import duckdb

from engagerec.config import DataConfig, FeatureConfig
from engagerec.data.adapters import load_tables
from engagerec.data.errors import DataError
from engagerec.data.events import SOURCE_ROW, Events, build_scoring_events, feature_column
from engagerec.data.fitting import Fitter
from engagerec.data.manifest import check_prepared, write_manifest
from engagerec.data.prepare import build_history, rows_by_shard, write_splits
from engagerec.data.raw import CONTENT_ID, TIMESTAMP, USER_ID, WATCH_TIME, RawTables
from engagerec.data.schema import VOCAB_DIR, DatasetSchema
from engagerec.data.tables import (
    canonical_columns,
    connect,
    has_rows,
    is_numeric,
    literal,
    quote,
    write_failure,
)
from engagerec.data.target_stats import live_counters, load_stat_tables

IDS_FILE = "ids.parquet"
ROW = "row"  # the input row (0-based, over the interaction files in order) a prediction is for


class SchemaApplier(Fitter):
    """A Fitter that fits nothing: every vocabulary, token type, mean, std and bucket edge is
    the training schema's, so a row is encoded as it would have been at training time.

    Args:
        con, events, features, out_dir: as for ``Fitter`` (``events`` holds the rows to score).
        fitted (DatasetSchema): the training data's schema.
        fitted_dir (Path): the directory holding it (its ``vocabs/``).
    """

    def __init__(self, con, events: Events, features, out_dir: Path, fitted: DatasetSchema, fitted_dir: Path):
        super().__init__(con, events, features, out_dir)
        self.fitted, self.fitted_dir = fitted, Path(fitted_dir)

    def _space_token_type(self, space: str, column: str) -> str:
        if space in self.fitted.token_types:
            return self.fitted.token_types[space]
        if space in self.fitted.hashed:  # schema.json from before token types were recorded
            raise DataError(
                f"id space '{space}' is hashed and its token type is not recorded; prepare the "
                "training data again with this engagerec release",
                file=str(self.fitted_dir / "schema.json"),
            )
        path = self.fitted_dir / VOCAB_DIR / f"{space}.parquet"
        kind = self.con.execute(
            f"SELECT typeof(token) FROM read_parquet({literal(str(path))}) LIMIT 1"
        ).fetchone()
        return "BIGINT" if kind and is_numeric(kind[0]) else "VARCHAR"

    def _fit_space(self, space: str, tokens_sql: str, feature, multi: bool) -> Dict[str, Any]:
        if space in self.spaces:
            return self.spaces[space]
        info: Dict[str, Any] = {"table": f"vocab_{len(self.spaces)}", "hashed": 0}
        if space in self.fitted.hashed:
            info["hashed"] = self.fitted.hashed[space]
            self.schema.hashed[space] = info["hashed"]
        else:
            path = self.fitted_dir / VOCAB_DIR / f"{space}.parquet"
            if not path.is_file():
                raise DataError("the training data's vocabulary is missing", file=str(path))
            token_type = self._space_token_type(space, feature_column(feature))
            # a vocabulary file lists tokens in index order: index = file row + 1
            self.con.execute(
                f"CREATE OR REPLACE TABLE {info['table']} AS SELECT CAST(token AS {token_type}) AS token, "
                "CAST(file_row_number + 1 AS INTEGER) AS idx "
                f"FROM read_parquet({literal(str(path))}, file_row_number = true)"
            )
            self.schema.vocab_sizes[space] = self.fitted.vocab_sizes[space]
        self.spaces[space] = info
        return info

    fitting = False

    @functools.cached_property
    def _first_row_in_log(self) -> Tuple[Optional[int], Any]:
        """The first row to score at or before the moment the live counters were saved (one
        moment for every id column: ``Fitter.log_end``) and its timestamp; (None, None) when
        every row follows it. One scan, whatever the number of live-counter columns."""
        until = next(m["counted_until"] for m in self.fitted.target_stats.values() if "counted_until" in m)
        time = quote(TIMESTAMP)
        row = self.con.execute(f"SELECT min(__src) FROM events WHERE {time} <= {until!r}").fetchone()[0]
        if row is None:
            return None, None
        return row, self.con.execute(f"SELECT {time} FROM events WHERE __src = {row}").fetchone()[0]

    def stat_token_type(self, feature: FeatureConfig) -> str:
        """The token type the training statistics were keyed by."""
        meta = self.fitted.target_stats.get(feature.name)
        if meta is None:
            raise DataError(
                f"feature '{feature.name}' has no training statistics in schema.json",
                file=str(self.fitted_dir / "schema.json"),
            )
        return meta["token_type"]

    def fit_stats(self, group, table: str, key: str, token_type: str, seed: int) -> None:
        """The training statistics of the features ``group``, read back from the training data;
        live counters (scheme: online) only for rows after the prepared log's last moment (the
        counters hold every view up to it: an earlier row's own and later views among them)."""
        first = group[0][1]
        until = self.fitted.target_stats[first.name].get("counted_until")
        if live_counters(group) and until is not None:
            row, got = self._first_row_in_log
            if row is not None:
                raise self.events.log.error(
                    f"feature '{first.name}' is a live counter (scheme: online) saved at the prepared "
                    f"log's last moment ({until!r}); this row is not after it, so the counter would "
                    "include its own view and later ones",
                    row,
                    column=TIMESTAMP,
                    expected=f"a timestamp after {until!r} (rows that follow the prepared log)",
                    got=got,
                )
        load_stat_tables(self.con, group, table, self.fitted_dir, token_type)
        for _, feature in group:
            self.schema.target_stats[feature.name] = dict(self.fitted.target_stats[feature.name])

    def _fitted_dense(self, feature: FeatureConfig):
        return next(d for d in self.fitted.dense if d.name == feature.name)

    def _moments(self, feature, value, source, table) -> Tuple[float, float]:
        dense = self._fitted_dense(feature)
        return dense.mean, dense.std

    def _bucket_edges(self, feature, bucket, value, source, table) -> List[float]:
        return list(self.fitted.buckets[bucket])

    def fit_numbers(self) -> DatasetSchema:
        """Phase 2 with the training statistics; the schema keeps training's input columns."""
        schema = super().fit_numbers()
        schema.input_columns = dict(self.fitted.input_columns)  # what training read, for the next check
        return schema


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
        con = connect(work, cfg.memory_limit, cfg.threads)
        raw = load_tables(source, work)
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
