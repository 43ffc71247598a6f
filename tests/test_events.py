"""Labels, filters, splits and history on small hand-made tables, through the one writer."""

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import study_config, study_files, write_csv
from engagerec.data.adapters import load_tables
from engagerec.data.errors import DataError
from engagerec.data.events import build_events
from engagerec.data.prepare import prepare
from engagerec.data.schema import DatasetSchema


def _rows(out, split):
    return pq.read_table(out / split).to_pandas()


def _all_rows(out):
    return pd.concat([_rows(out, s).assign(split=s) for s in ("train", "val", "test")], ignore_index=True)


def _ratio_config(tmp_path, **data):
    interactions = pd.DataFrame(
        {
            "user_id": [0] * 4,
            "content_id": [0] * 4,
            "watch_time": [0.0, 20.0, 50.0, 150.0],
            "timestamp": range(4),
        }
    )
    content = pd.DataFrame({"content_id": [0], "genres": ["1"], "rating": [3.0], "duration": [100.0]})
    files = study_files(tmp_path, interactions=interactions, content=content)
    return study_config(
        files,
        features=[{"name": "rating", "kind": "numeric"}],
        filters={"min_user_views": 0, "drop_zero_watch_time": False},
        split={"kind": "temporal", "test_fraction": 0.0, "val_fraction": 0.0},
        **data,
    )


@pytest.mark.parametrize("policy, expected", [("clip", [0, 0.2, 0.5, 1.0]), ("keep", [0, 0.2, 0.5, 1.5])])
def test_ratio_policies_and_skip_threshold(tmp_path, policy, expected):
    cfg = _ratio_config(tmp_path, watch_ratio={"ratio_cap": 1.0, "over_cap": policy})
    summary = prepare(cfg.data, tmp_path / "out")
    rows = _rows(tmp_path / "out", "train")
    assert sorted(rows["watch_ratio"].tolist()) == pytest.approx(expected)
    assert rows.sort_values("watch_ratio")["skip"].tolist() == [1, 1, 0, 0]  # 0.5 is not below 0.5
    assert summary["counted_not_dropped"][f"watch ratio above 1 ({policy})"] == 1


def test_over_cap_drop_and_any_number_of_skip_thresholds(tmp_path):
    cfg = _ratio_config(
        tmp_path,
        watch_ratio={"over_cap": "drop"},
        labels=[
            {"name": "watch_ratio"},
            {"name": "skip_03", "kind": "binary", "threshold": 0.3},
            {"name": "skip_06", "kind": "binary", "threshold": 0.6},
        ],
    )
    summary = prepare(cfg.data, tmp_path / "out")
    rows = _rows(tmp_path / "out", "train").sort_values("watch_ratio")
    assert summary["dropped"]["watch ratio above 1"] == 1 and len(rows) == 3
    assert rows["skip_03"].tolist() == [1, 1, 0] and rows["skip_06"].tolist() == [1, 1, 1]
    assert DatasetSchema.load(tmp_path / "out").label_names == ["watch_ratio", "skip_03", "skip_06"]


def test_rows_dropped_are_counted_by_reason(tmp_path):
    interactions = pd.DataFrame(
        {
            "user_id": [0] * 16 + [1] * 10,
            "content_id": [0, 1, 2, 3, 4, 5] * 4 + [0, 1],
            "watch_time": [30.0] * 12 + [np.nan, -1.0, 0.0, 10.0] + [5.0] * 10,
            "timestamp": range(26),
        }
    )
    content = pd.DataFrame(
        {
            "content_id": range(6),
            "genres": ["1"] * 6,
            "rating": [3.0] * 6,
            "duration": [60, 0, 30, -5, 45, np.nan],
        }
    )
    cfg = study_config(
        study_files(tmp_path, interactions=interactions, content=content),
        filters={"min_user_views": 3, "drop_zero_watch_time": True},
        split={"kind": "random", "test_fraction": 0.0, "val_fraction": 0.0},
    )
    summary = prepare(cfg.data, tmp_path / "out")
    content_of = interactions.content_id.to_numpy()
    dropped = summary["dropped"]
    assert dropped["missing duration"] == int((content_of == 5).sum())
    assert dropped["zero or negative duration"] == int(np.isin(content_of, [1, 3]).sum())
    ok = ~np.isin(content_of, [1, 3, 5])
    watch = interactions.watch_time.to_numpy()
    assert dropped["missing watch time"] == int((ok & np.isnan(watch)).sum())
    assert dropped["negative watch time"] == int((ok & (watch < 0)).sum())
    assert dropped["zero watch time"] == int((ok & (watch == 0)).sum())
    assert list(dropped)[-1] == "user has <= 3 views"  # in the order the filters ran
    assert (
        summary["rows_read"] == 26 and summary["rows_read"] - summary["rows_dropped"] == summary["rows_kept"]
    )
    assert summary["rows_kept"] == len(_all_rows(tmp_path / "out"))


