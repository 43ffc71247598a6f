"""Leak-free statistics of an id, as dense inputs: over the training rows, or (``scheme:
online``) as live counters over every earlier view.

Two feature kinds, both keyed by one id column (``column``):

* ``target_mean``: the mean of a label (``of``) over the training rows with that id, shrunk
  towards the training mean by ``smoothing`` pseudo-rows: ``(sum + m * prior) / (count + m)``.
  A training row must not see its own label, so training rows are cross-fitted: the rows are
  cut into ``folds`` seeded folds and each row gets the statistics of the other folds (the
  scheme of scikit-learn's TargetEncoder, and what engagerec_study.gbdt's reference feeds its
  trees). Validation, test and scored rows get the statistics of all training rows.
* ``id_count``: how many training rows have that id, the row itself left out (a popular
  video, a heavy user); usually with ``transform: log1p``.

No row reads its own label, and only live counters read labels of validation or test rows
(of earlier views, as a server's counters would). Cross-fitting
keeps a training row's own label out, but for a rare id (a row or two per fold) the other
folds' mean moves against the row's own label, and a model that also embeds the id can read a
little of it back: smoothing (``smoothing`` pseudo-rows of the training mean) damps this.

With ``scheme: cross_fit`` (the default) a training row's statistics include later training
rows, as the cross-fitted encoder's do, while under a temporal split a test row's cover only
the past: the model learns a freshness it will not have. ``scheme: ordered`` (CatBoost's
ordered target statistics, Prokhorenkova et al. 2018) gives every row the training rows of
its id strictly before its moment (the timestamp; simultaneous rows excluded), the same rule
for training and held-out rows.

``scheme: online`` drops the training-rows-only rule: every row gets the id's rows of every
split strictly before its moment (at least ``lag`` timestamp units before, when set). These are
the live counters a serving system updates as views end: a held-out row's statistics include
the labels of earlier held-out views of the same id (as its history_mean features include the
user's earlier views), never its own or a simultaneous one, and they stay fresh through a
temporal test period where training-only statistics go stale. With ``lag`` 0 a view still
playing when this one starts counts as known; a lag of about the longest view excludes it.
Scoring reads back the counters over every prepared row, as they stood at the log's last
moment (``counted_until`` in schema.json), and refuses rows at or before it.

The per-id sums and counts go to ``stats/<feature>.parquet`` beside schema.json (and the
prior to schema.json's ``target_stats``), so ``engagerec predict`` encodes new rows with the
training statistics (or the live counters). The per-row values are columns of the history
table (one row per event, keyed by the source row), which the shard writer joins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import duckdb

from engagerec.config import FeatureConfig
from engagerec.data.errors import DataError
from engagerec.data.exact_sums import fixed_sum, grid_bits
from engagerec.data.raw import TIMESTAMP
from engagerec.data.split import seeded_key
from engagerec.data.tables import literal, quote

STATS_DIR = "stats"
STAT_KINDS = ("target_mean", "id_count")


def stat_features(features: List[FeatureConfig]) -> List[FeatureConfig]:
    """The features computed here, in config order."""
    return [feature for feature in features if feature.kind in STAT_KINDS]


def stat_sql(fitter, features: List[FeatureConfig], seed: int) -> Tuple[List[str], Dict[str, str]]:
    """
    Fit (prepare) or read back (scoring) the per-id statistics of every target_mean and
    id_count feature (training rows, or every row for live counters) as DuckDB tables, and
    return the SQL that puts them on each row of ``events e``: the joins, and per feature its
    value. engagerec.data.prepare.build_history computes them in the history table's pass (the
    shard writer joins one per-row table: a second one did not fit 1 GB at KuaiRand-1K scale).

    Args:
        fitter: the prepare ``Fitter`` (fits on train rows and writes ``stats/`` beside the
            schema) or a scoring ``SchemaApplier`` (reads the training ones back).
        features: the data config's features (the others are left out).
        seed: the fold assignment's seed (``data.split.seed``).

    Returns:
        Tuple[List[str], Dict[str, str]]: LEFT JOIN clauses, and feature name -> SQL value.

    Example::

        joins, values = stat_sql(fitter, cfg.features, cfg.split.seed)
        con.execute(f"SELECT {values['video_views']} FROM events e {' '.join(joins)} LIMIT 3")
    """
    joins, values = [], {}
    labelled: Dict[Tuple[str, str], bool] = {}  # (label, counted rows) -> every counted row has it
    bits = fitter.label_grid if fitter.fitting else {}  # read back for scoring: no sums
    for c, ((column, _), group) in enumerate(_groups(features).items()):
        token_type = fitter.stat_token_type(group[0][1])
        key = fitter.token_sql(column, token_type)
        # one table per id column, one pass over the training rows for all of its features
        fitter.fit_stats(group, f"stat_{c}", key, token_type, seed)
        # a base's sums, which the window's rows carry on from (engagerec.data.growth)
        carried_joins, carried = fitter.carried_stats(group, f"stat_{c}", key)
        joins += carried_joins
        joined = False
        for i, feature in group:
            meta = fitter.schema.target_stats[feature.name]
            if fitter.fitting and feature.scheme in ("ordered", "online"):
                every_row_labelled = _every_counted_row_labelled(fitter.con, feature, labelled)
                sums = _ordered_sums(feature, key, bits.get(feature.of, 0), every_row_labelled)
            else:  # cross-fitted, or read back for scoring (never training rows: no fold of their own)
                if not joined:
                    joins.append(f"LEFT JOIN stat_{c} a{c} ON a{c}.token = {key}")
                    joined = True
                sums = _cross_fitted_sums(feature, f"a{c}", f"_{i}", fold_sql(feature, seed), key)
            if feature.name in carried:
                sums = {x: f"({sql}) + {carried[feature.name].get(x, 0)}" for x, sql in sums.items()}
            values[feature.name] = _value(feature, sums, key, meta)
    return joins, values


def live_counters(group: List[Tuple[int, FeatureConfig]]) -> bool:
    """Whether a group of ``_groups`` (one id column's features, all live counters or none)
    holds live counters (``scheme: online``)."""
    return group[0][1].scheme == "online"


def _groups(features: List[FeatureConfig]) -> Dict[Tuple[str, bool], List[Tuple[int, FeatureConfig]]]:
    """The statistic features by (id column, live counters or not): one per-id table each, as
    live counters sum every split's rows and the other schemes the training rows only."""
    groups: Dict[Tuple[str, bool], List[Tuple[int, FeatureConfig]]] = {}
    for i, feature in enumerate(stat_features(features)):
        groups.setdefault((feature.column or feature.name, feature.scheme == "online"), []).append(
            (i, feature)
        )
    return groups


def drop_stat_tables(con: duckdb.DuckDBPyConnection, features: List[FeatureConfig]) -> None:
    """Free the per-id tables once the rows hold their values.

    Args:
        con: the connection ``stat_sql`` made them in.
        features: the same features ``stat_sql`` was given (one table per id column and scheme
            kind, numbered as it numbered them).
    """
    for c in range(len(_groups(features))):
        con.execute(f"DROP TABLE IF EXISTS stat_{c}")


TRAINING_ROW = "e.__split = 0"
# a row of the log (train, val or test): live counters count these, never a base's last views,
# which only feed the history windows (their split is engagerec.data.growth.BASE_ROWS, 3)
LOGGED_ROW = "e.__split <= 2"


def _cross_fitted_sums(
    feature: FeatureConfig, alias: str, suffix: str, fold: str, key: str
) -> Dict[str, str]:
    """The id's training sums in ``alias`` (the feature's ``s<suffix>`` label sum and
    ``c<suffix>`` labelled rows; ``n`` rows), less, on a training row, those of its own fold
    (``s<suffix>_0, c<suffix>_0, s<suffix>_1, ...``) and the row itself."""
    folds = range(feature.folds)

    def own_fold(x: str) -> str:
        cases = " ".join(f"WHEN {k} THEN {alias}.{x}{suffix}_{k}" for k in folds)
        return f"(CASE WHEN {TRAINING_ROW} THEN coalesce(CASE {fold} {cases} END, 0) ELSE 0 END)"

    itself = f"(CASE WHEN {TRAINING_ROW} AND {key} IS NOT NULL THEN 1 ELSE 0 END)"
    if feature.kind == "id_count":
        return {"n": f"coalesce({alias}.n, 0) - {itself}"}
    return {f"{x}": f"coalesce({alias}.{x}{suffix}, 0) - {own_fold(x)}" for x in ("s", "c")}


def _counted_rows(feature: FeatureConfig) -> str:
    """The rows an ordered statistic counts: the training rows, or with ``scheme: online`` the log's."""
    return LOGGED_ROW if feature.scheme == "online" else TRAINING_ROW


def _every_counted_row_labelled(
    con: duckdb.DuckDBPyConnection, feature: FeatureConfig, known: Dict[Tuple[str, str], bool]
) -> bool:
    """Whether every row that ``feature`` counts has its label (``known`` caches the answers per
    label and counted rows). Then its labelled rows are its rows, and one windowed count serves
    both: at KuaiRand-1K scale each windowed aggregate over the user's rows costs about 3 s."""
    if feature.kind != "target_mean":
        return False
    counted = _counted_rows(feature)
    if (feature.of, counted) not in known:
        missing = con.execute(
            f"SELECT count(*) FROM events e WHERE {counted} AND e.{quote(feature.of)} IS NULL"
        ).fetchone()[0]
        known[feature.of, counted] = missing == 0
    return known[feature.of, counted]


def _ordered_sums(
    feature: FeatureConfig, key: str, bits: int, every_row_labelled: bool = False
) -> Dict[str, str]:
    """The rows of the id strictly before this row's moment (training rows only, or with
    ``scheme: online`` every split's, ``lag`` before), as windows over ``events e`` (ordered
    target statistics): the running sums up to the moment, its own rows excluded (a row never
    sees itself or anything simultaneous). The label sums are exact on the grid of ``bits``
    (``label_bits``): simultaneous rows come in either order. ``every_row_labelled``: no counted
    row lacks the label, so the labelled rows are counted by the rows' own window (the same
    count: DuckDB computes one window for the identical expressions)."""
    time = f"e.{quote(TIMESTAMP)}"
    label = f"e.{quote(feature.of)}" if feature.kind == "target_mean" else "NULL"
    counted = _counted_rows(feature)
    y, row = (
        f"CASE WHEN {counted} THEN CAST({label} AS DOUBLE) END",
        f"CASE WHEN {counted} THEN 1 END",
    )
    # one window order (one sort per id column); the frames differ only in their bounds
    order = f"PARTITION BY {key} ORDER BY {time} RANGE BETWEEN"
    if feature.lag > 0:  # rows at least lag before: strictly earlier, the moment left out
        window = f"OVER ({order} UNBOUNDED PRECEDING AND {float(feature.lag)!r} PRECEDING)"
    else:
        # everything up to the row's moment, the moment's own rows excluded: one window (the
        # same sums as "up to and including" less "the moment", which took two)
        window = f"OVER ({order} UNBOUNDED PRECEDING AND CURRENT ROW EXCLUDE GROUP)"
    labelled = row if every_row_labelled else y
    return {
        "s": f"coalesce({fixed_sum(y, bits, window)}, 0)",
        "c": f"coalesce(count({labelled}) {window}, 0)",
        "n": f"coalesce(count({row}) {window}, 0)",
    }


def label_bits(con: duckdb.DuckDBPyConnection, labels: List[str]) -> Dict[str, int]:
    """
    The exact-sum grid (engagerec.data.exact_sums) of each label the target means sum, from its
    largest magnitude and the rows of ``events`` (which hold every row any statistic counts):
    sums in doubles, as the running sums are windows, where DuckDB's 128-bit integers were
    1.3x slower.

    Args:
        con (duckdb.DuckDBPyConnection): the prepare connection (holds ``events``).
        labels (List[str]): the labels' columns (repeats are read once).

    Returns:
        Dict[str, int]: label -> the grid's bits.

    Example::

        >>> import duckdb
        >>> from engagerec.data.target_stats import label_bits
        >>> con = duckdb.connect()
        >>> _ = con.execute("CREATE TABLE events AS SELECT range / 1000 AS watch_ratio FROM range(1001)")
        >>> label_bits(con, ["watch_ratio", "watch_ratio"])  # ratios up to 1, 1,001 rows
        {'watch_ratio': 42}
    """
    labels = sorted(set(labels))
    if not labels:
        return {}
    bounds = ", ".join(f"max(abs(CAST({quote(label)} AS DOUBLE)))" for label in labels)
    rows, *found = con.execute(f"SELECT count(*), {bounds} FROM events").fetchone()
    return {label: grid_bits(bound, rows) for label, bound in zip(labels, found, strict=True)}


def _value(feature: FeatureConfig, sums: Dict[str, str], key: str, meta: Dict[str, Any]) -> str:
    """A statistic feature's value from the sums a row may see (``s`` label sum, ``c`` labelled
    rows, ``n`` rows)."""
    if feature.kind == "id_count":  # a missing id has no views (windows would pool missing ids)
        return f"CAST(CASE WHEN {key} IS NULL THEN 0 ELSE {sums['n']} END AS DOUBLE)"
    m, prior = f"CAST({float(feature.smoothing)!r} AS DOUBLE)", f"CAST({float(meta['prior'])!r} AS DOUBLE)"
    # a missing id has no training rows of its own: the prior (windows would pool missing ids)
    mean = f"(({sums['s']}) + {m} * {prior}) / (({sums['c']}) + {m})"
    return f"(CASE WHEN {key} IS NULL THEN {prior} ELSE {mean} END)"


def fold_sql(feature: FeatureConfig, seed: int) -> str:
    """A training row's fold (0 .. folds-1) as a SQL expression over ``events e`` (folds >= 2 is
    checked with the features, by fitting.validate_features)."""
    return f"{seeded_key(seed, 'e.__src')} % {feature.folds}"


def fit_stat_tables(
    con: duckdb.DuckDBPyConnection,
    group: List[Tuple[int, FeatureConfig]],
    table: str,
    key: str,
    seed: int,
    bits: Dict[str, int],
) -> Dict[str, float]:
    """
    Per id over the training rows (every row for a group of live counters), in one pass for
    every statistic feature ``i`` on one id column: DuckDB ``table(token, n, s_i, c_i, s_i_0,
    c_i_0, ...)`` (rows; the feature's label sum and labelled rows; those of each cross-fitting
    fold); ``save_stat_files`` writes them for scoring.

    Args:
        con: the prepare connection (holds ``events``).
        group: (index, feature) of one id column's features, all live counters or none.
        table: the DuckDB table to create.
        key: the SQL of the id's token on ``events e``.
        seed: the cross-fitting folds' seed.
        bits: the exact-sum grid of each label summed (``label_bits``, read once for every id
            column).

    Returns:
        Dict[str, float]: per feature its prior (the label's training mean; 0 for id_count).
    """
    means = [(i, f) for i, f in group if f.kind == "target_mean"]
    columns = [f"{key} AS token"]
    aggregates = ["count(*) AS n"]

    def label_sum(i: int, feature: FeatureConfig, where: str = "") -> str:
        """Exact (engagerec.data.exact_sums): an id's rows come in any order."""
        return fixed_sum(f"y_{i}", bits[feature.of], where)

    for i, feature in means:
        columns += [f"CAST(e.{quote(feature.of)} AS DOUBLE) AS y_{i}", f"{fold_sql(feature, seed)} AS f_{i}"]
        aggregates += [f"{label_sum(i, feature)} AS s_{i}", f"count(y_{i}) AS c_{i}"]
        if feature.scheme == "cross_fit":
            for k in range(feature.folds):
                where = f"FILTER (WHERE f_{i} = {k})"
                aggregates += [
                    f"{label_sum(i, feature, where)} AS s_{i}_{k}",
                    f"count(y_{i}) {where} AS c_{i}_{k}",
                ]
    rows = f"SELECT {', '.join(columns)} FROM events e WHERE e.__split = 0"
    # what scoring reads back: the training rows' sums, or every row's for live counters; the
    # prior is the training mean either way
    counted = f"SELECT {', '.join(columns)} FROM events e" if live_counters(group) else rows
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS SELECT token, {', '.join(aggregates)} FROM ({counted}) "
        "WHERE token IS NOT NULL GROUP BY token"
    )
    priors = {feature.name: 0.0 for _, feature in group}
    if means:
        averages = ", ".join(f"{label_sum(i, feature)} / count(y_{i})" for i, feature in means)
        found = con.execute(f"SELECT {averages} FROM ({rows})").fetchone()
        for (_, feature), mean in zip(means, found, strict=True):
            if mean is None:
                raise DataError(
                    f"feature '{feature.name}': label '{feature.of}' has no values in the training split",
                    expected="at least one labelled training row",
                )
            priors[feature.name] = float(mean)
    return priors


