"""Source files -> DuckDB tables, checked. Every check raises DataError naming the file, column
and first offending row; no bad row is skipped silently.

DuckDB reads CSV/TSV/Parquet out of core. A CSV row that does not parse (a corrupt value, a
wrong number of fields) is caught by DuckDB's reject store and reported with its line; a
value that parses but breaks a rule (a non-number where a number is needed, an infinity, a
missing id) is found by a query and reported with its row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import duckdb

from engagerec.data.errors import DataError, disk_full_error, first_line
from engagerec.data.raw import TableSource
from engagerec.disk import is_disk_full

PARQUET_SUFFIXES = (".parquet", ".pq")
NUMERIC_TYPES = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "FLOAT",
    "DOUBLE",
    "DECIMAL",
    "BOOLEAN",
)


INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT")  # fmt: skip
BAD = "__bad__"  # prefix of the per-column flags of values that are not integers


def quote(name: str) -> str:
    """A SQL identifier, quoted (column names come from user files)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + str(text).replace("'", "''") + "'"


def is_numeric(sql_type: str) -> bool:
    """Whether a DuckDB type (its parameters, as in ``DECIMAL(18,3)``, ignored) is a number or BOOLEAN."""
    return sql_type.split("(")[0] in NUMERIC_TYPES


# data.memory_limit: auto: this share of the source files' bytes, at least 1 GB (KuaiRand-1K's
# 1.26 GB of files prepare at 1.36 GiB peak under 1 GB) and at most half the machine's memory.
# 5x KuaiRand-1K (6.43 GB of files) spilled and grew superlinearly under 1 GB, not under 4 GB
# (docs/EXPERIMENTS.md)
AUTO_MEMORY_SHARE = 0.6
AUTO_MEMORY_FLOOR = 10**9


def resolve_memory_limit(setting: str, input_bytes: int = 0, machine_bytes: Optional[int] = None) -> str:
    """
    DuckDB's memory limit for ``data.memory_limit``: the setting itself (a size such as ``"4GB"``,
    or ``""`` for DuckDB's own 80% of RAM), or for ``"auto"`` ``AUTO_MEMORY_SHARE`` of the
    source files' ``input_bytes``, at least ``AUTO_MEMORY_FLOOR`` and at most half of
    ``machine_bytes``.

    Args:
        setting (str): ``data.memory_limit``.
        input_bytes (int): the source files' bytes (``source_bytes``). Default: 0.
        machine_bytes (Optional[int]): the machine's memory. Default: this one's (Linux sysconf).

    Returns:
        str: a size DuckDB's ``memory_limit`` takes, in MB for ``auto``.

    Example::

        >>> from engagerec.data.tables import resolve_memory_limit
        >>> resolve_memory_limit("4GB", 10**12)
        '4GB'
        >>> resolve_memory_limit("auto", 1_260_000_000, 24 * 2**30)  # KuaiRand-1K: the floor
        '1000MB'
        >>> resolve_memory_limit("auto", 6_430_000_000, 24 * 2**30)  # its 5x log
        '3858MB'
        >>> resolve_memory_limit("auto", 10**12, 16 * 10**9)  # half the machine at most
        '8000MB'
    """
    if setting != "auto":
        return setting
    if machine_bytes is None:
        machine_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    wanted = max(AUTO_MEMORY_FLOOR, AUTO_MEMORY_SHARE * input_bytes)
    return f"{round(min(wanted, machine_bytes / 2) / 10**6)}MB"


def source_bytes(tables: Iterable[Optional[TableSource]]) -> int:
    r"""
    The bytes of ``tables``' files (a directory's files summed; a path not there counts 0: its
    reader names it).

    Args:
        tables (Iterable[Optional[TableSource]]): source tables; None ones are skipped.

    Returns:
        int: their bytes.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> from engagerec.data.raw import TableSource
        >>> from engagerec.data.tables import source_bytes
        >>> path = Path(tempfile.mkdtemp()) / "log.csv"
        >>> _ = path.write_text("user_id,content_id\n1,2\n")
        >>> source_bytes([TableSource("interactions", [str(path)]), None])
        23
    """
    total = 0
    for table in tables:
        for name in table.files if table is not None else ():
            path = Path(name)
            if path.is_dir():
                total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            elif path.is_file():
                total += path.stat().st_size
    return total


