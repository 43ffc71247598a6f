"""How much of the watch ratio's explainable variance a temporal split lets any model recover, on
KuaiRand-1K-shaped data whose hidden truth is known (engagerec.data.kuairand_generator).

    .venv/bin/python benchmarks/explainable_bound.py --raw generated/kuairand_1k \\
        [--model-mse 0.0624] [--min-views 1 2 5 20]

The generator's noise floor assumes a predictor that knows every video's hidden bias and factors.
A model learns a video only from its training views, and under a temporal split a test row's
video may have none. This script splits the log as configs/kuairand_1k.yaml does (by time:
the last 20% test, 5% of the rest validation, ``engagerec.data.split.cut_points``) and scores
the test rows with an oracle that knows every user, the hour, each video's duration and genre,
and, exactly, the bias and factors of every video with at least ``k`` training views; for any
other video it predicts the expectation over the generator's prior of the video's bias and
factors, E[sigmoid(known + b + <u, v>)] with b ~ N(0, 0.5^2) and v ~ N(0, 0.45^2 I)
(Gauss-Hermite quadrature). With k = 1 no model can beat it in expectation: its share is an
upper bound, and a model, which must estimate each seen video from its few noisy views, stays
below it. With k > 1 the oracle ignores what 1..k-1 views say about a video, so those rows are
reference points (how much rests on the videos seen fewer than k times), not bounds.

A last row asks what learning costs, rather than what the split allows: a learner that knows every
user, hour, duration and genre exactly (a model sees each user some 9,000 times) and estimates
each video's bias and factors from that video's training views alone, with the generator's prior
(``learned_videos``: the posterior mode of least squares weighted by the Beta noise's variance,
m (1 - m) / (kappa + 1), and its Laplace covariance; a test row then gets E[sigmoid] over that
posterior). It is a reference point, not a bound: the Beta likelihood itself says a little more
per view than least squares, and a model must also learn the users; but it is what a model
trained with a squared loss could reach if it learned every video as well as the data allow.

With ``--predictions`` (``engagerec predict --input <a preparation> --split test`` of runs
trained on a preparation of this log split as the config splits it, with ``--prepared`` naming
the preparation of each file, or one for all, for its vocabularies), a
second table says where each model loses: the test rows grouped by how many training views their
video has, and in each group the excess squared error over the noise floor, E[(prediction - m)^2],
of the train-mean constant, the learner and each model.

Reported on the test rows, in expectation over the labels' Beta noise: the noise floor F
(E[Var(r | x)]), the train-mean constant's MSE C, the oracle's MSE and its share of the
explainable variance, (C - oracle) / (C - F); with ``--model-mse``, a model's share on the same
footing. Writes the section ``--section`` (``explainable_bound``) of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from scipy.special import expit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import record_section  # noqa: E402

CONFIG = REPO / "configs" / "kuairand_1k.yaml"


def read_log(raw: Path) -> pa.Table:
    """The views of ``write_kuairand_1k``'s log files under ``raw``, in time order.

    Args:
        raw: the generator's output directory.

    Returns:
        pa.Table: user_id, video_id, hourmin, time_ms, play_time_ms and duration_ms of every view,
        in the files' order.

    Raises:
        SystemExit: the files are not in time order (not the generator's).
    """
    from engagerec.data.kuairand_generator import LOG_FILES

    columns = ["user_id", "video_id", "hourmin", "time_ms", "play_time_ms", "duration_ms"]
    options = pa_csv.ConvertOptions(include_columns=columns)
    table = pa.concat_tables([pa_csv.read_csv(raw / name, convert_options=options) for name in LOG_FILES])
    time_ms = table.column("time_ms").to_numpy()
    if not (np.diff(time_ms) >= 0).all():
        raise SystemExit(f"{raw}: the log is not in time order")
    return table


def prior_expectation(
    known: np.ndarray, variance: np.ndarray, nodes: int = 32, block: int = 1 << 18
) -> np.ndarray:
    """E[sigmoid(known + sqrt(variance) Z)], Z ~ N(0, 1), per row, by Gauss-Hermite quadrature.

    Args:
        known: float64 [N], the logit's known part.
        variance: float64 [N], the variance of its unknown, normal part.
        nodes: quadrature nodes (32: exact to float64 rounding for these spreads).
        block: rows computed at once (memory: block x nodes float64).

    Returns:
        np.ndarray: float64 [N].

    Example:
        >>> round(float(prior_expectation(np.array([0.0]), np.array([4.0]))[0]), 6)  # symmetric
        0.5
    """
    x, w = np.polynomial.hermite.hermgauss(nodes)
    out = np.empty(len(known))
    for start in range(0, len(known), block):
        part = slice(start, start + block)
        spread = np.sqrt(2.0 * variance[part])[:, None] * x[None, :]
        out[part] = (expit(known[part, None] + spread) * w[None, :]).sum(axis=1) / np.sqrt(np.pi)
    return out


def learned_videos(
    inputs: np.ndarray,
    known: np.ndarray,
    ratio: np.ndarray,
    video: np.ndarray,
    prior_variance: np.ndarray,
    kappa: float,
    iterations: int = 8,
) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """Each video's hidden logit part, estimated from its training views by a learner that knows
    the rest: the posterior mode of theta in ratio ~ sigmoid(known + inputs . theta_video), under a
    normal prior, by Newton steps on least squares weighted by the Beta noise's variance
    m (1 - m) / (kappa + 1) (a quasi-likelihood); and the Laplace covariance at the mode.

    Args:
        inputs: float64 [N, P], what multiplies a video's parameters in a view (1 for the bias, then
            the viewer's factors).
        known: float64 [N], the rest of each view's logit.
        ratio: float64 [N], the observed watch ratios.
        video: int [N], each view's video.
        prior_variance: float64 [P], the prior's variance of each parameter (independent, mean 0).
        kappa: the Beta noise's concentration.
        iterations: Newton steps (the mode moves by less than 1e-6 after 6 here).

    Returns:
        (ids int [K], the videos viewed, sorted; mean float64 [K, P]; covariance float64 [K, P, P]).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> views = 400  # one video, bias 1: its estimate nears 1 as views grow
        >>> x, k = np.ones((views, 1)), np.zeros(views)
        >>> r = rng.beta(4 * expit(1.0), 4 * (1 - expit(1.0)), views)
        >>> ids, mean, cov = learned_videos(x, k, r, np.zeros(views, int), np.array([0.25]), 4.0)
        >>> bool(abs(mean[0, 0] - 1.0) < 3 * np.sqrt(cov[0, 0, 0])), bool(cov[0, 0, 0] < 0.01)
        (True, True)
    """
    ids, index = np.unique(video, return_inverse=True)
    params = inputs.shape[1]
    precision = np.diag(1.0 / prior_variance)
    pairs = [(a, b) for a in range(params) for b in range(a, params)]
    theta = np.zeros((len(ids), params))

    def mean_ratio() -> np.ndarray:  # each view's expected ratio under the current theta
        return expit(known + np.einsum("ij,ij->i", inputs, theta[index]))

    def curvature(m: np.ndarray) -> np.ndarray:
        # sum over a video's views of (kappa + 1) m (1 - m) x x^T, one bincount per upper-triangle entry
        weight = (kappa + 1) * m * (1 - m)
        h = np.empty((len(ids), params, params))
        for a, b in pairs:
            h[:, a, b] = h[:, b, a] = np.bincount(index, weight * inputs[:, a] * inputs[:, b], len(ids))
        return h + precision

    for _ in range(iterations):
        m = mean_ratio()
        residual = (kappa + 1) * (ratio - m)
        gradient = (
            np.stack([np.bincount(index, residual * inputs[:, a], len(ids)) for a in range(params)], axis=1)
            - theta @ precision
        )
        theta += np.linalg.solve(curvature(m), gradient[..., None])[..., 0]
    return ids, theta, np.linalg.inv(curvature(mean_ratio()))


VIEW_GROUPS = ((0, 0), (1, 1), (2, 4), (5, 19), (20, 99), (100, None))


def partial_oracles(
    world, user: np.ndarray, video: np.ndarray, score: np.ndarray, inputs: np.ndarray
) -> "tuple[np.ndarray, np.ndarray]":
    """Two oracles that know all of each row's logit but one part.

    Args:
        world: the generator's hidden truth (``KuaiRandWorld``).
        user: int [T], the rows' users.
        video: int [T], their videos.
        score: float64 [T], their logits.
        inputs: float64 [T, 1 + factors], 1 and the user's factors (as ``learned_videos`` reads).

    Returns:
        (E[sigmoid] with the video's factors drawn from the prior instead of known; sigmoid with
        the user's mean preference over the video's listed genres in place of the first genre's).
    """
    from engagerec.data.kuairand_generator import FACTOR_SD, NUM_GENRES

    factors = inputs[:, 1:]
    interaction = np.einsum("ij,ij->i", factors, world.video_factors[video])
    without_factors = prior_expectation(score - interaction, FACTOR_SD**2 * (factors**2).sum(axis=1))
    listed = world.video_genres[video].astype(np.int64)  # -1: none; the last column is 0, "no genre"
    prefs = world.genre_preference[user[:, None], np.where(listed >= 0, listed, NUM_GENRES)]
    tagged = (listed >= 0).sum(axis=1)
    bag = np.where(tagged > 0, (prefs * (listed >= 0)).sum(axis=1) / np.maximum(tagged, 1), 0.0)
    first = world.genre_preference[user, listed[:, 0]]  # -1 reads the "no genre" column
    return without_factors, expit(score - first + bag)


def decoded_predictions(path: Path, prepared: Path, user: np.ndarray, video: np.ndarray) -> np.ndarray:
    """A predict output's watch ratios, checked to be the test rows in the log's order.

    Args:
        path: ``engagerec predict --split test`` output (columns row, user_id_index,
            content_id_index, watch_ratio).
        prepared: the preparation it scored (its vocabularies decode the indices; index 0 is OOV).
        user: int [T], the log's test rows' users, in order.
        video: int [T], their videos.

    Returns:
        np.ndarray: float64 [T], the predicted watch ratio of each test row.

    Raises:
        SystemExit: the file holds other rows, or rows in another order.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["row", "user_id_index", "content_id_index", "watch_ratio"])
    if not np.array_equal(table.column("row").to_numpy(), np.arange(len(user))):
        raise SystemExit(f"{path}: not the test rows of {prepared}'s log in order (its row column)")
    for column, raw, vocab in (("user_id_index", user, "user_id"), ("content_id_index", video, "content_id")):
        tokens = pq.read_table(prepared / "vocabs" / f"{vocab}.parquet").column(0).to_numpy()
        index = table.column(column).to_numpy()
        seen = index > 0  # 0: out of vocabulary (a video never trained on), nothing to decode
        if len(index) != len(raw) or not (tokens[index[seen] - 1] == raw[seen]).all():
            raise SystemExit(f"{path}: not the test rows of {prepared}'s log in order ({column} differs)")
    return table.column("watch_ratio").to_numpy().astype(np.float64)


def main() -> None:
    """Score the test rows with the oracle for each ``--min-views`` and write the table."""
    from engagerec.config import load_config
    from engagerec.data.kuairand_generator import (
        FACTOR_DIM,
        FACTOR_SD,
        KAPPA,
        VIDEO_BIAS_SD,
        kuairand_world,
    )
    from engagerec.data.split import cut_points

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", default="generated/kuairand_1k", help="write_kuairand_1k's directory")
    parser.add_argument("--model-mse", type=float, nargs="*", default=[], help="test MSEs to put beside")
    parser.add_argument("--min-views", type=int, nargs="+", default=[1, 2, 5, 20])
    parser.add_argument("--predictions", nargs="*", default=[], help="predict outputs on the test split")
    parser.add_argument("--names", nargs="*", default=[], help="a name for each predictions file")
    parser.add_argument("--section", default="explainable_bound", help="the RESULTS.md section written")
    parser.add_argument(
        "--prepared", nargs="*", default=[], help="the preparation each predictions file scored (one for all)"
    )
    args = parser.parse_args()
    raw = Path(args.raw)
    made = json.loads((raw / "noise_floor.json").read_text())
    world = kuairand_world(
        made["scale"],
        made["seed"],
        made["popularity_skew"],
        made["videos"],
        made.get("video_arrival", 0.0),
        made.get("user_arrival", 0.0),
    )
    log = read_log(raw)
    rows = log.num_rows
    split = load_config(str(CONFIG)).data.split
    train_end, test_start = cut_points(rows, split.test_fraction, split.val_fraction)
    user, video, hourmin = (log.column(name).to_numpy() for name in ("user_id", "video_id", "hourmin"))
    ratio = log.column("play_time_ms").to_numpy() / log.column("duration_ms").to_numpy()
    del log
    views = np.bincount(video[:train_end], minlength=world.videos)
    # the constant a model learns: the training rows' mean label, in expectation
    train_mean = float(world.expected_ratio(user[:train_end], video[:train_end], hourmin[:train_end]).mean())

    def inputs_and_known(rows: slice) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
        # what multiplies a video's (bias, factors) in each view, the logit without that part, the logit
        u, v = user[rows], video[rows]
        score = world.score(u, v, hourmin[rows])
        inputs = np.concatenate([np.ones((len(u), 1)), world.user_factors[u].astype(np.float64)], axis=1)
        hidden = world.video_bias[v] + np.einsum("ij,ij->i", inputs[:, 1:], world.video_factors[v])
        return inputs, score - hidden, score

    prior = np.array([VIDEO_BIAS_SD**2] + [FACTOR_SD**2] * FACTOR_DIM)
    train_inputs, train_known, _ = inputs_and_known(slice(0, train_end))
    ids, mean, covariance = learned_videos(
        train_inputs, train_known, ratio[:train_end], video[:train_end], prior, KAPPA
    )
    del train_inputs, train_known
    inputs, known, score = inputs_and_known(slice(test_start, None))
    test_user, test_video = user[test_start:], video[test_start:]
    m = expit(score)
    floor = float(np.mean(m * (1 - m)) / (KAPPA + 1))
    constant = float(np.mean((m - train_mean) ** 2)) + floor
    # the hidden part's prior variance given the user, and the expectation over it
    unseen_mean = prior_expectation(known, inputs**2 @ prior)
    # the learner: the posterior over a trained-on video's part, the prior for any other
    trained = views[test_video] > 0  # exactly the videos learned_videos saw (ids, sorted)
    at = np.searchsorted(ids, test_video[trained])
    learned = unseen_mean.copy()
    learned[trained] = prior_expectation(
        known[trained] + np.einsum("ij,ij->i", inputs[trained], mean[at]),
        np.einsum("ij,ijk,ik->i", inputs[trained], covariance[at], inputs[trained]),
    )
    lines = [
        f"Data: `{raw}` ({rows:,} views, scale {made['scale']:g}, "
        f"popularity skew {made['popularity_skew']:g}); "
        f"{len(m):,} test rows. On the test rows: noise floor F = {floor:.4f}, train-mean constant "
        f"C = {constant:.4f} (explainable variance C - F = {constant - floor:.4f}). The oracle knows "
        "every user, hour, duration and genre; a video exactly when it has at least k training views, "
        "else through the generator's prior. k = 1 is an upper bound on any model; k > 1 is a "
        "reference point, not a bound (the oracle then ignores what fewer views say).",
        "",
        "| the oracle knows exactly the videos with at least | test rows with such a video | oracle MSE "
        "| share of the explainable variance |",
        "|---:|---:|---:|---:|",
    ]
    for k in args.min_views:
        known_video = views[test_video] >= k
        predicted = np.where(known_video, m, unseen_mean)
        mse = float(np.mean((predicted - m) ** 2)) + floor
        lines.append(
            f"| {k} training view{'s' if k > 1 else ''} | {known_video.mean():.1%} | {mse:.4f} | "
            f"{(constant - mse) / (constant - floor):.1%} |"
        )
    mse = float(np.mean((learned - m) ** 2)) + floor
    share = (constant - mse) / (constant - floor)
    lines += [
        "",
        "| a learner that knows every user and learns each video from its training views | test rows "
        "with a trained-on video | its MSE | share of the explainable variance |",
        "|---|---:|---:|---:|",
        f"| least squares weighted by the Beta noise, the generator's prior, Laplace posterior "
        f"(`learned_videos`) | {trained.mean():.1%} | {mse:.4f} | {share:.1%} |",
    ]
    if args.predictions:
        names = args.names or [Path(p).stem for p in args.predictions]
        if len(names) != len(args.predictions):
            raise SystemExit("--names: give one name per --predictions file")
        prepared = args.prepared * len(args.predictions) if len(args.prepared) == 1 else args.prepared
        if len(prepared) != len(args.predictions):
            raise SystemExit("--prepared: give one preparation, or one per --predictions file")
        models = [
            decoded_predictions(Path(p), Path(d), test_user, test_video)
            for p, d in zip(args.predictions, prepared, strict=True)
        ]
        oracles = partial_oracles(world, test_user, test_video, score, inputs)
        lines += [
            "",
            "Where the error lies: the test rows by their video's training views; in each group the "
            "excess squared error over the noise floor, E[(prediction - m)^2], x 1000. Beside the "
            "constant and the learner, two oracles that know everything but one part: the video's "
            "factors (their interaction with the user's, E over the prior instead), or the genre "
            "(the user's mean preference over the video's listed genres instead of the first "
            "genre's: what a pooled genre bag offers).",
            "",
            "| training views | test rows | train-mean constant | learner | oracle without the factors "
            "| oracle with a genre bag | " + " | ".join(names) + " |",
            "|---|---:|---:|---:|---:|---:|" + "---:|" * len(names),
        ]
        trained_views = views[test_video]
        for low, high in VIEW_GROUPS:
            group = (trained_views >= low) & (trained_views <= (high if high is not None else np.inf))
            label = f"{low}+" if high is None else (f"{low}" if low == high else f"{low}-{high}")
            excess = [
                float(np.mean((p[group] - m[group]) ** 2)) * 1000
                for p in (np.full_like(m, train_mean), learned, *oracles, *models)
            ]
            lines.append(f"| {label} | {group.mean():.1%} | " + " | ".join(f"{e:.2f}" for e in excess) + " |")
    for mse in args.model_mse:
        lines.append(
            f"\nA model with test MSE {mse:.4f} recovers {(constant - mse) / (constant - floor):.1%}."
        )
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
