"""The manifest of a prepared directory: every file ``prepare`` wrote, with its size, CRC-32 and,
for a shard, the rows the writer put in it. It is written last, so a directory without one is
an incomplete preparation, and every reader checks the directory against it before reading:

- on open, always (``check_prepared``): every listed file is present and of its size, no
  unlisted file sits among the shards, the files that are not shards (schema.json, vocabularies,
  id statistics: tens of MB at KuaiRand-1K scale, written by DuckDB without page checksums)
  match their CRC-32, and (``ShardReader``) each shard's footer holds the rows written;
- on demand (``engagerec prepare --verify DIR``, ``engagerec train --verify-data``): every
  file's CRC-32 as well, which reads every byte.

Damage that keeps a file's size (flipped bytes) passes the check on open; it is caught when the
shard is read, by the parquet page checksums the writer stores (``engagerec.data.shards``).

This module imports neither pyarrow nor DuckDB: the GBDT's process and serving code check with it.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable

from engagerec.data.errors import DataError
from engagerec.data.staging import incomplete_note

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
# directories whose every file the manifest must list: an unlisted shard there would be read
CHECKED_DIRS = ("train", "val", "test", "vocabs", "stats")


def crc32(path: Path) -> int:
    """
    The CRC-32 of a file, read in 4 MiB blocks.

    Args:
        path (Path): the file.

    Returns:
        int: its CRC-32 (zlib's).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "x"
        >>> _ = path.write_bytes(b"engagerec")
        >>> crc32(path) == __import__("zlib").crc32(b"engagerec")
        True
    """
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            value = zlib.crc32(block, value)
    return value


def write_manifest(directory: str | Path, shard_rows: Dict[str, int]) -> Path:
    """
    Write ``directory``/manifest.json, listing every file under ``directory`` with its size and
    CRC-32, and the rows of each shard in ``shard_rows``. Call it last: it marks the
    preparation complete.

    Args:
        directory (str | Path): the prepared directory, complete but for the manifest.
        shard_rows (Dict[str, int]): rows written per shard, by path relative to ``directory``
            (``"train/part-00000.parquet"``), as the shard writer counted them.

    Returns:
        Path: the manifest's path.

    Example::

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> (out / "train").mkdir()
        >>> _ = (out / "train" / "part-00000.parquet").write_bytes(b"0123")
        >>> _ = write_manifest(out, {"train/part-00000.parquet": 2})
        >>> json.loads((out / "manifest.json").read_text())["files"]["train/part-00000.parquet"]["rows"]
        2
    """
    directory = Path(directory)
    entries: Dict[str, Dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        name = path.relative_to(directory).as_posix()
        entries[name] = {"bytes": path.stat().st_size, "crc32": crc32(path)}
        if name in shard_rows:
            entries[name]["rows"] = int(shard_rows[name])
    missing = sorted(set(shard_rows) - set(entries))
    if missing:
        raise DataError(f"shards {missing} were written but are not in the directory", file=str(directory))
    path = directory / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1))
    tmp.replace(path)
    return path


def read_manifest(directory: str | Path) -> Dict[str, Dict[str, Any]]:
    """
    The files a prepared directory's manifest lists: ``{relative path: {"bytes", "crc32"[, "rows"]}}``.

    Args:
        directory (str | Path): a prepared directory.

    Returns:
        Dict[str, Dict[str, Any]]: the entries.

    Raises:
        DataError: the directory does not exist, the manifest is missing (an incomplete
            preparation), unreadable, of another format, or names a file outside the directory.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "schema.json").write_text("{}")
        >>> _ = write_manifest(out, {})
        >>> sorted(read_manifest(out))
        ['schema.json']
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.parent.is_dir():
        raise DataError(
            incomplete_note(path.parent) or "no prepared data here; run `engagerec prepare` first",
            file=str(path.parent),
        )
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
        for name, entry in entries.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"it names {name!r}, outside the directory")
            int(entry["bytes"]), int(entry["crc32"]), int(entry.get("rows", 0))
        return entries
    except FileNotFoundError:
        raise DataError(
            "incomplete preparation: it has no manifest.json, which engagerec prepare writes last "
            "(the prepare was interrupted, or an earlier engagerec, which wrote none, prepared it)",
            file=str(path),
            expected="a complete preparation: run `engagerec prepare` again",
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"the manifest is unreadable ({err})", file=str(path)) from None


