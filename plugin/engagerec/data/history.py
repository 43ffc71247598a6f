"""Viewing history: for each event, the user's previous ids strictly before it in time.

Rows with the same (user, timestamp) never see each other, so no event's history
contains itself or anything simultaneous. Only ids are used, never past labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from engagerec.data.errors import DataError
from engagerec.data.jagged import gather_rows, to_list_array
from engagerec.data.raw import TIMESTAMP, USER_ID


def _previous_rows(events: pd.DataFrame, length: int):
    """Rows sorted by (user, time) and, for each sorted row, the range [starts, ends) of the
    same user's rows strictly before its moment, at most ``length`` of them."""
    if TIMESTAMP not in events.columns:
        raise DataError(
            "a history feature needs a timestamp column",
            column=TIMESTAMP,
            expected="data.source.columns.timestamp to name it",
        )
    if length <= 0:
        raise DataError(f"history length {length}", expected="a positive integer")
    users = pd.factorize(events[USER_ID])[0]
    times = events[TIMESTAMP].to_numpy()
    order = np.lexsort((times, users))  # by user, then time
    users_sorted, times_sorted = users[order], times[order]
    n = len(order)
    position = np.arange(n)
    new_user = np.r_[True, users_sorted[1:] != users_sorted[:-1]]
    new_moment = new_user | np.r_[True, times_sorted[1:] != times_sorted[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))
    moment_start = np.maximum.accumulate(np.where(new_moment, position, 0))
    starts = np.maximum(user_start, moment_start - length)
    return order, starts, moment_start


def previous_label_mean(events: pd.DataFrame, label: str, length: int) -> np.ndarray:
    """Mean of ``label`` over the user's last ``length`` views strictly before each row (NaN for a
    first view). Past outcomes are known when the next video is served, so this is a
    pre-exposure feature; the row's own label and anything simultaneous are excluded."""
    order, starts, ends = _previous_rows(events, length)
    prefix = np.concatenate([[0.0], np.cumsum(events[label].to_numpy(dtype=np.float64)[order])])
    counts = ends - starts
    with np.errstate(invalid="ignore", divide="ignore"):
        sorted_mean = np.where(counts > 0, (prefix[ends] - prefix[starts]) / np.maximum(counts, 1), np.nan)
    out = np.empty(len(order))
    out[order] = sorted_mean
    return out


def previous_ids(events: pd.DataFrame, of: str, length: int) -> pd.Series:
    """A list column: up to ``length`` most recent ``of`` values before each row, oldest first."""
    order, starts, moment_start = _previous_rows(events, length)
    n = len(order)
    position = np.arange(n)
    lengths = moment_start - starts
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    source = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    values_sorted = events[of].to_numpy()[order][source]
    inverse = np.empty(n, dtype=np.int64)  # back to the events' own row order
    inverse[order] = position
    out_offsets, values = gather_rows(offsets, values_sorted, inverse)
    array = to_list_array(out_offsets, values)
    return pd.Series(pd.arrays.ArrowExtensionArray(pa.chunked_array([array])), index=events.index)
