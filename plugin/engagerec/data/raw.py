"""What an adapter returns: where the three source tables are and how their columns map to
canonical names. Nothing is read here; the dataset writer loads the files out of core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

# Canonical key columns. Interactions carry the first three (timestamp optional);
# duration may come from the interaction log or from the content table.
USER_ID = "user_id"
CONTENT_ID = "content_id"
WATCH_TIME = "watch_time"
DURATION = "duration"
TIMESTAMP = "timestamp"
KEY_COLUMNS = (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP)


@dataclass
class TableSource:
    """One source table: its files and how their columns become canonical columns.

    Args:
        name: "interactions", "users" or "content" (used in messages).
        files: one or more CSV/TSV/Parquet files with the same columns (a log may be split
            by date, as KuaiRand's is); rows are numbered per file in error messages.
        columns: canonical name -> column in the files, for columns whose names differ.
        derived: canonical name -> (file column, SQL template applied to it), added when the
            file has that column, e.g. ``{"hour": ("hourmin", "TRY_CAST({} AS BIGINT) // 100")}``.
        missing_marker: a number that means "missing" in every non-key column (KuaiRand: -124).
        drop: file columns never to load.
        required: canonical columns every file must have.

    Example::

        source = TableSource("users", ["users.csv"], columns={"user_id": "uid"})
    """

    name: str
    files: List[str]
    columns: Dict[str, str] = field(default_factory=dict)
    derived: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    missing_marker: Optional[float] = None
    drop: Tuple[str, ...] = ()
    required: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The file named in messages: the only file, or the list of files."""
        return self.files[0] if len(self.files) == 1 else ", ".join(self.files)


@dataclass
class RawTables:
    """interactions(user_id, content_id, watch_time, [duration], [timestamp], context...),
    users(user_id, attributes...), content(content_id, [duration], attributes...).

    ``post_exposure`` names columns observed during or after the view: they may be labels,
    and asking for one as a feature is an error (a leak).
    """

    interactions: TableSource
    users: Optional[TableSource] = None
    content: Optional[TableSource] = None
    post_exposure: FrozenSet[str] = frozenset()
    notes: Dict[str, str] = field(default_factory=dict)
