"""The section cache: one JSON file per section, keyed by the hash of its spec."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (the data a section reads: a changed file is a changed spec).

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.csv"
        >>> _ = path.write_text("x\\n1\\n")
        >>> file_digest(path)[:12]
        'daff832f8020'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spec_key(spec: Dict[str, Any]) -> str:
    """A short stable hash of a JSON-able spec (key order does not matter).

    Example::

        >>> spec_key({"a": 1, "b": [2, 3]}) == spec_key({"b": [2, 3], "a": 1})
        True
        >>> spec_key({"a": 1}) == spec_key({"a": 2})
        False
    """
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SectionCache:
    """``<root>/<section>.json`` holds ``{"key", "spec", "data"}``: a section's computed data,
    valid while its spec hashes to ``key``.

    Args:
        root: the cache directory (created on the first store).

    Example::

        >>> import tempfile
        >>> cache = SectionCache(tempfile.mkdtemp())
        >>> cache.load("random", {"seeds": [0, 1]}) is None
        True
        >>> cache.store("random", {"seeds": [0, 1]}, {"mse": 0.1})
        >>> cache.load("random", {"seeds": [0, 1]}), cache.load("random", {"seeds": [0, 1, 2]})
        ({'mse': 0.1}, None)
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, section: str) -> Path:
        """Where ``section``'s entry lives."""
        return self.root / f"{section}.json"

    def load(self, section: str, spec: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The section's cached data if it was computed under this spec, else None."""
        entry = self._entry(section)
        return entry["data"] if entry and entry.get("key") == spec_key(spec) else None

    def load_any(self, section: str) -> Optional[Dict[str, Any]]:
        """The section's cached data whatever its spec (what other sections render from)."""
        entry = self._entry(section)
        return entry["data"] if entry else None

    def _entry(self, section: str) -> Optional[Dict[str, Any]]:
        path = self.path(section)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # torn by hand or by another writer: recompute (store() itself is atomic)
        return entry if isinstance(entry, dict) and "data" in entry else None

    def store(self, section: str, spec: Dict[str, Any], data: Dict[str, Any]) -> None:
        """Write atomically: a crash leaves the old entry or the new one, never half of one."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(section)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(
            json.dumps({"key": spec_key(spec), "spec": spec, "data": data}, indent=1, default=float)
        )
        tmp.replace(path)