def check_prepared(directory: str | Path, full: bool = False) -> Dict[str, Dict[str, Any]]:
    """
    Check a prepared directory against its manifest before anything reads it: every listed file
    present and of its size (and, with ``full``, of its CRC-32), and no unlisted file among the
    shards, vocabularies and statistics.

    Args:
        directory (str | Path): a prepared directory.
        full (bool): also compare every file's CRC-32 (reads every byte). Default: False.

    Returns:
        Dict[str, Dict[str, Any]]: the manifest's entries (``ShardReader`` checks rows with them).

    Raises:
        DataError: naming the file and what differs (missing, size, checksum, unlisted), or an
            incomplete preparation.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> (out / "train").mkdir()
        >>> _ = (out / "train" / "part-00000.parquet").write_bytes(b"0123")
        >>> _ = write_manifest(out, {"train/part-00000.parquet": 2})
        >>> _ = check_prepared(out, full=True)  # all matches
        >>> _ = (out / "train" / "part-00000.parquet").write_bytes(b"01")
        >>> check_prepared(out)
        Traceback (most recent call last):
        ...
        engagerec.data.errors.DataError: file .../train/part-00000.parquet: has 2 bytes, ...
    """
    directory = Path(directory)
    entries = read_manifest(directory)
    for name, expected in entries.items():
        path = directory / name
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as err:
            raise DataError(f"cannot be examined ({err})", file=str(path)) from None
        if size is None:
            raise DataError(
                "a file of the preparation is missing",
                file=str(path),
                expected="every file manifest.json lists",
            )
        if size != expected["bytes"]:
            raise DataError(
                f"has {size:,} bytes, but manifest.json records {expected['bytes']:,} "
                "(truncated or replaced)",
                file=str(path),
                expected="the file as engagerec prepare wrote it: run `engagerec prepare` again",
            )
        # shards carry page checksums, checked as they are read; the rest is small: checked now
        if (full or "rows" not in expected) and _crc32_or_error(path, cached=not full) != expected["crc32"]:
            raise DataError(
                "does not match its CRC-32 in manifest.json (the file is damaged)",
                file=str(path),
                expected="the file as engagerec prepare wrote it: run `engagerec prepare` again",
            )
    for extra in _unlisted(directory, entries):
        raise DataError(
            "is not in manifest.json: a file engagerec prepare did not write sits among the data",
            file=str(extra),
            expected="only the files manifest.json lists (remove it, or prepare again)",
        )
    return entries


# (file, inode, size, mtime) -> CRC-32: a process opens the same preparation once per split and
# per evaluation; an unchanged file is read once
_CHECKED: Dict[tuple, int] = {}


def _crc32_or_error(path: Path, cached: bool) -> int:
    """The file's CRC-32; ``cached``: reuse this process's reading of an unchanged file (a full
    verification reads every byte again: damage on disk changes no mtime)."""
    try:
        if not cached:
            return crc32(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in _CHECKED:
            _CHECKED[key] = crc32(path)
        return _CHECKED[key]
    except OSError as err:
        raise DataError(f"cannot be read ({err})", file=str(path)) from None


def _unlisted(directory: Path, entries: Dict[str, Any]) -> Iterable[Path]:
    for sub in CHECKED_DIRS:
        if (directory / sub).is_dir():
            for path in sorted((directory / sub).rglob("*")):
                if path.is_file() and path.relative_to(directory).as_posix() not in entries:
                    yield path


def written_rows(entries: Dict[str, Dict[str, Any]], split: str) -> Dict[str, int]:
    """
    The rows the writer put in each shard of ``split``, by file name, from the manifest's entries.

    Args:
        entries (Dict[str, Dict[str, Any]]): ``check_prepared``'s result.
        split (str): ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        Dict[str, int]: file name (``part-00000.parquet``) -> rows.

    Example::

        >>> written_rows({"train/part-00000.parquet": {"bytes": 9, "crc32": 1, "rows": 3}}, "train")
        {'part-00000.parquet': 3}
    """
    prefix = f"{split}/"
    return {
        name[len(prefix) :]: int(entry["rows"])
        for name, entry in entries.items()
        if name.startswith(prefix) and "rows" in entry
    }


def verify_prepared(directory: str | Path) -> Dict[str, Any]:
    """
    The full check of a prepared directory (``engagerec prepare --verify DIR``): every file's size
    and CRC-32 against the manifest, and every shard's rows against its parquet footer.

    Args:
        directory (str | Path): a prepared directory.

    Returns:
        Dict[str, Any]: ``files``, ``bytes``, ``rows`` (over all shards) and ``seconds``.

    Raises:
        DataError: naming the first file that differs and how.

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "ids.parquet").write_bytes(b"not checked as parquet: not a shard")
        >>> _ = write_manifest(out, {})
        >>> verify_prepared(out)["files"]
        1
    """
    import pyarrow as pa  # here: the check on open needs no pyarrow
    import pyarrow.parquet as pq

    start = time.perf_counter()
    directory = Path(directory)
    entries = check_prepared(directory, full=True)
    if (directory / "schema.json").is_file():  # every shard schema.json lists is in the manifest
        from engagerec.data.schema import DatasetSchema

        for split, spec in DatasetSchema.load(directory).meta.get("splits", {}).items():
            for name in spec.get("files", []):
                if f"{split}/{name}" not in entries:
                    listed = directory / split / name
                    raise DataError("is listed in schema.json but not in manifest.json", file=str(listed))
    rows = 0
    for name, entry in entries.items():
        if "rows" not in entry:
            continue
        try:
            found = pq.ParquetFile(directory / name).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            raise DataError(
                f"the parquet footer cannot be read ({err})", file=str(directory / name)
            ) from None
        if found != entry["rows"]:
            raise DataError(
                f"holds {found:,} rows, but the writer wrote {entry['rows']:,}", file=str(directory / name)
            )
        rows += found
    return {
        "files": len(entries),
        "bytes": sum(entry["bytes"] for entry in entries.values()),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 3),
    }
