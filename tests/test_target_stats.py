"""target_mean and id_count features: held-out rows get the training statistics, training rows
are cross-fitted (never their own label), and scoring applies the training statistics."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from engagerec.config import LabelConfig, config_from_dict
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.data.scoring import encode_for_scoring

SMOOTHING, FOLDS = 20.0, 4  # 20.0 * a 16-digit prior overflowed DECIMAL literals once


def _files(directory, seed=0, n=600):
    rng = np.random.default_rng(seed)
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(15)], "age": rng.integers(15, 70, 15)})
    users["gender"] = rng.choice(["F", "M"], 15)
    content = pd.DataFrame(
        {
            "content_id": np.arange(50),
            "genres": rng.choice(["1,2", "2", "3"], 50),
            "rating": rng.uniform(1, 5, 50).round(2),
            "duration": rng.integers(10, 300, 50),
        }
    )
    log = pd.DataFrame(
        {
            "user_id": rng.choice(users.user_id, n),
            "content_id": rng.zipf(1.4, n) % 50,
            "timestamp": rng.integers(0, 10_000, n),
        }
    )
    log["watch_time"] = rng.uniform(0, 1.0, n) * content.duration[log.content_id].to_numpy()
    files = {}
    for name, frame in (("interactions", log), ("users", users), ("content", content)):
        frame.to_csv(directory / f"{name}.csv", index=False)
        files[name] = str(directory / f"{name}.csv")
    return files


def _config(files, **feature_changes):
    stats = [
        {"name": "content_wr", "kind": "target_mean", "column": "content_id", "of": "watch_ratio"},
        {"name": "user_skip", "kind": "target_mean", "column": "user_id", "of": "skip"},
        {"name": "content_views", "kind": "id_count", "column": "content_id"},
    ]
    for feature in stats:
        feature.update({"smoothing": SMOOTHING, "folds": FOLDS} if feature["kind"] == "target_mean" else {})
        feature.update(feature_changes)
    return config_from_dict(
        {
            "data": {
                "source": {"adapter": "study", **files},
                "features": [{"name": "user_id"}, {"name": "content_id"}, *stats],
                "filters": {"min_user_views": 0},
                "split": {"kind": "random", "test_fraction": 0.3, "val_fraction": 0.1, "seed": 3},
            }
        }
    )


def _split(directory, split):
    """A split's rows with the statistic features back in their own units."""
    frame = ds.dataset(directory / split).to_table().to_pandas()
    schema = json.loads((directory / "schema.json").read_text())
    for dense in schema["dense"]:
        frame[dense["name"]] = frame[dense["name"]].astype(np.float64) * dense["std"] + dense["mean"]
    return frame


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    directory = tmp_path_factory.mktemp("target_stats")
    files = _files(directory)
    cfg = _config(files)
    prepare(cfg.data, directory / "prepared")
    return cfg, files, directory


def _training_sums(train, key, label):
    grouped = train.groupby(key)[label]
    return grouped.sum(), grouped.count(), float(train[label].mean())


@pytest.mark.parametrize(("feature", "key", "label"), [("content_wr", "content_id", "watch_ratio"),
                                                       ("user_skip", "user_id", "skip")])  # fmt: skip
def test_held_out_rows_get_the_smoothed_training_mean(prepared, feature, key, label):
    _, _, directory = prepared
    train = _split(directory / "prepared", "train")
    sums, counts, prior = _training_sums(train, key, label)
    for split in ("val", "test"):
        rows = _split(directory / "prepared", split)
        s = rows[key].map(sums).fillna(0.0)  # an id unseen in training (index 0) has no training rows
        c = rows[key].map(counts).fillna(0.0)
        expected = (s + SMOOTHING * prior) / (c + SMOOTHING)
        np.testing.assert_allclose(rows[feature], expected, rtol=1e-4, atol=1e-4)


def test_training_rows_are_cross_fitted_and_never_see_their_own_label(prepared):
    _, _, directory = prepared
    train = _split(directory / "prepared", "train")
    sums, counts, prior = _training_sums(train, "content_id", "watch_ratio")
    # the value depends only on (id, fold): rows sharing an id and a value are one fold's rows
    folds_seen = 0
    for (content, value), fold in train.round({"content_wr": 5}).groupby(["content_id", "content_wr"]):
        rest_sum = sums[content] - fold.watch_ratio.sum()
        rest_count = counts[content] - len(fold)
        assert value == pytest.approx((rest_sum + SMOOTHING * prior) / (rest_count + SMOOTHING), abs=1e-4)
        folds_seen += 1
    assert folds_seen > train.content_id.nunique()  # several folds per id: the check had teeth
    # id_count: the other training rows with this id
    views = train.content_id.map(train.content_id.value_counts()) - 1
    np.testing.assert_allclose(train.content_views, views, atol=1e-3)


