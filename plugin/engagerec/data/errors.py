"""One error type for bad input data, with the file, column and row it concerns."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from engagerec.disk import free_space


class DataError(ValueError):
    """Bad input data. The message names the file, column, row and what was expected.

    ``row`` is the 0-based data row (header excluded); for CSV files the message
    also gives the 1-based line number, which is what an editor shows.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Optional[str] = None,
        column: Optional[str] = None,
        row: Optional[int] = None,
        expected: Optional[str] = None,
        got: Any = None,
    ) -> None:
        self.file, self.column, self.row, self.expected, self.got = file, column, row, expected, got
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            line = f" (line {row + 2})" if file and str(file).endswith((".csv", ".tsv", ".txt")) else ""
            where.append(f"row {row}{line}")
        text = ", ".join(where)
        text = f"{text}: {message}" if text else message
        if expected is not None:
            text += f"; expected {expected}"
        if got is not None:
            text += f", got {got!r}"
        super().__init__(text)


def first_line(error: BaseException) -> str:
    """
    The first line of an error's message (DuckDB's and pyarrow's run to several), or its type's
    name when the message is empty: what a one-line DataError quotes.

    Args:
        error (BaseException): the error.

    Returns:
        str: one line.

    Example::

        >>> first_line(ValueError("bad value\\nmore detail")), first_line(OSError())
        ('bad value', 'OSError')
    """
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def disk_full_error(path: str | Path, what: str = "writing the prepared data") -> DataError:
    """
    The error for a write that failed because the output disk is full: it names the output
    path and its free space, not the input that was being read at the time.

    Args:
        path (str | Path): the output directory being written.
        what (str): what was being written.

    Returns:
        DataError: to raise.

    Example::

        >>> str(disk_full_error("/tmp/out")).startswith("file /tmp/out: no space left on the disk")
        True
    """
    return DataError(
        f"no space left on the disk while {what} ({free_space(path)} there)",
        file=str(path),
        expected="more free disk space for the output directory (or another --out)",
    )
