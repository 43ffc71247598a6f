"""Properties of the data layer over generated inputs (hypothesis): the reader yields exactly
what the shards hold on any number of ranks, splits are disjoint and complete, history sees only
strictly earlier views, and scoring encodes rows as prepare did."""

import json
import shutil
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engagerec.config import SplitConfig, config_from_dict
from engagerec.data.errors import DataError
from engagerec.data.history import build_history_table
from engagerec.data.jagged import gather_rows
from engagerec.data.manifest import write_manifest
from engagerec.data.prepare import prepare
from engagerec.data.reader import ShardReader
from engagerec.data.schema import DatasetSchema, DenseFeature, LabelSpec, SparseFeature
from engagerec.data.scoring import encode_for_scoring
from engagerec.data.shards import ShardWriter
from engagerec.data.split import split_sql

# derandomize: CI runs the same examples every time (a red CI is never a coin toss)
SLOW = settings(
    max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 50),  # a single id
        st.lists(st.integers(0, 9), max_size=4),  # a list of ids (history, genres)
        st.floats(-5, 5, allow_nan=False, width=32),  # a dense value
        st.one_of(st.just(float("nan")), st.floats(0, 1, width=32)),  # a label, sometimes missing
    ),
    min_size=1,
    max_size=120,
)


def _write_shards(directory: Path, rows, rows_per_file: int, row_group: int) -> None:
    """A prepared directory holding ``rows`` as its train split (what prepare would write)."""
    table = pa.table(
        {
            "item": pa.array([r[0] for r in rows], pa.int32()),
            "history": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
            "x": pa.array([r[2] for r in rows], pa.float32()),
            "y": pa.array([r[3] for r in rows], pa.float32()),
        }
    )
    writer = ShardWriter(directory / "train", rows_per_file, row_group)
    writer.write(table)
    files = writer.close(table.schema)
    DatasetSchema(
        features=[],
        sparse=[SparseFeature("item", "item", multi=False), SparseFeature("history", "item", multi=True)],
        dense=[DenseFeature("x", "x", "none", 0.0, 1.0, None)],
        labels=[LabelSpec("y", "regression")],
        vocab_sizes={"item": 50},
        meta={"splits": {"train": {"rows": len(rows), "files": files}}},
    ).save(directory)
    write_manifest(directory, {f"train/{name}": n for name, n in zip(files, writer.file_rows, strict=True)})


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    lists=st.lists(st.lists(st.integers(-5, 99), max_size=5), max_size=30),
    length=st.one_of(st.none(), st.integers(0, 4)),
    picks=st.lists(st.integers(0, 10**6), max_size=40),
    prefix=st.integers(0, 3),
)
def test_gather_rows_selects_exactly_the_rows_asked_for(lists, length, picks, prefix):
    if length is not None:  # every list as long as the others: the whole-row copy path
        lists = [(ids + [7] * length)[:length] for ids in lists]
    # values before offsets[0] belong to no row and must never come out
    values = np.array([-1] * prefix + [v for ids in lists for v in ids], dtype=np.int32)
    offsets = prefix + np.concatenate([[0], np.cumsum([len(ids) for ids in lists])]).astype(np.int64)
    rows = np.array([p % len(lists) for p in picks] if lists else [], dtype=np.int64)

    new_offsets, new_values = gather_rows(offsets, values, rows)

    wanted = [lists[r] for r in rows]  # any order, repeats included
    assert new_offsets.tolist() == np.concatenate([[0], np.cumsum([len(ids) for ids in wanted])]).tolist()
    assert new_values.dtype == values.dtype
    got = [new_values[a:b].tolist() for a, b in zip(new_offsets[:-1], new_offsets[1:], strict=True)]
    assert got == wanted


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    batches=st.lists(st.integers(0, 30), max_size=8),
    rows_per_file=st.integers(1, 40),
    row_group_size=st.integers(1, 12),
)
def test_the_shard_writer_cuts_row_groups_of_the_configured_size_from_batches_of_any_size(
    batches, rows_per_file, row_group_size
):
    directory = Path(tempfile.mkdtemp())
    try:
        writer = ShardWriter(directory, rows_per_file, row_group_size)
        total = 0
        for rows in batches:  # as DuckDB streams them: any sizes, empty ones included
            writer.write(pa.table({"x": np.arange(total, total + rows, dtype=np.int64)}))
            total += rows
        files = writer.close(pa.schema([("x", pa.int64())]))

        def cut(rows: int, size: int) -> list:
            return [size] * (rows // size) + ([rows % size] if rows % size else [])

        assert writer.file_rows == (cut(total, rows_per_file) or [0])  # an empty split: one empty file
        values = []
        for name, rows in zip(files, writer.file_rows, strict=True):
            shard = pq.ParquetFile(directory / name)
            groups = [shard.metadata.row_group(g).num_rows for g in range(shard.metadata.num_row_groups)]
            assert groups == cut(rows, row_group_size)  # only each file's last group may be short
            values += shard.read().column("x").to_pylist()
        assert values == list(range(total))
    finally:
        shutil.rmtree(directory)


@SLOW
@given(
    rows=rows_strategy,
    rows_per_file=st.integers(1, 50),
    row_group=st.integers(1, 20),
    batch_size=st.integers(1, 40),
    world_size=st.integers(1, 4),
)
def test_the_reader_yields_every_row_once_in_order_on_any_number_of_ranks(
    rows, rows_per_file, row_group, batch_size, world_size
):
    directory = Path(tempfile.mkdtemp())
    try:
        _write_shards(directory, rows, rows_per_file, row_group)
        seen, batches = [], set()
        for rank in range(world_size):
            reader = ShardReader(
                directory, "train", batch_size, rank=rank, world_size=world_size, even_batches=True
            )
            count = 0
            for batch in reader:
                count += 1
                real = batch.weights.gt(0)
                jagged = batch.sparse_features.to_dict()
                lengths = jagged["history"].lengths().tolist()
                values = jagged["history"].values().tolist()
                starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
                for i in range(batch.batch_size):
                    if not real[i]:  # padding repeats a row at weight 0 and weighs nothing
                        assert float(batch.label_weights["y"][i]) == 0
                        continue
                    present = bool(batch.label_weights["y"][i] > 0)
                    seen.append(
                        (
                            int(jagged["item"].values()[i]),
                            values[starts[i] : starts[i + 1]],
                            float(batch.dense_features[i, 0]),
                            float(batch.labels["y"][i]) if present else None,
                        )
                    )
            batches.add(count)
        assert len(batches) == 1  # every rank steps through as many batches (lock-step evaluation)
        written = [
            (r[0], r[1], float(np.float32(r[2])), None if np.isnan(r[3]) else float(np.float32(r[3])))
            for r in rows
        ]
        assert seen == written
    finally:
        shutil.rmtree(directory)


@SLOW
@given(
    n=st.integers(1, 400),
    kind=st.sampled_from(["random", "temporal", "user"]),
    test_fraction=st.floats(0, 0.6),
    val_fraction=st.floats(0, 0.3),
    seed=st.integers(0, 2**31 - 1),
    users=st.integers(1, 30),
)
def test_splits_are_disjoint_complete_and_temporal_splits_respect_time(
    n, kind, test_fraction, val_fraction, seed, users
):
    con = duckdb.connect()
    rng = np.random.default_rng(seed)
    staged = pd.DataFrame(  # noqa: F841 (read by DuckDB)
        {"__src": np.arange(n), "user_id": rng.integers(0, users, n), "timestamp": rng.integers(0, 50, n)}
    )
    con.execute("CREATE TABLE staged AS SELECT * FROM staged")
    cfg = SplitConfig(kind=kind, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    try:
        expression = split_sql(con, cfg, n, "TRUE", has_timestamp=True)
    except DataError as err:  # a user split with too few users says so
        assert "left no training users" in str(err)
        return
    codes = con.execute(f"SELECT __src, {expression} AS s, user_id, timestamp FROM staged").df()
    assert len(codes) == n and set(codes["s"]) <= {0, 1, 2}  # every row in exactly one split
    assert (codes["s"] == 0).any()  # something to train on
    # the sizes the config asks for (split.py's definition): round(n * test_fraction) test, then
    # round(rest * val_fraction) of the rest validate; counted in rows, or in users for "user"
    units = codes.groupby("user_id")["s"].first() if kind == "user" else codes["s"]
    test = int(round(len(units) * test_fraction))
    val = int(round((len(units) - test) * val_fraction))
    assert [int((units == code).sum()) for code in (0, 1, 2)] == [len(units) - test - val, val, test]
    if kind == "temporal":  # nothing in a later split happened before anything in an earlier one
        for earlier, later in ((0, 1), (1, 2), (0, 2)):
            a, b = codes[codes.s == earlier], codes[codes.s == later]
            if len(a) and len(b):
                assert a["timestamp"].max() <= b["timestamp"].min()
    if kind == "user":  # a user's rows stay together
        assert (codes.groupby("user_id")["s"].nunique() == 1).all()


def test_a_random_split_takes_each_row_with_the_configured_probability():
    """The random split cuts a seeded pseudo-random order at exact sizes: its fractions are the
    config's, and every stretch of source rows meets them too (within 5 binomial standard
    deviations), as a random sample would; a split cut by position would not."""
    n, blocks, test_fraction, val_fraction = 20_000, 10, 0.3, 0.1
    con = duckdb.connect()
    staged = pd.DataFrame({"__src": np.arange(n)})  # noqa: F841 (read by DuckDB)
    con.execute("CREATE TABLE staged AS SELECT * FROM staged")
    for seed in (0, 1, 7):
        cfg = SplitConfig(kind="random", test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
        codes = con.execute(
            f"SELECT {split_sql(con, cfg, n, 'TRUE', has_timestamp=False)} FROM staged ORDER BY __src"
        ).fetchnumpy()
        codes = next(iter(codes.values()))
        assert np.bincount(codes, minlength=3).tolist() == [12_600, 1_400, 6_000]  # 70/30, then 10% of 70
        per_block = n // blocks
        for block in np.split(codes, blocks):
            share = (block == 2).mean()
            assert abs(share - test_fraction) <= 5 * np.sqrt(test_fraction * (1 - test_fraction) / per_block)
            rest = block[block != 2]
            val_share = (rest == 1).mean()
            assert abs(val_share - val_fraction) <= 5 * np.sqrt(val_fraction * (1 - val_fraction) / len(rest))


@SLOW
@given(
    views=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 8), st.integers(1, 99)), min_size=1, max_size=60
    ),
    length=st.integers(1, 6),
)
def test_history_holds_only_strictly_earlier_views_of_the_same_user(views, length):
    con = duckdb.connect()
    events = pd.DataFrame(views, columns=["u", "t", "item"]).assign(src=lambda f: np.arange(len(f)))  # noqa: F841
    con.execute("CREATE TABLE events AS SELECT * FROM events")
    build_history_table(
        con,
        "history",
        "SELECT src AS __src, 0 AS __split, u AS __u, t AS __t, item AS __v0 FROM events",
        [("history", "list", length, "[]::INTEGER[]")],
    )
    got = dict(con.execute("SELECT __src, history FROM history").fetchall())
    for src, (user, time, _) in enumerate(views):
        earlier = [(t, s, item) for s, (u, t, item) in enumerate(views) if u == user and t < time]
        expected = [item for _, _, item in sorted(earlier)][-length:]  # the newest `length`, oldest first
        assert got[src] == expected


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 10_000),
    text_ids=st.booleans(),
    min_count=st.integers(1, 3),
)
def test_scoring_encodes_every_row_as_prepare_did(tmp_path, seed, text_ids, min_count):
    """Generated tables with numeric or text ids, rare ids below min_count (the OOV row), repeated
    timestamps and empty genres: prepare's shards and the scoring encoder agree on every row."""
    rng = np.random.default_rng(seed)
    n = 300
    users = pd.DataFrame(
        {"user_id": np.arange(12), "age": rng.integers(15, 70, 12), "gender": rng.choice(["F", "M"], 12)}
    )
    content = pd.DataFrame(
        {
            "content_id": np.arange(40),
            "genres": rng.choice(["1,2", "2", "", "3,4", "5"], 40),
            "rating": rng.uniform(1, 5, 40).round(2),
            "duration": rng.integers(10, 300, 40),
        }
    )
    log = pd.DataFrame(
        {
            "user_id": rng.integers(0, 12, n),
            "content_id": rng.zipf(1.5, n) % 40,
            "timestamp": rng.integers(0, 60, n),
        }
    )
    log["watch_time"] = rng.uniform(0, 1.2, n) * content.duration[log.content_id].to_numpy()
    if text_ids:
        for frame in (users, log):
            frame["user_id"] = "u" + frame["user_id"].astype(str)
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    files = {}
    for name, frame in (("interactions", log), ("users", users), ("content", content)):
        frame.to_csv(directory / f"{name}.csv", index=False)
        files[name] = str(directory / f"{name}.csv")
    cfg = config_from_dict(
        {
            "data": {
                "source": {"adapter": "study", **files},
                "features": [
                    {"name": "user_id", "min_count": min_count},
                    {"name": "content_id", "min_count": min_count},
                    {"name": "gender"},
                    {"name": "genres", "kind": "multi_hot"},
                    {"name": "history", "kind": "history", "of": "content_id", "length": 5},
                    {"name": "recent", "kind": "history_mean", "of": "watch_ratio", "length": 5},
                    {"name": "age", "kind": "numeric"},
                    {"name": "rating", "kind": "numeric"},
                    {"name": "duration", "kind": "numeric", "transform": "log1p", "buckets": 4},
                ],
                "filters": {"min_user_views": 0},
                "split": {"kind": "random", "test_fraction": 0.3, "val_fraction": 0.1, "seed": seed},
            }
        }
    )
    prepare(cfg.data, directory / "prepared")
    summary = encode_for_scoring(
        cfg.data, directory / "prepared", files["interactions"], directory / "scored"
    )
    assert summary["rows_scored"] == n

    def rows(path, splits):
        frame = pd.concat([ds.dataset(path / s).to_table().to_pandas() for s in splits], ignore_index=True)
        for column in ("genres", "history"):
            frame[column] = frame[column].map(tuple)
        return frame.round(5).sort_values(list(frame.columns)).reset_index(drop=True)

    fitted, scored = (
        rows(directory / "prepared", ["train", "val", "test"]),
        rows(directory / "scored", ["test"]),
    )
    pd.testing.assert_frame_equal(scored, fitted, check_exact=False, atol=1e-5)
    schema = json.loads((directory / "scored" / "schema.json").read_text())
    assert (
        schema["vocab_sizes"]
        == json.loads((directory / "prepared" / "schema.json").read_text())["vocab_sizes"]
    )
