"""Labels, filters, splits and history on small hand-made tables."""

import numpy as np
import pandas as pd
import pytest
from conftest import study_config, study_files

from engagerec.config import LabelConfig, SplitConfig
from engagerec.data.adapters import load_tables
from engagerec.data.events import FilterReport, add_labels, build_events
from engagerec.data.history import previous_ids
from engagerec.data.split import split_indices


def test_ratio_policies_and_skip_threshold():
    frame = pd.DataFrame({"watch_time": [0.0, 20.0, 50.0, 150.0], "duration": [100.0] * 4})
    for policy, expected in (("clip", [0, 0.2, 0.5, 1.0]), ("keep", [0, 0.2, 0.5, 1.5])):
        report = FilterReport()
        out = add_labels(frame, LabelConfig(ratio_cap=1.0, over_cap=policy, skip_threshold=0.5), report)
        assert out["watch_ratio"].tolist() == pytest.approx(expected)
        assert out["skip"].tolist() == [1, 1, 0, 0]  # 0.5 is not below 0.5
    report = FilterReport()
    out = add_labels(frame, LabelConfig(over_cap="drop", skip_threshold=0.3), report)
    assert len(out) == 3 and report.dropped == {"watch ratio above 1": 1}
    assert out["skip"].tolist() == [1, 1, 0]


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
    )
    events, report = build_events(load_tables(cfg.data.source), cfg.data)
    content_of = interactions.content_id.to_numpy()
    assert report.dropped["missing duration"] == int((content_of == 5).sum())
    assert report.dropped["zero or negative duration"] == int(np.isin(content_of, [1, 3]).sum())
    assert report.rows_read == 26 and report.rows_read - report.rows_dropped == len(events)
    assert set(report.dropped) >= {
        "missing watch time",
        "negative watch time",
        "zero watch time",
        "user has <= 3 views",
    }
    assert (events.watch_time > 0).all() and (events.duration > 0).all()


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
    events, report = build_events(load_tables(cfg.data.source), cfg.data)
    assert set(events.user_id) == {1}  # 10 views is not "more than ten"
    assert report.dropped["user has <= 10 views"] == 10


def _events(n_users=20, per_user=30, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(n_users), per_user),
            "content_id": rng.integers(0, 50, n_users * per_user),
            "timestamp": rng.permutation(n_users * per_user).astype(float),
        }
    )


def test_random_split_is_seeded_and_val_comes_from_train():
    events = _events()
    a = split_indices(events, SplitConfig(kind="random", test_fraction=0.3, val_fraction=0.1, seed=3))
    b = split_indices(events, SplitConfig(kind="random", test_fraction=0.3, val_fraction=0.1, seed=3))
    c = split_indices(events, SplitConfig(kind="random", test_fraction=0.3, val_fraction=0.1, seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    assert len(a["test"]) == 180 and len(a["val"]) == 42 and len(a["train"]) == 378
    assert len(set(a["train"]) | set(a["val"]) | set(a["test"])) == len(events)


def test_temporal_split_never_trains_on_the_future():
    events = _events()
    parts = split_indices(events, SplitConfig(kind="temporal", test_fraction=0.3, val_fraction=0.1))
    ts = events.timestamp.to_numpy()
    assert (
        ts[parts["train"]].max() < ts[parts["val"]].min() <= ts[parts["val"]].max() < ts[parts["test"]].min()
    )


def test_user_split_keeps_each_user_on_one_side():
    events = _events()
    parts = split_indices(events, SplitConfig(kind="user", test_fraction=0.3, val_fraction=0.2, seed=1))
    users = {k: set(events.user_id.to_numpy()[v]) for k, v in parts.items()}
    assert (
        not (users["train"] & users["test"])
        and not (users["train"] & users["val"])
        and not (users["val"] & users["test"])
    )
    assert len(users["test"]) == 6 and sum(len(v) for v in parts.values()) == len(events)


def test_history_is_strictly_before_and_capped():
    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 1],
            "content_id": [10, 11, 12, 13, 20, 14],
            "timestamp": [5.0, 1.0, 3.0, 3.0, 1.0, 9.0],
        }
    )
    history = previous_ids(events, "content_id", length=2)
    got = [list(h) for h in history]
    assert got == [
        [12, 13],  # t=5: the two latest before it (t=3, t=3)
        [],  # t=1: first view
        [11],  # t=3: not its twin at the same moment
        [11],
        [],  # another user's history is separate
        [13, 10],  # t=9: last two, oldest first
    ]


def test_history_mean_averages_earlier_labels_only():
    from engagerec.data.history import previous_label_mean

    events = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 1],
            "watch_ratio": [0.5, 0.1, 0.3, 0.9, 0.7, 0.2],
            "timestamp": [5.0, 1.0, 3.0, 3.0, 1.0, 9.0],
        }
    )
    got = previous_label_mean(events, "watch_ratio", length=2)
    expected = [(0.3 + 0.9) / 2, np.nan, 0.1, 0.1, np.nan, (0.9 + 0.5) / 2]
    np.testing.assert_allclose(got, expected)