def connect(workdir: Path, memory_limit: str = "1GB", threads: int = 0) -> duckdb.DuckDBPyConnection:
    """A DuckDB database in ``workdir`` that spills to disk past ``memory_limit`` (a size,
    ``""`` for DuckDB's own, or ``"auto"``: ``resolve_memory_limit`` without the input's size).

    Insertion order is preserved, so a table's rowid is the row's position in its files.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(workdir / "prepare.duckdb"))
    con.execute(f"SET temp_directory = {literal(str(workdir / 'spill'))}")
    memory_limit = resolve_memory_limit(memory_limit)
    if memory_limit:
        con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET threads = {threads or os.cpu_count() or 1}")
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET TimeZone = 'UTC'")  # date-times with an offset convert the same on every machine
    con.execute("SET enable_progress_bar = false")  # it would write into stdout: the summary is ours
    return con


def write_failure(err: BaseException, out_dir: str | Path, what: str) -> Optional[DataError]:
    """
    The error to raise for a DuckDB or OS error met while ``what`` wrote into ``out_dir``: a full
    disk names the output and its free space; DuckDB out of memory or disk names its limit; any
    other error is a bug (None: re-raise it).

    Args:
        err (BaseException): the error caught.
        out_dir (str | Path): the output directory being written.
        what (str): what was writing, as the message's subject ("encoding the rows to score").

    Returns:
        Optional[DataError]: the error to raise, or None.

    Example::

        >>> error = write_failure(duckdb.OutOfMemoryException("Out of Memory Error: x"), "/tmp/o", "prepare")
        >>> str(error).startswith("file /tmp/o: prepare ran out of memory or disk: Out of Memory Error: x")
        True
    """
    if is_disk_full(err):
        return disk_full_error(out_dir, what)
    if isinstance(err, (duckdb.OutOfMemoryException, duckdb.IOException)):
        return DataError(
            f"{what} ran out of memory or disk: {first_line(err)}",
            file=str(out_dir),
            expected="a larger data.memory_limit or more free disk in the output directory",
        )
    return None


def sniff_separator(path: Path) -> str:
    """Tab or comma, judged from the header line (KuaiRand ships .csv files that are tab-separated)."""
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    return "\t" if header.count("\t") > header.count(",") else ","


def _scan(path: Path, types: Optional[Dict[str, str]] = None, rejects: Optional[str] = None) -> str:
    """The DuckDB table function reading one file."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return f"read_parquet({literal(str(path))})"
    options = ["header = true", f"delim = {literal(sniff_separator(path))}", "quote = '\"'"]
    if types:
        options.append("types = {" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in types.items()) + "}")
    if rejects:
        options += [
            "store_rejects = true",
            f"rejects_table = {literal(rejects)}",
            f"rejects_scan = {literal(rejects + '_scan')}",
        ]
    return f"read_csv({literal(str(path))}, {', '.join(options)})"


