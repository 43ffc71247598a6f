"""Fitting a DatasetSchema on the TRAIN rows of the ``events`` table, in DuckDB (prepare's step).

Vocabularies (or hashing), exact quantile buckets and normalisation are fitted by SQL over
``events`` (engagerec.data.events), so they run out of core: a vocabulary of millions of ids
is a DuckDB table, never a Python list. The ``Fitter`` also writes the SQL that encodes every
row; scoring reuses it with the fitted values read back (engagerec.data.scoring's
``SchemaApplier``). What is fitted, and how rows are encoded, is the contract in
engagerec.data.schema.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engagerec.config import FeatureConfig
from engagerec.data.errors import DataError
from engagerec.data.exact_sums import UnsummableError, exact_moments
from engagerec.data.raw import TIMESTAMP
from engagerec.data.schema import (
    MANAGED_INPUT_BUCKETS,
    VOCAB_DIR,
    DatasetSchema,
    DenseFeature,
    LabelSpec,
    SparseFeature,
    managed_spec,
    position_names,
)
from engagerec.data.tables import is_numeric, literal, quote
from engagerec.data.target_stats import (
    STAT_KINDS,
    fit_stat_tables,
    label_bits,
    live_counters,
    save_stat_files,
    stat_features,
    stat_meta,
)

FEATURE_KINDS = ("categorical", "multi_hot", "numeric", "history", "history_mean", *STAT_KINDS)
TRANSFORMS = ("none", "log1p")
# where a dense feature's values are read: the joined rows, or the history table that holds
# the history windows and id statistics (the aliases the shard writer gives them)
SOURCES = {"e": "events e", "h": "history h"}


@dataclass(frozen=True)
class Reads:
    """What one encoded column's SQL (``Fitter.sparse_sql`` / ``dense_sql``) reads, recorded as
    the fitter writes it, so the shard writer can tell which columns to encode once per user and
    which read the history table without parsing SQL (a token such as ``'h.264'`` in a
    vocabulary literal would fool a pattern).

    Args:
        column: the events' column it reads (alias ``e``); None: the history table (alias ``h``).
        joins: the indices in ``Fitter.joins`` of the vocabulary joins it reads.

    Example::

        >>> Reads("gender", (0,)).column, Reads(None).joins
        ('gender', ())
    """

    column: Optional[str]
    joins: Tuple[int, ...] = ()


def validate_features(features: List[FeatureConfig], columns: Dict[str, str], labels: List[str]) -> None:
    """Check the features before anything is fitted: names unique, kinds and options known,
    every column present in the joined tables.

    Args:
        features: ``data.features``.
        columns: the joined tables' columns (name -> DuckDB type; only the names are read).
        labels: the labels' names (what history_mean and target_mean may average).

    Raises:
        DataError: naming the feature (``data.features[i]``) and what was expected.

    Example::

        >>> from engagerec.config import FeatureConfig
        >>> validate_features([FeatureConfig("age", kind="numeric")], {"age": "BIGINT"}, ["skip"])
        >>> try:
        ...     validate_features([FeatureConfig("mood", kind="history_mean", of="like")], {}, ["skip"])
        ... except DataError as err:
        ...     print(err.expected)
        of: one of the labels ['skip']
    """
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
        if feature.max_items < 0 or (feature.max_items and feature.kind != "multi_hot"):
            raise DataError(
                f"{where}: max_items {feature.max_items}"
                + (f" on a {feature.kind} feature" if feature.kind != "multi_hot" else ""),
                expected="max_items >= 1 on a multi_hot feature (0: every id of the list)",
            )
        if feature.managed_collisions:
            _check_managed(feature, where)
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
    _check_shared_spaces(features)


def _check_shared_spaces(features: List[FeatureConfig]) -> None:
    """Features sharing an id space share its table: they must agree on managed collisions, and
    on max_items (the space's first feature fits its vocabulary: a shorter list would leave the
    other's later ids out of it, unseen)."""
    first: Dict[str, Tuple[int, Optional[Dict[str, Any]]]] = {}
    for i, feature in enumerate(features):
        if feature.kind not in ("categorical", "multi_hot", "history"):
            continue
        column = feature.of if feature.kind == "history" else (feature.column or feature.name)
        space = feature.id_space or column
        managed = managed_spec(feature) if feature.managed_collisions else None
        j, theirs = first.setdefault(space, (i, managed))
        if theirs != managed:
            raise DataError(
                f"data.features[{i}] ('{feature.name}') shares id space '{space}' with "
                f"data.features[{j}] ('{features[j].name}'), with other managed_collisions settings",
                expected=f"the same settings as data.features[{j}]: {theirs or 'none'}",
                got=managed or "none",
            )
        if feature.max_items != features[j].max_items:
            raise DataError(
                f"data.features[{i}] ('{feature.name}') shares id space '{space}' with "
                f"data.features[{j}] ('{features[j].name}'), with another max_items",
                expected=f"an id_space of its own, or max_items {features[j].max_items}",
                got=feature.max_items,
            )


def _check_managed(feature: FeatureConfig, where: str) -> None:
    """A managed-collision id space's settings: rows for its ids and at least the shared row,
    on a feature kind that holds ids, and no second way of bounding the table."""
    if feature.kind not in ("categorical", "history"):
        raise DataError(
            f"{where}: managed_collisions on a {feature.kind} feature",
            expected="kind: categorical or history",
        )
    if feature.managed_collisions < 2 or feature.eviction_interval < 1 or feature.hash_buckets:
        raise DataError(
            f"{where}: managed_collisions {feature.managed_collisions}, eviction_interval "
            f"{feature.eviction_interval}, hash_buckets {feature.hash_buckets}",
            expected="managed_collisions >= 2 rows, eviction_interval >= 1, and no hash_buckets",
        )


class Fitter:
    """Fits a DatasetSchema on the train rows of the ``events`` table and writes the SQL that
    encodes every row. Vocabularies become DuckDB tables ``vocab_<n>`` (token, idx).

    Run by engagerec.data.prepare (``fit_ids``, the history windows, then ``fit_numbers``);
    scoring subclasses it to read every fitted value back instead (``SchemaApplier``).

    Args:
        con: the DuckDB connection holding ``events`` (and, after the windows, ``history``).
        events: the ``events`` table's description (engagerec.data.events.Events).
        features: ``data.features``, checked by ``validate_features``.
        out_dir: the prepared directory: ``vocabs/`` and ``stats/`` are written into it.
    """

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
        # statistics table -> a base's sums the saved statistics add (engagerec.data.growth)
        self.carried_tables: Dict[str, str] = {}

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
        if feature.managed_collisions:  # no vocabulary: every id as a 31-bit hash, which MCH remaps
            self.schema.hashed[space] = MANAGED_INPUT_BUCKETS
            self.schema.managed[space] = managed_spec(feature)
            self.spaces[space] = {"table": f"vocab_{len(self.spaces)}", "hashed": MANAGED_INPUT_BUCKETS}
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
            self.save_vocabulary(space, table)
        self.spaces[space] = info
        return info

    def save_vocabulary(self, space: str, table: str) -> None:
        """``vocabs/<space>.parquet``: the vocabulary table's tokens in index order (index = file
        row + 1), what scoring and a later window read back."""
        (self.out_dir / VOCAB_DIR).mkdir(parents=True, exist_ok=True)
        path = self.out_dir / VOCAB_DIR / f"{space}.parquet"
        self.con.execute(
            f"COPY (SELECT token FROM {table} ORDER BY idx) TO {literal(str(path))} (FORMAT parquet)"
        )

    def _lookup_sql(self, info: Dict[str, Any], token: str) -> str:
        """token -> index (0: unseen or missing) as an expression; vocabulary joins are added
        by the caller through ``self.joins``."""
        self.last_join = None
        if info["hashed"]:
            hashed = f"1 + hash({token}) % {info['hashed']}"
            return f"CAST(CASE WHEN {token} IS NULL THEN 0 ELSE {hashed} END AS INTEGER)"
        # one join per (vocabulary, token): a feature and a history of the same ids share it (each
        # join holds its vocabulary as a hash table, and a large one twice ran out of memory)
        key = (info["table"], token)
        if key not in self._join_alias:
            alias = self._join_alias[key] = f"j{len(self.joins)}"
            self.joins.append(f"LEFT JOIN {info['table']} {alias} ON {alias}.token = {token}")
        alias = self._join_alias[key]
        self.last_join = int(alias[1:])
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
        priors = fit_stat_tables(self.con, group, table, key, seed, self.label_grid)  # exact sums
        save_stat_files(self.con, group, table, self.out_dir, self.carried_tables.get(table))
        for _, feature in group:
            meta = stat_meta(feature, priors[feature.name], token_type)
            if live_counters(group):  # saved as they stand at the log's end: scoring's rows come after
                meta["counted_until"] = self.log_end
            self.schema.target_stats[feature.name] = meta

    def carried_stats(self, group, table: str, key: str) -> Tuple[List[str], Dict[str, Dict[str, str]]]:
        """Sums that every row's statistics start from, per feature of ``group`` (``s``, ``c``,
        ``n`` as SQL), and the joins they read: none here; a window prepared against a base
        carries on from the base's (engagerec.data.growth)."""
        return [], {}

    @functools.cached_property
    def label_grid(self) -> Dict[str, int]:
        """The exact-sum grid of every label a target mean sums (``label_bits``): one scan of the
        events for every id column's statistics and their windows."""
        return label_bits(self.con, [f.of for f in stat_features(self.features) if f.kind == "target_mean"])

    @functools.cached_property
    def log_end(self) -> float:
        """The log's last timestamp: the moment live counters are saved at (one scan for every
        id column's)."""
        return float(self.con.execute(f"SELECT max({quote(TIMESTAMP)}) FROM events").fetchone()[0])

    # ------------------------------------------------------------------- fit
    def fit_ids(self) -> None:
        """Phase 1: vocabularies (or hashing) of every sparse feature, on train rows.

        Leaves ``sparse_sql`` (feature -> SELECT expression over ``events e`` and ``joins``),
        ``reads`` (feature -> what that expression reads) and ``histories`` ([(feature, encoded
        id expression)]) for the history windows.
        """
        self.joins: List[str] = []
        self._join_alias: Dict[Tuple[str, str], str] = {}  # (vocabulary table, token) -> its join's alias
        self.last_join: Optional[int] = None  # the index of the join the last lookup reads (None: hashed)
        self.sparse_sql: Dict[str, Optional[str]] = {}
        self.reads: Dict[str, Reads] = {}  # encoded column -> what its SQL reads
        self.histories: List[Any] = []
        self.history_joins: List[str] = []
        self._entries: Dict[int, List[SparseFeature]] = {}
        for index, feature in enumerate(self.features):
            column = feature.column or feature.name
            if feature.kind == "categorical":
                space = feature.id_space or column
                self.sparse_sql[feature.name] = self._id_lookup(space, column, feature)
                self.reads[feature.name] = Reads(column, () if self.last_join is None else (self.last_join,))
                self._entries[index] = [SparseFeature(feature.name, space, multi=False)]
            elif feature.kind == "multi_hot":
                space = feature.id_space or column
                sep = literal(feature.separator)
                tokens = (
                    "list_filter(list_transform(string_split("
                    f"coalesce(CAST(e.{quote(column)} AS VARCHAR), ''), {sep}), lambda t: trim(t)), "
                    "lambda t: t <> '')"
                )
                if feature.max_items:  # the list's first ids, in the order the row gives them
                    tokens = f"list_slice({tokens}, 1, {int(feature.max_items)})"
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
                self.reads[feature.name] = Reads(column)  # the vocabulary is a literal list, no join
                self._entries[index] = [SparseFeature(feature.name, space, multi=True)]
            elif feature.kind == "history":
                space = feature.id_space or feature.of
                lookup = self._id_lookup(space, feature.of, feature)
                if self.last_join is not None and self.joins[self.last_join] not in self.history_joins:
                    self.history_joins.append(self.joins[self.last_join])  # the history's query joins it too
                self.histories.append((feature, lookup))
                if feature.positions:  # position p of the window: a bag of 0 or 1 id
                    names = position_names(feature.name, feature.length)
                    for p, name in enumerate(names):
                        self.sparse_sql[name] = f"h.{quote(feature.name)}[{p + 1}:{p + 1}]"
                        self.reads[name] = Reads(None)
                    self._entries[index] = [SparseFeature(name, space, multi=True) for name in names]
                else:
                    self.sparse_sql[feature.name] = f"h.{quote(feature.name)}"  # from the history table
                    self.reads[feature.name] = Reads(None)
                    self._entries[index] = [SparseFeature(feature.name, space, multi=True)]

    def _moments(self, numeric: List[Tuple[FeatureConfig, str, str]]) -> Dict[str, Tuple[float, float]]:
        """(mean, std) of every numeric feature's train values (std 1 when they are constant), by
        feature name; a feature without a value is absent. ``numeric``: (feature, its value as
        SQL, the alias it reads: e or h).

        Exact sums on every thread (engagerec.data.exact_sums), for every feature of a table at
        once: DuckDB's float aggregates gave means that differed in their last bits from run to
        run, even on one thread, as the rows' order follows the parallel statements that wrote
        the tables."""
        moments: Dict[str, Tuple[float, float]] = {}
        for table, source in SOURCES.items():
            group = [(feature, value) for feature, value, alias in numeric if alias == table]
            if not group:
                continue
            values = [value for _, value in group]
            try:
                found = exact_moments(self.con, values, f"{source} WHERE {table}.__split = 0")
            except UnsummableError as err:
                feature, value = group[err.index]
                column = feature.column or feature.name
                bad = self.con.execute(
                    f"SELECT min(__src) FROM {source} WHERE {table}.__split = 0 AND NOT abs({value}) < 1e150"
                ).fetchone()[0]
                where = self.events.locate(column, bad) if bad is not None and table == "e" else None
                raise DataError(
                    f"numeric feature '{feature.name}': {err} in the training split",
                    file=where.file if where else None,
                    column=column,
                    row=where.row if where else None,
                    expected="finite numbers below about 1e150 in magnitude",
                ) from None
            for (feature, _), fitted in zip(group, found[None], strict=True):
                if fitted.count:
                    std = math.sqrt(fitted.var)
                    moments[feature.name] = (fitted.mean, std if std > 0 else 1.0)
        return moments

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
        numeric = []  # (index, feature, its column, the table it is read from, its value as SQL)
        for index, feature in enumerate(self.features):
            if feature.kind not in ("numeric", "history_mean", *STAT_KINDS):
                continue
            column = feature.column or feature.name
            computed = feature.kind in ("history_mean", *STAT_KINDS)  # by prepare, never missing
            table = "h" if computed else "e"  # the history table holds what prepare computed
            value = self._numeric_sql(feature.name if computed else column, feature, table)
            numeric.append((index, feature, column, table, value))
        moments = self._moments([(feature, value, table) for _, feature, _, table, value in numeric])
        for index, feature, column, table, value in numeric:
            computed = table == "h"
            if feature.name not in moments:
                raise DataError(
                    "numeric feature has no values in the training split",
                    column=column,
                    expected="at least one number",
                )
            mean, std = moments[feature.name]
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
            self.reads[feature.name] = Reads(None if computed else column)
            dense[index] = DenseFeature(feature.name, column, feature.transform, float(mean), std, fill)
            if feature.buckets > 0:
                bucket = f"{feature.name}_bucket"
                edges = self._bucket_edges(feature, bucket, value, SOURCES[table], table)
                self.schema.buckets[bucket] = edges
                self.schema.vocab_sizes[bucket] = len(edges) + 1
                edge_sql = "[" + ", ".join(repr(x) for x in edges) + "]::DOUBLE[]"
                self.sparse_sql[bucket] = (
                    f"CAST(CASE WHEN {value} IS NULL THEN 0 "
                    f"ELSE 1 + len(list_filter({edge_sql}, lambda b: b <= {filled})) END AS INTEGER)"
                )
                self.reads[bucket] = self.reads[feature.name]
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
