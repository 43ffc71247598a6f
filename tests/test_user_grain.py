"""The users table's columns encoded once per user give what the per-row expressions give."""

import json
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import study_config, study_files
from engagerec.data.fitting import Reads
from engagerec.data.manifest import MANIFEST_FILE
from engagerec.data.prepare import prepare
from engagerec.data.schema import VOCAB_DIR
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
    reads = {
        "gender": Reads("gender", (0,)),
        "age": Reads("age"),
        "row": Reads("__src"),
        "recent": Reads(None),
    }
    per_user = encode_per_user(con, grain, {"gender": "VARCHAR", "age": "DOUBLE"}, expressions, reads, JOINS)
    assert set(per_user) == {"gender", "age"}  # the log's own column and the history stay per row
    expected = con.execute(f"SELECT e.__src, {GENDER}, {AGE} FROM events e {JOINS[0]} ORDER BY 1").fetchall()
    got = con.execute(
        f"SELECT e.__src, {per_user['gender']}, {per_user['age']} FROM "
        f"(SELECT __src, __user_key FROM events) e {per_user_join('e')} ORDER BY 1"
    ).fetchall()
    assert got == expected
    assert [row[1:] for row in got] == [(1, -1.0), (2, 0.0), (0, 1.0), (0, 0.0), (1, -1.0), (0, 0.0)]


def test_nothing_is_encoded_per_user_when_no_expression_reads_a_user_column():
    con = duckdb.connect()
    con.execute("CREATE TABLE users AS SELECT 1 AS user_id, 20.0 AS age")
    grain = UserGrain(("age",), 'SELECT "user_id" AS __user_key, "age" AS "age" FROM users', False)
    expressions = {"rating": 'e."rating"', "recent": "h.recent"}
    reads = {"rating": Reads("rating"), "recent": Reads(None)}
    assert encode_per_user(con, grain, {"age": "DOUBLE"}, expressions, reads, []) == {}
    assert (
        con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'user_encoded'").fetchone()[0]
        == 0
    )


def test_a_user_without_kept_rows_is_never_encoded():
    """A user no event holds is left out of the per-user table, as it never reached a per-row
    expression: its value (1e300, past FLOAT's range) would otherwise fail the whole encoding."""
    con = duckdb.connect()
    con.execute("CREATE TABLE users AS SELECT * FROM (VALUES (1, 20.0), (2, 1e300)) t(user_id, age)")
    con.execute("CREATE TABLE staged AS SELECT * FROM (VALUES (0, 1), (1, 3)) t(__src, user_id)")
    grain = UserGrain(("age",), 'SELECT "user_id" AS __user_key, "age" AS "age" FROM users', False)
    con.execute(
        f"CREATE VIEW events AS SELECT staged.*, {', '.join(grain.view_columns())} "
        f"FROM staged {grain.view_join('staged')}"
    )
    per_user = encode_per_user(con, grain, {"age": "DOUBLE"}, {"age": AGE}, {"age": Reads("age")}, [])
    assert con.execute(f"SELECT __user_key, {per_user['age']} FROM user_encoded u ORDER BY 1").fetchall() == [
        (1, -1.0),
        (None, 0.0),  # user 3, whom the table lacks
    ]


def _data_files(out: Path) -> dict:
    """Every file a preparation wrote, less schema.json (its summary holds timings), by CRC-32."""
    files = json.loads((out / MANIFEST_FILE).read_text())["files"]
    return {name: entry["crc32"] for name, entry in files.items() if name != "schema.json"}


def _prepared_files(tmp_path: Path, name: str, users=None, content=None) -> dict:
    (tmp_path / name).mkdir()
    files = study_files(tmp_path / name, users=users, content=content)
    prepare(study_config(files).data, tmp_path / name / "out")
    return _data_files(tmp_path / name / "out")


def _users(**extra) -> pd.DataFrame:
    return pd.DataFrame(
        {"user_id": range(4), "age": [20, 30, 40, 50], "gender": ["F", "M", "F", "M"], **extra}
    )


def test_users_without_rows_change_no_byte_of_the_preparation(tmp_path):
    """Users the log never names, one of them with values no feature could encode (an age past
    FLOAT's range), leave every file of the preparation as it was."""
    extra = pd.DataFrame({"user_id": [98, 99], "age": [1e300, 33.0], "gender": ["X", "F"]})
    with_extra = _prepared_files(tmp_path, "extra", users=pd.concat([_users(), extra], ignore_index=True))
    assert with_extra == _prepared_files(tmp_path, "plain", users=_users())


def test_a_users_duration_column_is_not_the_ratios_duration(tmp_path):
    """The log has no duration, so the watch ratio (and the duration feature) read the content
    table's; a users table with a duration column of its own changes nothing."""
    with_duration = _prepared_files(tmp_path, "duration", users=_users(duration=[1.0, 2.0, 3.0, 4.0]))
    assert with_duration == _prepared_files(tmp_path, "plain", users=_users())


def test_multi_hot_tokens_that_look_like_sql_aliases_are_plain_tokens(tmp_path):
    """Tokens such as 'h.264' and 'j0.1' (the history table's and a vocabulary join's aliases)
    are written as the vocabulary's ids like any other token."""
    genres = ["h.264,j0.1", "2", "3", "h.264", "", "4,5"]
    content = pd.DataFrame(
        {
            "content_id": range(6),
            "genres": genres,
            "rating": [3.0] * 6,
            "duration": [60, 120, 30, 90, 45, 300],
        }
    )
    files = study_files(tmp_path, content=content)
    prepare(study_config(files).data, tmp_path / "out")
    vocab = {
        name: pq.read_table(tmp_path / "out" / VOCAB_DIR / f"{name}.parquet").column("token").to_pylist()
        for name in ("genres", "content_id")
    }
    rows = pq.read_table(tmp_path / "out" / "train").to_pandas()
    got = {
        vocab["content_id"][c - 1]: [vocab["genres"][g - 1] for g in ids]
        for c, ids in zip(rows.content_id, rows.genres, strict=True)
    }
    assert got == {c: [t for t in genres[c].split(",") if t] for c in got}
    assert {"h.264", "j0.1"} <= set(vocab["genres"])
