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

Reported on the test rows, in expectation over the labels' Beta noise: the noise floor F
(E[Var(r | x)]), the train-mean constant's MSE C, the oracle's MSE and its share of the
explainable variance, (C - oracle) / (C - F); with ``--model-mse``, a model's share on the same
footing. Writes the section ``explainable_bound`` of benchmarks/RESULTS.md.
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
        pa.Table: user_id, video_id, hourmin and time_ms of every view, in the files' order.

    Raises:
        SystemExit: the files are not in time order (not the generator's).
    """
    from engagerec.data.kuairand_generator import LOG_FILES

    columns = ["user_id", "video_id", "hourmin", "time_ms"]
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


def main() -> None:
    """Score the test rows with the oracle for each ``--min-views`` and write the table."""
    from engagerec.config import load_config
    from engagerec.data.kuairand_generator import FACTOR_SD, KAPPA, VIDEO_BIAS_SD, kuairand_world
    from engagerec.data.split import cut_points

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", default="generated/kuairand_1k", help="write_kuairand_1k's directory")
    parser.add_argument("--model-mse", type=float, nargs="*", default=[], help="test MSEs to put beside")
    parser.add_argument("--min-views", type=int, nargs="+", default=[1, 2, 5, 20])
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
    del log
    views = np.bincount(video[:train_end], minlength=world.videos)
    # the constant a model learns: the training rows' mean label, in expectation
    train_mean = float(world.expected_ratio(user[:train_end], video[:train_end], hourmin[:train_end]).mean())
    user, video, hourmin = user[test_start:], video[test_start:], hourmin[test_start:]
    score = world.score(user, video, hourmin)
    m = expit(score)
    floor = float(np.mean(m * (1 - m)) / (KAPPA + 1))
    constant = float(np.mean((m - train_mean) ** 2)) + floor
    # the score without the video's hidden part, and that part's prior variance given the user
    factors = world.user_factors[user].astype(np.float64)
    hidden = world.video_bias[video] + np.einsum("ij,ij->i", factors, world.video_factors[video])
    known = score - hidden
    variance = VIDEO_BIAS_SD**2 + FACTOR_SD**2 * np.einsum("ij,ij->i", factors, factors)
    unseen_mean = prior_expectation(known, variance)
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
        known_video = views[video] >= k
        predicted = np.where(known_video, m, unseen_mean)
        mse = float(np.mean((predicted - m) ** 2)) + floor
        lines.append(
            f"| {k} training view{'s' if k > 1 else ''} | {known_video.mean():.1%} | {mse:.4f} | "
            f"{(constant - mse) / (constant - floor):.1%} |"
        )
    for mse in args.model_mse:
        lines.append(
            f"\nA model with test MSE {mse:.4f} recovers {(constant - mse) / (constant - floor):.1%}."
        )
    record_section("explainable_bound", lines)


if __name__ == "__main__":
    main()