def file_columns(con: duckdb.DuckDBPyConnection, path: str | Path) -> Dict[str, str]:
    """Column name -> DuckDB type of one file, from its header (and a sample, for CSV types)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=str(path))
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {_scan(path)}").fetchall()
    except duckdb.Error as err:
        raise DataError(f"cannot be parsed: {first_line(err)}", file=str(path)) from None
    return {row[0]: row[1] for row in described}


def has_rows(con: duckdb.DuckDBPyConnection, path: str | Path) -> bool:
    """Whether a CSV/TSV/Parquet file holds at least one row below its header (reads one row).

    Args:
        con: a DuckDB connection.
        path: the file.

    Raises:
        DataError: the file cannot be parsed.
    """
    try:
        return con.execute(f"SELECT 1 FROM {_scan(Path(path))} LIMIT 1").fetchone() is not None
    except duckdb.Error as err:
        raise DataError(f"cannot be parsed: {first_line(err)}", file=str(path)) from None


@dataclass
class LoadedTable:
    """A source table loaded into DuckDB as ``name``: canonical columns, and the rowid at which
    each file's rows start (so a rowid converts back to a file and row for messages)."""

    name: str
    source: TableSource
    columns: Dict[str, str]  # canonical name -> DuckDB type
    file_starts: List[int] = field(default_factory=list)
    rows: int = 0

    def locate(self, rowid: int) -> Tuple[str, int]:
        """(file, 0-based data row) of a rowid of this table."""
        index = max(i for i, start in enumerate(self.file_starts) if start <= rowid)
        return self.source.files[index], int(rowid - self.file_starts[index])

    def error(self, message: str, rowid: Optional[int] = None, **details) -> DataError:
        """A DataError that names this table's file and row of ``rowid``, and a column by its
        name in the file (``duration_ms``, not the canonical ``duration``)."""
        if details.get("column") in self.source.columns:
            details["column"] = self.source.columns[details["column"]]
        if rowid is None:
            return DataError(message, file=self.source.label, **details)
        file, row = self.locate(rowid)
        return DataError(message, file=file, row=row, **details)


def canonical_columns(con: duckdb.DuckDBPyConnection, source: TableSource) -> Dict[str, Tuple[str, str, str]]:
    """canonical name -> (SQL expression over the first file's columns, its file type, the file's
    column name or "" when derived) of every column the source offers (renamed, derived, dropped
    as the adapter says)."""
    header = file_columns(con, source.files[0])
    file_to_canonical = {file: canon for canon, file in source.columns.items()}
    out: Dict[str, Tuple[str, str]] = {}
    for column, sql_type in header.items():
        if column in source.drop:
            continue
        if column in file_to_canonical:
            canon = file_to_canonical[column]
        elif source.columns.get(column, column) != column:
            # a file column that already has a canonical target's name (KuaiRand's readable
            # 'timestamp' beside 'time_ms') keeps its data under '<name>_raw'
            canon = f"{column}_raw"
        else:
            canon = column
        out[canon] = (quote(column), sql_type, column)
    for canon, (column, template) in source.derived.items():
        if column in header:
            out[canon] = (template.format(quote(column)), "DERIVED", "")
    return out


