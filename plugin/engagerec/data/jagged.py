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
    """Select ``rows`` (any order, repeats allowed) of a jagged column without a Python loop.

    Where every list has the same length (a fixed-length history), the values are an ``[rows,
    length]`` matrix and the rows are copied whole: one contiguous copy per row instead of one
    random read per value, which on a shuffled row group of 20-long lists is most of the reader's
    decoding time (docs/EXPERIMENTS.md).

    Args:
        offsets: ``len(column) + 1`` non-decreasing positions in ``values``; row ``i`` is
            ``values[offsets[i]:offsets[i + 1]]``.
        values: the flat values of every row.
        rows: the row numbers to select, in the order wanted.

    Returns:
        ``(new_offsets, new_values)``: offsets starting at 0 (int64) and the selected rows' values.

    Example::

        >>> offsets, values = np.array([0, 2, 2, 5]), np.array([10, 11, 20, 21, 22])
        >>> new_offsets, new_values = gather_rows(offsets, values, np.array([2, 0, 2, 1]))
        >>> new_offsets.tolist(), new_values.tolist()
        ([0, 3, 5, 8, 8], [20, 21, 22, 10, 11, 20, 21, 22])
    """
    lengths = np.diff(offsets)
    flat = values[offsets[0] : offsets[-1]] if lengths.size else values[:0]
    width = int(lengths[0]) if lengths.size else 0
    if width and (lengths == width).all():
        new_offsets = np.arange(len(rows) + 1, dtype=np.int64) * width
        return new_offsets, np.take(flat.reshape(lengths.size, width), rows, axis=0).reshape(-1)
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths[rows], out=new_offsets[1:])
    # position of each output value = its row's start in the source + its rank within the row
    starts = offsets[rows] - offsets[0]
    source = np.repeat(starts - new_offsets[:-1], lengths[rows]) + np.arange(new_offsets[-1], dtype=np.int64)
    return new_offsets, flat[source]