def save_stat_files(
    con: duckdb.DuckDBPyConnection,
    group: List[Tuple[int, FeatureConfig]],
    table: str,
    out_dir: Path,
    carried: Optional[str] = None,
) -> None:
    """
    Per feature of ``group`` its ``(token, s, c, n)`` in ``out_dir/stats/<feature>.parquet``, what
    scoring (``load_stat_tables``) and a later window read back.

    Args:
        con: the prepare connection.
        group: (index, feature) of one id column's features.
        table: their sums (``fit_stat_tables``'s table).
        out_dir: the prepared directory (``stats/`` goes there).
        carried: a table with ``load_stat_tables``'s columns whose sums are added per id (a base's,
            which a window carries on from: engagerec.data.growth); None: ``table``'s alone.

    Example::

        save_stat_files(con, [(0, video_views)], "stat_0", Path("prepared/day2"), carried="base_stat_0")
    """
    (out_dir / STATS_DIR).mkdir(parents=True, exist_ok=True)
    rows = f"{table} w" if carried is None else f"{table} w FULL OUTER JOIN {carried} b ON w.token = b.token"
    token = "w.token" if carried is None else "coalesce(w.token, b.token)"

    def total(column: str, sql_type: str) -> str:
        if carried is None:
            return f"w.{column}"
        return f"CAST(coalesce(w.{column}, 0) + coalesce(b.{column}, 0) AS {sql_type})"

    for i, feature in group:
        path = out_dir / STATS_DIR / f"{feature.name}.parquet"
        sums = (
            f"{total(f's_{i}', 'DOUBLE')} AS s, {total(f'c_{i}', 'BIGINT')} AS c"
            if feature.kind == "target_mean"
            else "NULL::DOUBLE AS s, 0 AS c"
        )
        per_id = f"SELECT {token} AS token, {sums}, {total('n', 'BIGINT')} AS n FROM {rows} ORDER BY token"
        con.execute(f"COPY ({per_id}) TO {literal(str(path))} (FORMAT parquet)")


