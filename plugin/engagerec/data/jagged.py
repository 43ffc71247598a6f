"""Vectorised helpers for jagged (list-per-row) columns held as (offsets, values)."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pyarrow as pa


def list_array_parts(array: pa.Array | pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    """(offsets starting at 0, flat values) of an Arrow list array; nulls are empty lists."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)
    values = values[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def to_list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """The Arrow list array of (offsets, values), the inverse of ``list_array_parts``; offsets become
    int32, the offset type of Arrow's ``list`` (not ``large_list``)."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def gather_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Select ``rows`` (any order, repeats allowed) of a jagged column without a Python loop."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    # position of each output value = its row's start in the source + its rank within the row
    source = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1], dtype=np.int64)
    return new_offsets, values[source]
