"""A prepared directory is replaced whole or not at all, by one prepare at a time.

``prepare`` writes the new preparation into a hidden sibling of its output directory,
``.<name>.prepare-<pid>-<token>/`` (DuckDB's spill included), and puts it in place only once
its manifest is written:

- where there is no old preparation, by renaming the sibling;
- where there is one, by exchanging the two directories in one atomic step (Linux
  ``renameat2(RENAME_EXCHANGE)``), then removing the old one. Where the file system cannot
  exchange, two renames are used, and a prepare killed between them leaves the old preparation
  in ``.<name>.replaced-<pid>``, which the next prepare puts back.

So a prepare killed at any moment leaves the old preparation whole; where there was none, the
output directory does not exist, and every reader says the preparation is incomplete
(``incomplete_note``).

A lock file beside them (``.<name>.prepare.lock``, held with ``flock`` for the whole prepare)
lets one prepare at a time write a given directory; the kernel drops the lock when its process
dies. Holding it proves that staging siblings left behind belong to dead prepares: they are
removed, and the space freed is reported.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import List, Optional

from engagerec.data.errors import DataError

# what a preparation holds at its top level (engagerec.data.prepare, .manifest, .target_stats,
# .growth's history tail); ".prepare-*" is the scratch that earlier prepares kept inside the
# output directory
PREPARED_ENTRIES = {
    "schema.json", "manifest.json", "train", "val", "test", "vocabs", "stats", "history_tail.parquet"
}  # fmt: skip
LEGACY_SCRATCH = ".prepare-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _sibling(out_dir: Path, kind: str) -> str:
    return f".{out_dir.name}.{kind}-"


def staging_dirs(out_dir: str | Path) -> List[Path]:
    """
    The staging siblings of ``out_dir``: preparations being written, or left by a killed prepare.

    Args:
        out_dir (str | Path): a prepared directory's path.

    Returns:
        List[Path]: the ``.<name>.prepare-*`` directories beside it.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> parent = Path(tempfile.mkdtemp())
        >>> (parent / ".data.prepare-12-ab").mkdir()
        >>> [p.name for p in staging_dirs(parent / "data")]
        ['.data.prepare-12-ab']
    """
    out_dir = Path(out_dir).resolve()
    if not out_dir.parent.is_dir():
        return []
    return sorted(p for p in out_dir.parent.glob(_sibling(out_dir, "prepare") + "*") if p.is_dir())


def incomplete_note(out_dir: str | Path) -> Optional[str]:
    """
    What a reader says where ``out_dir`` has no preparation but a prepare into it was started:
    None when none was.

    Args:
        out_dir (str | Path): the prepared directory a command was given.

    Returns:
        Optional[str]: the sentence, naming the staging directory.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> parent = Path(tempfile.mkdtemp())
        >>> incomplete_note(parent / "data") is None
        True
        >>> (parent / ".data.prepare-12-ab").mkdir()
        >>> incomplete_note(parent / "data").startswith("incomplete preparation")
        True
    """
    staged = staging_dirs(out_dir)
    out_dir = Path(out_dir).resolve()
    replaced = (
        sorted(out_dir.parent.glob(_sibling(out_dir, "replaced") + "*")) if out_dir.parent.is_dir() else []
    )
    if replaced and not out_dir.exists():
        return (
            f"incomplete preparation: a prepare was killed while swapping in a new preparation (the "
            f"earlier one is in {replaced[-1]}); run `engagerec prepare` again, which puts it back first"
        )
    if not staged:
        return None
    return (
        f"incomplete preparation: a prepare into this directory is running or was killed before "
        f"it finished (its work is in {staged[-1]}); run `engagerec prepare` again"
    )


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class PrepareLock:
    """
    One prepare at a time into ``out_dir``: an exclusive ``flock`` on ``.<name>.prepare.lock``
    beside it, holding the owner's process id. The kernel releases it when the process ends,
    however it ends.

    Args:
        out_dir (str | Path): the output directory.

    Raises:
        DataError: on entering, when another live process holds the lock (its id named).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "data"
        >>> with PrepareLock(out):
        ...     (out.parent / ".data.prepare.lock").read_text() == str(__import__("os").getpid())
        True
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.path = self.out_dir.parent / f".{self.out_dir.name}.prepare.lock"
        self._handle = None

    def __enter__(self) -> "PrepareLock":
        import fcntl  # POSIX, as prepare's DuckDB is here; readers import this module without it

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as err:
            raise DataError(
                f"cannot create the lock file {self.path} beside the output directory ({err.strerror})",
                file=str(self.out_dir),
                expected="an output directory whose parent directory can be written",
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                handle.close()
                raise DataError(
                    f"cannot lock {self.path} ({err.strerror}): this file system offers no flock",
                    file=str(self.out_dir),
                    expected="an output directory on a local file system",
                ) from None
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise DataError(
                f"another prepare (process {owner}) is writing into this directory",
                file=str(self.out_dir),
                expected="one prepare at a time into a directory: wait for it, or choose another --out",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None


def clean_stale(out_dir: str | Path) -> int:
    """
    Remove what dead prepares left behind: staging siblings and old in-directory scratch; put
    back an old preparation that a prepare killed mid-swap left aside. Call it holding
    ``PrepareLock``, which proves that no live prepare owns them.

    Args:
        out_dir (str | Path): the output directory.

    Returns:
        int: the bytes freed.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "data"
        >>> (out.parent / ".data.prepare-12-ab").mkdir()
        >>> _ = (out.parent / ".data.prepare-12-ab" / "spill").write_bytes(b"x" * 100)
        >>> with PrepareLock(out):
        ...     clean_stale(out)
        100
    """
    out_dir = Path(out_dir).resolve()
    replaced = sorted(out_dir.parent.glob(_sibling(out_dir, "replaced") + "*"))
    if replaced and not out_dir.exists():
        replaced[-1].rename(out_dir)  # killed between the two renames: the old preparation goes back
        replaced = replaced[:-1]
    stale = staging_dirs(out_dir) + replaced
    if out_dir.is_dir():
        stale += [p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(LEGACY_SCRATCH)]
    freed = 0
    for path in stale:
        before = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        freed += before - (_size(path) if path.exists() else 0)  # what really went
    return freed


def check_replaceable(out_dir: str | Path) -> None:
    """
    Refuse an output directory that prepare cannot replace whole: one holding anything but a
    preparation (replacing it would delete files prepare did not write), the working directory
    or a directory above it, a mount point (the swap renames within one file system), or a file.

    Args:
        out_dir (str | Path): the output directory.

    Raises:
        DataError: naming the first entries that are not a preparation's, or why else.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> (out / "train").mkdir()
        >>> check_replaceable(out)  # a preparation's entry: fine
        >>> _ = (out / "notes.txt").write_text("mine")
        >>> check_replaceable(out)
        Traceback (most recent call last):
        ...
        engagerec.data.errors.DataError: file ...: holds files that are not a preparation (notes.txt)...
    """
    out_dir = Path(out_dir).resolve()
    here = Path.cwd().resolve()
    if here == out_dir or out_dir in here.parents:
        raise DataError(
            "is the working directory or holds it: prepare replaces its output directory whole",
            file=str(out_dir),
            expected="an output directory beside or below the working directory (e.g. prepared/<name>)",
        )
    if not out_dir.is_dir():
        if out_dir.exists():
            raise DataError("is a file, not a directory", file=str(out_dir), expected="a directory")
        return
    if os.path.ismount(out_dir):
        raise DataError(
            "is a mount point: a new preparation is put in place by renaming it beside the old one",
            file=str(out_dir),
            expected="an output directory inside the mounted file system",
        )
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name not in PREPARED_ENTRIES and not p.name.startswith(LEGACY_SCRATCH)
    )
    if foreign:
        raise DataError(
            f"holds files that are not a preparation ({', '.join(foreign[:5])}); "
            "prepare replaces its output directory whole",
            file=str(out_dir),
            expected="an empty directory, a new one, or an earlier preparation",
        )


def new_staging(out_dir: str | Path) -> Path:
    """
    A new, empty staging directory beside ``out_dir`` (same file system: the swap is a rename).

    Args:
        out_dir (str | Path): the output directory.

    Returns:
        Path: ``.<name>.prepare-<pid>-<token>/``.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "data"
        >>> new_staging(out).name.startswith(".data.prepare-")
        True
    """
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f"{_sibling(out_dir, 'prepare')}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # the umask's mode, as a plain mkdir of the output would have
    if out_dir.is_dir():  # a re-prepare keeps the directory's mode
        staging.chmod(out_dir.stat().st_mode & 0o7777)
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # the file system cannot
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(staging: Path, out_dir: str | Path) -> None:
    """
    Put a complete staging directory in place of ``out_dir``, atomically where the system can
    (see the module's docstring), and remove the old preparation.

    Args:
        staging (Path): the finished preparation (its manifest written).
        out_dir (str | Path): where it goes.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "data"
        >>> out.mkdir(); _ = (out / "schema.json").write_text("old")
        >>> staging = new_staging(out); _ = (staging / "schema.json").write_text("new")
        >>> swap_in(staging, out)
        >>> (out / "schema.json").read_text(), staging.exists()
        ('new', False)
    """
    out_dir = Path(out_dir).resolve()
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if _exchange(staging, out_dir):
        shutil.rmtree(staging, ignore_errors=True)  # now the old preparation
        return
    aside = out_dir.parent / f"{_sibling(out_dir, 'replaced')}{os.getpid()}-{secrets.token_hex(4)}"
    out_dir.rename(aside)
    try:
        staging.rename(out_dir)
    except OSError:
        aside.rename(out_dir)  # the old preparation back in place
        raise
    shutil.rmtree(aside, ignore_errors=True)