def load_stat_tables(
    con: duckdb.DuckDBPyConnection,
    group: List[Tuple[int, FeatureConfig]],
    table: str,
    fitted_dir: Path,
    token_type: str,
) -> None:
    """The statistics of the features on one id column (training sums or live counters), read
    back from their ``stats/<feature>.parquet`` into DuckDB ``table`` with ``fit_stat_tables``'s
    columns (the folds' all 0: rows to score are never training rows).

    Args:
        con: the scoring connection.
        group: (index, feature) of one id column's features.
        table: the DuckDB table to create.
        fitted_dir: the prepared training directory (holds ``stats/``).
        token_type: the SQL type the ids were keyed by.
    """
    selects, joins = ["f0.token", "f0.n"], []
    for j, (i, feature) in enumerate(group):
        path = Path(fitted_dir) / STATS_DIR / f"{feature.name}.parquet"
        if not path.is_file():
            raise DataError("the training data's id statistics are missing", file=str(path))
        source = (
            f"(SELECT CAST(token AS {token_type}) AS token, s, c, n FROM read_parquet({literal(str(path))}))"
        )
        joins.append(source + f" f{j}" if j == 0 else f"LEFT JOIN {source} f{j} ON f{j}.token = f0.token")
        selects += [f"f{j}.s AS s_{i}", f"f{j}.c AS c_{i}"]
        selects += [f"0.0 AS s_{i}_{k}, 0 AS c_{i}_{k}" for k in range(feature.folds)]
    con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT {', '.join(selects)} FROM {' '.join(joins)}")


def stat_meta(feature: FeatureConfig, prior: float, token_type: str) -> Dict[str, Any]:
    """What schema.json keeps of a statistic feature: enough to encode new rows."""
    return {"kind": feature.kind, "column": feature.column or feature.name, "prior": prior,
            "token_type": token_type}  # fmt: skip
