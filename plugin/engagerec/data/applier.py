"""A Fitter that fits nothing (``SchemaApplier``): every vocabulary, token type, mean, std,
bucket edge and id statistic is read back from an earlier preparation, so rows are encoded as
they were then. Scoring uses it for the rows it scores (engagerec.data.scoring), and a window
prepared against a base grows from it (engagerec.data.growth).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engagerec.config import FeatureConfig
from engagerec.data.errors import DataError
from engagerec.data.events import Events, feature_column
from engagerec.data.fitting import Fitter
from engagerec.data.raw import TIMESTAMP
from engagerec.data.schema import VOCAB_DIR, DatasetSchema
from engagerec.data.tables import is_numeric, literal, quote
from engagerec.data.target_stats import live_counters, load_stat_tables


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
            if space in self.fitted.managed:
                self.schema.managed[space] = self.fitted.managed[space]
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

    def _moments(self, numeric) -> Dict[str, Tuple[float, float]]:
        fitted = (self._fitted_dense(feature) for feature, _, _ in numeric)
        return {dense.name: (dense.mean, dense.std) for dense in fitted}  # training's, never refitted

    def _bucket_edges(self, feature, bucket, value, source, table) -> List[float]:
        return list(self.fitted.buckets[bucket])

    def fit_numbers(self) -> DatasetSchema:
        """Phase 2 with the training statistics; the schema keeps training's input columns."""
        schema = super().fit_numbers()
        schema.input_columns = dict(self.fitted.input_columns)  # what training read, for the next check
        return schema