def load_table(
    con: duckdb.DuckDBPyConnection,
    name: str,
    source: TableSource,
    wanted: Iterable[str],
    required: Sequence[str] = (),
    numeric: Sequence[str] = (),
    keys: Sequence[str] = (),
) -> LoadedTable:
    """Load ``wanted`` canonical columns of every file of ``source`` into the table ``name``.

    Args:
        con: the DuckDB connection to load into.
        name: the DuckDB table to create (replaced if it exists).
        source: the files and how their columns map to canonical ones.
        wanted: the canonical columns to load; those no file has are left out, but every file
            must have the same ones (else a DataError naming both files).
        required: canonical columns every file must have (else a DataError naming the file).
        numeric: columns read as DOUBLE: a CSV value that is not a number is a rejected row,
            reported with its line.
        keys: columns the missing marker never applies to (ids).
    """
    wanted = list(dict.fromkeys(wanted))
    loaded = LoadedTable(name, source, {})
    for index, file in enumerate(source.files):
        offered = canonical_columns(con, TableSource(**{**source.__dict__, "files": [file]}))
        for column in required:
            if column not in offered:
                expected = sorted(set(required))
                raise DataError(
                    f"required column '{source.columns.get(column, column)}' is missing (maps to '{column}')",
                    file=file,
                    expected=f"columns including {expected} in every {source.name} file",
                    got=list(offered)[:20],
                )
        present = [c for c in wanted if c in offered]
        if index > 0 and present != list(loaded.columns):
            missing = [c for c in loaded.columns if c not in present]
            extra = [c for c in present if c not in loaded.columns]
            where, column = (source.files[0], missing[0]) if missing else (file, extra[0])
            other = file if missing else source.files[0]
            raise DataError(
                f"column '{source.columns.get(column, column)}' is in {where} but not in {other}",
                file=other,
                column=source.columns.get(column, column),
                expected=f"the same columns in every file of the {source.name} table",
            )
        types = {}
        select = []
        parquet = Path(file).suffix.lower() in PARQUET_SUFFIXES
        for canon in present:
            expression, file_type, file_column = offered[canon]
            if canon in numeric and file_column:
                if parquet and not is_numeric(file_type):  # text in a parquet file: check, then cast
                    _check_parquet_numbers(con, file, file_column)
                    expression = f"TRY_CAST({expression} AS DOUBLE)"
                types[file_column] = "DOUBLE"  # CSV: a value that is not a number is a rejected row
                file_type = "DOUBLE"
            elif (
                file_column
                and not parquet
                and (file_type if index == 0 else loaded.columns[canon]) in INTEGER_TYPES
            ):
                # DuckDB's CSV reader would round a '1.5' deep in an integer column: read the text,
                # flag what is not an integer (reported with its row below), then cast
                types[file_column] = "VARCHAR"
                text = expression
                expression = f"TRY_CAST({text} AS BIGINT)"
                flag = f"NOT coalesce(TRY_CAST({text} AS DOUBLE) = TRY_CAST({text} AS BIGINT), FALSE)"
                select.append(f"({text} IS NOT NULL AND {flag}) AS {quote(BAD + canon)}")
                file_type = "BIGINT"
            elif index > 0 and file_column:
                types[file_column] = loaded.columns[canon]  # later files read as the first: no silent cast
            if source.missing_marker is not None and canon not in keys and is_numeric(file_type):
                expression = f"NULLIF({expression}, {source.missing_marker})"
            select.append(f"{expression} AS {quote(canon)}")
        rejects = f"rejects_{name}_{index}"
        scan = _scan(Path(file), types, rejects)
        verb = f"CREATE OR REPLACE TABLE {name} AS" if index == 0 else f"INSERT INTO {name}"
        loaded.file_starts.append(loaded.rows)
        try:
            con.execute(f"{verb} SELECT {', '.join(select) or '1 AS __empty'} FROM {scan}")
        except duckdb.Error as err:
            if is_disk_full(err):  # the scratch disk, not the input: the caller names its output
                raise
            raise DataError(f"cannot be read: {first_line(err)}", file=file) from None
        if not parquet:
            _raise_rejected(con, rejects, file)
        if index == 0:
            loaded.columns = {
                row[0]: row[1]
                for row in con.execute(f"DESCRIBE {name}").fetchall()
                if row[0] != "__empty" and not row[0].startswith(BAD)
            }
        flagged = [row[0] for row in con.execute(f"DESCRIBE {name}").fetchall() if row[0].startswith(BAD)]
        for flag in flagged:
            where = f"{quote(flag)} AND rowid >= {loaded.file_starts[-1]}"
            bad = con.execute(f"SELECT min(rowid) FROM {name} WHERE {where}").fetchone()[0]
            if bad is not None:
                raise loaded.error(
                    "value is not an integer, unlike the column's other values",
                    bad,
                    column=flag[len(BAD) :],
                    expected="an integer (or the same kind of value in every row)",
                )
        loaded.rows = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
    return loaded


