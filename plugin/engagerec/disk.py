"""Full disks: recognising one in the errors of the writers engagerec uses, and saying how much
space is left, for the messages of prepare (engagerec.data.errors.disk_full_error) and of
checkpoint writes (engagerec.checkpoint)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# how a full disk reads in the errors of the writers engagerec uses (libc, DuckDB, pyarrow, torch)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


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
