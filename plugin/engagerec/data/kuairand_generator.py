"""KuaiRand-1K-shaped synthetic data with a planted signal and a known noise floor.

The files, their names and their columns follow the official layout of KuaiRand-1K
(Gao et al., "KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly
Exposed Videos", CIKM 2022); the real files are not needed. At scale 1 the sizes are
KuaiRand-1K's: 1,000 users, 4,369,953 videos and 11,713,045 log rows.

The model of the data (the hidden truth is drawn once per (scale, seed)):

* Users. Activity weights are log-normal, so a few users have tens of thousands of views;
  every user is drawn at least 20 views and the rest are shared out by weight (with
  ``user_arrival``, a user who joins during the log keeps only the views after the join). The
  views of all users are interleaved uniformly at random and spread over 2022-04-08 .. 2022-05-08
  (31 days, UTC) with a daily rhythm; time_ms increases row by row, and date / hourmin are
  the UTC calendar values of time_ms. The first log file holds the first 14 days (45% of
  the rows), the second the last 17 days.
* Videos. A view's popularity rank k is drawn by inverse CDF from a truncated power law,
  p(k) ~ (k + k0)^-s over all videos (s = ``popularity_skew``, 1.05 by default); a seeded
  permutation maps ranks to ids. k0 (1,000 at scale 1, proportional to the number of videos)
  flattens only the head, so that the top video gets ~0.01% of the views instead of ~9%,
  which would make each user watch it about a thousand times. At scale 1 the log then holds
  about 1.9M distinct videos; s = 1.3 gives about 1.1M (a stronger head), s = 0.65 about
  3.2M (flatter); ``videos`` sets the catalogue's size. Durations are log-normal (median 40 s).
* Watch ratio. score = mu + user bias + video bias + <user factors, video factors> (dim 6)
  + the user's preference for the video's first genre (0 for an untagged video)
  - 0.3 * log(duration / 40 s) + 0.1 * cos(2 pi (hour - 21) / 24); m = sigmoid(score) and
  r ~ Beta(kappa m, kappa (1 - m)) with kappa = 4, so E[r | x] = m and
  Var[r | x] = m (1 - m) / (kappa + 1). play_time_ms = round(r * duration_ms): no replays.
* Other labels. long_view = 1 if r >= 0.8 (KuaiRand derives it from play time by its own
  rule; here it is this threshold on r). is_click, is_like, is_hate, is_follow, is_comment,
  is_forward and is_profile_enter are Bernoulli(sigmoid(a + b * score)); the stay times are
  log-normal milliseconds when the page was opened, else 0. tab is drawn from fixed
  weights; is_rand is 0 (these are standard, not randomly exposed, logs).
* Side tables. The video table carries each video's duration (empty for 3% of videos; the
  log always has it) and its genres as ``tag`` (empty for 1%). User features carry no
  planted signal except user_active_degree, which follows activity. -124 is KuaiRand's
  missing marker, used for 1% of is_live_streamer and of a few onehot_feat columns.

noise_floor.json holds, per label, the loss of the Bayes predictor that knows the hidden
truth (the best any model can do), and the loss of the best constant predictor.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from scipy.special import betainc, entr, expit

from engagerec.errors import ConfigError

# ------------------------------------------------------------------ the official layout

LOG_FILES = ("log_standard_4_08_to_4_21_1k.csv", "log_standard_4_22_to_5_08_1k.csv")
USER_FILE = "user_features_1k.csv"
VIDEO_FILE = "video_features_basic_1k.csv"
NOISE_FLOOR_FILE = "noise_floor.json"
README_FILE = "README.txt"

LOG_COLUMNS = (
    "user_id",
    "video_id",
    "date",
    "hourmin",
    "time_ms",
    "is_click",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_hate",
    "long_view",
    "play_time_ms",
    "duration_ms",
    "profile_stay_time",
    "comment_stay_time",
    "is_profile_enter",
    "is_rand",
    "tab",
)
ONEHOT_CARDINALITY = (2, 7, 50, 48, 16, 34, 3, 40, 50, 7, 5, 5, 2, 2, 2, 2, 2, 2)
USER_COLUMNS = (
    "user_id",
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num",
    "follow_user_num_range",
    "fans_user_num",
    "fans_user_num_range",
    "friend_user_num",
    "friend_user_num_range",
    "register_days",
    "register_days_range",
    *(f"onehot_feat{i}" for i in range(len(ONEHOT_CARDINALITY))),
)
VIDEO_COLUMNS = (
    "video_id",
    "author_id",
    "video_type",
    "upload_dt",
    "upload_type",
    "visible_status",
    "video_duration",
    "server_width",
    "server_height",
    "music_id",
    "music_type",
    "tag",
)

FULL_USERS, FULL_VIDEOS, FULL_ROWS = 1_000, 4_369_953, 11_713_045
MISSING = -124  # KuaiRand's own missing-value marker

# ------------------------------------------------------------------ the hidden truth

KAPPA = 4.0  # Beta concentration: Var[r | x] = m (1 - m) / (KAPPA + 1)
FACTOR_DIM = 6
NUM_GENRES = 46
MAX_GENRES_PER_VIDEO = 3
SCORE_MEAN = 0.1
USER_BIAS_SD, VIDEO_BIAS_SD, FACTOR_SD, GENRE_PREFERENCE_SD = 0.5, 0.5, 0.45, 0.4
DURATION_MEDIAN_MS, DURATION_LOG_SD, DURATION_SLOPE = 40_000.0, 0.8, 0.3
MIN_DURATION_MS, MAX_DURATION_MS = 2_000, 1_200_000
HOUR_EFFECT, HOUR_PEAK = 0.1, 21
ZIPF_EXPONENT = 1.05
ZIPF_OFFSET_AT_SCALE_1 = 1_000.0  # see the module docstring: tames the head only
USER_ACTIVITY_LOG_SD = 1.0
MIN_USER_VIEWS = 20
LONG_VIEW_THRESHOLD = 0.8
SKIP_THRESHOLD = 0.5  # engagerec's default: skip = watch ratio < 0.5

# (intercept, slope on score) of each Bernoulli flag, chosen for KuaiRand-like base rates
FLAG_LOGITS = {
    "is_click": (-0.8, 1.0),
    "is_like": (-3.85, 0.8),
    "is_hate": (-5.6, -0.6),
    "is_follow": (-6.5, 0.5),
    "is_comment": (-5.8, 0.5),
    "is_forward": (-6.3, 0.4),
    "is_profile_enter": (-3.3, 0.4),
    "comment_open": (-2.8, 0.5),  # hidden: the comment page was opened (comment_stay_time > 0)
}
FLAG_COLUMNS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate")
PROFILE_STAY_MEDIAN_MS, COMMENT_STAY_MEDIAN_MS, STAY_LOG_SD = 8_000.0, 6_000.0, 1.0
TAB_WEIGHTS = np.array([20, 38, 12, 5, 8, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1], dtype=np.float64)

# ------------------------------------------------------------------ the calendar

WINDOW_START = dt.date(2022, 4, 8)
WINDOW_DAYS, FIRST_FILE_DAYS, FIRST_FILE_SHARE = 31, 14, 0.45
DAY_MS, HOUR_MS, MINUTE_MS = 86_400_000, 3_600_000, 60_000
START_MS = int(dt.datetime(2022, 4, 8, tzinfo=dt.timezone.utc).timestamp()) * 1000
END_MS = START_MS + WINDOW_DAYS * DAY_MS
FIRST_FILE_END_MS = START_MS + FIRST_FILE_DAYS * DAY_MS
# relative traffic by hour of the (UTC) log clock: quiet at night, peak in the evening
HOURLY_TRAFFIC = np.array(
    [9, 6, 4, 3, 2.5, 3, 5, 8, 10, 10, 10, 11, 13, 12, 10, 10, 10, 11, 13, 15, 17, 18, 16, 12]
)
WEEKEND_TRAFFIC = 1.15
MAX_ROWS = 999_999_999  # numpy's multivariate hypergeometric sampler needs fewer than 1e9

# independent random streams, so that changing one part never shifts another
(
    _USERS,
    _VIDEOS,
    _USER_TABLE,
    _VIDEO_TABLE,
    _LOG_ORDER,
    _LOG_ROWS,
    _ARRIVAL,
    _ARRIVAL_DRAWS,
    _USER_ARRIVAL,
    _USER_ARRIVAL_DRAWS,
) = range(10)
BEFORE_WINDOW = np.iinfo(np.int64).min  # the upload (join) time of a video (user) there from the start
# the most popular tenth of the catalogue and the most active tenth of the users are always there
# from the start: a view always finds a video and a user, and redrawing ends quickly
MAX_ARRIVAL = 0.9

_TEXT_SLICE_ROWS = 1 << 20  # keeps each joined line array far below pyarrow's 2 GiB string limit


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def kuairand_1k_sizes(scale: float, videos: Optional[int] = None) -> Tuple[int, int, int]:
    """(users, videos, log rows) at ``scale``; KuaiRand-1K's sizes at scale 1; ``videos`` sets the
    catalogue's size instead of scaling KuaiRand-1K's.

    Example:
        >>> kuairand_1k_sizes(0.5), kuairand_1k_sizes(0.5, videos=1000)
        ((500, 2184976, 5856522), (500, 1000, 5856522))
    """
    return (
        max(2, round(FULL_USERS * scale)),
        int(videos) if videos is not None else max(10, round(FULL_VIDEOS * scale)),
        max(100, round(FULL_ROWS * scale)),
    )


def popularity(videos: int, skew: float = ZIPF_EXPONENT) -> np.ndarray:
    """
    The share of views of each popularity rank: (k + k0)^-skew, normalised, with k0 = 1,000
    per KuaiRand-1K catalogue (see the module docstring).

    Args:
        videos (int): the catalogue's size.
        skew (float): the power law's exponent; 0 is uniform. Default: 1.05.

    Returns:
        np.ndarray: float64 [videos], summing to 1, by rank.

    Example:
        >>> shares = popularity(4, skew=0.0)
        >>> shares.tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    weight = _popularity_weights(videos, skew)
    return weight / weight.sum()


