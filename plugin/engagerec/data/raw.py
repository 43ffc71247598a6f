"""The three source tables in canonical column names, as every adapter returns them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

import pandas as pd

# Canonical key columns. Interactions carry the first four (timestamp optional);
# duration may come from the interaction log or from the content table.
USER_ID = "user_id"
CONTENT_ID = "content_id"
WATCH_TIME = "watch_time"
DURATION = "duration"
TIMESTAMP = "timestamp"
KEY_COLUMNS = (USER_ID, CONTENT_ID, WATCH_TIME, DURATION, TIMESTAMP)
SOURCE_ROW = "__row"  # each event's row in the interactions file, so errors can point at it


@dataclass
class RawTables:
    """interactions(user_id, content_id, watch_time, [duration], [timestamp], context...),
    users(user_id, attributes...), content(content_id, [duration], attributes...).

    ``post_exposure`` names columns observed during or after the view: they are labels
    or leaks, and asking for one as a feature is an error.
    """

    interactions: pd.DataFrame
    users: Optional[pd.DataFrame] = None
    content: Optional[pd.DataFrame] = None
    post_exposure: FrozenSet[str] = frozenset()
    notes: Dict[str, str] = field(default_factory=dict)
