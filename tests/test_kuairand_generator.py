"""write_kuairand_1k: KuaiRand-1K's layout, sizes, determinism and the planted signal, at a tiny scale."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.special import betainc

from engagerec.data import kuairand_generator as gen
from engagerec.data.kuairand_generator import kuairand_1k_sizes, kuairand_world, write_kuairand_1k

SCALE, CHUNK = 0.005, 7_000  # 5 users, 21,850 videos, 58,565 rows in 9 chunks

# written out here, not taken from the module, so that a wrong constant there fails
LOGS = ("log_standard_4_08_to_4_21_1k.csv", "log_standard_4_22_to_5_08_1k.csv")
LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
    "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab"
)
USER_HEADER = (
    "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,follow_user_num,"
    "follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,friend_user_num_range,"
    "register_days,register_days_range," + ",".join(f"onehot_feat{i}" for i in range(18))
)
VIDEO_HEADER = (
    "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,"
    "server_height,music_id,music_type,tag"
)
HEADERS = {
    LOGS[0]: LOG_HEADER,
    LOGS[1]: LOG_HEADER,
    "user_features_1k.csv": USER_HEADER,
    "video_features_basic_1k.csv": VIDEO_HEADER,
}
ALL_FILES = {*HEADERS, "noise_floor.json", "README.txt"}


def _write(tmp_path_factory, seed):
    out = tmp_path_factory.mktemp(f"kuairand_seed{seed}")
    return out, write_kuairand_1k(out, scale=SCALE, seed=seed, chunk_rows=CHUNK)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return _write(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def tables(written):
    out, _ = written
    first, second = (pd.read_csv(out / name) for name in LOGS)
    users = pd.read_csv(out / "user_features_1k.csv")
    videos = pd.read_csv(out / "video_features_basic_1k.csv", dtype={"tag": str})
    return first, second, pd.concat([first, second], ignore_index=True), users, videos


def test_files_and_columns_are_the_official_ones(written):
    out, _ = written
    assert {p.name for p in out.iterdir()} == ALL_FILES  # and no partial file left behind
    for name, header in HEADERS.items():
        with open(out / name, encoding="utf-8") as handle:
            assert handle.readline() == header + "\n"
    readme = (out / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "scale=0.005" in readme and "seed=0" in readme and "KuaiRand" in readme


def test_sizes_follow_the_scale_formula(tables):
    assert kuairand_1k_sizes(1.0) == (1_000, 4_369_953, 11_713_045)
    assert kuairand_1k_sizes(SCALE) == (5, 21_850, 58_565)
    assert kuairand_1k_sizes(1e-9) == (2, 10, 100)
    first, _, log, users, videos = tables
    n_users, n_videos, n_rows = kuairand_1k_sizes(SCALE)
    assert users.user_id.tolist() == list(range(n_users))
    assert videos.video_id.tolist() == list(range(n_videos))
    assert len(log) == n_rows
    assert log.user_id.between(0, n_users - 1).all() and log.video_id.between(0, n_videos - 1).all()
    assert log.user_id.value_counts().min() >= 20
    assert len(first) / n_rows == pytest.approx(0.45, abs=0.005)


def test_time_runs_forward_over_31_days_in_utc(tables):
    first, second, log, _, _ = tables
    assert (np.diff(log.time_ms.to_numpy()) > 0).all()  # across both files, in order
    assert first.date.between(20220408, 20220421).all() and second.date.between(20220422, 20220508).all()
    when = pd.to_datetime(log.time_ms, unit="ms", utc=True)
    assert (log.date == when.dt.year * 10_000 + when.dt.month * 100 + when.dt.day).all()
    assert (log.hourmin == when.dt.hour * 100 + when.dt.minute).all()
    assert log.date.nunique() == 31
    assert (log.is_rand == 0).all() and log.tab.between(0, 14).all() and log.tab.nunique() == 15


def test_same_seed_same_bytes_other_seed_other_bytes(written, tmp_path_factory):
    out, _ = written
    again, _ = _write(tmp_path_factory, 0)
    other, _ = _write(tmp_path_factory, 1)
    for name in ALL_FILES:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    for name in ALL_FILES - {"README.txt"}:
        assert (out / name).read_bytes() != (other / name).read_bytes(), name


def test_missing_markers_and_tags(written, tables):
    out, _ = written
    _, _, log, users, videos = tables
    assert (users.is_live_streamer == -124).sum() == 1
    assert set(users.is_live_streamer) <= {-124, 0, 1}
    onehot = users[[f"onehot_feat{i}" for i in range(18)]]
    assert (onehot == -124).any().sum() >= 2
    for column in onehot:
        values = onehot[column][onehot[column] != -124]
        assert values.min() >= 0 and 2 <= onehot[column].nunique() and values.max() < 50
    n_videos = len(videos)
    assert videos.tag.isna().sum() == max(1, round(0.01 * n_videos))
    genres = videos.tag.dropna().str.split(",").map(lambda ids: [int(g) for g in ids])
    assert genres.map(len).between(1, 3).all() and genres.map(lambda g: len(set(g)) == len(g)).all()
    assert genres.map(lambda g: min(g) >= 0 and max(g) < 46).all() and genres.map(len).max() == 3
    text = (out / "video_features_basic_1k.csv").read_text()
    assert ',"' in text  # multi-genre tags are quoted, so pandas found exactly 12 fields above
    assert 0.02 < videos.video_duration.isna().mean() < 0.04
    # the log always carries the duration; the table's agrees wherever it has one
    joined = log.merge(videos[["video_id", "video_duration"]], on="video_id")
    known = joined.video_duration.notna()
    assert (joined.duration_ms[known] == joined.video_duration[known]).all() and (~known).any()
    assert (videos.visible_status == 0.0).all() and set(videos.video_type) == {"NORMAL", "AD"}
    assert pd.to_datetime(videos.upload_dt, format="%Y-%m-%d").max() < pd.Timestamp("2022-04-08")


def _follow_bucket(n):
    for edge, label in ((0, "0"), (10, "(0,10]"), (50, "(10,50]"), (100, "(50,100]")):
        if n <= edge:
            return label
    for edge, label in ((150, "(100,150]"), (250, "(150,250]"), (500, "(250,500]")):
        if n <= edge:
            return label
    return "500+"


def _register_bucket(days):
    for edge, label in ((30, "15-30"), (60, "31-60"), (90, "61-90"), (180, "91-180"), (365, "181-365")):
        if days <= edge:
            return label
    return "366-730" if days <= 730 else "730+"


def test_user_ranges_agree_with_counts(tmp_path):
    write_kuairand_1k(tmp_path, scale=0.05, seed=3, chunk_rows=200_000)  # 50 users
    users = pd.read_csv(tmp_path / "user_features_1k.csv")
    assert (users.follow_user_num_range == users.follow_user_num.map(_follow_bucket)).all()
    assert (users.register_days_range == users.register_days.map(_register_bucket)).all()
    assert users.register_days.min() >= 15
    assert ((users.fans_user_num == 0) == (users.fans_user_num_range == "0")).all()
    assert ((users.friend_user_num >= 250) == (users.friend_user_num_range == "250+")).all()
    assert set(users.user_active_degree) == {"full_active", "high_active", "middle_active", "UNKNOWN"}


def test_watch_ratio_and_long_view(tables):
    _, _, log, _, _ = tables
    ratio = log.play_time_ms / log.duration_ms
    assert ratio.between(0, 1).all() and (log.duration_ms > 0).all()
    # long_view is r >= 0.8 for the unrounded r; the written ratio is within 0.5 / duration of r
    near = (ratio - 0.8).abs() <= 0.5 / log.duration_ms
    assert ((log.long_view == 1) == (ratio >= 0.8))[~near].all()
    assert 0.1 < log.long_view.mean() < 0.4
    assert 0.2 < (ratio < 0.5).mean() < 0.7


def test_engagement_flags(tables):
    _, _, log, _, _ = tables
    flags = ["is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "is_profile_enter"]
    assert log[flags + ["long_view"]].isin([0, 1]).all().all()
    assert 0.01 < log.is_like.mean() < 0.06 and log.is_hate.mean() < 0.02 and log.is_follow.mean() < 0.01
    assert ((log.profile_stay_time > 0) == (log.is_profile_enter == 1)).all()
    assert (log.comment_stay_time >= 0).all() and (log.comment_stay_time[log.is_comment == 1] > 0).all()
    # flags follow the planted score: liked views were watched longer
    ratio = log.play_time_ms / log.duration_ms
    assert ratio[log.is_like == 1].mean() > ratio[log.is_like == 0].mean() + 0.05
    assert ratio[log.is_hate == 1].mean() < ratio[log.is_hate == 0].mean()


def test_planted_signal_and_noise_floor_match_the_data(written, tables):
    _, floor = written
    _, _, log, _, _ = tables
    ratio = (log.play_time_ms / log.duration_ms).to_numpy()
    m = kuairand_world(SCALE, 0).expected_ratio(log.user_id, log.video_id, log.hourmin)
    decile = pd.qcut(m, 10, labels=False)
    by_decile = pd.Series(ratio).groupby(decile).mean()
    assert (np.diff(by_decile.to_numpy()) > 0).all()
    # the floor is E[(r - m)^2]: the data's squared error around m must match it
    assert np.mean((ratio - m) ** 2) == pytest.approx(floor["watch_ratio"]["mse"], rel=0.03)
    assert floor["watch_ratio"]["mse"] < 0.7 * ratio.var()
    assert floor["watch_ratio"]["constant_mse"] == pytest.approx(ratio.var(), rel=0.05)
    p_skip = betainc(4 * m, 4 * (1 - m), 0.5)
    skip = (ratio < 0.5).astype(float)
    assert np.mean((skip - p_skip) ** 2) == pytest.approx(floor["skip"]["brier"], rel=0.03)
    assert floor["skip"]["rate"] == pytest.approx(skip.mean(), abs=0.01)
    assert floor["long_view"]["rate"] == pytest.approx(log.long_view.mean(), abs=0.01)
    assert floor["is_click"]["rate"] == pytest.approx(log.is_click.mean(), abs=0.01)
    assert floor["is_like"]["rate"] == pytest.approx(log.is_like.mean(), abs=0.005)


def test_noise_floor_file(written):
    out, floor = written
    assert json.loads((out / "noise_floor.json").read_text()) == floor
    assert (floor["users"], floor["videos"], floor["rows"]) == kuairand_1k_sizes(SCALE)
    assert (floor["scale"], floor["seed"], floor["kappa"]) == (SCALE, 0, 4.0)
    assert 0.02 < floor["watch_ratio"]["mse"] < 0.05  # m (1 - m) / 5 <= 0.05
    assert floor["watch_ratio"]["mse"] < floor["watch_ratio"]["constant_mse"] < 0.25
    for label in ("skip", "long_view", "is_click", "is_like"):
        f = floor[label]
        assert 0 < f["log_loss"] < f["constant_log_loss"] <= math.log(2), label
        assert 0 < f["brier"] < f["constant_brier"] <= 0.25, label
        assert f["brier"] < f["log_loss"], label  # p (1 - p) < its binary entropy in nats
    assert 0.01 < floor["is_like"]["rate"] < 0.06
    assert "play_time_ms / duration_ms" in floor["notes"]


def test_popularity_is_skewed_and_scattered(tables):
    _, _, log, _, videos = tables
    views = log.video_id.value_counts()
    # a pure k^-1.05 law would give the top video 13% of the views here; the offset tames the head
    assert views.iloc[0] / len(log) < 0.05
    assert views.iloc[: len(videos) // 100].sum() / len(log) > 0.1  # the top 1% of videos
    order = kuairand_world(SCALE, 0).popularity_order
    assert sorted(order) == list(range(len(videos))) and (order != np.arange(len(videos))).mean() > 0.9


def test_a_crash_leaves_no_complete_looking_file(written, tmp_path, monkeypatch):
    out, _ = written
    for name in ALL_FILES:  # a complete earlier run in the same directory
        shutil.copy(out / name, tmp_path / name)
    real_chunk = gen._LogStream._chunk

    def failing(self, index, start, n):
        if index == 3:
            raise RuntimeError("disk full")
        return real_chunk(self, index, start, n)

    monkeypatch.setattr(gen._LogStream, "_chunk", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_kuairand_1k(tmp_path, scale=SCALE, seed=0, chunk_rows=CHUNK)
    assert {p.name for p in tmp_path.iterdir()} == {"user_features_1k.csv", "video_features_basic_1k.csv"}


@pytest.mark.parametrize(
    "kwargs", [{"scale": 0}, {"scale": float("nan")}, {"seed": -1}, {"chunk_rows": 0}, {"scale": 100}]
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_kuairand_1k(tmp_path, **{"scale": SCALE, **kwargs})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("skew", [1.3, 0.65])
def test_the_popularity_skew_shapes_how_many_distinct_videos_the_log_holds(written, tables, tmp_path, skew):
    _, floors = written
    _, _, log, _, _ = tables
    default_distinct = log["video_id"].nunique()
    assert floors["popularity_skew"] == 1.05
    assert default_distinct == pytest.approx(floors["expected_distinct_videos"], rel=0.02)
    shaped = write_kuairand_1k(tmp_path, scale=SCALE, seed=0, chunk_rows=CHUNK, popularity_skew=skew)
    distinct = pd.concat([pd.read_csv(tmp_path / name, usecols=["video_id"]) for name in LOGS])["video_id"]
    assert distinct.nunique() == pytest.approx(shaped["expected_distinct_videos"], rel=0.02)
    # a stronger head (1.3) repeats popular videos: fewer distinct; a flatter one (0.65): more
    assert (distinct.nunique() < default_distinct) == (skew > 1.05)
    assert shaped["rows"] == floors["rows"] and shaped["videos"] == floors["videos"]
    assert f"popularity_skew={skew!r}" in (tmp_path / "README.txt").read_text()


def test_the_catalogue_size_can_be_set_and_bad_shape_options_are_refused(tmp_path):
    floors = write_kuairand_1k(tmp_path, scale=0.001, seed=0, videos=500)
    videos = pd.read_csv(tmp_path / "video_features_basic_1k.csv", usecols=["video_id"])["video_id"]
    assert floors["videos"] == 500 and len(videos) == 500 and videos.max() < 500
    for bad in ({"popularity_skew": -0.1}, {"popularity_skew": float("inf")}, {"videos": 3}):
        with pytest.raises(ValueError, match="popularity_skew|videos"):
            write_kuairand_1k(tmp_path / "bad", scale=0.001, **bad)


def test_videos_can_arrive_during_the_log_and_are_viewed_only_from_their_upload_on(written, tables, tmp_path):
    """With video_arrival, a share of the catalogue is uploaded during the 31 days (upload_dt its
    day) and no view precedes its video's upload; users and view times are the default's."""
    from engagerec.data.kuairand_generator import BEFORE_WINDOW, DAY_MS, START_MS, kuairand_world

    _, floors = written
    _, _, log, _, _ = tables
    grown = write_kuairand_1k(tmp_path, scale=SCALE, seed=0, chunk_rows=CHUNK, video_arrival=0.3)
    world = kuairand_world(SCALE, 0, video_arrival=0.3)
    assert grown["video_arrival"] == 0.3 and "video_arrival" not in floors
    assert grown["expected_distinct_videos"] is None  # the formula assumes no arrival
    share = round(float((world.video_upload_ms != BEFORE_WINDOW).mean()), 4)
    assert f"video_arrival={share!r}" in (tmp_path / "README.txt").read_text()  # the drawn share
    upload = world.video_upload_ms
    during = upload != BEFORE_WINDOW
    assert during.mean() == pytest.approx(0.3 * 0.9, abs=0.02)  # the most popular tenth never arrives
    assert not during[world.popularity_order[: world.videos // 10]].any()
    table = pd.read_csv(tmp_path / "video_features_basic_1k.csv", usecols=["video_id", "upload_dt"])
    day = pd.to_datetime(table.sort_values("video_id")["upload_dt"]).to_numpy()
    start = np.datetime64("2022-04-08")
    uploaded = start + ((upload[during] - START_MS) // DAY_MS).astype("timedelta64[D]")
    assert (day[during] == uploaded).all() and (day[~during] < start).all()  # upload_dt: the upload day
    assert len(set(day[during])) == 31  # arrivals spread over the whole window
    new_log = pd.concat([pd.read_csv(tmp_path / name) for name in LOGS], ignore_index=True)
    video, time_ms = new_log["video_id"].to_numpy(), new_log["time_ms"].to_numpy()
    assert (upload[video] <= time_ms).all()  # to the millisecond: never before its upload
    assert (
        new_log["duration_ms"].to_numpy() == world.duration_ms[video]
    ).all()  # labels of the redrawn video
    late = during[video]
    week = (time_ms - time_ms.min()) // (7 * 86_400_000)
    assert late[week == 0].mean() < late[week == 3].mean()  # the share of new videos' views grows
    np.testing.assert_array_equal(time_ms, log["time_ms"].to_numpy())
    np.testing.assert_array_equal(new_log["user_id"].to_numpy(), log["user_id"].to_numpy())
    with pytest.raises(ValueError, match="video_arrival"):
        write_kuairand_1k(tmp_path / "bad", scale=0.001, video_arrival=0.95)


def test_users_can_join_during_the_log_and_view_only_from_their_join_on(written, tables, tmp_path):
    """With user_arrival, a share of the users join during the 31 days: no view precedes its
    user's join, the views go to users already there, register_days counts from the join, and
    the videos and view times are the default's."""
    from engagerec.data.kuairand_generator import BEFORE_WINDOW, DAY_MS, END_MS, kuairand_world

    _, default_floors = written
    _, _, log, _, _ = tables
    floors = write_kuairand_1k(tmp_path, scale=SCALE, seed=0, chunk_rows=CHUNK, user_arrival=0.5)
    world = kuairand_world(SCALE, 0, user_arrival=0.5)
    join = world.user_join_ms
    joined = join != BEFORE_WINDOW
    assert floors["user_arrival"] == 0.5 and world.video_upload_ms is None
    assert joined.sum() >= 1 and not joined[np.argmax(world.user_views)]  # the most active is there
    share = round(float(joined.mean()), 4)
    assert f"user_arrival={share!r}" in (tmp_path / "README.txt").read_text()
    new_log = pd.concat([pd.read_csv(tmp_path / name) for name in LOGS], ignore_index=True)
    user, time_ms = new_log["user_id"].to_numpy(), new_log["time_ms"].to_numpy()
    assert (join[user] <= time_ms).all()  # to the millisecond: never before the user joins
    assert (user != log["user_id"].to_numpy()).any()  # the joiners' earlier views went to others
    np.testing.assert_array_equal(time_ms, log["time_ms"].to_numpy())
    np.testing.assert_array_equal(new_log["video_id"].to_numpy(), log["video_id"].to_numpy())
    # the labels are drawn for the user who viewed: the noise floor moves with the users
    assert floors["watch_ratio"]["mse"] != default_floors["watch_ratio"]["mse"]
    users = pd.read_csv(tmp_path / "user_features_1k.csv").sort_values("user_id")
    register = users["register_days"].to_numpy()
    np.testing.assert_array_equal(register[joined], 1 + (END_MS - 1 - join[joined]) // DAY_MS)
    assert (register[joined] <= 31).all() and (register[~joined] >= 15).all()
    ranges = users["register_days_range"].to_numpy()
    expected = np.where(
        register <= 14, "1-14", np.where(register <= 30, "15-30", np.where(register <= 60, "31-60", ""))
    )
    assert (ranges[joined] == expected[joined]).all()  # a joiner's range holds its days
    with pytest.raises(ValueError, match="user_arrival"):
        write_kuairand_1k(tmp_path / "bad", scale=0.001, user_arrival=0.95)


def test_the_default_files_and_the_video_arrival_files_are_byte_for_byte_what_they_were(tmp_path):
    """Options added later (user_arrival) draw from their own streams: the files of the default
    and of video_arrival are those of the code before them (digests taken from commit e2c8ed6;
    numpy is pinned, so a change here is a change of the generated data)."""
    import hashlib

    digests = {
        "default": "2382944b5ee306bf6bb79c38f55f7926ede469dc771553a885f489f4520ff8b3",
        "video_arrival": "16b0a6e97358a4ddecff8d3ae3e8967f9e0f7293c5e6057cc0e08cb5c0289c95",
    }
    for name, options in (("default", {}), ("video_arrival", {"video_arrival": 0.3})):
        out = tmp_path / name
        write_kuairand_1k(out, scale=0.001, seed=0, chunk_rows=5000, **options)
        digest = hashlib.sha256()
        for path in sorted(out.iterdir()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        assert digest.hexdigest() == digests[name], name