def _popularity_weights(videos: int, skew: float) -> np.ndarray:
    offset = ZIPF_OFFSET_AT_SCALE_1 * videos / FULL_VIDEOS
    return (np.arange(1, videos + 1) + offset) ** -float(skew)


def expected_distinct_videos(rows: int, videos: int, skew: float = ZIPF_EXPONENT) -> float:
    """
    The expected number of distinct videos among ``rows`` views: sum over ranks of
    1 - (1 - p_k)^rows.

    Args:
        rows (int): views drawn.
        videos (int): the catalogue's size.
        skew (float): the popularity skew. Default: 1.05.

    Returns:
        float: the expectation.

    Example:
        >>> round(expected_distinct_videos(2, 2, skew=0.0), 3)  # 1 + P(the second differs)
        1.5
    """
    return float(-np.expm1(rows * np.log1p(-popularity(videos, skew))).sum())


@dataclass(frozen=True)
class KuaiRandWorld:
    """The hidden truth behind one (scale, seed): per-user and per-video arrays only."""

    scale: float
    seed: int
    rows: int
    popularity_skew: float  # the power law's exponent over popularity ranks
    # int64 [U]: the user's rows in the log; with user_join_ms, the views drawn for the user,
    # of which a joiner keeps those after the join (the rest go to others)
    user_views: np.ndarray
    user_bias: np.ndarray  # float32 [U]
    user_factors: np.ndarray  # float32 [U, FACTOR_DIM]
    genre_preference: np.ndarray  # float32 [U, NUM_GENRES + 1]; the last column, 0, is "no genre"
    video_bias: np.ndarray  # float32 [V]
    video_factors: np.ndarray  # float32 [V, FACTOR_DIM]
    video_genres: np.ndarray  # int8 [V, MAX_GENRES_PER_VIDEO]; -1 = none, the first drives the score
    duration_ms: np.ndarray  # int32 [V]
    popularity_order: np.ndarray  # int32 [V]: the video id at each popularity rank
    # int64 [V]: when each video is uploaded (BEFORE_WINDOW for most); None: all before the log
    video_upload_ms: Optional[np.ndarray] = None
    # int64 [U]: when each user joins (BEFORE_WINDOW for most); None: all before the log
    user_join_ms: Optional[np.ndarray] = None

    @property
    def users(self) -> int:
        """U, the number of users."""
        return len(self.user_bias)

    @property
    def videos(self) -> int:
        """V, the number of videos."""
        return len(self.video_bias)

    def score(self, user_id: np.ndarray, video_id: np.ndarray, hourmin: np.ndarray) -> np.ndarray:
        """The logit of the expected watch ratio of each view (float64)."""
        user_id, video_id = np.asarray(user_id), np.asarray(video_id)
        dot = np.einsum("ij,ij->i", self.user_factors[user_id], self.video_factors[video_id])
        # genre -1 ("no genre") indexes the last column, which is 0
        genre = self.genre_preference[user_id, self.video_genres[video_id, 0]]
        duration = np.log(self.duration_ms[video_id] / DURATION_MEDIAN_MS)
        hour = np.asarray(hourmin) // 100
        return (
            SCORE_MEAN
            + self.user_bias[user_id].astype(np.float64)
            + self.video_bias[video_id]
            + dot
            + genre
            - DURATION_SLOPE * duration
            + HOUR_EFFECT * np.cos(2 * np.pi * (hour - HOUR_PEAK) / 24)
        )

    def expected_ratio(self, user_id: np.ndarray, video_id: np.ndarray, hourmin: np.ndarray) -> np.ndarray:
        """m = E[r | user, video, hour], the planted watch ratio of each view."""
        return expit(self.score(user_id, video_id, hourmin))


