"""Float sums that come out the same to the last bit whatever order DuckDB adds the rows in.

DuckDB adds a float column's rows in the order its threads reach them, and the order of a
table's rows follows the parallel statement that wrote it. Two preparations of the same
KuaiRand-1K-shaped files gave normalisation means, label statistics and target means that
differed in their last bits, and so 12 of 53 prepared files, even with those aggregates on one
thread (docs/EXPERIMENTS.md). Here each value is first rounded onto a grid of step ``2**-bits``
(the same rounding for a row whatever else runs), with ``bits`` chosen so that any sum of the
rows' grid values stays an integer below 2**53. Doubles add such integers exactly, so DuckDB's
own float sums, windowed ones included, give the same bits in any order and on any number of
threads, at the speed of a float sum. The price is the grid: about 53 - log2(rows) significant
bits per value (29 at KuaiRand-1K's 11.7M rows, 23 at 10^9 rows), still finer than the float32
the shards hold; the means moved by about 5e-10 of their value at KuaiRand-1K scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import duckdb

FLOAT_BITS = 53  # doubles hold every integer below 2**53 exactly
MAX_BITS = 1000  # 2.0 ** bits stays a finite double


def grid_bits(bound: Optional[float], rows: int) -> int:
    """
    The grid for ``rows`` values of magnitude at most ``bound``: ``bits`` such that any sum of
    them, each rounded to a multiple of ``2**-bits``, is an integer multiple below 2**53.

    Args:
        bound (Optional[float]): the values' largest magnitude (None or 0: none, or all zero).
        rows (int): how many values a sum may add.

    Returns:
        int: the grid's bits.

    Raises:
        ValueError: ``bound`` is not finite (an infinite value cannot be summed).

    Example::

        >>> from engagerec.data.exact_sums import grid_bits
        >>> grid_bits(1.0, 11_713_045), grid_bits(1000.0, 11_713_045), grid_bits(0.0, 5)
        (28, 19, 0)
    """
    if not bound or rows <= 0:
        return 0
    if not math.isfinite(bound):
        raise ValueError(f"cannot sum values of magnitude {bound}")
    # bound < 2**bound_bits and rows < 2**rows_bits: rows * bound * 2**bits < 2**FLOAT_BITS
    bound_bits, rows_bits = math.frexp(abs(bound))[1], int(rows).bit_length()
    return max(-MAX_BITS, min(MAX_BITS, FLOAT_BITS - bound_bits - rows_bits))


def fixed_sum(value: str, bits: int) -> str:
    """
    SQL: the exact sum of ``value``'s rows rounded onto the grid of ``bits``, as a DOUBLE.

    Args:
        value (str): the SQL of a DOUBLE (NULLs are skipped, as ``sum`` skips them).
        bits (int): ``grid_bits`` of the values' largest magnitude and the rows summed.

    Returns:
        str: SQL of a DOUBLE (NULL when no row has a value).

    Example::

        >>> import duckdb
        >>> from engagerec.data.exact_sums import fixed_sum
        >>> duckdb.execute(f"SELECT {fixed_sum('x', 20)} FROM (VALUES (0.5), (0.25), (1e-9)) t(x)").fetchall()
        [(0.75,)]
    """
    return from_grid(fixed_total(value, bits), bits)


def fixed_total(value: str, bits: int, suffix: str = "") -> str:
    """
    SQL: the sum of ``value``'s rows in grid steps (an integer-valued DOUBLE); ``suffix`` follows
    the aggregate (``FILTER (WHERE ...)`` or ``OVER (...)``). ``from_grid`` scales it back.

    Args:
        value (str): the SQL of a DOUBLE.
        bits (int): ``grid_bits`` of the values' largest magnitude and the rows summed.
        suffix (str): what follows ``sum(...)``. Default: nothing.

    Returns:
        str: SQL of a DOUBLE.

    Example::

        >>> from engagerec.data.exact_sums import fixed_total
        >>> fixed_total("y", 28, "OVER (ORDER BY t)")
        'sum(round((y) * 268435456.0)) OVER (ORDER BY t)'
    """
    return f"sum(round(({value}) * {2.0**bits!r})){' ' + suffix if suffix else ''}"


def from_grid(total: str, bits: int) -> str:
    """
    SQL: a sum in grid steps (``fixed_total``) as the value it stands for.

    Args:
        total (str): the SQL of the sum.
        bits (int): the grid's bits.

    Returns:
        str: SQL of a DOUBLE.

    Example::

        >>> from engagerec.data.exact_sums import from_grid
        >>> from_grid("t", 1)
        '(t / 2.0)'
    """
    return f"({total} / {2.0**bits!r})"


@dataclass
class Moments:
    """One value's count (non-NULL rows), minimum, maximum, mean and population variance; the
    last three None without rows."""

    count: int
    low: Optional[float]
    high: Optional[float]
    mean: Optional[float]
    var: Optional[float]


def exact_moments(
    con: duckdb.DuckDBPyConnection, values: Sequence[str], rows: str, group: Optional[str] = None
) -> Dict[Optional[int], List[Moments]]:
    """
    Count, range, mean and population variance of each of ``values`` over ``rows``, the same to
    the last bit on any thread count and in any row order, in three scans on every thread: the
    ranges (which set each value's grid), the grid sums (the means), and the grid sums of the
    squared deviations from the means (the variances: two passes, so a large mean costs the
    variance no precision).

    Args:
        con (duckdb.DuckDBPyConnection): the connection holding ``rows``' tables.
        values (Sequence[str]): SQL of DOUBLE values over ``rows`` (NULLs skipped).
        rows (str): what follows FROM: tables, joins, a WHERE clause.
        group (Optional[str]): SQL of an integer to group by, or None for every row.

    Returns:
        Dict[Optional[int], List[Moments]]: per group (and under None, every row) one ``Moments``
        per value, in ``values``' order. Groups without rows are absent.

    Raises:
        ValueError: a value is infinite.

    Example::

        >>> import duckdb
        >>> from engagerec.data.exact_sums import exact_moments
        >>> con = duckdb.connect()
        >>> _ = con.execute("CREATE TABLE t AS SELECT range % 2 AS g, range / 4 AS x FROM range(4)")
        >>> everything = exact_moments(con, ["x"], "t")[None][0]
        >>> everything.count, everything.mean, everything.var
        (4, 0.375, 0.078125)
        >>> exact_moments(con, ["x"], "t", group="g")[1][0].mean
        0.5
    """
    n = len(values)
    keyed = group is not None
    projected = ", ".join(
        [f"CAST({value} AS DOUBLE) AS __v{i}" for i, value in enumerate(values)] + [f"{group or 0} AS __g"]
    )
    source = f"(SELECT {projected} FROM {rows})"
    by = "GROUP BY GROUPING SETS ((__g), ())" if keyed else ""

    def scan(aggregates: List[str]) -> Dict[Optional[int], tuple]:
        key = "__g" if keyed else "NULL"
        found = con.execute(f"SELECT {key}, {', '.join(aggregates)} FROM {source} {by}").fetchall()
        return {row[0]: row[1:] for row in found}

    ranges = scan([f"count(__v{i}), min(__v{i}), max(__v{i})" for i in range(n)])
    counts = {key: found[0::3] for key, found in ranges.items()}
    lows = {key: found[1::3] for key, found in ranges.items()}
    highs = {key: found[2::3] for key, found in ranges.items()}
    total_rows = counts[None]
    largest = [max(abs(lows[None][i] or 0.0), abs(highs[None][i] or 0.0)) for i in range(n)]
    bits = [grid_bits(largest[i], total_rows[i]) for i in range(n)]
    totals = scan([fixed_total(f"__v{i}", bits[i]) for i in range(n)])
    means = {  # exact: the grid sums over the counts
        key: [_scaled(totals[key][i], bits[i]) / counts[key][i] if counts[key][i] else None for i in range(n)]
        for key in ranges
    }
    groups = [key for key in ranges if key is not None] if keyed else [None]

    def row_mean(i: int) -> str:
        """Each row's own group's mean, rounded to a double."""
        cases = " ".join(f"WHEN {key} THEN {float(means[key][i] or 0)!r}" for key in groups)
        if not keyed or not cases:  # one mean, or no rows at all
            return repr(float(means[None][i] or 0))
        return f"(CASE __g {cases} END)"

    def spread(i: int) -> float:
        """The largest deviation of a row from its group's mean rounded to a double: the group's
        range plus that rounding."""
        ranged = [g for g in groups if counts[g][i]]
        return max(
            (highs[g][i] - lows[g][i] + abs(float(means[g][i])) * 2.0**-52 for g in ranged), default=0.0
        )

    square_bits = [grid_bits(spread(i) ** 2, total_rows[i]) for i in range(n)]
    squares = scan([fixed_total(f"(__v{i} - {row_mean(i)}) ^ 2", square_bits[i]) for i in range(n)])
    out: Dict[Optional[int], List[Moments]] = {}
    for key in ranges:
        moments = []
        for i in range(n):
            count = counts[key][i]
            if not count:
                moments.append(Moments(0, None, None, None, None))
                continue
            mean = means[key][i]
            # the squares were taken about each row's group mean m_g rounded to a double d_g; about
            # the mean M of these rows, a group's rows add n_g ((m_g - M)^2 - (m_g - d_g)^2) to them
            deviations = _scaled(squares[key][i], square_bits[i])
            for g in groups if key is None else [key]:
                m_g = means[g][i]
                if m_g is not None:
                    deviations += counts[g][i] * ((m_g - mean) ** 2 - (m_g - Fraction(float(m_g))) ** 2)
            var = float(max(deviations, Fraction(0)) / count)
            moments.append(Moments(int(count), float(lows[key][i]), float(highs[key][i]), float(mean), var))
        out[key] = moments
    return out


def _scaled(total: float, bits: int) -> Fraction:
    """A sum in grid steps (an integer-valued double) as the exact number it stands for."""
    return Fraction(total) / Fraction(2) ** bits