def test_a_training_label_moves_other_rows_statistics_but_never_its_own(tmp_path):
    files = _files(tmp_path)
    cfg = _config(files)
    prepare(cfg.data, tmp_path / "before")
    before = _split(tmp_path / "before", "train")
    log = pd.read_csv(files["interactions"])
    popular = log.content_id.value_counts().index[0]
    for source_row in log.index[log.content_id == popular][:10]:  # the first that lands in train
        changed_log = log.copy()
        changed_log.loc[source_row, "watch_time"] = 0.5  # seconds: a ratio near 0
        changed_log.to_csv(files["interactions"], index=False)
        prepare(cfg.data, tmp_path / "after")
        after = _split(tmp_path / "after", "train")  # the same rows in the same order
        changed = before.watch_ratio.to_numpy() != after.watch_ratio.to_numpy()
        if changed.any():
            break
    assert changed.sum() == 1
    row = int(np.flatnonzero(changed)[0])
    # its own value moves only with the prior (the training mean, which holds every training label)
    prior_shift = abs(after.watch_ratio[row] - before.watch_ratio[row]) / len(before)
    assert abs(after.content_wr[row] - before.content_wr[row]) <= prior_shift + 1e-6
    others = (before.content_id == before.content_id[row]).to_numpy() & ~changed
    assert (np.abs(after.content_wr[others] - before.content_wr[others]) > 2 * prior_shift).any()
    test_before, test_after = (_split(tmp_path / d, "test") for d in ("before", "after"))
    same_video = (test_before.content_id == before.content_id[row]).to_numpy()
    assert same_video.any()
    assert (~np.isclose(test_before.content_wr[same_video], test_after.content_wr[same_video])).all()


def test_scoring_applies_the_training_statistics(prepared, tmp_path):
    cfg, files, directory = prepared
    train = _split(directory / "prepared", "train")
    new_rows = pd.read_csv(files["interactions"]).head(80)
    new_rows.to_csv(tmp_path / "new.csv", index=False)
    summary = encode_for_scoring(
        cfg.data, directory / "prepared", str(tmp_path / "new.csv"), tmp_path / "scored"
    )
    assert summary["rows_scored"] == 80
    scored = _split(tmp_path / "scored", "test")
    sums, counts, prior = _training_sums(train, "content_id", "watch_ratio")
    s, c = scored.content_id.map(sums).fillna(0.0), scored.content_id.map(counts).fillna(0.0)
    np.testing.assert_allclose(scored.content_wr, (s + SMOOTHING * prior) / (c + SMOOTHING), atol=1e-4)
    views = scored.content_id.map(train.content_id.value_counts()).fillna(0)
    np.testing.assert_allclose(scored.content_views, views, atol=1e-3)  # scored rows are never training rows


def test_a_target_mean_of_something_that_is_not_a_label_is_refused(tmp_path):
    cfg = _config(_files(tmp_path), of="rating")
    with pytest.raises(DataError, match=r"target_mean averages a label .*of: one of the labels"):
        prepare(cfg.data, tmp_path / "prepared")


def test_ordered_statistics_see_only_training_rows_strictly_before_the_row(tmp_path):
    files = _files(tmp_path)
    log = pd.read_csv(files["interactions"])
    log["timestamp"] //= 200  # 50 moments: many views of one video at one moment (ties)
    log.to_csv(files["interactions"], index=False)
    users = pd.read_csv(files["users"])
    users.loc[users.index[:4], "gender"] = None  # missing ids: no views, the prior
    users.to_csv(files["users"], index=False)
    cfg = _config(files, scheme="ordered")
    gender = dataclasses.replace(cfg.data.features[-1], name="gender_views", column="gender")
    # the timestamp as a feature too, to read each row's moment back from the shards
    moment = dataclasses.replace(cfg.data.features[0], name="moment", column="timestamp", kind="numeric")
    cfg.data.features += [gender, moment, dataclasses.replace(gender, name="gender_id", kind="categorical")]
    cfg.data.split.kind = "temporal"
    prepare(cfg.data, tmp_path / "prepared")
    splits = {s: _split(tmp_path / "prepared", s) for s in ("train", "val", "test")}
    train = splits["train"]
    prior = float(train.watch_ratio.mean())
    checked = ties = 0
    for name, rows in splits.items():
        for row in rows.itertuples():
            same_video = train.content_id == row.content_id
            earlier = train[same_video & (train.moment < row.moment - 0.5)]
            s, c = earlier.watch_ratio.sum(), len(earlier)
            assert row.content_wr == pytest.approx((s + SMOOTHING * prior) / (c + SMOOTHING), abs=1e-4), name
            assert row.content_views == pytest.approx(c, abs=1e-3), name
            if row.gender_id == 0:  # a missing gender has no views, however many rows miss it
                assert row.gender_views == pytest.approx(0, abs=1e-3)
            checked += c > 0
            ties += int((same_video & (np.abs(train.moment - row.moment) < 0.5)).sum() > 1)
    assert checked > 100 and ties > 50  # earlier views and simultaneous ones: the check had teeth
    assert (splits["train"].gender_id == 0).any()
    # rows to score get every training row (they come after training)
    scored = encode_for_scoring(cfg.data, tmp_path / "prepared", files["interactions"], tmp_path / "scored")
    assert scored["rows_scored"] > 0
    every = _split(tmp_path / "scored", "test")
    views = every.content_id.map(train.content_id.value_counts()).fillna(0)
    np.testing.assert_allclose(every.content_views, views, atol=1e-3)
    sums, counts, _ = _training_sums(train, "content_id", "watch_ratio")
    s, c = every.content_id.map(sums).fillna(0.0), every.content_id.map(counts).fillna(0.0)
    np.testing.assert_allclose(every.content_wr, (s + SMOOTHING * prior) / (c + SMOOTHING), atol=1e-4)
    np.testing.assert_allclose(every.gender_views[every.gender_id == 0], 0, atol=1e-3)


