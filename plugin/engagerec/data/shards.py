"""Parquet shards: one directory per split, files of bounded rows, row groups sized for streaming.

Every data page carries a CRC-32 (parquet's page checksum), which ``ShardReader`` verifies as it
reads: a shard damaged without a change of size (which the manifest's check on open would
catch) still fails at its first damaged page, with the file and row group named, instead of
feeding wrong values to training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


class ShardWriter:
    """Appends encoded tables to ``<directory>/part-NNNNN.parquet`` files.

    Files are written under a temporary name and renamed when complete, so a crash
    never leaves a half-written shard that a reader would take as valid.

    Args:
        directory: the split's directory (created).
        rows_per_file: rows per file; the last file holds the rest.
        row_group_size: rows per row group (the reader's unit of decoding).
        dictionary: the columns to dictionary-encode (True: every column, parquet's default).
            A dictionary pays for a column of few distinct values (a small vocabulary, a 0/1
            label); for the ids of a large table or continuous numbers it costs a hash lookup
            per value, and in a shuffled order writes more bytes than the plain values
            (``engagerec.data.prepare.dictionary_columns``).

    Besides what the parquet writer holds, the writer keeps up to one row group's rows (and the
    table they came in) until the group is full.

    Example::

        >>> import tempfile
        >>> import pyarrow as pa
        >>> writer = ShardWriter(tempfile.mkdtemp(), rows_per_file=3, row_group_size=2)
        >>> writer.write(pa.table({"x": list(range(7))}))
        >>> writer.close(), writer.file_rows
        (['part-00000.parquet', 'part-00001.parquet', 'part-00002.parquet'], [3, 3, 1])
    """

    def __init__(
        self,
        directory: str | Path,
        rows_per_file: int,
        row_group_size: int,
        dictionary: bool | Sequence[str] = True,
    ) -> None:
        if rows_per_file < 1 or row_group_size < 1:
            raise ValueError(
                f"rows_per_file and row_group_size must be positive, got {rows_per_file}, {row_group_size}"
            )
        if isinstance(dictionary, str):  # list("abc") would name three columns
            raise TypeError("dictionary: True, False or a sequence of column names, not one string")
        self.directory = Path(directory)
        self.dictionary = dictionary if isinstance(dictionary, bool) else list(dictionary)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.files: List[str] = []
        self.file_rows: List[int] = []  # rows written into each file: the manifest's record
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._tmp: Path | None = None
        # rows not yet in a row group: the tables handed in come in any size (DuckDB streams
        # batches of up to 65,536 rows, often fewer), the row groups are cut to row_group_size
        self._pending: List[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table``. Row groups hold exactly ``row_group_size`` rows, whatever the sizes of
        the tables appended, except each file's last, which holds what is left of
        ``rows_per_file`` (and the very last, what is left of the split)."""
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        self._write_groups(final=False)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append one record batch."""
        self.write(pa.Table.from_batches([batch]))

    def close(self, schema: pa.Schema | None = None) -> List[str]:
        """Finish the last file; returns the names of the files written, in order.

        Args:
            schema: the columns of the one empty file written when nothing was, so that an empty
                split still has a file to read.
        """
        self._write_groups(final=True)
        if self._writer is None and not self.files and schema is not None:
            self._open(schema)  # an empty split still gets one (empty) file with the right columns
        self._close_file()
        return self.files

    def _write_groups(self, final: bool) -> None:
        """Write the pending rows as full row groups (and, when ``final``, the rest as one more),
        starting a new file whenever the current one reaches ``rows_per_file``."""
        while self._pending_rows:
            wanted = min(self.row_group_size, self.rows_per_file - self._rows_in_file)
            if self._pending_rows < wanted and not final:
                return
            pending = pa.concat_tables(self._pending)  # no copy: the tables become chunks
            take = min(wanted, self._pending_rows)
            if self._writer is None:
                self._open(pending.schema)
            self._writer.write_table(pending.slice(0, take), row_group_size=take)
            rest = pending.slice(take)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            self._rows_in_file += take
            self.rows += take
            if self._rows_in_file >= self.rows_per_file:
                self._close_file()

    def _open(self, schema: pa.Schema) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        self._tmp = self.directory / f".{name}.tmp"
        self._writer = pq.ParquetWriter(
            self._tmp,
            schema,
            compression="snappy",
            use_dictionary=self._dictionary_paths(schema),
            write_page_checksum=True,
        )
        self._rows_in_file = 0

    def _dictionary_paths(self, schema: pa.Schema) -> bool | List[str]:
        """``dictionary`` as the parquet writer takes it: a list column's values by their path
        (pyarrow silently ignores a name it does not find, so an unknown column is refused)."""
        if isinstance(self.dictionary, bool):
            return self.dictionary
        paths = []
        for column in self.dictionary:
            if column not in schema.names:
                raise ValueError(
                    f"dictionary column {column!r} is not among the columns written: {schema.names}"
                )
            kind = schema.field(column).type
            lists = (
                pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
            )
            paths.append(f"{column}.list.element" if lists else column)
        return paths

    def _close_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self._tmp.parent / self._tmp.name[1 : -len(".tmp")]
        os.replace(self._tmp, final)
        self.files.append(final.name)
        self.file_rows.append(self._rows_in_file)
        self._writer, self._rows_in_file = None, 0
