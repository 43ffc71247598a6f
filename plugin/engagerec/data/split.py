"""Seeded splits as SQL: random (the study's protocol), temporal and by user.

Each is an ordering of the kept rows cut at exact sizes: the last round(n * test_fraction)
rows are test, then the last round(rest * val_fraction) of the rest validate (validation
is always carved from train, never from test).

  random    rows ordered by a seeded hash of their source row
  temporal  rows ordered by (timestamp, source row): the latest rows are test
  user      users (in order of first appearance) permuted by numpy's seeded generator,
            the same way for any engine; each user's rows go where the user goes
"""

from __future__ import annotations

import duckdb
import numpy as np

from engagerec.config import SplitConfig
from engagerec.data.errors import DataError
from engagerec.data.raw import TIMESTAMP, USER_ID
from engagerec.data.tables import quote

SPLIT_KINDS = ("random", "temporal", "user")


def seeded_key(seed: int, row: str = "__src") -> str:
    """A SQL key that puts rows in a seeded pseudo-random order. DuckDB's hash of one integer
    mixes well (hash(row, seed) of two does not: nearby seeds give nearly one order), so the
    seed goes into the integer; rows are < 2^32 per dataset."""
    return f"hash({row} + {int(seed)} * 4294967296)"


def seeded_order(seed: int, row: str = "__src") -> str:
    """ORDER BY terms for the seeded order of ``seeded_key`` (ties, if any, by row)."""
    return f"{seeded_key(seed, row)}, {row}"


SPLIT_NAMES = ("train", "val", "test")  # __split codes 0, 1, 2


def cut_points(n: int, test_fraction: float, val_fraction: float) -> "tuple[int, int]":
    """(train end, val end) positions in an ordering of n rows."""
    head = n - int(round(n * test_fraction))
    train = head - int(round(head * val_fraction))
    return train, head


def _cut_case(con: duckdb.DuckDBPyConnection, key: str, kept: str, n: int, cfg: SplitConfig) -> str:
    """Split codes by position in the ordering by (``key``, __src), without sorting the wide
    rows: the (key, __src) values found at the two cut positions (a narrow query) become
    constants, and a row's split is a comparison with them."""
    train_end, val_end = cut_points(n, cfg.test_fraction, cfg.val_fraction)
    if train_end == 0:
        raise DataError(
            f"the {cfg.kind} split left no training rows ({n} rows in all)",
            expected="more rows or smaller test/val fractions",
        )

    def at_or_after(position: int) -> str:
        if position >= n:
            return "FALSE"
        value, src = con.execute(
            f"SELECT {key} AS k, __src FROM staged WHERE {kept} ORDER BY k, __src LIMIT 1 OFFSET {position}"
        ).fetchone()
        return f"({key} > {value!r} OR ({key} = {value!r} AND __src >= {src}))"

    return f"(CASE WHEN {at_or_after(val_end)} THEN 2 WHEN {at_or_after(train_end)} THEN 1 ELSE 0 END)"


def split_sql(
    con: duckdb.DuckDBPyConnection, cfg: SplitConfig, rows: int, kept: str, has_timestamp: bool
) -> str:
    """A SQL expression giving each kept row of ``staged`` its split code (0 train, 1 val, 2 test).

    ``kept`` is the WHERE condition of the kept rows; ``rows`` their number.
    """
    if cfg.kind not in SPLIT_KINDS:
        raise DataError(f"unknown split kind '{cfg.kind}'", expected=f"one of {SPLIT_KINDS}")
    if not 0 <= cfg.seed < 2**31:  # the seed is packed beside the row number in one hash input
        raise DataError(f"split.seed = {cfg.seed}", expected="an integer in [0, 2^31)")
    for name in ("test_fraction", "val_fraction"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise DataError(f"split.{name} = {value}", expected="a fraction in [0, 1)")
    if cfg.kind == "random":
        return _cut_case(con, seeded_key(cfg.seed), kept, rows, cfg)
    if cfg.kind == "temporal":
        if not has_timestamp:
            raise DataError(
                "a temporal split needs a timestamp column",
                column=TIMESTAMP,
                expected="data.source.columns.timestamp to name it",
            )
        return _cut_case(con, quote(TIMESTAMP), kept, rows, cfg)
    users = [
        u
        for (u,) in con.execute(
            f"SELECT {quote(USER_ID)} FROM staged WHERE {kept} GROUP BY {quote(USER_ID)} ORDER BY min(__src)"
        ).fetchall()
    ]
    order = np.random.default_rng(cfg.seed).permutation(len(users))
    train_end, val_end = cut_points(len(users), cfg.test_fraction, cfg.val_fraction)
    if train_end == 0:
        raise DataError(
            f"the user split left no training users ({len(users)} users)",
            expected="more users or smaller test/val fractions",
        )
    codes = np.zeros(len(users), dtype=np.int8)
    codes[order[train_end:val_end]] = 1
    codes[order[val_end:]] = 2
    import pyarrow as pa

    mapping = pa.table({"user": pa.array(users), "code": pa.array(codes)})  # noqa: F841 (read by DuckDB)
    con.execute("CREATE OR REPLACE TABLE user_split AS SELECT * FROM mapping")
    return f"(SELECT code FROM user_split WHERE user_split.user = staged.{quote(USER_ID)})"