@pytest.mark.parametrize("scheme", ["ordered", "online"])
@pytest.mark.parametrize("missing", ["every fourth row", "the last tenth"])
def test_statistic_means_count_only_the_rows_that_have_the_label(tmp_path, scheme, missing):
    """A counted row without the label adds to its video's views but not to the rows of its label
    mean; where every counted row has the label (here: training rows, when only the last tenth of
    the log, all test rows, misses it), one windowed count serves both."""
    files = _files(tmp_path)
    log = pd.read_csv(files["interactions"])
    log["timestamp"] //= 200
    log["liked"] = (np.arange(len(log)) % 3 == 0).astype(float)
    gone = log.index[::4] if missing == "every fourth row" else log.timestamp >= log.timestamp.quantile(0.9)
    log.loc[gone, "liked"] = np.nan
    log.to_csv(files["interactions"], index=False)
    cfg = _config(files, scheme=scheme)
    liked_mean = dataclasses.replace(cfg.data.features[2], name="content_liked", of="liked")
    moment = dataclasses.replace(cfg.data.features[0], name="moment", column="timestamp", kind="numeric")
    # the raw video id (the encoded one is 0 for every video training never saw)
    video = dataclasses.replace(moment, name="video", column="content_id")
    cfg.data.features += [liked_mean, moment, video]
    cfg.data.labels = [*cfg.data.labels, LabelConfig(name="liked", kind="binary", column="liked")]
    cfg.data.split.kind = "temporal"
    prepare(cfg.data, tmp_path / "prepared")
    splits = {s: _split(tmp_path / "prepared", s) for s in ("train", "val", "test")}
    train = splits["train"]
    counted = train if scheme == "ordered" else pd.concat(splits.values())  # online: every split's
    assert counted.liked.isna().any() == (scheme == "online" or missing == "every fourth row")
    prior, wr_prior = float(train.liked.mean()), float(train.watch_ratio.mean())  # NaN left out
    fewer = 0
    for name, rows in splits.items():
        for row in rows.itertuples():
            same_video = counted.video.round() == round(row.video)
            earlier = counted[same_video & (counted.moment < row.moment - 0.5)]
            labelled = earlier.liked.dropna()
            expected = (labelled.sum() + SMOOTHING * prior) / (len(labelled) + SMOOTHING)
            assert row.content_liked == pytest.approx(expected, abs=1e-4), name
            assert row.content_views == pytest.approx(len(earlier), abs=1e-3), name
            # the watch ratio is never missing: its mean counts every earlier row
            wr = (earlier.watch_ratio.sum() + SMOOTHING * wr_prior) / (len(earlier) + SMOOTHING)
            assert row.content_wr == pytest.approx(wr, abs=1e-4), name
            fewer += len(labelled) < len(earlier)
    assert (fewer > 20) == counted.liked.isna().any()  # means that count fewer rows: the check had teeth


