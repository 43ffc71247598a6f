"""prepare(): the one dataset writer. tables -> events -> labels -> split -> schema (train only)
-> encoded parquet shards, out of core (DuckDB), for every adapter.

Output directory layout::

    schema.json          encodings, labels, the summary below
    vocabs/<id space>.parquet  one vocabulary per id space (token per row, index = row + 1)
    train/part-*.parquet rows in a seeded random order, so that streaming reads are mixed
    val/part-*.parquet
    test/part-*.parquet
    stats/<feature>.parquet  per-id sums and counts of the id statistics (engagerec.data.target_stats)
    history_tail.parquet  with history features: each user's last views, which a window
                         prepared against this one (``--base``) continues (engagerec.data.growth)
    manifest.json        every file's size, CRC-32 and rows (engagerec.data.manifest), written last

The whole directory is written beside the output directory and swapped in once complete
(engagerec.data.staging). Memory is bounded by DuckDB's ``data.memory_limit`` (it spills to a
scratch directory inside the staging directory) and by one record batch in Python, never by
the number of rows.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import duckdb

from engagerec.config import DataConfig
from engagerec.data import growth, staging
from engagerec.data.adapters import load_tables
from engagerec.data.errors import DataError
from engagerec.data.events import Events, FilterReport, build_events
from engagerec.data.exact_sums import UnsummableError, exact_moments
from engagerec.data.fitting import Fitter, Reads
from engagerec.data.history import build_history_table, has_ties
from engagerec.data.manifest import write_manifest
from engagerec.data.raw import CONTENT_ID, TIMESTAMP, USER_ID
from engagerec.data.schema import SCHEMA_FILE, DatasetSchema
from engagerec.data.shards import ShardWriter
from engagerec.data.split import SPLIT_NAMES, seeded_order
from engagerec.data.tables import (
    connect,
    quote,
    resolve_memory_limit,
    source_bytes,
    write_failure,
)
from engagerec.data.target_stats import drop_stat_tables, stat_sql
from engagerec.data.user_grain import USER_ENCODED, encode_per_user, joins_used, per_user_join, read_per_user

SPLITS = SPLIT_NAMES
SCRATCH = ".scratch"  # DuckDB's database and spill, inside the staging directory
BATCH_ROWS = 65_536  # rows per record batch streamed from DuckDB to the parquet writer


def prepare(
    cfg: DataConfig, out_dir: str | Path, *, overwrite: bool = True, base: Optional[str | Path] = None
) -> Dict[str, Any]:
    """Build a prepared dataset in ``out_dir``; returns its summary (schema.json stores it, but
    for the manifest stage's seconds and ``stale_scratch_freed_bytes``, which come after it).

    The new preparation is written beside ``out_dir`` and swapped in whole once complete
    (engagerec.data.staging): a prepare that fails or is killed leaves an earlier preparation
    there as it was. One prepare at a time writes a directory, and scratch that dead prepares
    left is removed first (``summary["stale_scratch_freed_bytes"]``). The manifest
    (engagerec.data.manifest), written last, lets every reader check the files.

    Args:
        cfg: the ``data`` section of an experiment config (source, features, labels, filters,
            split, shard sizes, the engine's memory limit).
        out_dir: the output directory: new, empty, or an earlier preparation (replaced whole).
        overwrite: replace an earlier preparation in ``out_dir``; when False, one there is an error.
        base: an earlier preparation of the same config that this one continues: its vocabularies
            grow, its normalisation stays, its id statistics and histories carry on
            (engagerec.data.growth); the source then holds the next window of the log.

    Returns:
        The summary: rows read, dropped per reason, kept; per-label statistics per split;
        constant baselines on test; table sizes; seconds per stage.

    Raises:
        DataError: bad input (named by file, column and row), a full output disk (the output
            and its free space named), another prepare writing ``out_dir``, an ``out_dir``
            holding files that are not a preparation, or a base this window cannot continue
            (engagerec.data.growth says which).

    Example (run from the repository, where the bundled KuaiRand data lives)::

        >>> import tempfile
        >>> from engagerec.config import load_config
        >>> summary = prepare(load_config("kuairand_temporal").data, tempfile.mkdtemp())
        >>> summary["rows_read"], summary["dropped"]["zero or negative duration"], summary["rows_kept"]
        (41828, 7738, 33963)
        >>> [summary["split"][name]["rows"] for name in ("train", "val", "test")]
        [21397, 2377, 10189]
    """
    out_dir = Path(out_dir)
    checked = growth.check_base(cfg, base, out_dir) if base is not None else None
    staging.check_replaceable(out_dir)
    with staging.PrepareLock(out_dir):
        freed = staging.clean_stale(out_dir)
        if not overwrite and (out_dir / SCHEMA_FILE).exists():
            raise DataError("holds a preparation and overwrite is off", file=str(out_dir))
        stage = staging.new_staging(out_dir)
        try:
            summary = _prepare_into(cfg, stage, out_dir, checked)
            summary["stale_scratch_freed_bytes"] = freed
            try:
                staging.swap_in(stage, out_dir)
            except OSError as err:
                raise DataError(
                    f"the new preparation could not be put in place ({err}); the earlier one is as it was",
                    file=str(out_dir),
                ) from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # a failed prepare leaves nothing behind
    return summary


def _prepare_into(cfg: DataConfig, stage: Path, out_dir: Path, base: Optional[growth.Base]) -> Dict[str, Any]:
    """Write a whole preparation into ``stage`` (its scratch inside), manifest last; errors name
    ``out_dir``, the directory the user gave. ``base``: the directory and schema it continues."""
    timings: Dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage_name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage_name] = round(now - clock, 2)
        clock = now

    work = stage / SCRATCH
    try:
        work.mkdir(parents=True, exist_ok=True)
        raw = load_tables(cfg.source, work)
        memory_limit = resolve_memory_limit(
            cfg.memory_limit, source_bytes([raw.interactions, raw.users, raw.content])
        )
        con = connect(work, memory_limit, cfg.threads)
        events = build_events(con, raw, cfg)
        lap("load, join, labels, filters, split")
        if base is None:
            fitter, rows = Fitter(con, events, cfg.features, stage), "events"
        else:
            growth.check_window(con, events, base)
            fitter = growth.GrowingFitter(con, events, cfg.features, stage, base)
            rows = growth.load_tail(con, base.dir, cfg.features, events.columns) or "events"
        fitter.fit_ids()
        lap("fit vocabularies (train)")
        build_history(con, fitter, events, cfg, rows)
        if growth.history_length(cfg.features) and {USER_ID, TIMESTAMP} <= set(events.columns):
            growth.write_tail(con, rows, cfg.features, stage / growth.TAIL_FILE)
        if base is not None:
            fitter.forget_base()
        lap("history windows, id statistics")
        schema = fitter.fit_numbers()
        lap("fit normalisation, buckets (train)")
        files = write_splits(con, fitter, events, cfg, stage)
        lap("encode, shuffle, write shards")
        summary = _summary(con, cfg, events, schema, raw.notes)
        time_range = _time_range(con, events)
        con.close()
        shutil.rmtree(work)
        summary["seconds"] = timings
        summary["memory_limit"] = memory_limit  # what data.memory_limit resolved to
        schema.meta = {
            "summary": summary,
            "splits": files,
            "config": asdict(cfg),
            "engine": f"duckdb {duckdb.__version__}",
        }
        if time_range is not None:
            schema.meta["time_range"] = time_range
        if base is not None:
            schema.meta["base"] = summary["base"] = fitter.base_record()
        schema.save(stage)
        lap("summary, schema.json")
        write_manifest(stage, rows_by_shard(files))  # last: it marks the preparation complete
        lap("manifest (CRC-32 of every file)")  # in the returned summary only: it follows schema.json
    except (duckdb.Error, OSError) as err:
        failure = write_failure(err, out_dir, "writing the prepared data")
        if failure is None:
            raise
        raise failure from None
    return summary


def rows_by_shard(files: Dict[str, Any]) -> Dict[str, int]:
    """
    Rows per shard, by path relative to the prepared directory: what the manifest records.

    Args:
        files (Dict[str, Any]): ``write_splits``' result (per split: ``files`` and ``file_rows``).

    Returns:
        Dict[str, int]: ``"<split>/<file>"`` -> rows written into it.

    Example::

        >>> rows_by_shard({"val": {"rows": 5, "files": ["part-00000.parquet"], "file_rows": [5]}})
        {'val/part-00000.parquet': 5}
    """
    return {
        f"{split}/{name}": rows
        for split, spec in files.items()
        for name, rows in zip(spec["files"], spec["file_rows"], strict=True)
    }


def build_history(
    con: duckdb.DuckDBPyConnection, fitter: Fitter, events: Events, cfg: DataConfig, rows: str = "events"
) -> None:
    """The ``history`` table: per event, its id histories (encoded ids of earlier views), its
    history_mean features (means of earlier labels) and its id statistics (target_mean,
    id_count: computed in the same pass, so the writer joins one per-row table). ``rows``: the
    events, or a subquery adding a base's last views before them (engagerec.data.growth)."""
    values, windows = [], []
    for feature, lookup in fitter.histories:
        values.append(lookup)
        windows.append((feature.name, "list", feature.length, "[]::INTEGER[]"))
    for feature in cfg.features:
        if feature.kind == "history_mean":
            values.append(f"e.{quote(feature.of)}")
            windows.append((feature.name, "avg", feature.length, "NULL"))
    stat_joins, stat_columns = stat_sql(fitter, cfg.features, cfg.split.seed)
    stats = [f"{sql} AS {quote(name)}" for name, sql in stat_columns.items()]
    joins = " ".join(fitter.history_joins + stat_joins)
    if not windows:
        select = ", ".join(["e.__src", "e.__split"] + stats)
        con.execute(f"CREATE OR REPLACE TABLE history AS SELECT {select} FROM {rows} e {joins}")
    else:
        source = (
            f"SELECT e.__src, e.__split, e.{quote(USER_ID)} AS __u, e.{quote(TIMESTAMP)} AS __t, "
            + ", ".join([f"{value} AS __v{i}" for i, value in enumerate(values)] + stats)
            + f" FROM {rows} e {joins}"
        )
        ties = has_ties(con, rows)
        build_history_table(con, "history", source, windows, ties=ties, keep=list(stat_columns))
    drop_stat_tables(con, cfg.features)


def _split_order(cfg: DataConfig, split: str) -> str:
    """Train in a seeded random order (streaming reads are then mixed); val and test in the
    split's own order (random, by time, or by source row)."""
    if split == "train":
        return seeded_order(cfg.split.seed + 1, "e.__src")
    if cfg.split.kind == "random":
        return seeded_order(cfg.split.seed, "e.__src")
    if cfg.split.kind == "temporal":
        return f"e.{quote(TIMESTAMP)}, e.__src"
    return "e.__src"


def write_splits(
    con,
    fitter: Fitter,
    events: Events,
    cfg: DataConfig,
    out_dir: Path,
    splits=SPLITS,
    order: Optional[str] = None,
) -> Dict[str, Any]:
    """Encode and write each split, in two passes that each fit DuckDB's memory limit:

    1. ``encoded``: every row's columns that need no history (vocabulary lookups, standardised
       numbers, labels), with its source row and timestamp; the columns that read only the
       users table are encoded once per user instead (engagerec.data.user_grain);
    2. per split, one streaming query: those columns joined with the history table on the
       source row (and the per-user codes on the user), in the split's order (``order``, an
       ORDER BY over ``e``, replaces it: scoring keeps the input's order).

    One query for everything held every vocabulary's hash table and the history join at once,
    and ran out of 1 GB at 5x the KuaiRand-1K shape. Returns per split its rows and files.
    """
    schema = fitter.schema
    columns = {name: fitter.sparse_sql[name] for name in schema.sparse_names}
    columns.update({name: fitter.dense_sql[name] for name in schema.dense_names})
    columns.update(
        {label: f"CAST(coalesce(e.{quote(label)}, 'NaN'::DOUBLE) AS FLOAT)" for label in schema.label_names}
    )
    reads = dict(fitter.reads)
    reads.update({label: Reads(label) for label in schema.label_names})
    from_history = {name for name in columns if reads[name].column is None}
    per_row = {name: sql for name, sql in columns.items() if name not in from_history}
    on_user = read_per_user(events.user_grain, per_row, reads) if events.user_grain else []
    encoded = {name: f"__c{i}" for i, name in enumerate(n for n in per_row if n not in on_user)}
    kept = [
        f"e.{k}" for k in ["__src", "__split"] + ([quote(TIMESTAMP)] if TIMESTAMP in events.columns else [])
    ]
    if on_user:
        kept.append("e.__user_key")
    joins = joins_used([reads[name] for name in encoded], fitter.joins)
    con.execute(
        "CREATE OR REPLACE TABLE encoded AS SELECT "
        + ", ".join(kept + [f"{columns[name]} AS {alias}" for name, alias in encoded.items()])
        + f" FROM events e {' '.join(joins)}"
    )
    per_user = (  # the users to encode read off encoded's keys: no second scan of the events
        encode_per_user(con, events.user_grain, events.columns, per_row, reads, fitter.joins, keys="encoded")
        if on_user
        else {}
    )
    read = {
        name: per_user.get(name) or (columns[name] if name in from_history else f"e.{encoded[name]}")
        for name in columns
    }
    select = ", ".join(f"{read[name]} AS {quote(name)}" for name in columns)
    user_join = per_user_join("e") if per_user else ""
    files: Dict[str, Any] = {}
    dictionary = dictionary_columns(schema, cfg.row_group_size)
    for code, name in enumerate(SPLITS):
        if name not in splits:
            continue
        writer = ShardWriter(out_dir / name, cfg.rows_per_file, cfg.row_group_size, dictionary)
        query = (
            f"SELECT {select} FROM encoded e JOIN history h ON h.__src = e.__src {user_join} "
            f"WHERE e.__split = {code} AND h.__split = {code} "  # both sides filtered before the join
            f"ORDER BY {order or _split_order(cfg, name)}"
        )
        reader = con.cursor().sql(query).to_arrow_reader(BATCH_ROWS)  # own cursor: streams alone
        layout = reader.schema
        for batch in reader:
            writer.write_batch(batch)
        writer.close(layout)
        files[name] = {"rows": writer.rows, "files": writer.files, "file_rows": writer.file_rows}
    con.execute("DROP TABLE encoded")
    if per_user:
        con.execute(f"DROP TABLE {USER_ENCODED}")
    return files


def dictionary_columns(schema: DatasetSchema, row_group_size: int) -> List[str]:
    """
    The columns of the shards worth a parquet dictionary: ids of a table of at most half a row
    group's rows (where a row group's dictionary and its indices take fewer bytes than the plain
    values), and binary labels. The other ids, the dense features and the regression labels are
    written plain: at KuaiRand-1K scale, dictionary-encoding every column wrote the shuffled
    training split about 1.7x slower and 5% larger (docs/EXPERIMENTS.md).

    Args:
        schema (DatasetSchema): the prepared data's schema (its tables' sizes).
        row_group_size (int): rows per row group of the shards.

    Returns:
        List[str]: the column names to dictionary-encode.

    Example::

        >>> from engagerec.data.schema import DatasetSchema, LabelSpec, SparseFeature
        >>> schema = DatasetSchema(features=[], sparse=[SparseFeature("user_id", "user_id", False),
        ...     SparseFeature("content_id", "content_id", False)], dense=[],
        ...     labels=[LabelSpec("watch_ratio", "regression"), LabelSpec("skip", "binary")],
        ...     vocab_sizes={"user_id": 1_000, "content_id": 4_000_000})
        >>> dictionary_columns(schema, row_group_size=65_536)
        ['user_id', 'skip']
    """
    small = [f.name for f in schema.sparse if schema.num_embeddings(f.id_space) <= row_group_size // 2]
    return small + [label.name for label in schema.labels if label.kind == "binary"]


# ------------------------------------------------------------------- summary


def _time_range(con, events: Events) -> Optional[List[float]]:
    """The kept rows' first and last timestamps (a window prepared against this one must start
    after the last); None without timestamps."""
    if TIMESTAMP not in events.columns:
        return None
    low, high = con.execute(f"SELECT min({quote(TIMESTAMP)}), max({quote(TIMESTAMP)}) FROM events").fetchone()
    return None if low is None else [float(low), float(high)]


def _stats(con, events: Events) -> Dict[str, Dict[str, Any]]:
    """Per split and for all rows: rows, users, items, and per label mean, variance, missing
    (exact sums: engagerec.data.exact_sums)."""
    # the distinct counts in a query of their own: beside the label aggregates, the same grouping
    # took 3.9 s against 2.4 s for the two queries at KuaiRand-1K scale (on one thread, then)
    distinct = [
        f"count(DISTINCT {quote(column)})" if column in events.columns else "NULL"
        for column in (USER_ID, CONTENT_ID)
    ]
    found = con.execute(
        f"SELECT __split, count(*), {', '.join(distinct)} FROM events GROUP BY GROUPING SETS ((__split), ())"
    ).fetchall()
    counts = {row[0]: row[1:] for row in found}
    names = [quote(label.name) for label in events.labels]
    try:
        labels = exact_moments(con, names, "events", group="__split") if names else {}
    except UnsummableError as err:
        raise DataError(
            f"label '{events.labels[err.index].name}': {err}",
            column=events.labels[err.index].name,
            expected="finite numbers below about 1e150 in magnitude",
        ) from None
    out: Dict[str, Dict[str, Any]] = {name: {"rows": 0} for name in (*SPLITS, "all")}
    for key, (rows, users, items) in counts.items():
        stats: Dict[str, Any] = {"rows": int(rows)}
        if users is not None:
            stats["users"] = int(users)
        if items is not None:
            stats["items"] = int(items)
        stats["labels"] = {
            label.name: {
                "mean": moments.mean,
                "var": moments.var,
                "missing": int(rows) - moments.count,
                "min": moments.low,
                "max": moments.high,
            }
            for label, moments in zip(events.labels, labels.get(key, []), strict=True)
        }
        out["all" if key is None else SPLITS[key]] = stats
    return out


def _baselines(con, events: Events, stats: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Constant predictors fitted on train, scored on test: the floor every model must beat
    (every label's in the same scans of the test rows)."""
    if stats["test"]["rows"] == 0:
        return {}
    scored, errors = [], []
    for label in events.labels:
        mean = stats["train"]["labels"][label.name]["mean"]
        if mean is None:
            continue
        q = quote(label.name)
        if label.kind == "binary":  # the majority class's accuracy
            errors.append(f"CAST({q} = {1.0 if mean >= 0.5 else 0.0} AS DOUBLE)")
        else:  # the training mean's MSE
            errors.append(f"({q} - {mean!r}) ^ 2")
        scored.append((label, mean))
    if not errors:
        return {}
    try:
        found = exact_moments(con, errors, "events WHERE __split = 2")[None]
    except UnsummableError as err:  # a label so large that its error's square overflows
        label = scored[err.index][0]
        raise DataError(
            f"label '{label.name}': its constant baseline's error: {err}",
            column=label.name,
            expected="finite numbers below about 1e75 in magnitude",
        ) from None
    return {
        label.name: (
            {"accuracy_majority": moments.mean, "positive_rate_train": mean}
            if label.kind == "binary"
            else {"mse_train_mean": moments.mean}
        )
        for (label, mean), moments in zip(scored, found, strict=True)
    }


def _summary(
    con, cfg: DataConfig, events: Events, schema: DatasetSchema, notes: Dict[str, str]
) -> Dict[str, Any]:
    report: FilterReport = events.report
    stats = _stats(con, events)
    return {
        "adapter": cfg.source.adapter,
        "rows_read": report.rows_read,
        "dropped": dict(report.dropped),
        "rows_dropped": report.rows_dropped,
        "counted_not_dropped": dict(report.notes),
        "rows_kept": events.rows,
        "watch_ratio": asdict(cfg.watch_ratio),
        "labels": {label.name: asdict(label) for label in cfg.labels},
        # kept rows whose raw label is missing (weight 0 for that label), counted by _stats
        "label_missing": {name: spec["missing"] for name, spec in stats["all"]["labels"].items()},
        "all": stats["all"],
        "split": {"kind": cfg.split.kind, "seed": cfg.split.seed, **{name: stats[name] for name in SPLITS}},
        "baselines_on_test": _baselines(con, events, stats),
        "sparse_features": {f.name: schema.num_embeddings(f.id_space) for f in schema.sparse},
        "dense_features": schema.dense_names,
        "notes": notes,
    }


def _number(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # a label with no value in a split


def format_summary(summary: Dict[str, Any], out_dir: Optional[str | Path] = None) -> str:
    """The human-readable prepare summary printed by `engagerec prepare`."""
    lines = [f"engagerec prepare ({summary['adapter']})" + (f" -> {out_dir}" if out_dir else "")]
    lines.append(f"  rows read            {summary['rows_read']:>10,}")
    # reasons that dropped nothing are left out here (schema.json's summary has every one)
    for reason, count in summary["dropped"].items():
        if count:
            lines.append(f"  dropped: {reason:<30} {count:>8,}")
    lines.append(f"  rows kept            {summary['rows_kept']:>10,}")
    for note, count in summary["counted_not_dropped"].items():
        if count:
            lines.append(f"  counted: {note:<30} {count:>8,}")
    everything = summary["all"]
    who = [f"{everything[k]:,} {k}" for k in ("users", "items") if k in everything]
    if who:
        lines.append("  " + "   ".join(who))
    baselines = summary["baselines_on_test"]
    for name, spec in summary["labels"].items():
        stats = everything["labels"][name]
        source = spec["column"] or (
            "watch ratio" if spec["kind"] == "regression" else f"ratio < {spec['threshold']:g}"
        )
        what = "rate" if spec["kind"] == "binary" else "mean"
        text = f"  label {name:<14} {spec['kind']:<10} ({source}): {what} {_number(stats['mean'])}"
        if stats["missing"]:
            text += f", missing {stats['missing']:,} (weight 0)"
        base = baselines.get(name, {})
        if "mse_train_mean" in base:
            text += f"; test MSE of the train mean {_number(base['mse_train_mean'])}"
        if "accuracy_majority" in base:
            text += f"; test accuracy of the majority class {_number(base['accuracy_majority'])}"
        lines.append(text)
    split = summary["split"]
    sizes = "   ".join(f"{name} {split[name]['rows']:,}" for name in SPLITS)
    lines.append(f"  split {split['kind']} (seed {split['seed']}): {sizes}")
    last: Dict[str, str] = {}  # a positional history (<name>@0, @1, ...) is shown as one entry
    shown: Dict[str, int] = {}
    for name, rows in summary["sparse_features"].items():
        base, at, position = name.partition("@")
        if at:
            last[base] = position
        shown[base if at else name] = rows
    tables = ", ".join(
        f"{name}{f'@0..{last[name]}' if name in last else ''}[{rows:,}]" for name, rows in shown.items()
    )
    lines.append(f"  sparse features (table rows incl. OOV): {tables}")
    lines.append(f"  dense features: {', '.join(summary['dense_features']) or '-'}")
    if "base" in summary:
        grown = ", ".join(
            f"{space} {g['rows_before']:,} -> {g['rows_after']:,}"
            for space, g in summary["base"]["growth"].items()
        )
        lines.append(f"  continues {summary['base']['dir']}; table rows: {grown or '-'}")
    if "seconds" in summary:
        lines.append("  seconds: " + ", ".join(f"{k} {v:g}" for k, v in summary["seconds"].items()))
    if "memory_limit" in summary:
        lines.append(f"  DuckDB memory limit: {summary['memory_limit'] or 'its own (80% of RAM)'}")
    return "\n".join(lines)
