"""One error type for bad input data, with the file, column and row it concerns."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any, Optional

# how a full disk reads in the errors of the writers engagerec uses (libc, DuckDB, pyarrow, torch)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


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


def is_disk_full(error: BaseException) -> bool:
    """
    Whether ``error`` (or an error it was raised from) says the disk has no space left: an
    OSError with ENOSPC, or a library's message for it (DuckDB, pyarrow and torch's writers
    each wrap it in their own error type).

    Args:
        error (BaseException): the error caught while writing.

    Returns:
        bool: True when the cause is a full disk.

    Example::

        >>> import errno
        >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
        True
        >>> is_disk_full(ValueError("bad value"))
        False
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_space(path: str | Path) -> str:
    """
    The free space of the disk holding ``path`` (or its nearest existing parent), for a
    message: ``"12.3 MiB free"``.

    Args:
        path (str | Path): a file or directory, existing or not.

    Returns:
        str: the free space, or ``"free space unknown"`` when no parent can be examined.

    Example::

        >>> free_space("/").endswith("free")
        True
    """
    place = Path(path).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:,.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"  # not reached


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
