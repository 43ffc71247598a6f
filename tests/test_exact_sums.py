"""Float sums that do not depend on the order DuckDB adds rows in (engagerec.data.exact_sums)."""

from fractions import Fraction

import duckdb
import numpy as np
import pytest

from engagerec.data.exact_sums import exact_moments, fixed_sum, fixed_total, grid_bits


def _table(con, name: str, values: np.ndarray, groups: np.ndarray, order: np.ndarray) -> None:
    """``name``(g, x) holding the rows in ``order``, in row groups DuckDB's threads share out."""
    con.execute(f"CREATE TABLE {name} (g INTEGER, x DOUBLE)")
    con.executemany(f"INSERT INTO {name} VALUES (?, ?)", [(int(groups[i]), float(values[i])) for i in order])


def _exact(values) -> tuple:
    """Mean and population variance of doubles in exact arithmetic, rounded once."""
    exact = [Fraction(float(v)) for v in values]
    mean = sum(exact) / len(exact)
    return float(mean), float(sum((v - mean) ** 2 for v in exact) / len(exact))


@pytest.fixture
def adversarial():
    """Values whose float sum depends on the order they are added in: a large mean with a small
    spread, and magnitudes 10^8 apart."""
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [1e6 + rng.normal(0, 1e-3, 3000), rng.normal(0, 1e-2, 3000) * 10.0 ** rng.integers(-8, 1, 3000)]
    )
    groups = rng.integers(0, 3, len(values))
    return values, groups


def test_moments_are_the_same_bits_in_any_row_order_and_thread_count(adversarial):
    values, groups = adversarial
    con = duckdb.connect()
    rng = np.random.default_rng(1)
    results, plain = [], set()
    for k in range(4):
        order = rng.permutation(len(values))
        _table(con, f"t{k}", values, groups, order)
        con.execute(f"SET threads = {1 + k % 2}")
        results.append(exact_moments(con, ["x"], f"t{k}", group="g"))
        plain.add(con.execute(f"SELECT sum(x) FROM t{k}").fetchone()[0])
    assert len(plain) > 1, "the data should make DuckDB's float sum depend on the order"
    assert all(result == results[0] for result in results[1:])


def test_moments_are_within_the_grid_of_exact_arithmetic(adversarial):
    """A mean is the exact mean of the values rounded onto their grid: within half a step of the
    values' own; a variance is taken about that mean, so a large mean leaves a small spread's
    variance accurate."""
    values, groups = adversarial
    con = duckdb.connect()
    _table(con, "t", values, groups, np.arange(len(values)))
    found = exact_moments(con, ["x", "x * 2", "CASE WHEN g = 0 THEN NULL ELSE x END"], "t", group="g")
    step = 2.0 ** -grid_bits(np.abs(values).max(), len(values))
    everything = found[None]
    mean, var = _exact(values)
    assert everything[0].count == len(values)
    assert (everything[0].low, everything[0].high) == (values.min(), values.max())
    assert abs(everything[0].mean - mean) <= step / 2 and everything[1].mean == 2 * everything[0].mean
    assert everything[0].var == pytest.approx(var, rel=1e-9)
    for g in range(3):
        mean_g, var_g = _exact(values[groups == g])
        assert found[g][0].count == int((groups == g).sum())
        assert abs(found[g][0].mean - mean_g) <= step / 2 and found[g][0].var == pytest.approx(
            var_g, rel=1e-9
        )
    # NULLs are skipped, as SQL aggregates skip them; a group with none of a value has no moments
    assert everything[2].count == int((groups != 0).sum())
    assert abs(everything[2].mean - _exact(values[groups != 0])[0]) <= step / 2
    assert found[0][2].count == 0 and found[0][2].mean is None and found[0][2].var is None
    # a large mean with a tiny spread: the variance is still right to 1e-6
    tight = values[:3000]
    _table(con, "tight", tight, np.zeros(len(tight)), np.arange(len(tight)))
    (moments,) = exact_moments(con, ["x"], "tight")[None]
    assert moments.var == pytest.approx(_exact(tight)[1], rel=1e-6) and moments.var < 2e-6


def test_moments_without_rows_or_groups():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (g INTEGER, x DOUBLE)")
    assert exact_moments(con, ["x"], "t")[None][0].count == 0
    assert list(exact_moments(con, ["x"], "t", group="g")) == [None]
    con.execute("INSERT INTO t VALUES (1, 2.5), (1, 2.5)")
    (moments,) = exact_moments(con, ["x"], "t")[None]
    assert (moments.mean, moments.var, moments.low, moments.high) == (2.5, 0.0, 2.5, 2.5)


def test_grid_sums_are_the_same_in_any_order_windows_included():
    """What the ordered target statistics sum: running sums over rows whose order among equal
    timestamps is arbitrary."""
    rng = np.random.default_rng(2)
    values = rng.random(2000) * 10.0 ** rng.integers(-6, 3, 2000)
    con = duckdb.connect()
    bits = grid_bits(values.max(), len(values))
    running = "OVER (ORDER BY g RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW EXCLUDE GROUP)"
    grid, plain = set(), set()
    for k in range(3):
        _table(con, f"t{k}", values, np.arange(len(values)) // 500, rng.permutation(len(values)))
        grid.add(con.execute(f"SELECT {fixed_sum('x', bits)} FROM t{k}").fetchone())
        # every row's running sum over the earlier groups, keyed by the row's value
        grid.add(
            tuple(sorted(con.execute(f"SELECT x, {fixed_total('x', bits, running)} FROM t{k}").fetchall()))
        )
        plain.add(con.execute(f"SELECT sum(x) FROM t{k}").fetchone())
    assert len(plain) > 1, "the data should make DuckDB's float sum depend on the order"
    assert len(grid) == 2  # one total and one set of running sums, whatever the order
    with pytest.raises(ValueError, match="inf"):
        grid_bits(float("inf"), 3)
