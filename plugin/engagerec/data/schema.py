"""DatasetSchema: vocabularies, buckets and normalisation fitted on TRAIN rows only.

It is written as schema.json (plus one parquet file per vocabulary under ``vocabs/``) beside
the shards, so that training, evaluation and prediction encode data identically.
Encoding conventions:

* every id space has a vocabulary; row 0 of its table is the out-of-vocabulary /
  missing row, known ids are 1..len(vocab) in sorted token order. An id space bigger than
  the feature's ``hash_buckets`` is hashed instead: row 1 + hash(id) % hash_buckets;
* numeric features become standardised float32 dense columns (train mean / std);
  ``buckets`` > 0 adds ``<name>_bucket``, a sparse feature over exact train quantiles;
* labels are float32 columns, NaN where a raw label is missing (weight 0 for that task).

Fitting and encoding are SQL over the ``events`` table (engagerec.data.events), so they
run out of core; a vocabulary of millions of ids is a DuckDB table, never a Python list.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.parquet as pq

from engagerec.config import FeatureConfig
from engagerec.data.errors import DataError
from engagerec.data.raw import TIMESTAMP
from engagerec.data.tables import is_numeric, literal, quote, single_thread
from engagerec.data.target_stats import STAT_KINDS, fit_stat_tables, live_counters, stat_meta

SCHEMA_FILE = "schema.json"
VOCAB_DIR = "vocabs"
SCHEMA_VERSION = 2
FEATURE_KINDS = ("categorical", "multi_hot", "numeric", "history", "history_mean", *STAT_KINDS)
TRANSFORMS = ("none", "log1p")
# where a dense feature's values are read: the joined rows, or the history table that holds
# the history windows and id statistics (the aliases the shard writer gives them)
SOURCES = {"e": "events e", "h": "history h"}


@dataclass
class SparseFeature:
    """One sparse (id) input: its name in the shards, its id space (table), and whether a row
    holds several ids (genres, history) or exactly one."""

    name: str
    id_space: str
    multi: bool


@dataclass
class DenseFeature:
    """One dense input: standardised by the train ``mean`` and ``std``; ``fill`` imputes
    missing values (the train mean), or is None when a missing value is an error."""

    name: str
    column: str
    transform: str
    mean: float
    std: float
    fill: Optional[float]


@dataclass
class LabelSpec:
    """One label column of the shards: its name and kind (regression | binary)."""

    name: str
    kind: str


@dataclass
class DatasetSchema:
    """What a prepared dataset holds and how its inputs were encoded (see the module docstring).

    Example::

        schema = DatasetSchema.load("prepared/kuairand_random")
        schema.sparse_names, schema.dense_names, schema.label_names
        schema.num_embeddings("content_id")  # rows of that id space's table, OOV row included
    """

    features: List[Dict[str, Any]]  # the FeatureConfigs it was fitted with
    sparse: List[SparseFeature]
    dense: List[DenseFeature]
    labels: List[LabelSpec]
    vocab_sizes: Dict[str, int]  # id space -> known ids (table rows = size + 1)
    hashed: Dict[str, int] = field(default_factory=dict)  # id space -> hash buckets
    buckets: Dict[str, List[float]] = field(default_factory=dict)  # feature -> boundaries
    input_columns: Dict[str, str] = field(default_factory=dict)  # column -> "number" | "text"
    token_types: Dict[str, str] = field(default_factory=dict)  # id space -> BIGINT | VARCHAR tokens
    # target_mean / id_count feature -> its id column, token type and prior (engagerec.data.target_stats)
    target_stats: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def sparse_names(self) -> List[str]:
        """The sparse features' names."""
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> List[str]:
        """The dense features' names, in the order of ``Batch.dense_features``' columns."""
        return [f.name for f in self.dense]

    @property
    def label_names(self) -> List[str]:
        """The label columns' names."""
        return [label.name for label in self.labels]

    def num_embeddings(self, id_space: str) -> int:
        """Rows of the id space's table: its vocabulary (or hash buckets) plus the OOV row 0."""
        if id_space in self.hashed:
            return self.hashed[id_space] + 1
        return self.vocab_sizes[id_space] + 1

    def vocab(self, directory: str | Path, id_space: str) -> List[Any]:
        """The tokens of an id space, in index order (index = position + 1)."""
        return pq.read_table(Path(directory) / VOCAB_DIR / f"{id_space}.parquet").column("token").to_pylist()

    # ---------------------------------------------------------------- storage
    def to_json(self) -> Dict[str, Any]:
        """The schema as a JSON-ready mapping, with the schema version."""
        return {"version": SCHEMA_VERSION, **asdict(self)}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory``/schema.json atomically; returns its path."""
        path = Path(directory) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        tmp.replace(path)  # atomic: a reader never sees half a schema
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetSchema":
        """Read ``directory``/schema.json.

        Raises:
            DataError: if the file is missing or was written with another schema version.
        """
        path = Path(directory) / SCHEMA_FILE
        if not path.is_file():
            raise DataError("schema not found; run `engagerec prepare` first", file=str(path))
        raw = json.loads(path.read_text())
        if raw.pop("version", None) != SCHEMA_VERSION:
            raise DataError(
                "unsupported schema version (prepared by another engagerec release): prepare the data again",
                file=str(path),
                expected=f"version {SCHEMA_VERSION}",
            )
        return cls(
            features=raw["features"],
            sparse=[SparseFeature(**f) for f in raw["sparse"]],
            dense=[DenseFeature(**f) for f in raw["dense"]],
            labels=[LabelSpec(**label) for label in raw["labels"]],
            vocab_sizes=raw["vocab_sizes"],
            hashed=raw.get("hashed", {}),
            buckets=raw.get("buckets", {}),
            input_columns=raw.get("input_columns", {}),
            token_types=raw.get("token_types", {}),
            target_stats=raw.get("target_stats", {}),
            meta=raw.get("meta", {}),
        )


def position_names(history: str, length: int) -> List[str]:
    """The features of a positional history (``positions: true``), oldest position first.

    Example::

        >>> position_names("history", 3)
        ['history@0', 'history@1', 'history@2']
    """
    return [f"{history}@{p}" for p in range(length)]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


# ----------------------------------------------------------------- fitting (SQL)


def validate_features(features: List[FeatureConfig], columns: Dict[str, str], labels: List[str]) -> None:
    """Names unique, kinds and options known, every column present in the joined tables."""
    seen = set()
    for i, feature in enumerate(features):
        where = f"data.features[{i}] ('{feature.name}')"
        if feature.name in seen:
            raise DataError(f"{where}: duplicate feature name")
        seen.add(feature.name)
        if feature.kind not in FEATURE_KINDS:
            raise DataError(f"{where}: unknown kind '{feature.kind}'", expected=f"one of {FEATURE_KINDS}")
        if feature.transform not in TRANSFORMS:
            raise DataError(
                f"{where}: unknown transform '{feature.transform}'", expected=f"one of {TRANSFORMS}"
            )
        if feature.missing not in ("error", "mean"):
            raise DataError(f"{where}: unknown missing policy '{feature.missing}'", expected="error or mean")
        if feature.positions and feature.kind != "history":
            raise DataError(f"{where}: positions: true on a {feature.kind} feature", expected="kind: history")
        if feature.kind in ("history_mean", "target_mean") and feature.of not in labels:
            raise DataError(
                f"{where}: {feature.kind} averages a label ("
                + ("of earlier views)" if feature.kind == "history_mean" else "of the id's training rows)"),
                expected=f"of: one of the labels {labels}",
                got=feature.of,
            )
        if feature.kind == "history_mean":
            continue
        if feature.kind in STAT_KINDS and (feature.folds < 2 or feature.smoothing <= 0):
            raise DataError(
                f"{where}: folds {feature.folds}, smoothing {feature.smoothing}",
                expected="folds >= 2 and smoothing > 0 (pseudo-rows of the training mean)",
            )
        online = feature.kind in STAT_KINDS and feature.scheme == "online"
        if not math.isfinite(feature.lag) or feature.lag < 0 or (feature.lag > 0 and not online):
            raise DataError(
                f"{where}: lag {feature.lag}",
                expected="a finite lag >= 0, set only on a target_mean or id_count with scheme: online",
            )
        if feature.kind in STAT_KINDS and feature.scheme != "cross_fit" and TIMESTAMP not in columns:
            raise DataError(
                f"{where}: {feature.scheme} statistics need a {TIMESTAMP} column",
                column=TIMESTAMP,
                expected=f"data.source.columns.{TIMESTAMP} to name it, or scheme: cross_fit",
            )
        column = feature.of if feature.kind == "history" else (feature.column or feature.name)
        if column not in columns:
            visible = sorted(c for c in columns if not c.startswith("__"))
            raise DataError(
                f"{where}: reads column '{column}', which no table has", expected=f"one of {visible}"
            )


class Fitter:
    """Fits a DatasetSchema on the train rows of the ``events`` table and writes the SQL that
    encodes every row. Vocabularies become DuckDB tables ``vocab_<n>`` (token, idx)."""

    def __init__(self, con, events, features: List[FeatureConfig], out_dir: Path) -> None:
        self.con, self.events, self.features, self.out_dir = con, events, features, out_dir
        self.spaces: Dict[str, Dict[str, Any]] = {}  # id space -> {table, token_type, hashed}
        self.schema = DatasetSchema(
            features=[asdict(f) for f in features],
            sparse=[],
            dense=[],
            labels=[LabelSpec(label.name, label.kind) for label in events.labels],
            vocab_sizes={},
        )

    # ----------------------------------------------------------------- tokens
    def token_sql(self, column: str, token_type: str) -> str:
        """``column`` of ``events e`` as a token of ``token_type`` (NULL when missing)."""
        q = f"e.{quote(column)}"
        if token_type == "BIGINT":
            sql_type = self.events.columns[column]
            if sql_type in ("DOUBLE", "FLOAT"):  # integral floats (ids read beside NaN) are ints
                bad = f"isnan({q}) OR isinf({q})"
                return f"(CASE WHEN {bad} THEN NULL WHEN {q} = floor({q}) THEN CAST({q} AS BIGINT) END)"
            return f"CAST({q} AS BIGINT)"
        if self.events.columns[column] in ("DOUBLE", "FLOAT"):  # a NaN is a missing id, not a token
            return f"(CASE WHEN isnan({q}) THEN NULL ELSE CAST({q} AS VARCHAR) END)"
        return f"CAST({q} AS VARCHAR)"

    def _space_token_type(self, space: str, column: str) -> str:
        """The token type of an id space first read from ``column``: BIGINT or VARCHAR."""
        return self._token_type(column)

    def _token_type(self, column: str) -> str:
        sql_type = self.events.columns[column]
        if sql_type in ("DOUBLE", "FLOAT"):
            q = quote(column)
            fractional = self.con.execute(
                f"SELECT count(*) FROM events WHERE __split = 0 AND {q} IS NOT NULL AND NOT isnan({q}) "
                f"AND NOT isinf({q}) AND {q} <> floor({q})"
            ).fetchone()[0]
            return "VARCHAR" if fractional else "BIGINT"
        return "BIGINT" if is_numeric(sql_type) else "VARCHAR"

    def _fit_space(self, space: str, tokens_sql: str, feature: FeatureConfig, multi: bool) -> Dict[str, Any]:
        """Vocabulary (or hashing) of an id space from its train tokens; the first feature of a
        space fits it, later features share it."""
        if space in self.spaces:
            return self.spaces[space]
        table = f"vocab_{len(self.spaces)}"
        source = f"unnest({tokens_sql})" if multi else tokens_sql
        self.con.execute(
            f"CREATE OR REPLACE TABLE {table} AS SELECT token, "
            "CAST(row_number() OVER (ORDER BY token) AS INTEGER) AS idx "
            f"FROM (SELECT {source} AS token FROM events e WHERE e.__split = 0) WHERE token IS NOT NULL "
            f"GROUP BY token HAVING count(*) >= {int(feature.min_count)}"
        )
        size = self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        info = {"table": table, "hashed": 0}
        if feature.hash_buckets and size > feature.hash_buckets:
            info["hashed"] = int(feature.hash_buckets)
            self.schema.hashed[space] = int(feature.hash_buckets)
        else:
            self.schema.vocab_sizes[space] = int(size)
            (self.out_dir / VOCAB_DIR).mkdir(parents=True, exist_ok=True)
            path = self.out_dir / VOCAB_DIR / f"{space}.parquet"
            self.con.execute(
                f"COPY (SELECT token FROM {table} ORDER BY idx) TO {literal(str(path))} (FORMAT parquet)"
            )
        self.spaces[space] = info
        return info

    def _lookup_sql(self, info: Dict[str, Any], token: str) -> str:
        """token -> index (0: unseen or missing) as an expression; vocabulary joins are added
        by the caller through ``self.joins``."""
        if info["hashed"]:
            hashed = f"1 + hash({token}) % {info['hashed']}"
            return f"CAST(CASE WHEN {token} IS NULL THEN 0 ELSE {hashed} END AS INTEGER)"
        alias = f"j{len(self.joins)}"
        self.joins.append(f"LEFT JOIN {info['table']} {alias} ON {alias}.token = {token}")
        return f"coalesce({alias}.idx, 0)"

    def _id_lookup(self, space: str, column: str, feature: FeatureConfig) -> str:
        """One id per row of ``column`` in ``space`` (fitted by the first feature that uses the
        space; later ones share its token type and table): the index expression, 0 when unseen."""
        token_type = self.spaces.get(space, {}).get("token_type") or self._space_token_type(space, column)
        token = self.token_sql(column, token_type)
        info = self._fit_space(space, token, feature, multi=False)
        info.setdefault("token_type", token_type)
        self.schema.token_types[space] = info["token_type"]
        return f"CAST({self._lookup_sql(info, token)} AS INTEGER)"

    # ---------------------------------------------------------------- numbers
    def _numeric_sql(self, column: str, feature: FeatureConfig, table: str) -> str:
        """The value of a numeric feature as DOUBLE (NULL when missing), transformed;
        ``table`` is the alias it is read from (e: events, h: the history table)."""
        q = f"{table}.{quote(column)}"
        value = f"CAST({q} AS DOUBLE)"
        value = f"(CASE WHEN isnan({value}) THEN NULL ELSE {value} END)"
        if feature.transform == "log1p":
            source = SOURCES[table]
            bad = self.con.execute(f"SELECT min(__src) FROM {source} WHERE {value} < 0").fetchone()[0]
            if bad is not None:
                err = self.events.locate(column, bad)
                raise DataError(
                    "log1p transform needs values >= 0",
                    file=err.file,
                    column=column,
                    row=err.row,
                    expected="a non-negative number",
                )
            value = f"ln(1 + {value})"
        return value

    # --------------------------------------------------------- id statistics
    fitting = True  # fits statistics on the training rows (a SchemaApplier reads them back)

    def stat_token_type(self, feature: FeatureConfig) -> str:
        """The token type of a target_mean / id_count feature's id column."""
        return self._token_type(feature.column or feature.name)

    def fit_stats(self, group, table: str, key: str, token_type: str, seed: int) -> None:
        """The per-id training statistics of the features ``group`` ([(index, feature)], one id
        column) as DuckDB ``table``, saved beside the schema for scoring
        (engagerec.data.target_stats)."""
        with single_thread(self.con):  # label sums in a fixed order: the same values on every run
            priors = fit_stat_tables(self.con, group, table, key, seed, self.out_dir)
        for _, feature in group:
            meta = stat_meta(feature, priors[feature.name], token_type)
            if live_counters(group):  # saved as they stand at the log's end: scoring's rows come after
                meta["counted_until"] = self.log_end
            self.schema.target_stats[feature.name] = meta

    @functools.cached_property
    def log_end(self) -> float:
        """The log's last timestamp: the moment live counters are saved at (one scan for every
        id column's)."""
        return float(self.con.execute(f"SELECT max({quote(TIMESTAMP)}) FROM events").fetchone()[0])

    # ------------------------------------------------------------------- fit
    def fit_ids(self) -> None:
        """Phase 1: vocabularies (or hashing) of every sparse feature, on train rows.

        Leaves ``sparse_sql`` (feature -> SELECT expression over ``events e`` and ``joins``)
        and ``histories`` ([(feature, encoded id expression)]) for the history windows.
        """
        self.joins: List[str] = []
        self.sparse_sql: Dict[str, Optional[str]] = {}
        self.histories: List[Any] = []
        self.history_joins: List[str] = []
        self._entries: Dict[int, List[SparseFeature]] = {}
        for index, feature in enumerate(self.features):
            column = feature.column or feature.name
            if feature.kind == "categorical":
                space = feature.id_space or column
                self.sparse_sql[feature.name] = self._id_lookup(space, column, feature)
                self._entries[index] = [SparseFeature(feature.name, space, multi=False)]
            elif feature.kind == "multi_hot":
                space = feature.id_space or column
                sep = literal(feature.separator)
                tokens = (
                    "list_filter(list_transform(string_split("
                    f"coalesce(CAST(e.{quote(column)} AS VARCHAR), ''), {sep}), lambda t: trim(t)), "
                    "lambda t: t <> '')"
                )
                info = self._fit_space(space, tokens, feature, multi=True)
                info.setdefault("token_type", "VARCHAR")
                self.schema.token_types[space] = info["token_type"]
                if info["hashed"]:
                    mapped = (
                        f"list_transform({tokens}, lambda t: CAST(1 + hash(t) % {info['hashed']} AS INTEGER))"
                    )
                else:  # multi-hot vocabularies are small (genres, tags): a constant list lookup
                    vocab = self.con.execute(
                        f"SELECT list(token ORDER BY idx) FROM {info['table']}"
                    ).fetchone()[0]
                    vocab_sql = "[" + ", ".join(literal(t) for t in (vocab or [])) + "]::VARCHAR[]"
                    position = f"CAST(coalesce(list_position({vocab_sql}, t), 0) AS INTEGER)"
                    mapped = f"list_transform({tokens}, lambda t: {position})"
                self.sparse_sql[feature.name] = mapped
                self._entries[index] = [SparseFeature(feature.name, space, multi=True)]
            elif feature.kind == "history":
                space = feature.id_space or feature.of
                before = len(self.joins)
                lookup = self._id_lookup(space, feature.of, feature)
                self.history_joins += self.joins[before:]
                self.histories.append((feature, lookup))
                if feature.positions:  # position p of the window: a bag of 0 or 1 id
                    names = position_names(feature.name, feature.length)
                    for p, name in enumerate(names):
                        self.sparse_sql[name] = f"h.{quote(feature.name)}[{p + 1}:{p + 1}]"
                    self._entries[index] = [SparseFeature(name, space, multi=True) for name in names]
                else:
                    self.sparse_sql[feature.name] = f"h.{quote(feature.name)}"  # from the history table
                    self._entries[index] = [SparseFeature(feature.name, space, multi=True)]

    def _moments(self, feature: FeatureConfig, value: str, source: str, table: str) -> Tuple[float, float]:
        """(mean, std) of a numeric feature's train values (std 1 when they are constant)."""
        mean, std, count = self.con.execute(
            f"SELECT avg(v), stddev_pop(v), count(v) FROM (SELECT {value} AS v FROM {source} "
            f"WHERE {table}.__split = 0)"
        ).fetchone()
        if not count:
            raise DataError(
                "numeric feature has no values in the training split",
                column=feature.column or feature.name,
                expected="at least one number",
            )
        return float(mean), (float(std) if std and std > 0 else 1.0)

    def _bucket_edges(
        self, feature: FeatureConfig, bucket: str, value: str, source: str, table: str
    ) -> List[float]:
        """The bucket boundaries of a numeric feature: exact quantiles of its train values."""
        quantiles = [i / feature.buckets for i in range(1, feature.buckets)]
        edges = self.con.execute(
            f"SELECT quantile_cont(v, {quantiles}) FROM (SELECT {value} AS v FROM {source} "
            f"WHERE {table}.__split = 0) WHERE v IS NOT NULL"
        ).fetchone()[0]
        return sorted(set(float(x) for x in edges))

    def fit_numbers(self) -> DatasetSchema:
        """Phase 2: normalisation and buckets of every numeric feature on train rows (history_mean
        features are read from the ``history`` table the windows wrote), then the schema."""
        self.dense_sql: Dict[str, str] = {}
        dense: Dict[int, DenseFeature] = {}
        for index, feature in enumerate(self.features):
            if feature.kind not in ("numeric", "history_mean", *STAT_KINDS):
                continue
            column = feature.column or feature.name
            computed = feature.kind in ("history_mean", *STAT_KINDS)  # by prepare, never missing
            table = "h" if computed else "e"  # the history table holds what prepare computed
            source = SOURCES[table]
            value = self._numeric_sql(feature.name if computed else column, feature, table)
            mean, std = self._moments(feature, value, source, table)
            fill = float(mean) if feature.missing == "mean" or computed else None
            if fill is None:
                bad = self.con.execute(f"SELECT min(__src) FROM events e WHERE {value} IS NULL").fetchone()[0]
                if bad is not None:
                    err = self.events.locate(column, bad)
                    raise DataError(
                        "numeric feature value is missing",
                        file=err.file,
                        column=column,
                        row=err.row,
                        expected="a number (or set missing: mean on the feature to impute)",
                    )
            filled = f"coalesce({value}, {float(mean)!r})"
            self.dense_sql[feature.name] = f"CAST(({filled} - {float(mean)!r}) / {std!r} AS FLOAT)"
            dense[index] = DenseFeature(feature.name, column, feature.transform, float(mean), std, fill)
            if feature.buckets > 0:
                bucket = f"{feature.name}_bucket"
                edges = self._bucket_edges(feature, bucket, value, source, table)
                self.schema.buckets[bucket] = edges
                self.schema.vocab_sizes[bucket] = len(edges) + 1
                edge_sql = "[" + ", ".join(repr(x) for x in edges) + "]::DOUBLE[]"
                self.sparse_sql[bucket] = (
                    f"CAST(CASE WHEN {value} IS NULL THEN 0 "
                    f"ELSE 1 + len(list_filter({edge_sql}, lambda b: b <= {filled})) END AS INTEGER)"
                )
                self._entries.setdefault(index, []).append(SparseFeature(bucket, bucket, multi=False))
        order = sorted(self._entries)
        self.schema.sparse = [entry for index in order for entry in self._entries[index]]
        self.schema.dense = [dense[index] for index in sorted(dense)]
        self.schema.input_columns = {
            c: ("number" if is_numeric(self.events.columns[c]) else "text")
            for c in _input_columns(self.features)
        }
        return self.schema


def _input_columns(features: List[FeatureConfig]) -> List[str]:
    columns = []
    for feature in features:
        if feature.kind == "history_mean":
            continue  # computed by prepare from earlier rows, not read from the input tables
        column = feature.of if feature.kind == "history" else (feature.column or feature.name)
        if column not in columns:
            columns.append(column)
    return columns
