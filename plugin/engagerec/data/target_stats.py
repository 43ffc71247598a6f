"""Leak-free statistics of an id over the training rows, as dense inputs.

Two feature kinds, both keyed by one id column (``column``):

* ``target_mean``: the mean of a label (``of``) over the training rows with that id, shrunk
  towards the training mean by ``smoothing`` pseudo-rows: ``(sum + m * prior) / (count + m)``.
  A training row must not see its own label, so training rows are cross-fitted: the rows are
  cut into ``folds`` seeded folds and each row gets the statistics of the other folds (the
  scheme of scikit-learn's TargetEncoder, and what engagerec.gbdt's reference feeds its
  trees). Validation, test and scored rows get the statistics of all training rows.
* ``id_count``: how many training rows have that id, the row itself left out (a popular
  video, a heavy user); usually with ``transform: log1p``.

Neither reads a label of a validation or test row. With a temporal split a training row's
statistics include later training rows, as the cross-fitted encoder's do; validation and
test rows see only training rows, all earlier.

The per-id sums and counts go to ``stats/<feature>.parquet`` beside schema.json (and the
prior to schema.json's ``target_stats``), so ``engagerec predict`` encodes new rows with the
training statistics. The per-row values are a narrow table ``stats`` keyed by the source row,
which the shard writer joins (as it joins the history table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import duckdb

from engagerec.config import FeatureConfig
from engagerec.data.errors import DataError
from engagerec.data.split import seeded_key
from engagerec.data.tables import literal, quote

STATS_DIR = "stats"
STAT_KINDS = ("target_mean", "id_count")


def stat_features(features: List[FeatureConfig]) -> List[FeatureConfig]:
    """The features computed here, in config order."""
    return [feature for feature in features if feature.kind in STAT_KINDS]


def build_stats(con: duckdb.DuckDBPyConnection, fitter, features: List[FeatureConfig], seed: int) -> None:
    """
    ``CREATE TABLE stats(__src, __split, <one column per target_mean / id_count feature>)`` over every
    row of ``events``.

    Args:
        con: the connection holding ``events``.
        fitter: the prepare ``Fitter`` (fits the statistics on train rows and writes them to
            its output directory) or a scoring ``SchemaApplier`` (reads the training ones).
        features: the data config's features (the others are left out).
        seed: the fold assignment's seed (``data.split.seed``).

    Example::

        build_stats(con, fitter, cfg.features, cfg.split.seed)
        con.execute("SELECT * FROM stats LIMIT 3").fetchall()  # [(__src, content_watch_ratio), ...]
    """
    columns, joins = [], []
    for i, feature in enumerate(stat_features(features)):
        token_type = fitter.stat_token_type(feature)
        key = fitter.token_sql(feature.column or feature.name, token_type)
        table = f"stats_{i}"
        fitter.fit_stat(feature, table, key, token_type, seed)
        joins.append(f"LEFT JOIN {table} a{i} ON a{i}.token = {key}")
        training_row = "e.__split = 0"
        if feature.kind == "target_mean":
            fold = f"f{i}.fold = {fold_sql(feature, seed)}"
            joins.append(f"LEFT JOIN {table}_folds f{i} ON f{i}.token = {key} AND {fold}")
            prior = fitter.schema.target_stats[feature.name]["prior"]
            m = float(feature.smoothing)
            # all training rows with this id, less those of the row's own fold (training rows only)
            total, count = (
                f"coalesce(a{i}.{x}, 0) - (CASE WHEN {training_row} THEN coalesce(f{i}.{x}, 0) ELSE 0 END)"
                for x in ("s", "c")
            )
            m, prior = f"CAST({m!r} AS DOUBLE)", f"CAST({prior!r} AS DOUBLE)"  # not DECIMAL literals
            value = f"({total} + {m} * {prior}) / ({count} + {m})"
        else:  # id_count: a training row is one of its id's rows; it does not count itself
            itself = f"(CASE WHEN {training_row} AND {key} IS NOT NULL THEN 1 ELSE 0 END)"
            value = f"CAST(coalesce(a{i}.n, 0) - {itself} AS DOUBLE)"
        columns.append(f"{value} AS {quote(feature.name)}")
    select = ", ".join(["e.__src", "e.__split"] + columns)
    con.execute(f"CREATE OR REPLACE TABLE stats AS SELECT {select} FROM events e {' '.join(joins)}")


def fold_sql(feature: FeatureConfig, seed: int) -> str:
    """A training row's fold (0 .. folds-1) as a SQL expression over ``events e``."""
    return f"{seeded_key(seed, 'e.__src')} % {max(int(feature.folds), 2)}"


def fit_stat_table(
    con: duckdb.DuckDBPyConnection, feature: FeatureConfig, table: str, key: str, seed: int, out_dir: Path
) -> float:
    """Per id over the training rows: ``table(token, s, c, n)`` (label sum, labelled rows, rows)
    and, for target_mean, ``<table>_folds(token, fold, s, c)``; written to
    ``out_dir/stats/<feature>.parquet``. Returns the prior (the label's training mean)."""
    label = f"e.{quote(feature.of)}" if feature.kind == "target_mean" else "NULL"
    rows = (
        f"SELECT {key} AS token, CAST({label} AS DOUBLE) AS y, {fold_sql(feature, seed)} AS fold "
        "FROM events e WHERE e.__split = 0"
    )
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS SELECT token, sum(y) AS s, count(y) AS c, count(*) AS n "
        f"FROM ({rows}) WHERE token IS NOT NULL GROUP BY token"
    )
    con.execute(
        f"CREATE OR REPLACE TABLE {table}_folds AS SELECT token, fold, sum(y) AS s, count(y) AS c "
        f"FROM ({rows}) WHERE token IS NOT NULL GROUP BY token, fold"
    )
    prior = 0.0
    if feature.kind == "target_mean":
        mean = con.execute(f"SELECT avg(y) FROM ({rows})").fetchone()[0]
        if mean is None:
            raise DataError(
                f"feature '{feature.name}': label '{feature.of}' has no values in the training split",
                expected="at least one labelled training row",
            )
        prior = float(mean)
    (out_dir / STATS_DIR).mkdir(parents=True, exist_ok=True)
    path = out_dir / STATS_DIR / f"{feature.name}.parquet"
    con.execute(f"COPY (SELECT * FROM {table} ORDER BY token) TO {literal(str(path))} (FORMAT parquet)")
    return prior


def load_stat_table(
    con: duckdb.DuckDBPyConnection, feature: FeatureConfig, table: str, fitted_dir: Path, token_type: str
) -> None:
    """The training statistics of ``feature`` as ``table`` (and an empty ``<table>_folds``: rows
    to score are never training rows)."""
    path = Path(fitted_dir) / STATS_DIR / f"{feature.name}.parquet"
    if not path.is_file():
        raise DataError("the training data's id statistics are missing", file=str(path))
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS SELECT CAST(token AS {token_type}) AS token, s, c, n "
        f"FROM read_parquet({literal(str(path))})"
    )
    con.execute(
        f"CREATE OR REPLACE TABLE {table}_folds AS SELECT token, 0 AS fold, s, c FROM {table} LIMIT 0"
    )


def stat_meta(feature: FeatureConfig, prior: float, token_type: str) -> Dict[str, Any]:
    """What schema.json keeps of a statistic feature: enough to encode new rows."""
    return {"kind": feature.kind, "column": feature.column or feature.name, "prior": prior,
            "token_type": token_type}  # fmt: skip
