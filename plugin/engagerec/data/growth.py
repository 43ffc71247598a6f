"""Preparing the next window of a growing log against an earlier preparation, its *base*
(``engagerec prepare --base DIR``), as a team that retrains every day does.

The window's rows are split, encoded and written like any preparation, and the result is an
ordinary prepared directory that every command reads. What the base fixed stays fixed, so a
model trained on the base goes on meaning the same thing (``engagerec train --init-from``):

* **vocabularies grow**: every id the base knew keeps its index; ids first seen in the window's
  training rows (``min_count`` of them there) are appended after them, in token order. A
  hashed id space stays hashed with its bucket count. A vocabulary never turns into hashing:
  past a feature's ``hash_buckets`` (its table's configured maximum) the prepare is refused,
  since hashing would move every known id's row;
* **normalisation and bucket edges** are the base's (as for scoring: engagerec.data.scoring);
* **id statistics carry on**: every row's sums start from the base's saved per-id sums (its
  training rows, or every row for live counters), and the window's own rows add to them by
  the feature's scheme; the saved ``stats/`` hold both, so the next window carries on again.
  The prior stays the base's. A live counter with a ``lag`` counts the base's views whole;
* **histories reach back into the base**: each preparation with history features keeps its
  users' last views (``history_tail.parquet``: the raw ids and labels the windows read, at most
  the longest history's length per user), and the window's first views of a user see them;
* ``schema.json``'s ``meta.base`` records the base (its path, its manifest's CRC-32, its time
  range) and per id space the table's rows before and after.

What a window does not carry over, by the same rules as any preparation: the filters (such as
``min_user_views``) and ``min_count`` count the window's rows alone; ids first seen in a base's
validation or test rows join a vocabulary only when they reappear in a later window's training
rows, and those rows add to the carried statistics only as live counters (the other schemes
count training rows). A daily chain that keeps every row prepares each day with
``val_fraction`` and ``test_fraction`` 0.

Refused before anything is written, each with its reason: a base from another config (its
features, labels or watch-ratio definition; each difference named), a base whose files changed
since (every file's CRC-32 against its manifest), a base prepared by an earlier release (no
time range or history tail), the output directory being the base, a window with a view at or
before the base's last moment (file, row and timestamp named), a window left with no rows, and
labels relative to a group (their training cuts are not stored).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engagerec.config import DataConfig, FeatureConfig, config_changes, feature_with_defaults, history_length
from engagerec.data.applier import SchemaApplier
from engagerec.data.errors import DataError
from engagerec.data.fitting import Fitter
from engagerec.data.manifest import MANIFEST_FILE, check_prepared
from engagerec.data.raw import TIMESTAMP, USER_ID
from engagerec.data.schema import SCHEMA_FILE, VOCAB_DIR, DatasetSchema
from engagerec.data.tables import literal, quote
from engagerec.data.target_stats import load_stat_tables

TAIL_FILE = "history_tail.parquet"  # per user, the last views the history windows read
BASE_ROWS = 3  # the __split of a base's tail rows: history windows read them, nothing writes them
COMPARED = ("features", "labels", "watch_ratio")  # what gives a base's encoding its meaning


def tail_columns(features: List[FeatureConfig]) -> List[str]:
    """
    The columns of a history tail: the user, the time, and what the history windows read (the
    ids of history features, the labels of history_mean features).

    Args:
        features (List[FeatureConfig]): ``data.features``.

    Returns:
        List[str]: column names, the user and time first.

    Example::

        >>> from engagerec.config import FeatureConfig
        >>> tail_columns([FeatureConfig("h", kind="history", of="content_id", length=20),
        ...               FeatureConfig("r", kind="history_mean", of="skip", length=20)])
        ['user_id', 'timestamp', 'content_id', 'skip']
    """
    columns = [USER_ID, TIMESTAMP]
    for feature in features:
        if feature.kind in ("history", "history_mean") and feature.of not in columns:
            columns.append(feature.of)
    return columns


def write_tail(con, source: str, features: List[FeatureConfig], path: Path) -> None:
    """
    Write each user's last views of ``source`` (at most ``history_length`` of them, by time and
    then source row) to ``path``, with new negative source rows in the same order: the rows the
    next window's history windows read.

    Args:
        con: the DuckDB connection holding ``source``.
        source (str): a table or subquery with ``__src`` and ``tail_columns(features)``.
        features (List[FeatureConfig]): ``data.features``.
        path (Path): the parquet file to write.

    Example::

        >>> # write_tail(con, "events", cfg.features, stage / TAIL_FILE)
    """
    columns = ", ".join(quote(c) for c in tail_columns(features))
    user, time = quote(USER_ID), quote(TIMESTAMP)
    latest = f"PARTITION BY {user} ORDER BY {time} DESC, __src DESC"
    # the newest view of a user gets -1 within its user's block, older ones lower: (time, __src)
    # order within a user is kept, which is all the windows read
    con.execute(
        f"COPY (SELECT {columns}, CAST(-row_number() OVER (ORDER BY {user}, {time} DESC, __src DESC) "
        f"AS BIGINT) AS __src FROM (SELECT {columns}, __src, row_number() OVER ({latest}) AS __k "
        f"FROM {source}) WHERE __k <= {history_length(features)} ORDER BY {user}, {time}, __src) "
        f"TO {literal(str(path))} (FORMAT parquet)"
    )


@dataclasses.dataclass
class Base:
    """A checked base: its directory, its schema, and its manifest's CRC-32 when it was checked
    (compared again once the window is written: a base replaced meanwhile is an error)."""

    dir: Path
    schema: DatasetSchema
    manifest_crc32: int


def check_base(cfg: DataConfig, base_dir: str | Path, out_dir: str | Path) -> Base:
    """
    Everything about a base that can be checked before its window is read: another directory
    than the output, intact (every file's CRC-32), prepared with this config's features, labels
    and watch ratio, by a release that records what growth needs.

    Args:
        cfg (DataConfig): the window's data config.
        base_dir (str | Path): the base preparation.
        out_dir (str | Path): where the window's preparation goes.

    Returns:
        Base: the base's directory, schema and manifest CRC-32.

    Raises:
        DataError: naming the base's file and the reason.

    Example::

        >>> # check_base(load_config("kuairand_temporal").data, "prepared/day1", "prepared/day2").schema
    """
    base = Path(base_dir)
    if base.resolve() == Path(out_dir).resolve():
        raise DataError(
            "the base is the output directory: the new window would replace the preparation it "
            "grows from (and the runs trained on it)",
            file=str(base),
            expected="another --out than the base",
        )
    # the files growth reads (schema, vocabularies, statistics, tail) against their CRC-32; the
    # shards, never read here, against their sizes (prepare --verify checks every byte)
    check_prepared(base)
    crc = zlib.crc32((base / MANIFEST_FILE).read_bytes())
    schema = DatasetSchema.load(base)
    where = str(base / SCHEMA_FILE)
    theirs = dict(schema.meta.get("config", {}))
    # a base written before a feature key existed does not record it: it was at its default
    theirs["features"] = [feature_with_defaults(f) for f in theirs.get("features") or []]
    ours = dataclasses.asdict(cfg)
    changes = []
    for key in COMPARED:
        changes += config_changes({key: _by_name(theirs.get(key))}, {key: _by_name(ours[key])}, "data.")
    source = ("adapter", "columns")  # what a raw column means (the files themselves differ by design)
    changes += config_changes(
        {"source": {k: theirs.get("source", {}).get(k) for k in source}},
        {"source": {k: ours["source"][k] for k in source}},
        "data.",
    )
    if changes:
        raise DataError(
            "the base was prepared from another config: " + "; ".join(changes),
            file=where,
            expected="the base's data.features, labels, watch_ratio, source.adapter and source.columns",
        )
    relative = [label.name for label in cfg.labels if label.relative_to]
    if relative:
        raise DataError(
            f"label(s) {relative} are relative to a group: their training cuts are not stored, so "
            "a window cannot keep the base's",
            file=where,
            expected="labels with a constant threshold or a raw column",
        )
    if "time_range" not in schema.meta:
        raise DataError(
            "the base records no time range (prepared by an earlier engagerec, or from a log "
            "without timestamps): prepare it again with this release",
            file=where,
            expected=f"a base prepared from a log with a {TIMESTAMP} column",
        )
    if history_length(cfg.features) and not (base / TAIL_FILE).is_file():
        raise DataError(
            "the base keeps no history tail (prepared by an earlier engagerec): prepare it again",
            file=str(base / TAIL_FILE),
        )
    return Base(base, schema, crc)


def _by_name(value: Any) -> Any:
    """A list of named entries (features, labels) as a mapping by name, so that a difference is
    named by its entry and key (``data.features.recent.length: 3 -> 5``)."""
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        return {v["name"]: v for v in value}
    return value


def check_window(con, events, base: Base) -> None:
    """
    Every row of the window must follow the base's last moment (a window left with no rows
    is refused earlier, by engagerec.data.events, with the count each filter dropped).

    Args:
        con: the DuckDB connection holding ``events`` (the window's kept rows).
        events: their engagerec.data.events.Events.
        base (Base): the checked base (its schema's ``meta.time_range``).

    Raises:
        DataError: the first row at or before the base's end (its file and row), or a window
            without timestamps.

    Example::

        >>> # check_window(con, build_events(con, raw, cfg), check_base(cfg, "prepared/day1", out))
    """
    if TIMESTAMP not in events.columns:
        raise DataError(
            "preparing against a base needs the window's times",
            file=events.log.source.label,
            column=TIMESTAMP,
        )
    end = base.schema.meta["time_range"][1]
    time = quote(TIMESTAMP)
    row = con.execute(f"SELECT min(__src) FROM events WHERE {time} <= {end!r}").fetchone()[0]
    if row is not None:
        got = con.execute(f"SELECT {time} FROM events WHERE __src = {row}").fetchone()[0]
        raise events.log.error(
            f"the window overlaps its base {base.dir}, which ends at {end!r}: this view would be "
            "counted twice (in the base's statistics and histories, and here)",
            row,
            column=TIMESTAMP,
            expected=f"a timestamp after {end!r}",
            got=got,
        )


class GrowingFitter(SchemaApplier):
    """Fits a window's schema on top of a base's (see the module docstring): vocabularies grow,
    numbers keep the base's normalisation, id statistics add the base's sums to the window's.

    Args:
        con, events, features, out_dir: as for ``Fitter`` (``events`` holds the window).
        base (Base): the checked base (``check_base``).

    Example::

        >>> # fitter = GrowingFitter(con, events, cfg.features, stage, check_base(cfg, "prepared/day1", out))
        >>> # fitter.fit_ids(); fitter.growth["content_id"]
    """

    fitting = True  # the window's own statistics are fitted (ordered, cross-fitted or live)

    def __init__(self, con, events, features, out_dir: Path, base: Base):
        super().__init__(con, events, features, out_dir, base.schema, base.dir)
        self.base = base
        self.growth: Dict[str, Dict[str, int]] = {}  # id space -> rows before, after, appended

    def _fit_space(self, space: str, tokens_sql: str, feature, multi: bool) -> Dict[str, Any]:
        if space in self.spaces or space in self.fitted.hashed:
            return super()._fit_space(space, tokens_sql, feature, multi)
        info = super()._fit_space(space, tokens_sql, feature, multi)  # the base's tokens, idx 1..n
        table, before = info["table"], self.fitted.vocab_sizes[space]
        source = f"unnest({tokens_sql})" if multi else tokens_sql
        self.con.execute(
            f"INSERT INTO {table} SELECT token, "
            f"CAST({before} + row_number() OVER (ORDER BY token) AS INTEGER) "
            f"FROM (SELECT {source} AS token FROM events e WHERE e.__split = 0) "
            f"WHERE token IS NOT NULL AND token NOT IN (SELECT token FROM {table}) "
            f"GROUP BY token HAVING count(*) >= {int(feature.min_count)}"
        )
        after = int(self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        if feature.hash_buckets and after > feature.hash_buckets:
            raise DataError(
                f"id space '{space}' would grow from {before:,} to {after:,} ids, past feature "
                f"'{feature.name}''s hash_buckets ({feature.hash_buckets:,}), the most its table holds. "
                "Policy: a vocabulary never turns into hashing while it grows (that would move every "
                "known id's row)",
                file=str(self.fitted_dir / VOCAB_DIR / f"{space}.parquet"),
                expected="prepare from scratch (the space is then hashed), or raise hash_buckets",
            )
        self.schema.vocab_sizes[space] = after
        self.growth[space] = {"rows_before": before + 1, "rows_after": after + 1, "appended": after - before}
        self.save_vocabulary(space, table)
        return info

    def fit_stats(self, group, table: str, key: str, token_type: str, seed: int) -> None:
        """The base's sums loaded beside the window's statistics (``carried_stats`` adds them to
        every row, and ``stats/`` is saved with both: ``Fitter.fit_stats``), with the base's prior."""
        base = self.carried_tables[table] = f"base_{table}"
        load_stat_tables(self.con, group, base, self.fitted_dir, token_type)
        Fitter.fit_stats(self, group, table, key, token_type, seed)
        for _, feature in group:
            meta = dict(self.fitted.target_stats[feature.name])  # the base's prior
            if "counted_until" in meta:
                meta["counted_until"] = self.log_end
            self.schema.target_stats[feature.name] = meta

    def carried_stats(self, group, table: str, key: str) -> Tuple[List[str], Dict[str, Dict[str, str]]]:
        """The base's sums of each feature of ``group``, joined on the id: added to what the
        window's own rows give."""
        base = self.carried_tables[table]
        alias = f"b_{table}"
        sums = {}
        for i, feature in group:
            carried = {"n": f"coalesce({alias}.n, 0)"}
            if feature.kind == "target_mean":
                carried.update({"s": f"coalesce({alias}.s_{i}, 0)", "c": f"coalesce({alias}.c_{i}, 0)"})
            sums[feature.name] = carried
        return [f"LEFT JOIN {base} {alias} ON {alias}.token = {key}"], sums

    def forget_base(self) -> None:
        """Free what the window's rows needed of the base once the history table holds their
        values: the base's statistics and tail, and the tail's rows of the history table (the
        writer joins the window's rows only; the numbers' checks then see only those)."""
        for table in self.carried_tables.values():
            self.con.execute(f"DROP TABLE IF EXISTS {table}")
        self.con.execute("DROP TABLE IF EXISTS base_tail")
        self.con.execute(f"DELETE FROM history WHERE __split = {BASE_ROWS}")

    def base_record(self) -> Dict[str, Any]:
        """What ``schema.json``'s ``meta.base`` keeps: the base, its manifest's CRC-32 and time
        range, and the growth of each id space's table.

        Raises:
            DataError: the base was replaced while the window was prepared (its manifest differs
                from the one checked first).
        """
        manifest = self.fitted_dir / MANIFEST_FILE
        try:
            crc = zlib.crc32(manifest.read_bytes())
        except OSError:
            crc = None
        if crc != self.base.manifest_crc32:
            raise DataError(
                "the base was replaced or removed while this window was prepared against it",
                file=str(manifest),
                expected="a base left as it is until the window's prepare ends",
            )
        return {
            "dir": str(self.fitted_dir.resolve()),
            "manifest_crc32": crc,
            "time_range": self.fitted.meta["time_range"],
            "growth": self.growth,
        }


def load_tail(con, base_dir: Path, features: List[FeatureConfig], columns: Dict[str, str]) -> Optional[str]:
    """
    Load the base's history tail as DuckDB table ``base_tail`` (split ``BASE_ROWS``), its
    columns cast to the window's types, and return the subquery that adds it to ``events``
    for the history windows; None without history features.

    Args:
        con: the window's DuckDB connection.
        base_dir (Path): the base.
        features (List[FeatureConfig]): ``data.features``.
        columns (Dict[str, str]): the window's ``events`` columns and their types.

    Returns:
        Optional[str]: the SQL of the window's rows and the base's last views, or None.

    Example::

        >>> # rows = load_tail(con, Path("prepared/day1"), cfg.features, events.columns) or "events"
    """
    if not history_length(features):
        return None
    path = base_dir / TAIL_FILE
    cast = ", ".join(f"CAST({quote(c)} AS {columns[c]}) AS {quote(c)}" for c in tail_columns(features))
    con.execute(
        f"CREATE OR REPLACE TABLE base_tail AS SELECT {cast}, __src, {BASE_ROWS} AS __split "
        f"FROM read_parquet({literal(str(path))})"
    )
    return "(SELECT * FROM events UNION ALL BY NAME SELECT * FROM base_tail)"


def known_rows(later_dir: str | Path, earlier_dir: str | Path) -> Dict[str, int]:
    """
    The table rows an earlier preparation had, per id space whose table grew since, when
    ``later_dir`` continues ``earlier_dir`` (prepared against it, or against a window that did):
    a model trained on the earlier data scores the later rows with every id appended since on
    its out-of-vocabulary row 0, as a model whose vocabulary stayed frozen would.

    Args:
        later_dir (str | Path): the later preparation.
        earlier_dir (str | Path): the data the model trained on.

    Returns:
        Dict[str, int]: id space -> the earlier table's rows (OOV row included); empty when no
        table grew.

    Raises:
        DataError: an id space whose earlier vocabulary is not the start of the later one
            (prepared again, or not from this lineage), or a hashed space or bucket feature whose
            rows differ.

    Example::

        >>> # known_rows("prepared/day3", "prepared/day1")
        >>> # {'content_id': 4461, 'user_id': 615}
    """
    import pyarrow as pa  # here: prepare itself reads vocabularies with DuckDB
    import pyarrow.parquet as pq

    later, earlier = DatasetSchema.load(later_dir), DatasetSchema.load(earlier_dir)
    rows: Dict[str, int] = {}
    for space in sorted({f.id_space for f in later.sparse}):
        now, then = later.num_embeddings(space), earlier.num_embeddings(space)
        path = Path(later_dir) / VOCAB_DIR / f"{space}.parquet"
        if space in later.hashed or space in earlier.hashed or space in later.buckets:
            # hashed ids keep their rows only with the bucket count and the token type hashed
            kind = (later.hashed.get(space), later.token_types.get(space))
            if kind != (earlier.hashed.get(space), earlier.token_types.get(space)) or now != then:
                raise DataError(
                    f"id space '{space}' has {now:,} rows here and {then:,} in the run's data {earlier_dir}",
                    file=str(Path(later_dir) / SCHEMA_FILE),
                    expected="the run's own data, or a window prepared against it (prepare --base)",
                )
            continue  # hashed ids and buckets keep their rows
        try:
            tokens = pq.read_table(path).column("token")
            known = pq.read_table(Path(earlier_dir) / VOCAB_DIR / path.name).column("token")
        except (OSError, KeyError, pa.ArrowException) as err:
            raise DataError(
                f"id space '{space}': a vocabulary cannot be read ({err})", file=str(path)
            ) from None
        if len(tokens) != now - 1:
            raise DataError(
                f"id space '{space}': schema.json counts {now - 1:,} ids, its vocabulary "
                f"holds {len(tokens):,}",
                file=str(path),
            )
        if now < then or not tokens.slice(0, then - 1).equals(known):
            raise DataError(
                f"id space '{space}': the run's vocabulary ({then - 1:,} ids) is not the start of this "
                f"one ({now - 1:,} ids): prepared again, or not continuing the run's data, its ids "
                "would be read as other ids",
                file=str(path),
                expected=f"the run's data {earlier_dir}, or a window prepared against it (prepare --base)",
            )
        if now > then:
            rows[space] = then
    return rows
