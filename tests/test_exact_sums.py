"""Float sums that do not depend on the order DuckDB adds rows in (engagerec.data.exact_sums)."""

import math

import duckdb
import numpy as np
import pytest

from engagerec.data.exact_sums import (
    FLOAT_BITS,
    UnsummableError,
    exact_moments,
    fixed_sum,
    fixed_total,
    grid_bits,
)

ROWS = 300_000  # three of DuckDB's 122,880-row groups: two threads split a scan between them

# three groups DuckDB's float sums get wrong in different ways: a large mean with a tiny spread,
# magnitudes 10^8 apart, and a tight group beside them
VALUES = f"""
    SELECT range AS i, CAST(range % 3 AS INTEGER) AS g,
        CASE range % 3
            WHEN 0 THEN 1e6 + ((hash(range) % 2001) - 1000.0) * 1e-6
            WHEN 1 THEN (hash(range) % 1000) / 1000.0 * pow(10, (hash(range * 7) % 9) - 8.0)
            ELSE 5 + ((hash(range * 3) % 31) - 15.0) * 0.001
        END AS x
    FROM range({ROWS})
"""


@pytest.fixture(scope="module")
def orders():
    """The same rows in four insertion orders (t0 .. t3)."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE base AS {VALUES}")
    for k in range(4):
        con.execute(f"CREATE TABLE t{k} AS SELECT g, x FROM base ORDER BY hash(i + {k * 1_000_003})")
    return con


def _reference(x: np.ndarray):
    """Mean and population variance from correctly rounded sums (math.fsum)."""
    mean = math.fsum(x) / len(x)
    return mean, math.fsum((x - mean) ** 2) / len(x)


def test_moments_are_the_same_bits_in_any_row_order_and_thread_count(orders):
    results, plain = [], set()
    for k in range(4):
        orders.execute(f"SET threads = {1 + k % 2}")
        results.append(exact_moments(orders, ["x", "x * x"], f"t{k}", group="g"))
        plain.add(orders.execute(f"SELECT sum(x), var_pop(x) FROM t{k}").fetchone())
    assert len(plain) > 1, "the data should make DuckDB's float sums depend on the order"
    assert all(result == results[0] for result in results[1:])


def test_moments_match_correctly_rounded_sums(orders):
    """A large mean leaves a tiny spread's variance accurate (two passes); a tight group keeps
    its variance beside a wide one."""
    found = exact_moments(orders, ["x", "CASE WHEN g = 0 THEN NULL ELSE x END"], "t0", group="g")
    x, g = (
        np.asarray(column) for column in zip(*orders.execute("SELECT x, g FROM t0").fetchall(), strict=True)
    )
    for key, rows in [(None, slice(None)), *((k, g == k) for k in range(3))]:
        mean, var = _reference(x[rows])
        moments = found[key][0]
        assert moments.count == len(x[rows]) and (moments.low, moments.high) == (x[rows].min(), x[rows].max())
        assert moments.mean == pytest.approx(mean, rel=1e-15) and moments.var == pytest.approx(var, rel=1e-12)
    assert found[0][0].var < 1e-6 and found[2][0].var == pytest.approx(8e-5, rel=0.1)
    # NULLs are skipped, as SQL aggregates skip them; a group with none of a value has no moments
    assert found[None][1].count == int((g != 0).sum())
    assert found[None][1].mean == pytest.approx(_reference(x[g != 0])[0], rel=1e-15)
    assert found[0][1].count == 0 and found[0][1].mean is None and found[0][1].var is None


def test_a_constant_has_its_own_value_as_mean_and_no_variance():
    """0.1 is not a multiple of any power of two: its grid must keep it whole."""
    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT range % 2 AS g, 0.1::DOUBLE AS x FROM range({ROWS})")
    for moments in exact_moments(con, ["x"], "t", group="g").values():
        assert (moments[0].mean, moments[0].var, moments[0].low) == (0.1, 0.0, 0.1)


def test_moments_without_rows_and_bad_values():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (g INTEGER, x DOUBLE)")
    assert exact_moments(con, ["x"], "t")[None][0].count == 0
    assert list(exact_moments(con, ["x"], "t", group="g")) == [None]
    con.execute("INSERT INTO t VALUES (1, 1.0), (1, 'inf'), (NULL, 2.0)")
    with pytest.raises(UnsummableError, match="inf") as caught:
        exact_moments(con, ["1", "x"], "t WHERE g = 1")
    assert caught.value.index == 1
    with pytest.raises(ValueError, match="NULL"):
        exact_moments(con, ["1"], "t", group="g")
    with pytest.raises(UnsummableError, match="NaN"):
        exact_moments(con, ["CAST('nan' AS DOUBLE)"], "t")


def test_the_float_grid_is_as_fine_as_exactness_allows():
    """The largest rows (2^20 - 1) of the largest value (just under 2) sum exactly below 2^53;
    one bit finer, and they would not fit."""
    rows, bound = 2**20 - 1, 2.0 - 2.0**-52
    bits = grid_bits(bound, rows)
    con = duckdb.connect()
    value = f"CAST({bound!r} AS DOUBLE)"
    total = con.execute(f"SELECT {fixed_total(value, bits)} FROM range({rows})").fetchone()[0]
    assert total == rows * math.ceil(bound * 2.0**bits) < 2**FLOAT_BITS
    assert rows * math.ceil(bound * 2.0 ** (bits + 1)) >= 2**FLOAT_BITS
    with pytest.raises(UnsummableError, match="inf"):
        grid_bits(float("inf"), 3)


def test_grid_sums_are_the_same_in_any_order_windows_included(orders):
    """What the ordered target statistics sum: running sums over rows whose order among equal
    keys is arbitrary."""
    bits = grid_bits(orders.execute("SELECT max(abs(x)) FROM base").fetchone()[0], ROWS)
    running = "OVER (ORDER BY g RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW EXCLUDE GROUP)"
    totals, windows, plain = set(), set(), set()
    for k in range(4):
        orders.execute(f"SET threads = {1 + k % 2}")
        totals.add(orders.execute(f"SELECT {fixed_sum('x', bits)} FROM t{k}").fetchone())
        # each group's running sum over the groups before it
        window = f"SELECT DISTINCT g, {fixed_total('x', bits, running)} FROM t{k} ORDER BY g"
        windows.add(tuple(orders.execute(window).fetchall()))
        plain.add(orders.execute(f"SELECT sum(x) FROM t{k}").fetchone())
    assert len(plain) > 1, "the data should make DuckDB's float sum depend on the order"
    assert len(totals) == 1 and len(windows) == 1
