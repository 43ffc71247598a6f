"""Source tables -> the ``events`` table: load, check, join, derive labels, filter, split.

Everything runs in DuckDB, out of core. Every dropped row is counted by reason, in the
order the filters run; every bad value raises a DataError naming its file, column and row.
The split is a column (``__split``: 0 train, 1 val, 2 test) so that the vocabularies can be
fitted on train rows by a plain filter.

Two entry points share every step: ``build_events`` (prepare: rows whose labels cannot be
derived are dropped, users filtered, the split drawn) and ``build_scoring_events`` (rows to
predict: kept with NULL labels, no user filter, all in the test split).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import duckdb

from engagerec.config import DataConfig, FeatureConfig, LabelConfig
from engagerec.data.errors import DataError
from engagerec.data.fitting import validate_features
from engagerec.data.history import require_history_keys
from engagerec.data.raw import CONTENT_ID, DURATION, KEY_COLUMNS, TIMESTAMP, USER_ID, WATCH_TIME, RawTables
from engagerec.data.split import split_sql
from engagerec.data.tables import (
    LoadedTable,
    canonical_columns,
    check_ids,
    check_numeric,
    is_numeric,
    load_table,
    quote,
)
from engagerec.data.user_grain import UserGrain

OVER_CAP_POLICIES = ("clip", "drop", "keep")
UNJOINED_POLICIES = ("error", "keep", "drop")
LABEL_KINDS = ("regression", "binary")
WATCH_RATIO_COLUMNS = (WATCH_TIME, "watch_ratio")  # never features: the label's own source
SOURCE_ROW = "__src"  # the event's rowid in the loaded log: converts back to (file, row)


@dataclass
class FilterReport:
    """Rows in, rows dropped per reason (in the order the filters ran), rows out."""

    rows_read: int = 0
    dropped: "OrderedDict[str, int]" = field(default_factory=OrderedDict)
    notes: Dict[str, int] = field(default_factory=dict)  # counted but not dropped (e.g. clipped ratios)

    @property
    def rows_dropped(self) -> int:
        """Rows dropped for any reason (the sum of ``dropped``)."""
        return sum(self.dropped.values())


@dataclass
class Events:
    """The ``events`` table and what is known about it.

    columns: canonical column -> DuckDB type (features' sources, keys, labels, ``__split``).
    origin: column -> the loaded table it came from (for messages that name a file and row).
    """

    con: duckdb.DuckDBPyConnection
    columns: Dict[str, str]
    origin: Dict[str, LoadedTable]
    log: LoadedTable
    report: FilterReport
    labels: List[LabelConfig]
    rows: int
    user_grain: Optional[UserGrain] = None  # the users table's columns, at the user's grain

    def locate(self, column: str, src: int) -> DataError:
        """A DataError pointing at the row of the file that gave event ``src`` its ``column``."""
        table = self.origin.get(column, self.log)
        if table is self.log:
            return self.log.error("value is missing", src, column=column)
        key = USER_ID if table.name == "users" else CONTENT_ID
        entity = self.con.execute(f"SELECT {quote(key)} FROM log WHERE rowid = {src}").fetchone()[0]
        row = self.con.execute(
            f"SELECT min(rowid) FROM {table.name} WHERE {quote(key)} = $1", [entity]
        ).fetchone()[0]
        if row is None:
            file, log_row = self.log.locate(src)
            return DataError(
                f"value is missing ({key} {entity!r} has no row in {table.source.label})",
                file=file,
                column=column,
                row=log_row,
            )
        return table.error("value is missing", row, column=column)


def feature_column(feature: FeatureConfig) -> str:
    """The source column a feature reads (history features read ``of``)."""
    return feature.of if feature.kind == "history" else (feature.column or feature.name)


def _check_labels(labels: List[LabelConfig], features: List[FeatureConfig]) -> None:
    """Kinds known, and every label name its own: a label named like a feature, a feature's
    source column or a key column would be a second column of one name in the shards."""
    names = set()
    taken = {f.name for f in features} | {f"{f.name}_bucket" for f in features}
    taken |= {feature_column(f) for f in features} | set(KEY_COLUMNS)
    for i, label in enumerate(labels):
        where = f"data.labels[{i}] ('{label.name}')"
        if label.name in names:
            raise DataError(f"{where}: duplicate label name")
        if label.name in taken or label.name.startswith("__"):
            raise DataError(
                f"{where}: the name is already a feature, a feature's column or a key column",
                expected="a label name of its own (e.g. click for column is_click)",
            )
        names.add(label.name)
        if label.kind not in LABEL_KINDS:
            raise DataError(f"{where}: unknown kind '{label.kind}'", expected=f"one of {LABEL_KINDS}")
        if label.relative_to and (label.column or label.kind != "binary" or not 0 < label.threshold < 1):
            raise DataError(
                f"{where}: relative_to {label.relative_to} with kind {label.kind}, column "
                f"{label.column}, threshold {label.threshold}",
                expected="a derived binary label (no column) whose threshold, a quantile, is in (0, 1)",
            )
    if not labels:
        raise DataError("data.labels is empty", expected="at least one label (e.g. watch_ratio)")


def _namespaces(con, raw: RawTables) -> Dict[str, Dict[str, Tuple[str, str]]]:
    """Per table: joined-name -> (canonical name in its table, file type). A user or content
    column whose name the log already has is renamed ``user_<c>`` / ``content_<c>``."""
    spaces: Dict[str, Dict[str, Tuple[str, str]]] = {}
    taken = set()
    for name, source, key in (
        ("log", raw.interactions, None),
        ("users", raw.users, USER_ID),
        ("content", raw.content, CONTENT_ID),
    ):
        if source is None:
            continue
        space = {}
        offered = canonical_columns(con, source)
        for column in source.required:  # before the features are matched: the message names the file
            if column not in offered:
                raise DataError(
                    f"required column '{source.columns.get(column, column)}' is missing (maps to '{column}')",
                    file=source.files[0],
                    expected=f"columns including {sorted(set(source.required))} in every {source.name} file",
                    got=list(offered)[:20],
                )
        for canon, (_, file_type, _) in offered.items():
            joined = canon
            if key is not None and canon != key and canon in taken:
                joined = f"{key.split('_')[0]}_{canon}"
            space[joined] = (canon, file_type)
        taken |= set(space)
        spaces[name] = space
    return spaces


@dataclass
class _Sources:
    """The loaded tables (users and content optional), each joined column's canonical name per
    table (``_namespaces``), the table each joined column is read from, and the report."""

    log: LoadedTable
    users: Optional[LoadedTable]
    content: Optional[LoadedTable]
    spaces: Dict[str, Dict[str, Tuple[str, str]]]
    origin: Dict[str, LoadedTable]
    report: FilterReport


def build_events(con: duckdb.DuckDBPyConnection, raw: RawTables, cfg: DataConfig) -> Events:
    """Load and check the tables, join them, derive labels, filter (counted), split: prepare's
    ``events``.

    The result is the DuckDB table ``events``: one row per kept view with the key columns,
    every feature's source column, one column per label (NULL where a raw label is missing),
    ``__src`` and ``__split``. A row whose label cannot be derived (a zero duration, no watch
    time, ...) is dropped and counted, as are users with ``filters.min_user_views`` views or fewer.

    Args:
        con: the DuckDB connection the tables are loaded into.
        raw: where the three tables are (an adapter's ``RawTables``).
        cfg: the data config (features, labels, filters, split, unjoined-id policies).

    Raises:
        DataError: a bad value, a missing column, or no row left, named by file, column and row.
    """
    sources = _load_sources(con, raw, cfg)
    for column in _label_columns(cfg.labels):
        if column not in sources.log.columns:
            raise sources.log.error(
                f"label column '{column}' is not in the interaction log",
                expected=f"one of {sorted(sources.log.columns)}",
            )
    _check_sources(con, sources, cfg)
    return _training_events(con, cfg, sources)


def build_scoring_events(con: duckdb.DuckDBPyConnection, raw: RawTables, cfg: DataConfig) -> Events:
    """``build_events`` for rows to predict (engagerec.data.scoring): labels are optional.

    A row whose label cannot be derived (no watch time column, a zero duration, ...) keeps a NULL
    label instead of being dropped (counted), a raw label column the input lacks is NULL, users
    with few views stay, and every row is in split 2 (test). Only the unjoined-id policy of the
    run's config drops rows (counted).

    Args:
        con: the DuckDB connection the tables are loaded into.
        raw: where the three tables are (the rows to score, and the run's users and content).
        cfg: the run's data config.

    Raises:
        DataError: as ``build_events``, but never for a missing label.
    """
    sources = _load_sources(con, raw, cfg)
    _check_sources(con, sources, cfg)
    return _scoring_events(con, cfg, sources)


def _label_columns(labels: List[LabelConfig]) -> List[str]:
    """The log columns that raw labels read."""
    return [label.column for label in labels if label.column]


def _numeric_columns(features: List[FeatureConfig]) -> set:
    """The source columns of numeric features, parsed as numbers on load. Timestamps are parsed
    on their own (numbers or date-time text), even when a feature reads one."""
    return {feature_column(f) for f in features if f.kind == "numeric"} - {TIMESTAMP}


def _load_sources(con, raw: RawTables, cfg: DataConfig) -> _Sources:
    """The three tables loaded (the columns features, keys and labels read), after the checks
    that need only their headers: labels, leaks, features."""
    _check_labels(cfg.labels, cfg.features)
    spaces = _namespaces(con, raw)
    features = cfg.features
    _refuse_leaks(features, cfg.labels, raw.post_exposure)
    available = {joined for space in spaces.values() for joined in space}
    validate_features(features, dict.fromkeys(available, ""), [label.name for label in cfg.labels])
    for feature in features:
        if feature.kind in ("history", "history_mean"):
            require_history_keys(available, feature.name)
    wanted = {feature_column(f) for f in features if f.kind != "history_mean"}
    wanted |= {USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP}
    tables = {
        name: _load_one(
            con, name, source, spaces, wanted, _numeric_columns(features), _label_columns(cfg.labels)
        )
        for name, source in (("log", raw.interactions), ("users", raw.users), ("content", raw.content))
    }
    origin: Dict[str, LoadedTable] = {}
    for name, table in tables.items():
        if table is None:
            continue
        for joined, (canon, _) in spaces[name].items():
            if canon in table.columns:
                origin.setdefault(joined, table)
    report = FilterReport(rows_read=tables["log"].rows)
    return _Sources(tables["log"], tables["users"], tables["content"], spaces, origin, report)


def _load_one(con, name, source, spaces, wanted, numeric, label_columns) -> Optional[LoadedTable]:
    """One table (None when the source has none), with the wanted columns it has; the numeric
    ones (and the log's label columns and numeric timestamps) parsed as numbers."""
    if source is None:
        return None
    space = spaces[name]
    # names the first file lacks are asked for too: a later file that has one is an error
    asked = sorted(wanted | set(label_columns if name == "log" else []))
    own = [space[c][0] if c in space else c for c in asked]
    own_numeric = [space[c][0] for c in numeric if c in space] + [WATCH_TIME, DURATION]
    if name == "log":
        own_numeric += label_columns
        if TIMESTAMP in space and is_numeric(space[TIMESTAMP][1]):
            own_numeric.append(TIMESTAMP)
    return load_table(con, name, source, own, source.required, own_numeric, keys=(USER_ID, CONTENT_ID))


def _check_sources(con, sources: _Sources, cfg: DataConfig) -> None:
    """Ids present (and unique in the users and content tables), numeric columns numbers, and the
    label sources finite: an infinite watch time or duration would pass as a full view."""
    log, users, content = sources.log, sources.users, sources.content
    for column in (USER_ID, CONTENT_ID):
        if column in log.columns:
            check_ids(con, log, column, unique=False)
    for table, key in ((users, USER_ID), (content, CONTENT_ID)):
        if table is not None:
            check_ids(con, table, key, unique=True)
    for column in sorted(_numeric_columns(cfg.features)):
        table = sources.origin.get(column)
        if table is not None and column not in (DURATION,):
            canon = next(c for j, (c, _) in sources.spaces[table.name].items() if j == column)
            check_numeric(con, table, canon, allow_null=True)
    for table, column in (
        (log, WATCH_TIME),
        (log, DURATION),
        (content, DURATION),
        *((log, c) for c in _label_columns(cfg.labels)),
    ):
        if table is not None and column in table.columns:
            check_numeric(con, table, column, allow_null=True)


def _refuse_leaks(features: List[FeatureConfig], labels: List[LabelConfig], post_exposure) -> None:
    label_names = {label.name for label in labels} | {label.column for label in labels if label.column}
    for i, feature in enumerate(features):
        if feature.kind == "history_mean":
            continue
        column = feature_column(feature)
        if column in post_exposure or column in WATCH_RATIO_COLUMNS or column in label_names:
            raise DataError(
                f"data.features[{i}] ('{feature.name}'): column '{column}' is observed during or after "
                "the view (a label or a leak) and cannot be a feature"
            )


def _timestamp_sql(con, log: LoadedTable) -> Optional[str]:
    """Timestamps as DOUBLE ms: numbers stay as they are, date-time strings are parsed."""
    if TIMESTAMP not in log.columns:
        return None
    sql_type = log.columns[TIMESTAMP]
    q = f"l.{quote(TIMESTAMP)}"
    if is_numeric(sql_type):
        check_numeric(con, log, TIMESTAMP, allow_null=False)
        return f"CAST({q} AS DOUBLE)"
    if sql_type.startswith("TIMESTAMP") or sql_type == "DATE":
        parsed = f"CAST(epoch_ms(CAST({q} AS TIMESTAMP)) AS DOUBLE)"
    else:
        # TIMESTAMPTZ honours an offset in the text ('...+02:00'); text without one is UTC
        parsed = f"CAST(epoch_ms(TRY_CAST({q} AS TIMESTAMPTZ)) AS DOUBLE)"
    bad = con.execute(f"SELECT min(rowid) FROM log WHERE {parsed.replace('l.', '')} IS NULL").fetchone()[0]
    if bad is not None:
        got = con.execute(f"SELECT {quote(TIMESTAMP)} FROM log WHERE rowid = {bad}").fetchone()[0]
        raise log.error(
            "timestamp cannot be parsed",
            bad,
            column=TIMESTAMP,
            expected="a number or a date-time string",
            got=got,
        )
    return parsed


def _join_sql(con, log, table, key, policy, report, alias) -> Tuple[str, Optional[str]]:
    """(the LEFT JOIN clause of ``table`` on ``key``, the drop condition of unjoined rows or
    None), after applying the unjoined-id policy (error, keep: counted, drop: counted)."""
    if policy not in UNJOINED_POLICIES:
        raise DataError(f"unknown unjoined policy '{policy}'", expected=f"one of {UNJOINED_POLICIES}")
    left, right = f"l.{quote(key)}", f"{alias}.{quote(key)}"
    if log.columns[key] != table.columns[key]:  # e.g. ints in the log, text in the table
        left, right = f"CAST({left} AS VARCHAR)", f"CAST({right} AS VARCHAR)"
    unknown = f"NOT EXISTS (SELECT 1 FROM {table.name} {alias} WHERE {right} = {left})"
    first, count = con.execute(f"SELECT min(l.rowid), count(*) FROM log l WHERE {unknown}").fetchone()
    if count and policy == "error":
        got = con.execute(f"SELECT {quote(key)} FROM log WHERE rowid = {first}").fetchone()[0]
        raise log.error(
            f"{key} does not join the table {table.source.label}",
            first,
            column=key,
            expected=f"an id present in that table (or set unjoined_{key.split('_')[0]}s: keep|drop)",
            got=got,
        )
    if count and policy == "keep":
        report.notes[f"{key} not in its table (kept, features missing)"] = int(count)
    dropped = f"{alias}.{quote(key)} IS NULL" if count and policy == "drop" else None
    return f"LEFT JOIN {table.name} {alias} ON {right} = {left}", dropped


# ------------------------------------------------------------------ the events table
# prepare's events (_training_events) and scoring's (_scoring_events) are the same steps
# composed differently: each function below does one of them, and what scoring does otherwise
# (labels left NULL rather than rows dropped, no user filter, no split) is visible in its
# composition rather than in flags inside the steps.


@dataclass
class _Ratio:
    """The watch ratio over a joined row (aliases ``l``, ``u``, ``c``) and the rules under
    which it is unusable, in the order they are counted: (reason, SQL condition)."""

    duration: str
    watch: str
    value: str  # watch / duration, as it is
    kept: str  # the value the label derives from (clipped at the cap under over_cap: clip)
    unusable: List[Tuple[str, str]]

    def columns(self, ratio: str) -> List[str]:
        """SELECT items: the duration and watch time read, ``ratio`` as ``__ratio`` and the
        value as ``__raw_ratio``."""
        return [
            f"{self.duration} AS {quote(DURATION)}",
            f"{self.watch} AS {quote(WATCH_TIME)}",
            f"{ratio} AS __ratio",
            f"{self.value} AS __raw_ratio",
        ]


def _training_events(con, cfg: DataConfig, sources: _Sources) -> Events:
    """prepare's events: rows with an unusable ratio are dropped (counted), then users with
    too few views; the split is drawn and relative skip labels cut on training rows."""
    log, report = sources.log, sources.report
    joins, drops = _joins(con, cfg, sources)
    derived = [label for label in cfg.labels if not label.column]
    if derived and WATCH_TIME not in log.columns:
        raise log.error(
            f"label '{derived[0].name}' derives from the watch ratio, but the log has no watch time column",
            expected="a watch_time column (map it with data.source.columns)",
        )
    ratio = _watch_ratio(cfg, sources)
    timestamp = _timestamp_sql(con, log)
    ratio_columns = ratio.columns(ratio.kept) if ratio else []
    drops += ratio.unusable if ratio else []
    select = _row_columns(cfg, sources, timestamp) + ratio_columns + _raw_label_columns(cfg.labels, log)
    _stage(con, select, joins, drops, report)
    if ratio:
        _note_kept_ratios(con, cfg, report)
    _check_binary_labels(con, log, cfg.labels)
    kept = f"__drop IS NULL AND {_user_filter(con, log, cfg.filters.min_user_views, report)}"
    rows = _count_kept(con, log, kept, report)
    split = split_sql(con, cfg.split, rows, kept, has_timestamp=timestamp is not None)
    labels = _labels_sql(cfg.labels, lambda label: _relative_skip_sql(con, log, label, kept, split, report))
    return _events_view(con, cfg, sources, labels, split, kept, rows)


def _scoring_events(con, cfg: DataConfig, sources: _Sources) -> Events:
    """Scoring's events: a row with an unusable ratio (or no watch time column) is kept with
    NULL derived labels (counted), no user is filtered out, every row is in split 2 (test), and
    a relative skip label is NULL (its training cuts are not stored)."""
    log, report = sources.log, sources.report
    joins, drops = _joins(con, cfg, sources)
    ratio = _watch_ratio(cfg, sources)
    timestamp = _timestamp_sql(con, log)
    if ratio:
        undefined = " OR ".join(f"({condition})" for _, condition in ratio.unusable)
        ratio_columns = ratio.columns(f"(CASE WHEN {undefined} THEN NULL ELSE {ratio.kept} END)")
    else:
        ratio_columns = ["NULL::DOUBLE AS __ratio", "NULL::DOUBLE AS __raw_ratio"]
    select = _row_columns(cfg, sources, timestamp) + ratio_columns + _raw_label_columns(cfg.labels, log)
    unlabelled = ratio.unusable if ratio else []
    if unlabelled:
        select.append(_first_match(unlabelled, "__unlabelled"))
    _stage(con, select, joins, drops, report)
    if unlabelled:
        _note_unlabelled(con, unlabelled, report)
    _check_binary_labels(con, log, cfg.labels)
    kept = f"__drop IS NULL AND {_user_filter(con, log, 0, report)}"
    rows = _count_kept(con, log, kept, report)
    labels = _labels_sql(cfg.labels, lambda label: _unscored_relative_label(cfg.features, label))
    return _events_view(con, cfg, sources, labels, "2", kept, rows)


def _joins(con, cfg: DataConfig, sources: _Sources) -> Tuple[List[str], List[Tuple[str, str]]]:
    """The LEFT JOINs of the users and content tables to the log, and the drop rules of the
    unjoined-id policies (checked first: watch_ratio.over_cap too)."""
    wr = cfg.watch_ratio
    if wr.over_cap not in OVER_CAP_POLICIES:
        raise DataError(
            f"unknown watch_ratio.over_cap '{wr.over_cap}'", expected=f"one of {OVER_CAP_POLICIES}"
        )
    joins, drops = [], []
    for table, key, policy, alias in (
        (sources.users, USER_ID, cfg.source.unjoined_users, "u"),
        (sources.content, CONTENT_ID, cfg.source.unjoined_content, "c"),
    ):
        if table is None:
            continue
        clause, unknown = _join_sql(con, sources.log, table, key, policy, sources.report, alias)
        joins.append(clause)
        if unknown is not None:
            drops.append((f"{key} not in its table", unknown))
    return joins, drops


def _needed_columns(cfg: DataConfig) -> List[str]:
    """The joined names of every feature's source column and the two ids, sorted."""
    needed = {feature_column(f) for f in cfg.features if f.kind != "history_mean"}
    return sorted(needed | {USER_ID, CONTENT_ID})


def _row_columns(cfg: DataConfig, sources: _Sources, timestamp: Optional[str]) -> List[str]:
    """SELECT items of a joined row: its source row, every feature's source column (and the
    ids) from the log or the content table, and the parsed timestamp. The users table's
    columns are left to the events view (``_user_grain``)."""
    select = [f"l.rowid AS {SOURCE_ROW}"]
    log = sources.log
    for joined in _needed_columns(cfg):
        table = sources.origin.get(joined)
        if table is None or table is sources.users:
            continue
        canon = sources.spaces[table.name][joined][0]
        if joined in (USER_ID, CONTENT_ID) and table is not log:
            continue
        if _selected_apart(joined, log):
            continue
        select.append(f"{_ALIASES[table.name]}.{quote(canon)} AS {quote(joined)}")
    if timestamp is not None:
        select.append(f"{timestamp} AS {quote(TIMESTAMP)}")
    return select


_ALIASES = {"log": "l", "users": "u", "content": "c"}  # the tables' aliases in the staged query


def _selected_apart(joined: str, log: LoadedTable) -> bool:
    """Whether a joined column is selected apart from the others, whichever table it comes
    from: the timestamp (parsed) and the duration the watch ratio reads (from its table)."""
    return joined == TIMESTAMP or (joined == DURATION and WATCH_TIME in log.columns)


def _user_grain(cfg: DataConfig, sources: _Sources) -> Optional[UserGrain]:
    """The users table's feature columns, left at the user's grain (engagerec.data.user_grain):
    the events view joins them, or None when no feature reads one."""
    users = sources.users
    if users is None:
        return None
    wanted = [
        c
        for c in _needed_columns(cfg)
        if c != USER_ID and sources.origin.get(c) is users and not _selected_apart(c, sources.log)
    ]
    if not wanted:
        return None
    space = sources.spaces[users.name]
    text_keys = sources.log.columns[USER_ID] != users.columns[USER_ID]  # as _join_sql matches them
    key = f"CAST({quote(USER_ID)} AS VARCHAR)" if text_keys else quote(USER_ID)
    columns = ", ".join(f"{quote(space[c][0])} AS {quote(c)}" for c in wanted)
    return UserGrain(tuple(wanted), f"SELECT {key} AS __user_key, {columns} FROM {users.name}", text_keys)


def _watch_ratio(cfg: DataConfig, sources: _Sources) -> Optional[_Ratio]:
    """The watch ratio's SQL and the rules that make it unusable (counted by reason), or None
    when the log has no watch time column."""
    log, content, wr = sources.log, sources.content, cfg.watch_ratio
    if WATCH_TIME not in log.columns:
        return None
    table = log if DURATION in log.columns else (content if content and DURATION in content.columns else None)
    if table is None:
        raise log.error(
            "no duration: neither the interactions nor the content table has a duration column",
            expected="a 'duration' column (map it with data.source.columns)",
        )
    duration, watch = f"{_ALIASES[table.name]}.{quote(DURATION)}", f"l.{quote(WATCH_TIME)}"
    value = f"({watch} / {duration})"
    unusable = [
        ("missing duration", f"{duration} IS NULL OR isnan({duration})"),
        ("zero or negative duration", f"{duration} <= 0"),
        ("missing watch time", f"{watch} IS NULL OR isnan({watch})"),
        ("negative watch time", f"{watch} < 0"),
    ]
    if cfg.filters.drop_zero_watch_time:
        unusable.append(("zero watch time", f"{watch} = 0"))
    if wr.over_cap == "drop":
        unusable.append((f"watch ratio above {wr.ratio_cap:g}", f"{value} > {wr.ratio_cap!r}"))
    kept = f"LEAST({value}, {wr.ratio_cap!r})" if wr.over_cap == "clip" else value
    return _Ratio(duration, watch, value, kept, unusable)


def _raw_label_columns(labels: List[LabelConfig], log: LoadedTable) -> List[str]:
    """SELECT items of the raw labels (``__label__<name>``): NaN in a file is a missing label,
    like an empty cell; a column the log lacks (scoring's input may) is NULL."""
    select = []
    for label in labels:
        if label.column and label.column in log.columns:
            raw = f"l.{quote(label.column)}"
            select.append(
                f"(CASE WHEN isnan({raw}) THEN NULL ELSE {raw} END) AS {quote('__label__' + label.name)}"
            )
        elif label.column:
            select.append(f"NULL::DOUBLE AS {quote('__label__' + label.name)}")
    return select


def _first_match(rules: List[Tuple[str, str]], column: str) -> str:
    """A SELECT item: the index of the first rule a row meets, as ``column`` (NULL: none)."""
    case = " ".join(f"WHEN {condition} THEN {i}" for i, (_, condition) in enumerate(rules))
    return f"CASE {case} END AS {column}"


def _stage(con, select: List[str], joins: List[str], drops: List[Tuple[str, str]], report) -> None:
    """Materialise the joined rows once (``staged``), each with the first drop rule it meets
    (``__drop``), and count the dropped rows by reason into ``report``."""
    drop = _first_match(drops, "__drop") if drops else "NULL::INTEGER AS __drop"
    con.execute(
        f"CREATE OR REPLACE TABLE staged AS SELECT {', '.join(select + [drop])} FROM log l {' '.join(joins)}"
    )
    counts = dict(con.execute("SELECT __drop, count(*) FROM staged GROUP BY __drop").fetchall())
    for i, (reason, _) in enumerate(drops):
        report.dropped[reason] = int(counts.get(i, 0))


def _note_unlabelled(con, unlabelled: List[Tuple[str, str]], report) -> None:
    """Count the kept rows whose derived labels are NULL, by the first reason (``__unlabelled``)."""
    counts = dict(
        con.execute("SELECT __unlabelled, count(*) FROM staged WHERE __drop IS NULL GROUP BY 1").fetchall()
    )
    for i, (reason, _) in enumerate(unlabelled):
        report.notes[f"{reason} (kept, derived labels missing)"] = int(counts.get(i, 0))


def _note_kept_ratios(con, cfg: DataConfig, report) -> None:
    """Count the kept rows that a reader might expect dropped: zero watch time (a skip), and
    ratios above the cap (clipped or kept as they are)."""
    wr = cfg.watch_ratio
    zero, above = con.execute(
        f"SELECT count(*) FILTER (WHERE {quote(WATCH_TIME)} = 0), count(*) FILTER (WHERE __raw_ratio > "
        f"{wr.ratio_cap!r}) FROM staged WHERE __drop IS NULL"
    ).fetchone()
    if not cfg.filters.drop_zero_watch_time:
        report.notes["zero watch time (kept: ratio 0, a skip)"] = int(zero)
    if wr.over_cap != "drop":
        report.notes[f"watch ratio above {wr.ratio_cap:g} ({wr.over_cap})"] = int(above)


def _user_filter(con, log: LoadedTable, min_views: int, report) -> str:
    """The condition that keeps users with more than ``min_views`` kept views (``TRUE`` when
    ``min_views`` is 0); the users and rows it drops are counted."""
    if min_views <= 0:
        return "TRUE"
    if USER_ID not in log.columns:
        raise log.error("filters.min_user_views needs a user_id column", expected="min_user_views: 0")
    users_out, rows_out = con.execute(
        "SELECT count(*), coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM staged "
        f"WHERE __drop IS NULL GROUP BY {quote(USER_ID)} HAVING count(*) <= {min_views})"
    ).fetchone()
    report.notes[f"users with <= {min_views} views (dropped)"] = int(users_out)
    report.dropped[f"user has <= {min_views} views"] = int(rows_out)
    con.execute(
        f"CREATE OR REPLACE TABLE kept_users AS SELECT {quote(USER_ID)} AS u FROM staged "
        f"WHERE __drop IS NULL GROUP BY {quote(USER_ID)} HAVING count(*) > {min_views}"
    )
    return f"{quote(USER_ID)} IN (SELECT u FROM kept_users)"


def _count_kept(con, log: LoadedTable, kept: str, report) -> int:
    """The rows ``kept`` selects; none left is an error that lists what was dropped."""
    rows = con.execute(f"SELECT count(*) FROM staged WHERE {kept}").fetchone()[0]
    if rows == 0:
        summary = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.items())
        raise log.error(
            f"no rows left after filtering ({report.rows_read} read; dropped {summary})",
            expected="at least one usable row (check the filters and the duration / watch time columns)",
        )
    return rows


def _labels_sql(labels: List[LabelConfig], relative: Callable[[LabelConfig], str]) -> List[str]:
    """SELECT items of the labels over ``staged``: a raw label's column, the watch ratio, or a
    skip below the threshold; ``relative`` gives a skip label relative to a group."""
    items = []
    for label in labels:
        if label.column:
            value = f"CAST({quote('__label__' + label.name)} AS DOUBLE)"
        elif label.kind == "regression":
            value = "CAST(__ratio AS DOUBLE)"
        elif label.relative_to:
            value = relative(label)
        else:
            value = f"CAST(__ratio < {label.threshold!r} AS DOUBLE)"
        items.append(f"{value} AS {quote(label.name)}")
    return items


def _events_view(
    con, cfg: DataConfig, sources: _Sources, labels: List[str], split: str, kept: str, rows: int
) -> Events:
    """The ``events`` view over the kept staged rows: their columns (the ``__`` ones but the
    source row left out), the labels and the split; returns its Events."""
    columns = [c[0] for c in con.execute("DESCRIBE staged").fetchall()]
    keep_columns = [f"staged.{quote(c)}" for c in columns if not c.startswith("__")] + [SOURCE_ROW]
    grain = _user_grain(cfg, sources)
    user_columns = grain.view_columns() if grain else []
    user_join = grain.view_join("staged") if grain else ""
    names = [c for c in columns if not c.startswith("__")] + list(grain.columns if grain else [])
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # DuckDB would rename the second silently (name_1), and features read the first
        raise DataError(
            f"column '{twice[0]}' would reach the events from both the users table and another table",
            column=twice[0],
            expected="a column name that one table gives (rename one with data.source.columns)",
        )
    # A view, not a table: the wide rows are materialised once (staged); fitting reads a few
    # columns of it at a time, and the writer streams it once per split.
    con.execute(
        f"CREATE OR REPLACE VIEW events AS SELECT {', '.join(keep_columns + user_columns)}, "
        f"{', '.join(labels)}, {split} AS __split FROM staged {user_join} WHERE {kept}"
    )
    described = {row[0]: row[1] for row in con.execute("DESCRIBE events").fetchall()}
    return Events(
        con, described, sources.origin, sources.log, sources.report, list(cfg.labels), int(rows), grain
    )


def _unscored_relative_label(features: List[FeatureConfig], label: LabelConfig) -> str:
    """Scoring's value of a relative skip label: NULL (its cuts are the training split's, not
    kept for scoring), after refusing a history_mean that would read it."""
    _refuse_relative_history(features, label)
    return "NULL::DOUBLE"


def _refuse_relative_history(features: List[FeatureConfig], label: LabelConfig) -> None:
    """Scoring leaves a relative label missing (its cuts are not stored), so a history_mean of
    it would read missing values where training read real ones: refused rather than skewed."""
    for feature in features:
        if feature.kind == "history_mean" and feature.of == label.name:
            raise DataError(
                f"feature '{feature.name}' averages label '{label.name}', which is relative_to "
                f"{label.relative_to}: scoring cannot derive it (the training cuts are not stored)",
                expected="a history_mean of the watch ratio or of a label with a constant threshold",
            )


def _relative_skip_sql(con, log: LoadedTable, label: LabelConfig, kept: str, split: str, report) -> str:
    """A skip label relative to the row's group (``label.relative_to``): ratio below the group's
    ``threshold`` quantile over training rows, else the training split's quantile (counted).
    The cuts come from training rows only, so held-out outcomes never move a label's definition."""
    if label.relative_to == "user" and USER_ID not in log.columns:
        raise log.error(f"label '{label.name}' is relative_to user, but the log has no user_id column")
    group = quote(USER_ID) if label.relative_to == "user" else f"floor(log2({quote(DURATION)}))"
    table = quote(f"__cut__{label.name}")
    q = float(label.threshold)
    train = f"{kept} AND {split} = 0"
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS SELECT {group} AS g, quantile_cont(__ratio, {q!r}) AS cut "
        f"FROM staged WHERE {train} GROUP BY g"
    )
    overall = con.execute(f"SELECT quantile_cont(__ratio, {q!r}) FROM staged WHERE {train}").fetchone()[0]
    fallback = con.execute(
        f"SELECT count(*) FROM staged WHERE {kept} AND {group} NOT IN (SELECT g FROM {table})"
    ).fetchone()[0]
    if fallback:
        report.notes[f"label '{label.name}': rows whose {label.relative_to} has no training rows "
                     "(the training split's cut)"] = int(fallback)  # fmt: skip
    return f"CAST(__ratio < coalesce((SELECT cut FROM {table} WHERE g = {group}), {overall!r}) AS DOUBLE)"


def _check_binary_labels(con, log: LoadedTable, labels: List[LabelConfig]) -> None:
    """A raw binary label must be 0 or 1 where present."""
    for label in labels:
        if label.column and label.kind == "binary" and label.column in log.columns:
            q = quote(label.column)
            bad = con.execute(
                f"SELECT min(rowid) FROM log WHERE {q} IS NOT NULL AND NOT isnan({q}) AND {q} NOT IN (0, 1)"
            ).fetchone()[0]
            if bad is not None:
                got = con.execute(f"SELECT {q} FROM log WHERE rowid = {bad}").fetchone()[0]
                raise log.error(
                    f"binary label '{label.name}' is not 0 or 1",
                    bad,
                    column=label.column,
                    expected="0, 1 or empty (missing)",
                    got=got,
                )
