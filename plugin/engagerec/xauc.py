"""Exact XAUC in O(n log n) time and a few bytes per row with numpy alone: the score evaluation's
ExactXAUC (engagerec.metrics) computes over a split, importable where torch must not be loaded
(the study's GBDT process, engagerec_study.gbdt_fit)."""

from __future__ import annotations

import numpy as np

BLOCK_ROWS = 1 << 18  # rows per block of the blocked pair count: bounds its transient memory


def _ascending_pairs_in(ranks: np.ndarray) -> int:
    """
    The number of pairs i < j with ranks[i] < ranks[j] within one block, in O(n log^2 n): a
    bottom-up merge sort over runs that double each level, where every element of a right run
    counts the smaller elements of its left run by one binary search (runs are told apart by
    an offset key, so a whole level is one searchsorted and one sort of already-sorted halves).
    Its transient memory is some 60 bytes per row, so callers give it one block at a time.
    """
    n = len(ranks)
    span = int(ranks.max(initial=0)) + 1
    values = ranks.astype(np.int64, copy=True)
    position = np.arange(n, dtype=np.int64)
    count, width = 0, 1
    while width < n:
        pair = position // (2 * width)
        right = (position // width) % 2 == 1
        keys = pair * span + values  # runs are sorted, pairs in order: the left halves' keys are sorted
        left_keys = keys[~right]
        below = np.searchsorted(left_keys, keys[right], side="left")
        count += int((below - np.searchsorted(left_keys, pair[right] * span, side="left")).sum())
        values = np.sort(keys, kind="stable") - pair * span  # timsort: merges each pair's two runs
        width *= 2
    return count


def _ascending_pairs(ranks: np.ndarray, span: int, block: int = BLOCK_ROWS) -> int:
    """
    The number of pairs i < j with ranks[i] < ranks[j] (ranks in [0, span)), block by block: the
    pairs inside a block by ``_ascending_pairs_in``, the pairs from earlier blocks by a count per
    rank of the rows seen so far (one prefix sum per block). At most 16 blocks, each at least
    ``block`` rows, so the prefix sums cost O(16 n) and the transient memory is one block's.
    """
    n = len(ranks)
    block = max(block, -(-n // 16))
    wide = np.int64 if n >= 2**31 else np.int32
    seen = np.zeros(span, dtype=wide)  # per rank, the rows of earlier blocks holding it
    count = 0
    for lo in range(0, n, block):
        part = ranks[lo : lo + block]
        count += _ascending_pairs_in(part)
        if lo:
            below = np.cumsum(seen, dtype=wide)  # below[r]: earlier rows with a rank <= r
            # earlier rows with a smaller rank: below[r - 1]; rank 0 has none
            count += int(below[part[part > 0] - 1].sum(dtype=np.int64))
            del below
        seen += np.bincount(part, minlength=span).astype(wide, copy=False)
    return count


def dense_ranks(values: np.ndarray) -> "tuple[np.ndarray, int]":
    """
    Each value's rank among the distinct values (0 for the smallest), as int32 (int64 past 2^31
    rows), and the number of distinct values: ``np.unique(values, return_inverse=True)`` in about
    half its memory.

    Args:
        values (np.ndarray): [n] numbers.

    Returns:
        tuple[np.ndarray, int]: the ranks and the number of distinct values.

    Example::

        >>> import numpy as np
        >>> from engagerec.xauc import dense_ranks
        >>> dense_ranks(np.array([0.5, 0.1, 0.5, 0.3], dtype=np.float32))
        (array([2, 0, 2, 1], dtype=int32), 3)
    """
    n = len(values)
    wide = np.int64 if n >= 2**31 else np.int32
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.empty(n, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    del ordered
    ranks = np.empty(n, dtype=wide)
    ranks[order] = np.cumsum(new, dtype=wide) - 1
    return ranks, int(new.sum())


def _tied_pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64, copy=False)
    return int((counts * (counts - 1) // 2).sum())


def exact_xauc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """
    XAUC: the share of pairs with different labels that the predictions order the same way
    (ties in prediction count one half); Zhan et al., "Deconfounding Duration Bias in Watch-time
    Prediction for Video Recommendation", KDD 2022.

    Exact, in O(n log n) with numpy alone and about 30 bytes per row beyond its inputs: rows
    sorted by (label, prediction) through one int64 key, the pairs in ascending order of
    prediction counted block by block, the pairs within a label tie taken off, and tie counts
    give the rest, so no pair is enumerated.

    Args:
        predictions (np.ndarray): [n] predicted values (any numeric dtype; float32 is not widened).
        labels (np.ndarray): [n] true values.

    Returns:
        float: XAUC in [0, 1] (0.5: no better than chance), NaN when every label is equal.

    Example::

        >>> import numpy as np
        >>> from engagerec.xauc import exact_xauc
        >>> round(exact_xauc(np.array([0.1, 0.4, 0.3, 0.9]), np.array([0.0, 0.5, 0.2, 1.0])), 4)
        1.0
        >>> round(exact_xauc(np.array([0.5, 0.5, 0.2]), np.array([1.0, 0.0, 0.3])), 4)  # 1/3 + 0.5/3
        0.5
    """
    n = len(predictions)
    rank_x, span_x = dense_ranks(np.asarray(predictions))
    rank_y, span_y = dense_ranks(np.asarray(labels))
    total = n * (n - 1) // 2
    tied_x = _tied_pairs(np.bincount(rank_x, minlength=span_x))
    tied_y = _tied_pairs(np.bincount(rank_y, minlength=span_y))
    pairs = total - tied_y  # pairs whose labels differ: the ones XAUC scores
    if pairs == 0:
        return float("nan")
    # one key per row sorts by label, then prediction, in place of an argsort and a gather
    key = rank_y.astype(np.int64)
    del rank_y
    key *= span_x
    key += rank_x
    del rank_x
    key.sort()
    edges = np.flatnonzero(key[1:] != key[:-1]) + 1
    tied_both = _tied_pairs(np.diff(edges, prepend=0, append=n))  # equal label and prediction
    del edges
    key %= span_x  # the predictions' ranks in (label, prediction) order
    ordered = key.astype(np.int32 if span_x < 2**31 else np.int64)
    del key
    # ascending pairs in that order: every concordant pair, plus the pairs inside a label tie
    # whose predictions differ (tied_y - tied_both of them)
    concordant = _ascending_pairs(ordered, span_x) - (tied_y - tied_both)
    ties_in_prediction = tied_x - tied_both  # differing labels, equal predictions: half each
    return float((concordant + 0.5 * ties_in_prediction) / pairs)
