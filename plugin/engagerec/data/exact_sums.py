"""Float sums that come out the same to the last bit whatever order DuckDB adds the rows in.

DuckDB adds a float column's rows in the order its threads reach them, and the order of a
table's rows follows the parallel statement that wrote it. Two preparations of the same
KuaiRand-1K-shaped files gave normalisation means, label statistics and target means that
differed in their last bits, and so 12 of 53 prepared files, even with those aggregates on one
thread (docs/EXPERIMENTS.md, "Same files, same bytes"). Here each value is first rounded onto a
grid of step ``2**-bits`` (the same rounding for a row whatever else runs), with ``bits`` chosen
from the values' largest magnitude and the rows summed so that every sum of grid steps is an
integer that the sum's type holds exactly:

* in doubles (below 2**53), which DuckDB's own float sums, windowed ones included, add exactly
  in any order at their usual speed: the running sums of the target statistics, where 128-bit
  integers made the windows 1.3x slower. About 53 - log2(rows) significant bits are kept per
  value (28 for ratios up to 1 at KuaiRand-1K's 11.7M rows, 22 at 10^9 rows), finer than the
  float32 of the shards;
* in DuckDB's 128-bit HUGEINT (below 2**126): means and variances (``exact_moments``), where a
  variance needs the squares' low bits; values keep their full precision there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

import duckdb

FLOAT_BITS = 53  # a double holds every integer below 2**53 exactly
HUGEINT_BITS = 126  # a HUGEINT holds every integer below 2**127: one bit spare
MAX_BITS = 1000  # 2.0 ** bits stays a finite double


class UnsummableError(ValueError):
    """Values no grid can sum: not finite, or of a magnitude near the double's limit.

    Args:
        message (str): what was found.
        index (int): which of the values summed (``exact_moments``' ``values``).

    Example::

        >>> from engagerec.data.exact_sums import UnsummableError
        >>> UnsummableError("an infinite value", 2).index
        2
    """

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


def grid_bits(bound: Optional[float], rows: int, total_bits: int = FLOAT_BITS) -> int:
    """
    The grid for ``rows`` values of magnitude at most ``bound``: ``bits`` such that any sum of
    them, each rounded to a multiple of ``2**-bits``, is an integer number of steps below
    ``2**total_bits``.

    Args:
        bound (Optional[float]): the values' largest magnitude (None or 0: none, or all zero).
        rows (int): how many values a sum may add.
        total_bits (int): ``FLOAT_BITS`` for sums in doubles, ``HUGEINT_BITS`` for sums in
            DuckDB's HUGEINT. Default: ``FLOAT_BITS``.

    Returns:
        int: the grid's bits.

    Raises:
        UnsummableError: ``bound`` is not finite, or so large that the grid's step overflows.

    Example::

        >>> from engagerec.data.exact_sums import HUGEINT_BITS, grid_bits
        >>> grid_bits(1.0, 11_713_045), grid_bits(1000.0, 11_713_045), grid_bits(0.0, 5)
        (28, 19, 0)
        >>> grid_bits(1.0, 11_713_045, HUGEINT_BITS)
        101
    """
    if not bound or rows <= 0:
        return 0
    if not math.isfinite(bound):
        raise UnsummableError(f"a value of magnitude {bound}")
    # bound < 2**bound_bits and rows < 2**rows_bits; a value rounds to at most
    # ceil(bound * 2**bits) <= 2**(total_bits - rows_bits) steps, so rows of them stay below 2**total_bits
    bound_bits, rows_bits = math.frexp(abs(bound))[1], int(rows).bit_length()
    bits = total_bits - bound_bits - rows_bits
    if bits < -MAX_BITS:
        raise UnsummableError(f"{rows} values of magnitude up to {bound}")
    return min(MAX_BITS, bits)


def fixed_sum(value: str, bits: int, suffix: str = "") -> str:
    """
    SQL: the exact sum of ``value``'s rows rounded onto the grid of ``bits``, as a DOUBLE;
    ``suffix`` follows the aggregate (``FILTER (WHERE ...)`` or ``OVER (...)``).

    Args:
        value (str): the SQL of a DOUBLE (NULLs are skipped, as ``sum`` skips them).
        bits (int): ``grid_bits`` of the values' largest magnitude and the rows summed.
        suffix (str): what follows ``sum(...)``. Default: nothing.

    Returns:
        str: SQL of a DOUBLE (NULL when no row has a value).

    Example::

        >>> import duckdb
        >>> from engagerec.data.exact_sums import fixed_sum
        >>> duckdb.execute(f"SELECT {fixed_sum('x', 20)} FROM (VALUES (0.5), (0.25), (1e-9)) t(x)").fetchall()
        [(0.75,)]
    """
    return from_grid(fixed_total(value, bits, suffix), bits)


def fixed_total(value: str, bits: int, suffix: str = "", integer: bool = False) -> str:
    """
    SQL: the sum of ``value``'s rows in grid steps; ``suffix`` follows the aggregate (``FILTER
    (WHERE ...)`` or ``OVER (...)``). ``from_grid`` scales it back.

    Args:
        value (str): the SQL of a DOUBLE.
        bits (int): ``grid_bits`` of the values' largest magnitude and the rows summed.
        suffix (str): what follows ``sum(...)``. Default: nothing.
        integer (bool): sum HUGEINTs (``bits`` from ``HUGEINT_BITS``) instead of integer-valued
            doubles (``FLOAT_BITS``). Default: False.

    Returns:
        str: SQL of a DOUBLE, or of a HUGEINT when ``integer``.

    Example::

        >>> from engagerec.data.exact_sums import fixed_total
        >>> fixed_total("y", 28, "OVER (ORDER BY t)")
        'sum(round((y) * 268435456.0)) OVER (ORDER BY t)'
    """
    steps = f"round(({value}) * {2.0**bits!r})"
    if integer:
        steps = f"CAST({steps} AS HUGEINT)"
    return f"sum({steps}){' ' + suffix if suffix else ''}"


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
    """
    One value's moments over some rows (``exact_moments``).

    Args:
        count (int): rows with the value (not NULL).
        low (Optional[float]): its minimum; None without rows.
        high (Optional[float]): its maximum; None without rows.
        mean (Optional[float]): its mean; None without rows.
        var (Optional[float]): its population variance; None without rows.

    Example::

        >>> from engagerec.data.exact_sums import Moments
        >>> Moments(2, 1.0, 3.0, 2.0, 1.0).var
        1.0
    """

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
    ranges (which set each value's grid), the sums in HUGEINT grid steps (the means, exact), and
    the sums of the squared deviations from the means (two passes, so a large mean costs the
    variance no precision).

    Args:
        con (duckdb.DuckDBPyConnection): the connection holding ``rows``' tables.
        values (Sequence[str]): SQL of numbers over ``rows`` (NULLs skipped).
        rows (str): what follows FROM: tables, joins, a WHERE clause.
        group (Optional[str]): SQL of an integer, never NULL, to group by; None for every row.

    Returns:
        Dict[Optional[int], List[Moments]]: per group (and under None, every row) one ``Moments``
        per value, in ``values``' order. Groups without rows are absent.

    Raises:
        UnsummableError: a value is NaN, infinite, or too large to square (its ``index`` says
            which).

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
        """One row of ``aggregates`` per group, and under None one over every row."""
        key = "GROUPING(__g), __g" if keyed else "1, NULL"
        found = con.execute(f"SELECT {key}, {', '.join(aggregates)} FROM {source} {by}").fetchall()
        if any(total == 0 and g is None for total, g, *_ in found):
            raise ValueError(f"exact_moments: the group {group} is NULL on some rows")
        return {(None if total else g): found_row for total, g, *found_row in found}

    ranges = scan([f"count(__v{i}), min(__v{i}), max(__v{i})" for i in range(n)])
    counts = {key: found[0::3] for key, found in ranges.items()}
    lows = {key: found[1::3] for key, found in ranges.items()}
    highs = {key: found[2::3] for key, found in ranges.items()}
    largest = [_largest(lows[None][i], highs[None][i], i) for i in range(n)]
    bits = [_bits(largest[i], counts[None][i], i) for i in range(n)]
    totals = scan([fixed_total(f"__v{i}", bits[i], integer=True) for i in range(n)])
    means = {  # exact: the values on their grid, summed as integers, over the counts
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
        """The largest deviation of a value on its grid from its group's mean rounded to a
        double: the group's range, a grid step at either end, and that rounding."""
        step = 2.0 ** -bits[i]
        return max(
            (
                highs[g][i] - lows[g][i] + 2 * step + abs(float(means[g][i])) * 2.0**-52
                for g in groups
                if counts[g][i]
            ),
            default=0.0,
        )

    # squares of the values on their grid (exactly what the means summed), with slack for the
    # doubles' rounding in the subtraction and the square
    def square_bound(i: int) -> float:
        bound = spread(i) * spread(i) * (1 + 2.0**-40)  # a product overflows to inf, ** would raise
        if not math.isfinite(bound):
            raise UnsummableError(f"a value of magnitude up to {largest[i]:g}, too large to square", i)
        return bound

    square_bits = [_bits(square_bound(i), counts[None][i], i) for i in range(n)]
    on_grid = [f"(round(__v{i} * {2.0 ** bits[i]!r}) / {2.0 ** bits[i]!r})" for i in range(n)]
    squares = scan(
        [fixed_total(f"({on_grid[i]} - {row_mean(i)}) ^ 2", square_bits[i], integer=True) for i in range(n)]
    )
    out: Dict[Optional[int], List[Moments]] = {}
    for key in ranges:
        moments = []
        for i in range(n):
            count = counts[key][i]
            if not count:
                moments.append(Moments(0, None, None, None, None))
                continue
            mean = means[key][i]
            # squares about each row's group mean m_g rounded to a double d_g; about the mean M of
            # these rows a group's rows add n_g ((m_g - M)^2 - (m_g - d_g)^2), as the values on the
            # grid sum to n_g m_g exactly
            deviations = _scaled(squares[key][i], square_bits[i])
            for g in groups if key is None else [key]:
                m_g = means[g][i]
                if m_g is not None:
                    deviations += counts[g][i] * ((m_g - mean) ** 2 - (m_g - Fraction(float(m_g))) ** 2)
            var = float(max(deviations, Fraction(0)) / count)
            moments.append(Moments(int(count), float(lows[key][i]), float(highs[key][i]), float(mean), var))
        out[key] = moments
    return out


def _largest(low: Optional[float], high: Optional[float], index: int) -> float:
    """The largest magnitude of values within [low, high]; NaN is refused (it compares with nothing)."""
    ends = [x for x in (low, high) if x is not None]
    if any(math.isnan(x) for x in ends):
        raise UnsummableError("a NaN value", index)
    return max((abs(x) for x in ends), default=0.0)


def _bits(bound: float, rows: int, index: int) -> int:
    """``grid_bits`` in HUGEINT steps, naming the value on failure."""
    try:
        return grid_bits(bound, rows, HUGEINT_BITS)
    except UnsummableError as err:
        raise UnsummableError(str(err), index) from None


def _scaled(total: float, bits: int) -> Fraction:
    """A sum in grid steps as the exact number it stands for."""
    return Fraction(total) / Fraction(2) ** bits