@pytest.mark.parametrize("lag", [0.0, 7.0])
def test_online_statistics_count_every_splits_earlier_rows(tmp_path, lag):
    """Live counters: a row of any split gets the id's rows of every split strictly before its
    moment (``lag`` before, when set), labels of held-out rows included, never its own moment;
    an ordered feature on the same id column keeps to training rows; scoring reads the
    counters over every prepared row."""
    files = _files(tmp_path)
    log = pd.read_csv(files["interactions"])
    log["timestamp"] //= 200  # 50 moments: ties, and gaps of a few moments for the lag
    log.to_csv(files["interactions"], index=False)
    cfg = _config(files, scheme="online", lag=lag)
    moment = dataclasses.replace(cfg.data.features[0], name="moment", column="timestamp", kind="numeric")
    # the raw video id (the encoded one is 0 for every video training never saw)
    video = dataclasses.replace(moment, name="video", column="content_id")
    ordered = dataclasses.replace(cfg.data.features[2], name="content_wr_ordered", scheme="ordered", lag=0.0)
    cfg.data.features += [moment, video, ordered]
    cfg.data.split.kind = "temporal"
    prepare(cfg.data, tmp_path / "prepared")
    splits = {s: _split(tmp_path / "prepared", s) for s in ("train", "val", "test")}
    every, train = pd.concat(splits.values()), splits["train"]
    prior = float(train.watch_ratio.mean())
    held_out_seen = 0
    for name, rows in splits.items():
        for row in rows.itertuples():
            same_video = every.video.round() == round(row.video)
            # integer moments: at least lag before, or strictly before when lag is 0
            earlier = every[same_video & (every.moment < row.moment - (lag - 0.5 if lag else 0.5))]
            s, c = earlier.watch_ratio.sum(), len(earlier)
            assert row.content_wr == pytest.approx((s + SMOOTHING * prior) / (c + SMOOTHING), abs=1e-4), name
            assert row.content_views == pytest.approx(c, abs=1e-3), name
            trained = train[(train.video.round() == round(row.video)) & (train.moment < row.moment - 0.5)]
            expected = (trained.watch_ratio.sum() + SMOOTHING * prior) / (len(trained) + SMOOTHING)
            assert row.content_wr_ordered == pytest.approx(expected, abs=1e-4), name
            held_out_seen += name != "train" and len(earlier) > len(trained)
    assert held_out_seen > 50  # held-out rows did count earlier held-out views: the check had teeth
    # the log's own rows: their counters would hold their own and later views, refused by row
    with pytest.raises(DataError, match=r"live counter .* not after it") as refused:
        encode_for_scoring(cfg.data, tmp_path / "prepared", files["interactions"], tmp_path / "refused")
    assert refused.value.row is not None and "timestamp" in str(refused.value)
    # rows after the log get the counters at its end (every prepared row), the ordered feature
    # the training rows'
    later = pd.read_csv(files["interactions"])
    later["timestamp"] += int(later["timestamp"].max()) + 1
    later.to_csv(tmp_path / "later.csv", index=False)
    scored = encode_for_scoring(
        cfg.data, tmp_path / "prepared", str(tmp_path / "later.csv"), tmp_path / "scored"
    )
    assert scored["rows_scored"] > 0
    rows = _split(tmp_path / "scored", "test")
    every_video, videos = every.video.round(), rows.video.round()
    np.testing.assert_allclose(
        rows.content_views, videos.map(every_video.value_counts()).fillna(0), atol=1e-3
    )
    sums = videos.map(every.groupby(every_video).watch_ratio.sum()).fillna(0.0)
    s, c = sums, videos.map(every_video.value_counts()).fillna(0)
    np.testing.assert_allclose(rows.content_wr, (s + SMOOTHING * prior) / (c + SMOOTHING), atol=1e-4)
    train_video = train.video.round()
    s, c = (
        videos.map(train.groupby(train_video).watch_ratio.sum()).fillna(0.0),
        videos.map(train_video.value_counts()).fillna(0),
    )
    np.testing.assert_allclose(rows.content_wr_ordered, (s + SMOOTHING * prior) / (c + SMOOTHING), atol=1e-4)


def test_lag_is_only_for_online_statistics(tmp_path):
    files = _files(tmp_path)
    for change in (
        {"lag": 5.0},
        {"lag": -1.0, "scheme": "online"},
        {"lag": float("inf"), "scheme": "online"},
    ):
        with pytest.raises(DataError, match=r"a finite lag >= 0, set only on a target_mean or id_count"):
            prepare(_config(files, **change).data, tmp_path / "prepared")


def test_ordered_statistics_need_a_timestamp(tmp_path):
    files = _files(tmp_path)
    log = pd.read_csv(files["interactions"]).drop(columns="timestamp")
    log.to_csv(files["interactions"], index=False)
    cfg = _config(files, scheme="ordered")
    with pytest.raises(DataError, match="ordered statistics need a timestamp column"):
        prepare(cfg.data, tmp_path / "prepared")


def test_folds_and_smoothing_are_checked(tmp_path):
    files = _files(tmp_path)
    for change in ({"folds": 1}, {"smoothing": 0.0}):
        with pytest.raises(DataError, match=r"expected folds >= 2 and smoothing > 0"):
            prepare(_config(files, **change).data, tmp_path / "prepared")