@pytest.mark.parametrize("text_keys", [False, True])
def test_each_row_reads_its_own_users_columns(tmp_path, text_keys):
    """The users table's columns reach the events by a join at read time: every row gets its
    user's values, a user missing from the table (kept) gets NULLs, and no row is added or lost.
    With text_keys the table's ids are text while the log's are numbers (matched as text)."""
    files = study_files(tmp_path)
    log = pd.read_csv(files["interactions"])
    log = pd.concat([log, log.head(5).assign(user_id=7)], ignore_index=True)  # user 7: no row
    users = pd.read_csv(files["users"])
    if text_keys:  # a non-numeric id makes the column text
        users = pd.concat([users, pd.DataFrame({"user_id": ["x9"], "age": [60], "gender": ["F"]})])
    files["interactions"] = write_csv(tmp_path / "interactions.csv", log)
    files["users"] = write_csv(tmp_path / "users.csv", users)
    cfg = study_config(
        files,
        filters={"min_user_views": 0, "drop_zero_watch_time": False},
        source={"adapter": "study", **files, "unjoined_users": "keep"},
    ).data
    con = duckdb.connect()
    events = build_events(con, load_tables(cfg.source, tmp_path / "work"), cfg)
    got = con.execute("SELECT user_id, age, gender FROM events ORDER BY __src").fetchall()
    by_user = {str(u): (a, g) for u, a, g in users[["user_id", "age", "gender"]].itertuples(index=False)}
    expected = [(u, *by_user.get(str(u), (None, None))) for u in log.user_id]
    assert [(int(u), a, g) for u, a, g in got] == [(u, a, g) for u, a, g in expected]
    assert events.rows == len(log)
    assert events.report.notes["user_id not in its table (kept, features missing)"] == 5


def test_min_user_views_keeps_users_with_more_than_n(tmp_path):
    interactions = pd.DataFrame(
        {
            "user_id": [0] * 10 + [1] * 11,
            "content_id": [0] * 21,
            "watch_time": [30.0] * 21,
            "timestamp": range(21),
        }
    )
    cfg = study_config(study_files(tmp_path, interactions=interactions))
    summary = prepare(cfg.data, tmp_path / "out")
    assert summary["all"]["users"] == 1 and summary["rows_kept"] == 11  # 10 views is not "more than ten"
    assert summary["dropped"]["user has <= 10 views"] == 10


def _events_files(tmp_path, n_users=20, per_user=30, seed=0):
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    interactions = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(n_users), per_user),
            "content_id": rng.integers(0, 6, n),
            "watch_time": rng.uniform(1, 30, n).round(2),
            "timestamp": rng.permutation(n).astype(float),
        }
    )
    users = pd.DataFrame({"user_id": range(n_users), "age": range(n_users), "gender": "F"})
    return interactions, study_files(tmp_path, interactions=interactions, users=users)


def _split_config(files, **split):
    return study_config(
        files,
        features=[{"name": "timestamp", "kind": "numeric"}, {"name": "age", "kind": "numeric"}],
        filters={"min_user_views": 0, "drop_zero_watch_time": False},
        split={"test_fraction": 0.3, "val_fraction": 0.1, **split},
    )


def _timestamps_by_split(out):
    schema = DatasetSchema.load(out)
    dense = schema.dense[0]  # timestamp, standardised: undo it
    return {
        s: _rows(out, s)["timestamp"].to_numpy() * dense.std + dense.mean for s in ("train", "val", "test")
    }