def kuairand_world(
    scale: float = 1.0,
    seed: int = 0,
    popularity_skew: float = ZIPF_EXPONENT,
    videos: Optional[int] = None,
    video_arrival: float = 0.0,
    user_arrival: float = 0.0,
) -> KuaiRandWorld:
    """Draw the hidden truth of ``write_kuairand_1k(out_dir, scale, seed, ...)``; independent of
    chunking. ``popularity_skew``, ``videos``, ``video_arrival`` and ``user_arrival`` are
    ``write_kuairand_1k``'s.

    Example:
        >>> world = kuairand_world(scale=0.001, seed=0)
        >>> (world.users, world.videos, world.rows)
        (2, 4370, 11713)
    """
    _check(scale, seed, 1, popularity_skew, videos, video_arrival, user_arrival)
    n_users, n_videos, n_rows = kuairand_1k_sizes(scale, videos)
    rng = _rng(seed, _USERS)
    activity = rng.lognormal(0.0, USER_ACTIVITY_LOG_SD, n_users)
    floor = min(MIN_USER_VIEWS, n_rows // n_users)
    user_views = floor + rng.multinomial(n_rows - floor * n_users, activity / activity.sum())
    user_bias = rng.normal(0.0, USER_BIAS_SD, n_users).astype(np.float32)
    user_factors = rng.normal(0.0, FACTOR_SD, (n_users, FACTOR_DIM)).astype(np.float32)
    genre_preference = np.zeros((n_users, NUM_GENRES + 1), dtype=np.float32)
    genre_preference[:, :NUM_GENRES] = rng.normal(0.0, GENRE_PREFERENCE_SD, (n_users, NUM_GENRES))

    rng = _rng(seed, _VIDEOS)
    video_bias = rng.standard_normal(n_videos, dtype=np.float32) * np.float32(VIDEO_BIAS_SD)
    video_factors = rng.standard_normal((n_videos, FACTOR_DIM), dtype=np.float32)
    video_factors *= np.float32(FACTOR_SD)
    duration = rng.lognormal(math.log(DURATION_MEDIAN_MS), DURATION_LOG_SD, n_videos)
    duration_ms = np.clip(np.round(duration), MIN_DURATION_MS, MAX_DURATION_MS).astype(np.int32)
    del duration
    popularity_order = rng.permutation(n_videos).astype(np.int32)
    # each on its own stream: the rest of the world is the same with or without arrival
    upload = _arrivals(_rng(seed, _ARRIVAL), video_arrival, popularity_order) if video_arrival > 0 else None
    join = None
    if user_arrival > 0:
        most_active = np.argsort(-user_views, kind="stable")
        join = _arrivals(_rng(seed, _USER_ARRIVAL), user_arrival, most_active)
    return KuaiRandWorld(
        scale=float(scale),
        seed=int(seed),
        rows=n_rows,
        popularity_skew=float(popularity_skew),
        user_views=user_views.astype(np.int64),
        user_bias=user_bias,
        user_factors=user_factors,
        genre_preference=genre_preference,
        video_bias=video_bias,
        video_factors=video_factors,
        video_genres=_video_genres(rng, n_videos),
        duration_ms=duration_ms,
        popularity_order=popularity_order,
        video_upload_ms=upload,
        user_join_ms=join,
    )


def _arrivals(rng: np.random.Generator, share: float, leading: np.ndarray) -> np.ndarray:
    """When each of ``len(leading)`` users or videos arrives: a ``share`` of them at a uniformly
    random moment of the log, the rest (always the first tenth of ``leading``, the most active
    or popular first) before it starts."""
    n = len(leading)
    arrives = rng.random(n) < share
    during = START_MS + np.floor(rng.random(n) * (END_MS - START_MS)).astype(np.int64)
    moment = np.where(arrives, during, BEFORE_WINDOW)
    moment[leading[: max(1, n // 10)]] = BEFORE_WINDOW
    return moment


def _video_genres(rng: np.random.Generator, n_videos: int) -> np.ndarray:
    """1-3 distinct genres per video, the first from a skewed genre popularity; 1% untagged."""
    first = rng.choice(NUM_GENRES, size=n_videos, p=rng.dirichlet(np.full(NUM_GENRES, 0.7)))
    count = rng.choice(MAX_GENRES_PER_VIDEO, size=n_videos, p=[0.55, 0.3, 0.15]) + 1
    second = (first + rng.integers(1, NUM_GENRES, n_videos)) % NUM_GENRES  # never the first
    third = (first + rng.integers(1, NUM_GENRES, n_videos)) % NUM_GENRES
    third = np.where(third == second, -1, third)  # a rare collision just drops the third
    genres = np.stack(
        [first, np.where(count >= 2, second, -1), np.where(count >= 3, third, -1)], axis=1
    ).astype(np.int8)
    genres[_exactly(rng, n_videos, 0.01)] = -1
    return genres


def _exactly(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """A random mask with round(fraction * n) rows, at least one: markers occur at every scale."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=max(1, round(fraction * n)), replace=False)] = True
    return mask


def _check(
    scale: float,
    seed: int,
    chunk_rows: int,
    skew: float = ZIPF_EXPONENT,
    videos: Optional[int] = None,
    video_arrival: float = 0.0,
    user_arrival: float = 0.0,
) -> None:
    for name, share in (("video_arrival", video_arrival), ("user_arrival", user_arrival)):
        if not (isinstance(share, (int, float)) and 0 <= share <= MAX_ARRIVAL):
            raise ConfigError(f"{name} must be a share in [0, {MAX_ARRIVAL}], got {share!r}")
    if not (isinstance(skew, (int, float)) and math.isfinite(skew) and skew >= 0):
        raise ConfigError(f"popularity_skew must be a number >= 0 (0: uniform), got {skew!r}")
    if videos is not None and not (isinstance(videos, (int, np.integer)) and videos >= 10):
        raise ConfigError(f"videos must be an integer >= 10, got {videos!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a positive number, got {scale!r}")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(chunk_rows, (int, np.integer)) and chunk_rows >= 1):
        raise ConfigError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if kuairand_1k_sizes(scale)[2] > MAX_ROWS:
        raise ConfigError(f"scale {scale} asks for more than {MAX_ROWS:,} log rows")


# ------------------------------------------------------------------ CSV text


@contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """Write to a partial name and rename on success, so a crash leaves no complete-looking file."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as handle:
            yield handle
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _header(columns: Sequence[str]) -> bytes:
    return (",".join(columns) + "\n").encode()


def _text(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _float_text(values: np.ndarray, missing: Union[np.ndarray, None] = None) -> pa.Array:
    """Whole numbers written as floats, "720.0", the way KuaiRand's pandas-written files have them."""
    text = pc.binary_join_element_wise(_text(values), pa.scalar(".0"), "")
    if missing is None:
        return text
    return pc.if_else(pa.array(missing), pa.scalar(""), text)


def _pick(labels: Sequence[str], index: np.ndarray) -> pa.Array:
    return pc.take(pa.array(labels, pa.string()), pa.array(index))


def _quoted(text: pa.Array) -> pa.Array:
    """CSV quoting where needed; no generated value contains a double quote."""
    wrapped = pc.binary_join_element_wise(pa.scalar('"'), text, pa.scalar('"'), "")
    return pc.if_else(pc.match_substring(text, ","), wrapped, text)


def _write_text_rows(handle: BinaryIO, columns: Sequence[pa.Array]) -> None:
    """Write string columns as CSV lines; pyarrow's writer would quote every string."""
    n = len(columns[0])
    for start in range(0, n, _TEXT_SLICE_ROWS):
        part = [c.slice(start, _TEXT_SLICE_ROWS) for c in columns]
        lines = pc.binary_join_element_wise(*part, ",")
        lines = pc.binary_join_element_wise(lines, pa.scalar(""), "\n")
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[
            lines.offset : lines.offset + len(lines) + 1
        ]
        handle.write(memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]])


# ------------------------------------------------------------------ user table

FOLLOW_EDGES = (0, 10, 50, 100, 150, 250, 500)
FOLLOW_LABELS = ("0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]", "(250,500]", "500+")
# fans and friends use KuaiRand's own half-open buckets ("1w" is 10,000)
FANS_EDGES = (0, 9, 99, 999, 4_999, 9_999, 99_999, 999_999)
FANS_LABELS = (
    "0",
    "[1,10)",
    "[10,100)",
    "[100,1k)",
    "[1k,5k)",
    "[5k,1w)",
    "[1w,10w)",
    "[10w,100w)",
    "[100w,1000w)",
)
FRIEND_EDGES = (0, 4, 29, 59, 119, 249)
FRIEND_LABELS = ("0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+")
# KuaiRand's labels; "1-14" only for users who join during the log (user_arrival)
REGISTER_EDGES = (14, 30, 60, 90, 180, 365, 730)
REGISTER_LABELS = ("1-14", "15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+")


def _bucket(values: np.ndarray, edges: Sequence[int], labels: Sequence[str]) -> pa.Array:
    """Label of the bucket (edge[i-1], edge[i]] holding each value; above the last edge: the last label."""
    return _pick(labels, np.searchsorted(np.asarray(edges), values, side="left"))


def _skewed_count(
    rng: np.random.Generator, n: int, median: float, log_sd: float, zero: float, cap: int
) -> np.ndarray:
    """Log-normal counts, capped, with a share ``zero`` of exact zeros."""
    count = np.minimum(np.floor(rng.lognormal(math.log(median), log_sd, n)), cap).astype(np.int64)
    count[rng.random(n) < zero] = 0
    return count


def _user_columns(world: KuaiRandWorld) -> List[pa.Array]:
    rng = _rng(world.seed, _USER_TABLE)
    n = world.users
    # the most active users are "full_active", as in KuaiRand; 1% unknown
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-world.user_views, kind="stable")] = np.arange(n)
    degree = np.searchsorted([0.65, 0.87], rank / n, side="right")
    degree[_exactly(rng, n, 0.01)] = 3
    live = (rng.random(n) < 0.2).astype(np.int64)
    live[_exactly(rng, n, 0.01)] = MISSING
    follow = _skewed_count(rng, n, 150, 1.3, 0.01, 5_000)
    fans = _skewed_count(rng, n, 40, 1.8, 0.04, 2_000_000)
    friends = _skewed_count(rng, n, 15, 1.5, 0.12, 5_000)
    register = np.minimum(15 + np.floor(rng.lognormal(math.log(900), 0.9, n)), 3_650).astype(np.int64)
    if world.user_join_ms is not None:  # the table is a snapshot at the log's end
        joined = world.user_join_ms != BEFORE_WINDOW
        register[joined] = 1 + (END_MS - 1 - world.user_join_ms[joined]) // DAY_MS
    columns = [
        _text(np.arange(n)),
        _pick(("full_active", "high_active", "middle_active", "UNKNOWN"), degree),
        _text((rng.random(n) < 0.02).astype(np.int64)),
        _text(live),
        _text((rng.random(n) < 0.75).astype(np.int64)),
        _text(follow),
        _quoted(_bucket(follow, FOLLOW_EDGES, FOLLOW_LABELS)),
        _text(fans),
        _quoted(_bucket(fans, FANS_EDGES, FANS_LABELS)),
        _text(friends),
        _quoted(_bucket(friends, FRIEND_EDGES, FRIEND_LABELS)),
        _text(register),
        _bucket(register, REGISTER_EDGES, REGISTER_LABELS),
    ]
    # the binary features 12-17 go missing together, as in KuaiRand; feature 4 on its own
    missing_4, missing_12_17 = _exactly(rng, n, 0.01), _exactly(rng, n, 0.01)
    for feature, cardinality in enumerate(ONEHOT_CARDINALITY):
        value = rng.choice(cardinality, size=n, p=rng.dirichlet(np.ones(cardinality))).astype(np.int64)
        if feature == 4:
            value[missing_4] = MISSING
        elif feature >= 12:
            value[missing_12_17] = MISSING
        columns.append(_text(value))
    return columns


# ------------------------------------------------------------------ video table

UPLOAD_TYPES = (
    "LongImport",
    "Web",
    "ShortImport",
    "Kmovie",
    "LongPicture",
    "PictureSet",
    "LongCamera",
    "ShortCamera",
)
UPLOAD_TYPE_WEIGHTS = np.array([39, 32, 12, 11, 2, 1, 1, 1], dtype=np.float64)
RESOLUTIONS = ((720, 1280), (1280, 720), (1080, 1920), (960, 1280), (720, 960), (1440, 1080))
RESOLUTION_WEIGHTS = np.array([68, 18, 6, 4, 3, 1], dtype=np.float64)
MUSIC_TYPES = ("9.0", "4.0", "8.0", "7.0", "11.0")
MUSIC_TYPE_WEIGHTS = np.array([88, 9, 1.5, 1, 0.5])
MAX_UPLOAD_AGE_DAYS = 3_650
UPLOAD_DATES = tuple(
    (WINDOW_START - dt.timedelta(days=age)).isoformat() for age in range(MAX_UPLOAD_AGE_DAYS + 1)
)
WINDOW_DATES = tuple((WINDOW_START + dt.timedelta(days=day)).isoformat() for day in range(WINDOW_DAYS))
GENRE_TEXT = tuple(str(g) for g in range(NUM_GENRES)) + ("",)
LATER_GENRE_TEXT = tuple("," + str(g) for g in range(NUM_GENRES)) + ("",)


def _weighted(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(len(weights), size=n, p=weights / weights.sum())


def _video_columns(world: KuaiRandWorld, start: int, stop: int, rng: np.random.Generator) -> List[pa.Array]:
    n = stop - start
    n_authors, n_songs = max(1, world.videos // 8), max(1, world.videos // 3)
    # powers of uniforms: low author and song indices are the prolific ones
    author = np.floor(n_authors * rng.random(n) ** 2).astype(np.int64)
    song = np.floor(n_songs * rng.random(n) ** 3).astype(np.int64)
    no_music = rng.random(n) < 0.027
    music_id = np.where(no_music, 0, 1_000_000_007 + song * 7_919)
    music_type = np.where(no_music, len(MUSIC_TYPES), _weighted(rng, MUSIC_TYPE_WEIGHTS, n))
    resolution = _weighted(rng, RESOLUTION_WEIGHTS, n)
    # uploaded before the log window starts, so no view precedes its video; a video that arrives
    # during the window (``video_arrival``) carries its upload day instead
    age = np.clip(np.floor(rng.lognormal(math.log(30), 1.3, n)), 1, MAX_UPLOAD_AGE_DAYS).astype(np.int64)
    if world.video_upload_ms is not None:
        upload = world.video_upload_ms[start:stop]
        during = upload != BEFORE_WINDOW
        age[during] = len(UPLOAD_DATES) + (upload[during] - START_MS) // DAY_MS
    genres = world.video_genres[start:stop].astype(np.int64)
    genres[genres < 0] = NUM_GENRES  # index of the "" label
    tag = pc.binary_join_element_wise(
        _pick(GENRE_TEXT, genres[:, 0]),
        _pick(LATER_GENRE_TEXT, genres[:, 1]),
        _pick(LATER_GENRE_TEXT, genres[:, 2]),
        "",
    )
    return [
        _text(np.arange(start, stop)),
        _text(author),
        _pick(("NORMAL", "AD"), (rng.random(n) < 0.01).astype(np.int64)),
        _pick(UPLOAD_DATES + WINDOW_DATES, age),
        _pick(UPLOAD_TYPES, _weighted(rng, UPLOAD_TYPE_WEIGHTS, n)),
        _pick(("0.0",), np.zeros(n, dtype=np.int64)),
        _float_text(world.duration_ms[start:stop], missing=rng.random(n) < 0.03),
        _float_text(np.array([w for w, _ in RESOLUTIONS])[resolution]),
        _float_text(np.array([h for _, h in RESOLUTIONS])[resolution]),
        _text(music_id),
        _pick(MUSIC_TYPES + ("",), music_type),
        _quoted(tag),
    ]


# ------------------------------------------------------------------ log


def _hourly_traffic() -> Tuple[np.ndarray, np.ndarray]:
    """Knots (ms after START_MS, one per hour) and the cumulative share of views at each."""
    weekend = np.array([(WINDOW_START + dt.timedelta(days=d)).weekday() >= 5 for d in range(WINDOW_DAYS)])
    day = np.where(weekend, WEEKEND_TRAFFIC, 1.0)
    day[:FIRST_FILE_DAYS] *= FIRST_FILE_SHARE / day[:FIRST_FILE_DAYS].sum()
    day[FIRST_FILE_DAYS:] *= (1 - FIRST_FILE_SHARE) / day[FIRST_FILE_DAYS:].sum()
    mass = (day[:, None] * (HOURLY_TRAFFIC / HOURLY_TRAFFIC.sum())[None, :]).ravel()
    cumulative = np.concatenate([[0.0], np.cumsum(mass)])
    return np.arange(len(cumulative), dtype=np.float64) * HOUR_MS, cumulative / cumulative[-1]


def _calendar_days() -> np.ndarray:
    days = (WINDOW_START + dt.timedelta(days=d) for d in range(WINDOW_DAYS))
    return np.array([d.year * 10_000 + d.month * 100 + d.day for d in days], dtype=np.int64)


def _bernoulli(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    return (rng.random(len(p)) < p).astype(np.int64)


def _binary_losses(p: np.ndarray) -> Dict[str, float]:
    """Sums, over rows, of the Bayes log loss (nats) and Brier score of a label with P(1) = p."""
    return {"log_loss": float(np.sum(entr(p) + entr(1 - p))), "brier": float(np.sum(p * (1 - p)))}


def _inverse_cdf(cdf: np.ndarray, uniforms: np.ndarray, order: Optional[np.ndarray] = None) -> np.ndarray:
    """The index each uniform draw falls in under ``cdf`` (through ``order`` when given)."""
    index = np.minimum(np.searchsorted(cdf, uniforms, side="right"), len(cdf) - 1)
    return index if order is None else order[index]


def _arrived(drawn: np.ndarray, time_ms: np.ndarray, arrival_ms: np.ndarray, redraw) -> np.ndarray:
    """``drawn`` (video or user ids) with each one not there yet at its view's time replaced by
    ``redraw(k)``'s, again until every one has arrived."""
    late = np.flatnonzero(arrival_ms[drawn] > time_ms)
    while late.size:
        drawn[late] = redraw(late.size)
        late = late[arrival_ms[drawn[late]] > time_ms[late]]
    return drawn


class _LogStream:
    """Produces the log chunk by chunk, in time order, and sums the noise floor as it goes."""

    def __init__(self, world: KuaiRandWorld, chunk_rows: int):
        self.world, self.chunk_rows = world, chunk_rows
        self.order_rng = _rng(world.seed, _LOG_ORDER)
        self.remaining = world.user_views.copy()
        self.popularity_cdf = np.cumsum(_popularity_weights(world.videos, world.popularity_skew))
        self.popularity_cdf /= self.popularity_cdf[-1]
        # who views a redrawn view when its user has not joined yet (user_arrival): by activity
        joining = world.user_join_ms is not None
        self.activity_cdf = np.cumsum(world.user_views) / world.user_views.sum() if joining else None
        self.knots, self.traffic = _hourly_traffic()
        self.days = _calendar_days()
        self.last_gap = np.iinfo(np.int64).min  # max of time_ms - row index so far
        self.sums: Dict[str, Dict[str, float]] = {}

    def chunks(self) -> Iterator[pa.Table]:
        for index, start in enumerate(range(0, self.world.rows, self.chunk_rows)):
            yield self._chunk(index, start, min(self.chunk_rows, self.world.rows - start))

    def _users(self, n: int) -> np.ndarray:
        """The next n views' users: a uniformly random interleaving of every user's views."""
        take = self.order_rng.multivariate_hypergeometric(self.remaining, n, method="marginals")
        self.remaining -= take
        users = np.repeat(np.arange(self.world.users, dtype=np.int64), take)
        self.order_rng.shuffle(users)
        return users

    def _times(self, rng: np.random.Generator, start: int, n: int) -> np.ndarray:
        """Stratified draws from the traffic curve, then nudged 1 ms apart so time always moves on."""
        row = np.arange(start, start + n, dtype=np.int64)
        share = (row + rng.random(n)) / self.world.rows
        offset = np.floor(np.interp(share, self.traffic, self.knots)).astype(np.int64)
        # t[i] > t[i-1]  <=>  t[i] - i >= t[i-1] - (i-1): a running max of the gap keeps order
        gap = START_MS + offset - row
        gap[0] = max(gap[0], self.last_gap)
        gap = np.maximum.accumulate(gap)
        self.last_gap = int(gap[-1])
        return np.minimum(gap + row, END_MS - 1)

    def _chunk(self, index: int, start: int, n: int) -> pa.Table:
        world, rng = self.world, _rng(self.world.seed, _LOG_ROWS, index)
        user = self._users(n)
        video = _inverse_cdf(self.popularity_cdf, rng.random(n), world.popularity_order).astype(np.int64)
        time_ms = self._times(rng, start, n)
        # a view of a video not uploaded yet, or by a user who has not joined yet, is drawn again
        # from the same law, on its own random stream: new videos' and users' views start on arrival
        if world.video_upload_ms is not None:
            draws = _rng(world.seed, _ARRIVAL_DRAWS, index)
            video = _arrived(
                video,
                time_ms,
                world.video_upload_ms,
                lambda k: _inverse_cdf(self.popularity_cdf, draws.random(k), world.popularity_order),
            )
        if world.user_join_ms is not None:
            draws = _rng(world.seed, _USER_ARRIVAL_DRAWS, index)
            user = _arrived(
                user, time_ms, world.user_join_ms, lambda k: _inverse_cdf(self.activity_cdf, draws.random(k))
            )
        within_day = (time_ms - START_MS) % DAY_MS
        hourmin = (within_day // HOUR_MS) * 100 + (within_day % HOUR_MS) // MINUTE_MS
        date = self.days[(time_ms - START_MS) // DAY_MS]

        score = world.score(user, video, hourmin)
        m = expit(score)
        a, b = KAPPA * m, KAPPA * (1 - m)
        ratio = rng.beta(a, b)
        duration = world.duration_ms[video].astype(np.int64)
        p = {flag: expit(icpt + slope * score) for flag, (icpt, slope) in FLAG_LOGITS.items()}
        flags = {flag: _bernoulli(rng, p[flag]) for flag in FLAG_LOGITS}
        comment_open = flags.pop("comment_open") | flags["is_comment"]
        # stay times are whole ms, at least 1 when the page was opened
        profile_stay = np.ceil(rng.lognormal(math.log(PROFILE_STAY_MEDIAN_MS), STAY_LOG_SD, n)).astype(
            np.int64
        )
        comment_stay = np.ceil(rng.lognormal(math.log(COMMENT_STAY_MEDIAN_MS), STAY_LOG_SD, n)).astype(
            np.int64
        )

        variance = float(np.sum(m * (1 - m))) / (KAPPA + 1)  # Var[r | x] of the Beta
        self._add("watch_ratio", {"mse": variance, "m": float(np.sum(m)), "m2": float(np.sum(m * m))})
        p_skip = betainc(a, b, SKIP_THRESHOLD)
        p_long = 1 - betainc(a, b, LONG_VIEW_THRESHOLD)
        for label, prob in (("skip", p_skip), ("long_view", p_long), ("is_click", p["is_click"])):
            self._add(label, {**_binary_losses(prob), "p": float(np.sum(prob))})
        self._add("is_like", {**_binary_losses(p["is_like"]), "p": float(np.sum(p["is_like"]))})

        columns = {
            "user_id": user,
            "video_id": video,
            "date": date,
            "hourmin": hourmin,
            "time_ms": time_ms,
            **{flag: flags[flag] for flag in FLAG_COLUMNS},
            "long_view": (ratio >= LONG_VIEW_THRESHOLD).astype(np.int64),
            "play_time_ms": np.round(ratio * duration).astype(np.int64),
            "duration_ms": duration,
            "profile_stay_time": np.where(flags["is_profile_enter"] == 1, profile_stay, 0),
            "comment_stay_time": np.where(comment_open == 1, comment_stay, 0),
            "is_profile_enter": flags["is_profile_enter"],
            "is_rand": np.zeros(n, dtype=np.int64),
            "tab": _weighted(rng, TAB_WEIGHTS, n).astype(np.int64),
        }
        return pa.table([pa.array(columns[c]) for c in LOG_COLUMNS], names=list(LOG_COLUMNS))

    def _add(self, label: str, sums: Dict[str, float]) -> None:
        into = self.sums.setdefault(label, {})
        for key, value in sums.items():
            into[key] = into.get(key, 0.0) + value

    def noise_floor(self) -> Dict[str, object]:
        rows, sums = self.world.rows, self.sums
        mean_m = sums["watch_ratio"]["m"] / rows
        floor_mse = sums["watch_ratio"]["mse"] / rows
        # the best constant predicts E[r]; its mse is Var[r] = Var[m] + E[Var[r | x]]
        out: Dict[str, object] = {
            "watch_ratio": {
                "mse": floor_mse,
                "constant_mse": sums["watch_ratio"]["m2"] / rows - mean_m**2 + floor_mse,
            }
        }
        for label in ("skip", "long_view", "is_click", "is_like"):
            rate = sums[label]["p"] / rows
            out[label] = {
                "log_loss": sums[label]["log_loss"] / rows,
                "brier": sums[label]["brier"] / rows,
                "constant_log_loss": float(entr(rate) + entr(1 - rate)),
                "constant_brier": rate * (1 - rate),
                "rate": rate,
            }
        return out


# ------------------------------------------------------------------ the public entry point

NOTES = (
    "Losses of the Bayes predictor that knows the generator's hidden truth, averaged over all log rows "
    "(a random test split has the same expectation): no model can do better in expectation. constant_* "
    "is the loss of the best constant predictor. Labels as engagerec prepares them with skip threshold "
    "0.5 and ratio cap 1: watch_ratio = play_time_ms / duration_ms, which equals the hidden Beta draw r up "
    "to the rounding of play_time_ms to whole ms (under 0.5 / duration_ms); skip = watch_ratio < 0.5; "
    "long_view = r >= 0.8. Log loss in nats."
)


def write_kuairand_1k(
    out_dir: Union[str, Path],
    scale: float = 1.0,
    seed: int = 0,
    chunk_rows: int = 1_000_000,
    popularity_skew: float = ZIPF_EXPONENT,
    videos: Optional[int] = None,
    video_arrival: float = 0.0,
    user_arrival: float = 0.0,
) -> dict:
    """Write KuaiRand-1K-shaped synthetic files, in KuaiRand's layout, under ``out_dir``.

    Files: ``log_standard_4_08_to_4_21_1k.csv`` and ``log_standard_4_22_to_5_08_1k.csv``
    (LOG_COLUMNS, time order), ``user_features_1k.csv`` (USER_COLUMNS),
    ``video_features_basic_1k.csv`` (VIDEO_COLUMNS), ``noise_floor.json`` (written last)
    and ``README.txt``. The same arguments give byte-identical files. Memory is bounded:
    per-user and per-video arrays, and per-row arrays for one chunk at a time.

    long_view is 1 when the hidden watch ratio r is >= 0.8 (not KuaiRand's own play-time
    rule); see the module docstring for the rest of the model.

    Args:
        out_dir: directory to write into; created if missing. These files are replaced.
        scale: 1.0 gives KuaiRand-1K's sizes; users, videos and rows scale linearly
            (at least 2 users, 10 videos and 100 rows), see ``kuairand_1k_sizes``.
        seed: non-negative integer; with scale it fixes the hidden truth and every row.
        chunk_rows: log and video-table rows generated per step; bounds memory. The
            output depends on it, so keep it fixed for reproducible files.
        popularity_skew: the exponent of the videos' popularity power law (the data's shape):
            1.05 (default) gives about 1.9M distinct videos at scale 1, 1.3 a stronger head
            (about 1.1M), 0.65 a flatter one (about 3.2M); 0 is uniform.
        videos: the catalogue's size (default: KuaiRand-1K's 4,369,953 times ``scale``).
        video_arrival: the share of the catalogue uploaded during the log's 31 days, at a
            uniformly random moment (``upload_dt`` its day), each viewed only from then on; the
            others, as by default (0), before the log starts, among them always the most popular
            tenth (so at most 0.9). A growing catalogue, for the retraining replay: each day
            brings videos no earlier day had. Users and view times are the default's; labels
            are drawn for the videos viewed (``expected_distinct_videos`` is then None).
        user_arrival: the share of users who join during the log, at a uniformly random moment,
            each viewing only from then on (the views drawn for a user before that go to users
            already there, by activity); the most active tenth is always there from the start
            (so at most 0.9). A joiner's ``register_days`` counts from the join to the log's end.
            New users every day, for the retraining replay; view times are the default's.

    Returns:
        The content of noise_floor.json: per-label Bayes losses, sizes, scale, seed, kappa,
        the popularity skew and the expected number of distinct videos in the log.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as out:
        ...     floor = write_kuairand_1k(out, scale=0.001, seed=0)
        >>> floor["users"], floor["videos"], floor["rows"]
        (2, 4370, 11713)
        >>> 0 < floor["watch_ratio"]["mse"] < floor["watch_ratio"]["constant_mse"]
        True
    """
    _check(scale, seed, chunk_rows, popularity_skew, videos, video_arrival, user_arrival)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # stale files from an earlier run would mix with this one's if it crashed
    for name in (NOISE_FLOOR_FILE, README_FILE, USER_FILE, VIDEO_FILE, *LOG_FILES):
        (out / name).unlink(missing_ok=True)
    world = kuairand_world(scale, seed, popularity_skew, videos, video_arrival, user_arrival)

    with _atomic(out / USER_FILE) as handle:
        handle.write(_header(USER_COLUMNS))
        _write_text_rows(handle, _user_columns(world))

    with _atomic(out / VIDEO_FILE) as handle:
        handle.write(_header(VIDEO_COLUMNS))
        for index, start in enumerate(range(0, world.videos, chunk_rows)):
            stop = min(start + chunk_rows, world.videos)
            _write_text_rows(handle, _video_columns(world, start, stop, _rng(seed, _VIDEO_TABLE, index)))

    stream = _LogStream(world, chunk_rows)
    options = pa_csv.WriteOptions(include_header=False)
    with _atomic(out / LOG_FILES[0]) as first, _atomic(out / LOG_FILES[1]) as second:
        first.write(_header(LOG_COLUMNS))
        second.write(_header(LOG_COLUMNS))
        for table in stream.chunks():
            time_ms = table.column("time_ms").to_numpy()
            cut = int(np.searchsorted(time_ms, FIRST_FILE_END_MS, side="left"))
            if cut > 0:
                pa_csv.write_csv(table.slice(0, cut), first, options)
            if cut < len(table):
                pa_csv.write_csv(table.slice(cut), second, options)

    floor: Dict[str, object] = {
        **stream.noise_floor(),
        "rows": world.rows,
        "users": world.users,
        "videos": world.videos,
        "scale": float(scale),
        "seed": int(seed),
        "popularity_skew": world.popularity_skew,
        # the formula assumes every video there from the start: none with arrival
        "expected_distinct_videos": (
            None
            if video_arrival
            else expected_distinct_videos(world.rows, world.videos, world.popularity_skew)
        ),
        "kappa": KAPPA,
        "skip_threshold": SKIP_THRESHOLD,
        "ratio_cap": 1.0,
        "long_view_threshold": LONG_VIEW_THRESHOLD,
        "notes": NOTES,
    }
    # recorded where set: the default files stay as they were
    if video_arrival:
        floor["video_arrival"] = float(video_arrival)
    if user_arrival:
        floor["user_arrival"] = float(user_arrival)
    with _atomic(out / README_FILE) as handle:
        handle.write(_readme(world, chunk_rows).encode())
    with _atomic(out / NOISE_FLOOR_FILE) as handle:
        handle.write((json.dumps(floor, indent=2) + "\n").encode())
    return floor


def _arrival_share(moments: np.ndarray) -> float:
    """The share of videos (users) arriving during the log (drawn: near the asked one)."""
    return round(float(np.mean(moments != BEFORE_WINDOW)), 4)


def _readme(world: KuaiRandWorld, chunk_rows: int) -> str:
    arrivals = (("video_arrival", world.video_upload_ms), ("user_arrival", world.user_join_ms))
    return (
        "SYNTHETIC DATA - not KuaiRand. Generated by engagerec "
        "(engagerec.data.kuairand_generator.write_kuairand_1k) with "
        f"scale={world.scale!r}, seed={world.seed}, chunk_rows={chunk_rows}, "
        f"popularity_skew={world.popularity_skew!r}"
        + "".join(
            f", {name}={_arrival_share(moments)!r}" for name, moments in arrivals if moments is not None
        )
        + ".\n"
        "The files follow the layout and column names of KuaiRand-1K (Gao et al., CIKM 2022):\n"
        f"  {LOG_FILES[0]}, {LOG_FILES[1]}: {world.rows:,} views in time order\n"
        f"  {USER_FILE}: {world.users:,} users; {VIDEO_FILE}: {world.videos:,} videos\n"
        "The watch ratio and the other labels come from a planted model; -124 marks missing values.\n"
        f"{NOISE_FLOOR_FILE}: the best loss any model can reach on each label (the noise floor).\n"
    )
