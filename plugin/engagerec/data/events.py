"""Source tables -> the ``events`` table: load, check, join, derive labels, filter, split.

Everything runs in DuckDB, out of core. Every dropped row is counted by reason, in the
order the filters run; every bad value raises a DataError naming its file, column and row.
The split is a column (``__split``: 0 train, 1 val, 2 test) so that the vocabularies can be
fitted on train rows by a plain filter.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

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


def build_events(
    con: duckdb.DuckDBPyConnection, raw: RawTables, cfg: DataConfig, *, scoring: bool = False
) -> Events:
    """Load and check the tables, join them, derive labels, filter (counted), split.

    The result is the DuckDB table ``events``: one row per kept view with the key columns,
    every feature's source column, one column per label (NULL where a raw label is missing),
    the history_mean features, ``__src`` and ``__split``.

    With ``scoring`` (rows to predict, engagerec.data.scoring), labels are optional: a row
    whose label cannot be derived (no watch time column, a zero duration, ...) keeps a NULL
    label instead of being dropped, users with few views stay, and every row is in split 2.
    Only the unjoined-id policy of the run's config can drop rows (counted).
    """
    _check_labels(cfg.labels, cfg.features)
    spaces = _namespaces(con, raw)

    features = cfg.features
    wanted = {c for f in features if f.kind != "history_mean" for c in [feature_column(f)]}
    _refuse_leaks(features, cfg.labels, raw.post_exposure)
    available = {joined for space in spaces.values() for joined in space}
    validate_features(features, dict.fromkeys(available, ""), [label.name for label in cfg.labels])
    for feature in features:
        if feature.kind in ("history", "history_mean"):
            require_history_keys(available, feature.name)
    wanted |= {USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP}
    label_columns = [label.column for label in cfg.labels if label.column]
    # timestamps are parsed on their own (numbers or date-time text), even when a feature reads one
    numeric = {feature_column(f) for f in features if f.kind == "numeric"} - {TIMESTAMP}

    def load(name: str, source) -> Optional[LoadedTable]:
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

    log = load("log", raw.interactions)
    users = load("users", raw.users)
    content = load("content", raw.content)
    for column in label_columns:
        if column not in log.columns and not scoring:
            raise log.error(
                f"label column '{column}' is not in the interaction log",
                expected=f"one of {sorted(log.columns)}",
            )
    for column in (USER_ID, CONTENT_ID):
        if column in log.columns:
            check_ids(con, log, column, unique=False)
    for table, key in ((users, USER_ID), (content, CONTENT_ID)):
        if table is not None:
            check_ids(con, table, key, unique=True)
    origin: Dict[str, LoadedTable] = {}
    for name, table in (("log", log), ("users", users), ("content", content)):
        if table is None:
            continue
        for joined, (canon, _) in spaces[name].items():
            if canon in table.columns:
                origin.setdefault(joined, table)
    for column in sorted(numeric):
        table = origin.get(column)
        if table is not None and column not in (DURATION,):
            canon = next(c for j, (c, _) in spaces[table.name].items() if j == column)
            check_numeric(con, table, canon, allow_null=True)
    # the label sources: an infinite watch time or duration would pass as a full view
    for table, column in (
        (log, WATCH_TIME),
        (log, DURATION),
        (content, DURATION),
        *((log, c) for c in label_columns),
    ):
        if table is not None and column in table.columns:
            check_numeric(con, table, column, allow_null=True)
    report = FilterReport(rows_read=log.rows)
    return _events_table(con, cfg, log, users, content, spaces, origin, report, scoring)


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


def _events_table(con, cfg, log, users, content, spaces, origin, report, scoring: bool) -> Events:
    wr = cfg.watch_ratio
    if wr.over_cap not in OVER_CAP_POLICIES:
        raise DataError(
            f"unknown watch_ratio.over_cap '{wr.over_cap}'", expected=f"one of {OVER_CAP_POLICIES}"
        )
    select = [f"l.rowid AS {SOURCE_ROW}"]
    joins, drops = [], []
    for table, key, policy, alias in (
        (users, USER_ID, cfg.source.unjoined_users, "u"),
        (content, CONTENT_ID, cfg.source.unjoined_content, "c"),
    ):
        if table is None:
            continue
        clause, unknown = _join_sql(con, log, table, key, policy, report, alias)
        joins.append(clause)
        if unknown is not None:
            drops.append((f"{key} not in its table", unknown))
    aliases = {"log": "l", "users": "u", "content": "c"}
    needed = {feature_column(f) for f in cfg.features if f.kind != "history_mean"} | {USER_ID, CONTENT_ID}
    for joined in sorted(needed):
        table = origin.get(joined)
        if table is None:
            continue
        canon = spaces[table.name][joined][0]
        if joined in (USER_ID, CONTENT_ID) and table is not log:
            continue
        if joined == TIMESTAMP or (joined == DURATION and WATCH_TIME in log.columns):
            continue  # selected below, parsed (timestamps) and from the table the ratio uses
        select.append(f"{aliases[table.name]}.{quote(canon)} AS {quote(joined)}")
    duration_table = (
        log if DURATION in log.columns else (content if content and DURATION in content.columns else None)
    )
    has_ratio = WATCH_TIME in log.columns
    derived = [label for label in cfg.labels if not label.column]
    if derived and not has_ratio and not scoring:
        raise log.error(
            f"label '{derived[0].name}' derives from the watch ratio, but the log has no watch time column",
            expected="a watch_time column (map it with data.source.columns)",
        )
    if has_ratio and duration_table is None:
        raise log.error(
            "no duration: neither the interactions nor the content table has a duration column",
            expected="a 'duration' column (map it with data.source.columns)",
        )
    timestamp = _timestamp_sql(con, log)
    if timestamp is not None:
        select.append(f"{timestamp} AS {quote(TIMESTAMP)}")
    reasons: List[Tuple[str, str]] = list(drops)
    unlabelled: List[Tuple[str, str]] = []  # scoring: rows whose derived labels are NULL, kept
    if has_ratio:
        duration = f"{aliases[duration_table.name]}.{quote(DURATION)}"
        watch = f"l.{quote(WATCH_TIME)}"
        select += [f"{duration} AS {quote(DURATION)}", f"{watch} AS {quote(WATCH_TIME)}"]
        ratio = f"({watch} / {duration})"
        reasons += [
            ("missing duration", f"{duration} IS NULL OR isnan({duration})"),
            ("zero or negative duration", f"{duration} <= 0"),
            ("missing watch time", f"{watch} IS NULL OR isnan({watch})"),
            ("negative watch time", f"{watch} < 0"),
        ]
        if cfg.filters.drop_zero_watch_time:
            reasons.append(("zero watch time", f"{watch} = 0"))
        if wr.over_cap == "drop":
            reasons.append((f"watch ratio above {wr.ratio_cap:g}", f"{ratio} > {wr.ratio_cap!r}"))
        kept_ratio = f"LEAST({ratio}, {wr.ratio_cap!r})" if wr.over_cap == "clip" else ratio
        if scoring:  # a row to score is kept; what would have dropped it leaves its label NULL
            unlabelled, reasons = reasons[len(drops) :], list(drops)
            undefined = " OR ".join(f"({condition})" for _, condition in unlabelled)
            kept_ratio = f"(CASE WHEN {undefined} THEN NULL ELSE {kept_ratio} END)"
        select.append(f"{kept_ratio} AS __ratio")
        select.append(f"{ratio} AS __raw_ratio")
    elif scoring:
        select += ["NULL::DOUBLE AS __ratio", "NULL::DOUBLE AS __raw_ratio"]
    for label in cfg.labels:
        if label.column and label.column in log.columns:
            raw = f"l.{quote(label.column)}"  # NaN in a file is a missing label, like an empty cell
            select.append(
                f"(CASE WHEN isnan({raw}) THEN NULL ELSE {raw} END) AS {quote('__label__' + label.name)}"
            )
        elif label.column:  # scoring an input without this label column (checked above otherwise)
            select.append(f"NULL::DOUBLE AS {quote('__label__' + label.name)}")
    case = " ".join(f"WHEN {condition} THEN {i}" for i, (_, condition) in enumerate(reasons))
    select.append(f"CASE {case} END AS __drop" if reasons else "NULL::INTEGER AS __drop")
    if unlabelled:
        case = " ".join(f"WHEN {condition} THEN {i}" for i, (_, condition) in enumerate(unlabelled))
        select.append(f"CASE {case} END AS __unlabelled")
    con.execute(f"CREATE OR REPLACE TABLE staged AS SELECT {', '.join(select)} FROM log l {' '.join(joins)}")

    counts = dict(con.execute("SELECT __drop, count(*) FROM staged GROUP BY __drop").fetchall())
    for i, (reason, _) in enumerate(reasons):
        report.dropped[reason] = int(counts.get(i, 0))
    if unlabelled:
        counts = dict(
            con.execute(
                "SELECT __unlabelled, count(*) FROM staged WHERE __drop IS NULL GROUP BY 1"
            ).fetchall()
        )
        for i, (reason, _) in enumerate(unlabelled):
            report.notes[f"{reason} (kept, derived labels missing)"] = int(counts.get(i, 0))
    if has_ratio and not scoring:
        zero, above = con.execute(
            f"SELECT count(*) FILTER (WHERE {quote(WATCH_TIME)} = 0), count(*) FILTER (WHERE __raw_ratio > "
            f"{wr.ratio_cap!r}) FROM staged WHERE __drop IS NULL"
        ).fetchone()
        if not cfg.filters.drop_zero_watch_time:
            report.notes["zero watch time (kept: ratio 0, a skip)"] = int(zero)
        if wr.over_cap != "drop":
            report.notes[f"watch ratio above {wr.ratio_cap:g} ({wr.over_cap})"] = int(above)
    _check_binary_labels(con, log, cfg.labels)

    min_views = 0 if scoring else cfg.filters.min_user_views
    keep_users = "TRUE"
    if min_views > 0:
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
        keep_users = f"{quote(USER_ID)} IN (SELECT u FROM kept_users)"
    kept = f"__drop IS NULL AND {keep_users}"
    rows = con.execute(f"SELECT count(*) FROM staged WHERE {kept}").fetchone()[0]
    if rows == 0:
        summary = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.items())
        raise log.error(
            f"no rows left after filtering ({report.rows_read} read; dropped {summary})",
            expected="at least one usable row (check the filters and the duration / watch time columns)",
        )

    split = "2" if scoring else split_sql(con, cfg.split, rows, kept, has_timestamp=timestamp is not None)
    labels_sql = []
    for label in cfg.labels:
        if label.column:
            value = f"CAST({quote('__label__' + label.name)} AS DOUBLE)"
        elif label.kind == "regression":
            value = "CAST(__ratio AS DOUBLE)"
        elif label.relative_to and scoring:
            _refuse_relative_history(cfg.features, label)
            value = "NULL::DOUBLE"  # its cuts are the training split's, not kept for scoring
        elif label.relative_to:
            value = _relative_skip_sql(con, log, label, kept, split, report)
        else:
            value = f"CAST(__ratio < {label.threshold!r} AS DOUBLE)"
        labels_sql.append(f"{value} AS {quote(label.name)}")
    columns = [c[0] for c in con.execute("DESCRIBE staged").fetchall()]
    keep_columns = [quote(c) for c in columns if not c.startswith("__")] + [SOURCE_ROW]
    # A view, not a table: the wide rows are materialised once (staged); fitting reads a few
    # columns of it at a time, and the writer streams it once per split.
    con.execute(
        f"CREATE OR REPLACE VIEW events AS SELECT {', '.join(keep_columns)}, {', '.join(labels_sql)}, "
        f"{split} AS __split FROM staged WHERE {kept}"
    )
    described = {row[0]: row[1] for row in con.execute("DESCRIBE events").fetchall()}
    return Events(con, described, origin, log, report, list(cfg.labels), int(rows))


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