def test_random_split_is_seeded_exact_in_size_and_val_comes_from_train(tmp_path):
    _, files = _events_files(tmp_path)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        prepare(_split_config(files, kind="random", seed=seed).data, tmp_path / name)
        runs[name] = {k: np.sort(v) for k, v in _timestamps_by_split(tmp_path / name).items()}
    assert all(np.allclose(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not np.allclose(runs["a"]["test"], runs["c"]["test"])
    assert [len(runs["a"][k]) for k in ("train", "val", "test")] == [378, 42, 180]
    together = np.concatenate(list(runs["a"].values()))
    assert len(np.unique(np.round(together, 3))) == 600  # every row once


def test_temporal_split_never_trains_on_the_future(tmp_path):
    _, files = _events_files(tmp_path)
    prepare(_split_config(files, kind="temporal").data, tmp_path / "out")
    ts = _timestamps_by_split(tmp_path / "out")
    assert ts["train"].max() < ts["val"].min() <= ts["val"].max() < ts["test"].min()
    assert np.all(np.diff(ts["test"]) > 0)  # val and test are written in time order


def test_user_split_keeps_each_user_on_one_side(tmp_path):
    _, files = _events_files(tmp_path)
    prepare(
        _split_config(files, kind="user", test_fraction=0.3, val_fraction=0.2, seed=1).data, tmp_path / "o"
    )
    age = DatasetSchema.load(tmp_path / "o").dense[1]  # age = user id here: undo the standardisation
    users = {
        s: set(np.round(_rows(tmp_path / "o", s)["age"] * age.std + age.mean))
        for s in ("train", "val", "test")
    }
    assert not (users["train"] & users["test"]) and not (users["train"] & users["val"])
    assert not (users["val"] & users["test"])
    assert len(users["test"]) == 6 and sum(len(_rows(tmp_path / "o", s)) for s in users) == 600


def _relative_rows(tmp_path, split_kind, relative_to, quantile):
    _, files = _events_files(tmp_path)
    cfg = study_config(
        files,
        features=[{"name": "age", "kind": "numeric"}, {"name": "duration", "kind": "numeric"}],
        labels=[{"name": "watch_ratio"},
                {"name": "skip", "kind": "binary", "threshold": quantile, "relative_to": relative_to}],
        filters={"min_user_views": 0, "drop_zero_watch_time": False},
        split={"kind": split_kind, "test_fraction": 0.3, "val_fraction": 0.1, "seed": 2},
    )  # fmt: skip
    summary = prepare(cfg.data, tmp_path / "out")
    schema = DatasetSchema.load(tmp_path / "out")
    rows = _all_rows(tmp_path / "out")
    for dense in schema.dense:  # undo the standardisation: age = user id here, raw duration
        rows[dense.name] = (rows[dense.name] * dense.std + dense.mean).round(3)
    return rows, summary


@pytest.mark.parametrize("quantile", [0.5, 0.3])
def test_relative_skip_cuts_at_each_users_training_quantile(tmp_path, quantile):
    rows, _ = _relative_rows(tmp_path, "random", "user", quantile)
    train = rows[rows.split == "train"]
    cuts = train.groupby("age")["watch_ratio"].quantile(quantile)  # linear, as DuckDB's quantile_cont
    expected = rows["watch_ratio"] < rows["age"].map(cuts)
    assert (rows["skip"] == expected.astype(float)).all()
    assert 0.1 < rows["skip"].mean() < 0.9 and rows["age"].nunique() == 20


def test_relative_skip_falls_back_to_the_training_cut_for_unseen_users_and_counts_them(tmp_path):
    rows, summary = _relative_rows(tmp_path, "user", "user", 0.5)
    cut = np.quantile(rows.loc[rows.split == "train", "watch_ratio"], 0.5)
    held_out = rows[rows.split != "train"]
    assert (held_out["skip"] == (held_out["watch_ratio"] < cut).astype(float)).all()
    assert summary["counted_not_dropped"]["label 'skip': rows whose user has no training rows "
                                          "(the training split's cut)"] == len(held_out)  # fmt: skip


def test_relative_skip_by_duration_groups_by_power_of_two(tmp_path):
    rows, _ = _relative_rows(tmp_path, "random", "duration", 0.5)
    rows["group"] = np.floor(np.log2(rows["duration"]))
    cuts = rows[rows.split == "train"].groupby("group")["watch_ratio"].quantile(0.5)
    assert rows["group"].nunique() > 1
    assert (rows["skip"] == (rows["watch_ratio"] < rows["group"].map(cuts)).astype(float)).all()


def test_relative_skip_refuses_a_regression_label_or_a_threshold_outside_0_1(tmp_path):
    _, files = _events_files(tmp_path)
    for label in ({"name": "skip", "kind": "binary", "threshold": 1.0, "relative_to": "user"},
                  {"name": "skip", "kind": "regression", "relative_to": "user"}):  # fmt: skip
        cfg = study_config(files, labels=[{"name": "watch_ratio"}, label])
        with pytest.raises(DataError, match="relative_to user"):
            prepare(cfg.data, tmp_path / "out")


def test_scoring_refuses_a_recent_mean_of_a_relative_label_it_cannot_derive(tmp_path):
    from engagerec.data.scoring import encode_for_scoring

    _, files = _events_files(tmp_path)
    relative = {"name": "skip", "kind": "binary", "threshold": 0.5, "relative_to": "user"}
    features = [{"name": "age", "kind": "numeric"},
                {"name": "recent_skip", "kind": "history_mean", "of": "skip", "length": 5}]  # fmt: skip
    cfg = study_config(files, features=features, labels=[{"name": "watch_ratio"}, relative],
                       filters={"min_user_views": 0, "drop_zero_watch_time": False})  # fmt: skip
    prepare(cfg.data, tmp_path / "out")  # training derives it: fine
    with pytest.raises(DataError, match="averages label 'skip', which is relative_to user"):
        encode_for_scoring(cfg.data, tmp_path / "out", files["interactions"], tmp_path / "scored")


def test_history_holds_only_strictly_earlier_views_of_the_same_user(tmp_path):
    # user 0 watches 1, 2, 3 at t=0, 1, 1 (a tie) and 4 at t=2; user 1 watches 5 then 1
    interactions = pd.DataFrame(
        {
            "user_id": [0, 0, 0, 1, 0, 1],
            "content_id": [1, 2, 3, 5, 4, 1],
            "watch_time": [10.0, 20.0, 30.0, 40.0, 5.0, 50.0],
            "timestamp": [0, 1, 1, 0, 2, 5],
        }
    )
    content = pd.DataFrame(
        {"content_id": range(1, 6), "genres": ["1"] * 5, "rating": [3.0] * 5, "duration": [100.0] * 5}
    )
    cfg = study_config(
        study_files(tmp_path, interactions=interactions, content=content),
        features=[
            {"name": "content_id"},
            {"name": "history", "kind": "history", "of": "content_id", "length": 2},
            {"name": "recent_ratio", "kind": "history_mean", "of": "watch_ratio", "length": 2},
        ],
        filters={"min_user_views": 0, "drop_zero_watch_time": False},
        split={"kind": "temporal", "test_fraction": 0.0, "val_fraction": 0.0},
    )
    prepare(cfg.data, tmp_path / "out")
    schema = DatasetSchema.load(tmp_path / "out")
    vocab = schema.vocab(tmp_path / "out", "content_id")
    rows = _rows(tmp_path / "out", "train")  # temporal, no val/test: ordered by (time, source row)
    # the two views at t=1 see only the view at t=0, never each other; length 2 keeps the last two
    by_content = dict(zip(rows.content_id.map(lambda c: vocab[c - 1]), rows.history.map(list), strict=True))
    assert [vocab[h - 1] for h in by_content[2]] == [1] and [vocab[h - 1] for h in by_content[3]] == [1]
    assert [vocab[h - 1] for h in by_content[4]] == [2, 3]
    dense = schema.dense[0]
    recent = dict(
        zip(
            rows.content_id.map(lambda c: vocab[c - 1]),
            rows.recent_ratio * dense.std + dense.mean,
            strict=True,
        )
    )
    assert recent[4] == pytest.approx((0.2 + 0.3) / 2)  # mean watch ratio of the two views before it
    assert recent[2] == pytest.approx(0.1) and recent[3] == pytest.approx(0.1)


def test_rare_ids_go_to_the_oov_row_and_huge_id_spaces_are_hashed(tmp_path):
    interactions, files = _events_files(tmp_path)  # 6 content ids, drawn at random
    counts = interactions.content_id.value_counts()
    cutoff = int(counts.sort_values().iloc[2]) + 1  # at least the three rarest ids fall below it
    base = {"filters": {"min_user_views": 0, "drop_zero_watch_time": False}}
    base["split"] = {"kind": "random", "test_fraction": 0.0, "val_fraction": 0.0}
    cfg = study_config(files, features=[{"name": "content_id", "min_count": cutoff}], **base)
    prepare(cfg.data, tmp_path / "rare")
    schema = DatasetSchema.load(tmp_path / "rare")
    frequent = sorted(int(c) for c, n in counts.items() if n >= cutoff)
    assert schema.vocab(tmp_path / "rare", "content_id") == frequent
    encoded = _rows(tmp_path / "rare", "train")["content_id"]
    assert (encoded == 0).sum() == int(counts[counts < cutoff].sum())  # every rare view, counted once

    features = [{"name": "user_id", "hash_buckets": 7}, {"name": "age", "kind": "numeric"}]  # age = user here
    cfg = study_config(files, features=features, **base)  # 20 users > 7 buckets
    prepare(cfg.data, tmp_path / "hashed")
    schema = DatasetSchema.load(tmp_path / "hashed")
    assert schema.hashed == {"user_id": 7} and schema.num_embeddings("user_id") == 8
    assert not (tmp_path / "hashed" / "vocabs" / "user_id.parquet").exists()
    rows = _rows(tmp_path / "hashed", "train")
    ids = rows["user_id"]
    assert ids.between(1, 7).all() and ids.nunique() > 3  # spread over the buckets, never the OOV row
    users = np.round(rows["age"] * schema.dense[0].std + schema.dense[0].mean)
    assert (
        users.nunique() == 20 and rows.groupby(users)["user_id"].nunique().max() == 1
    )  # one user, one bucket
