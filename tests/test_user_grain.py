"""The users table's columns encoded once per user give what the per-row expressions give."""

import duckdb
import pytest

from engagerec.data.user_grain import UserGrain, encode_per_user, per_user_join

GENDER = "CAST(coalesce(j0.idx, 0) AS INTEGER)"  # a vocabulary lookup of a user column
AGE = 'CAST((coalesce(e."age", 30.0) - 30.0) / 10.0 AS FLOAT)'  # a standardised user number
JOINS = ['LEFT JOIN vocab_0 j0 ON j0.token = CAST(e."gender" AS VARCHAR)']


@pytest.mark.parametrize("text_keys", [False, True])
def test_per_user_codes_equal_the_per_row_expressions(text_keys):
    """Known users (one with missing columns), a user the table lacks, a row without a user:
    each row reads through the per-user tables what the expression gives on its own row."""
    con = duckdb.connect()
    key_type = "VARCHAR" if text_keys else "BIGINT"
    con.execute(
        f"CREATE TABLE users AS SELECT CAST(u AS {key_type}) AS user_id, gender, age "
        "FROM (VALUES (1, 'F', 20.0), (2, 'M', NULL), (3, NULL, 40.0)) t(u, gender, age)"
    )
    con.execute(
        "CREATE TABLE staged AS SELECT * FROM (VALUES (0, 1), (1, 2), (2, 3), (3, 9), (4, 1), (5, NULL)) "
        "t(__src, user_id)"
    )
    key = 'CAST("user_id" AS VARCHAR)' if text_keys else '"user_id"'
    grain = UserGrain(
        ("gender", "age"),
        f'SELECT {key} AS __user_key, "gender" AS "gender", "age" AS "age" FROM users',
        text_keys,
    )
    con.execute(
        f"CREATE VIEW events AS SELECT staged.*, {', '.join(grain.view_columns())} "
        f"FROM staged {grain.view_join('staged')}"
    )
    con.execute("CREATE TABLE vocab_0 AS SELECT * FROM (VALUES ('F', 1), ('M', 2)) t(token, idx)")
    expressions = {"gender": GENDER, "age": AGE, "row": "e.__src", "recent": "h.recent"}
    per_user = encode_per_user(con, grain, {"gender": "VARCHAR", "age": "DOUBLE"}, expressions, JOINS)
    assert set(per_user) == {"gender", "age"}  # the log's own column and the history stay per row
    expected = con.execute(f"SELECT e.__src, {GENDER}, {AGE} FROM events e {JOINS[0]} ORDER BY 1").fetchall()
    got = con.execute(
        f"SELECT e.__src, {per_user['gender']}, {per_user['age']} FROM "
        f"(SELECT __src, __user_key FROM events) e {per_user_join('e')} ORDER BY 1"
    ).fetchall()
    assert got == expected
    assert [row[1:] for row in got] == [(1, -1.0), (2, 0.0), (0, 1.0), (0, 0.0), (1, -1.0), (0, 0.0)]


def test_nothing_is_encoded_per_user_when_no_expression_reads_only_user_columns():
    con = duckdb.connect()
    con.execute("CREATE TABLE users AS SELECT 1 AS user_id, 20.0 AS age")
    grain = UserGrain(("age",), 'SELECT "user_id" AS __user_key, "age" AS "age" FROM users', False)
    mixed = {"age_and_row": 'e."age" + e.__src'}  # a user column beside a row's own
    assert encode_per_user(con, grain, {"age": "DOUBLE"}, mixed, []) == {}
    assert (
        con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'user_encoded'").fetchone()[0]
        == 0
    )