def _check_parquet_numbers(con: duckdb.DuckDBPyConnection, file: str, column: str) -> None:
    """A text column of a parquet file that must hold numbers: the first value that is not one
    is a DataError with its row."""
    q = quote(column)
    bad = con.execute(
        f"SELECT file_row_number, {q} FROM read_parquet({literal(file)}, file_row_number = true) "
        f"WHERE {q} IS NOT NULL AND TRY_CAST({q} AS DOUBLE) IS NULL ORDER BY file_row_number LIMIT 1"
    ).fetchall()
    if bad:
        raise DataError(
            "value is not a number",
            file=file,
            column=column,
            row=int(bad[0][0]),
            expected="a number",
            got=bad[0][1],
        )


def _raise_rejected(con: duckdb.DuckDBPyConnection, rejects: str, file: str) -> None:
    first = con.execute(
        f"SELECT line, column_name, error_type, csv_line, error_message FROM {rejects} ORDER BY line LIMIT 1"
    ).fetchone()
    con.execute(f"DROP TABLE IF EXISTS {rejects}")
    con.execute(f"DROP TABLE IF EXISTS {rejects}_scan")
    if first is None:
        return
    line, column, kind, text, message = first
    detail = message.split(". ")[-1] if kind == "CAST" else message
    expected = "a well-formed CSV row"
    if kind == "CAST":
        expected = (
            "a number" if "DOUBLE" in message else "a value of the type the column has in its other rows"
        )
    raise DataError(
        f"row cannot be parsed ({kind.lower().replace('_', ' ')}): {detail}",
        file=file,
        column=column or None,
        row=int(line) - 2,  # line 1 is the header
        expected=expected,
        got=text,
    )


def check_numeric(
    con: duckdb.DuckDBPyConnection, table: LoadedTable, column: str, *, allow_null: bool
) -> None:
    """Check that every value of ``column`` is a finite number (and present, unless
    ``allow_null``). Raises DataError at the first bad row."""
    sql_type = table.columns[column]
    q = quote(column)
    value = q if is_numeric(sql_type) else f"TRY_CAST({q} AS DOUBLE)"
    value = f"CAST({value} AS DOUBLE)"
    if not is_numeric(sql_type):
        bad = _first_row(con, table.name, f"{q} IS NOT NULL AND {value} IS NULL")
        if bad is not None:
            got = con.execute(f"SELECT {q} FROM {table.name} WHERE rowid = {bad}").fetchone()[0]
            raise table.error("value is not a number", bad, column=column, expected="a number", got=got)
    bad = _first_row(con, table.name, f"isinf({value})")
    if bad is not None:
        raise table.error("value is infinite", bad, column=column, expected="a finite number")
    if not allow_null:
        bad = _first_row(con, table.name, f"{value} IS NULL OR isnan({value})")
        if bad is not None:
            raise table.error("value is missing", bad, column=column, expected="a value in every row")


def _first_row(con: duckdb.DuckDBPyConnection, table: str, condition: str) -> Optional[int]:
    return con.execute(f"SELECT min(rowid) FROM {table} WHERE {condition}").fetchone()[0]


def check_ids(con: duckdb.DuckDBPyConnection, table: LoadedTable, column: str, *, unique: bool) -> None:
    """Ids must be present in every row, and unique where the table is keyed by them."""
    bad = _first_row(con, table.name, f"{quote(column)} IS NULL")
    if bad is not None:
        raise table.error("id is missing", bad, column=column, expected="an id in every row")
    if unique:
        q = quote(column)  # the first row repeating an id seen earlier (a hash aggregate, no sort)
        row = con.execute(
            f"SELECT min(t.rowid) FROM {table.name} t JOIN (SELECT {q} AS id, min(rowid) AS first FROM "
            f"{table.name} GROUP BY {q} HAVING count(*) > 1) d ON t.{q} = d.id WHERE t.rowid > d.first"
        ).fetchone()[0]
        if row is not None:
            got = con.execute(f"SELECT {quote(column)} FROM {table.name} WHERE rowid = {row}").fetchone()[0]
            raise table.error(
                "duplicate id", row, column=column, expected="each id once in this table", got=got
            )
