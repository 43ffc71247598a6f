"""Which parts of the hidden truth a run's id tables hold, on KuaiRand-1K-shaped data whose truth is
known (engagerec.data.kuairand_generator): the users' and the videos' factors and biases.

    .venv/bin/python benchmarks/factor_recovery.py --raw generated/kuairand_1k \\
        --prepared prepared/kuairand_1k --runs RUN [RUN ...] --names NAME [NAME ...] [--mf] \\
        [--section factor_recovery]

The generator's watch-ratio logit holds mu + user bias + video bias + <user factors, video
factors> (6 each) + the user's preference for the video's first genre + hour and duration terms. A
model's dot product <e_user, e_video> can express the factor term only if its embeddings hold the
factors up to a linear map, so for each run (its best checkpoint) this fits, by least squares, the
true factors (and biases) from the learned rows, and reports R^2: for the users, and for the videos
grouped by their training views (a video seen a few times cannot be learned, whatever the model).

With ``--mf``, a reference beside the runs: plain matrix factorisation, sigmoid(mu + b_u + b_v +
<p_u, q_v>) trained with a squared loss on the prepared training split's watch ratios, one pass,
batches of 4096, 32 factors, row-wise Adagrad at 0.1 (the engagerec default's update, written out in
PyTorch), rows starting as TorchRec's do: what one epoch of the dot product alone learns. Writes the
section ``--section`` (``factor_recovery``) of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import record_section  # noqa: E402

VIDEO_GROUPS = ((1, 4), (5, 19), (20, 99), (100, None))
TABLES = {"user": "user_id", "video": "content_id"}


def r_squared(learned: np.ndarray, truth: np.ndarray) -> float:
    """The share of ``truth``'s variance (summed over its columns) that a least-squares linear map
    of ``learned`` (with an intercept) explains.

    Args:
        learned: [n, d] learned rows.
        truth: [n, k] or [n] true values.

    Returns:
        float: R^2 in [0, 1] (0 for no rows).

    Example::

        >>> x = np.random.default_rng(0).normal(size=(100, 3))
        >>> round(r_squared(x, x @ np.array([[1.0], [2.0], [0.0]])), 6)
        1.0
    """
    truth = truth.reshape(len(truth), -1).astype(np.float64)
    if len(truth) == 0:
        return 0.0
    design = np.c_[learned.astype(np.float64), np.ones(len(learned))]
    coef, *_ = np.linalg.lstsq(design, truth, rcond=None)
    residual = truth - design @ coef
    return float(1.0 - residual.var(axis=0).sum() / truth.var(axis=0).sum())


def vocabulary(prepared: Path, space: str) -> np.ndarray:
    """The raw id of each table row from 1 on (row 0 is out-of-vocabulary), from the preparation."""
    return pq.read_table(prepared / "vocabs" / f"{space}.parquet").column("token").to_numpy()


def training_views(prepared: Path, rows: int) -> np.ndarray:
    """How many training rows each content_id table row has."""
    column = ds.dataset(prepared / "train").to_table(columns=["content_id"]).column("content_id")
    return np.bincount(column.to_numpy(), minlength=rows)


def run_tables(run: Path) -> Dict[str, np.ndarray]:
    """The user and video tables of a run's best checkpoint, opened as ``engagerec predict`` opens it."""
    from engagerec.runs import open_run

    with open_run(run, "best", device="cpu") as opened:
        state = opened.dmp.module.state_dict()
    return {
        kind: state[f"sparse_arch.embedding_bags.t_{space}.weight"].local_shards()[0].tensor.numpy()
        for kind, space in TABLES.items()
    }


def one_pass_mf(
    prepared: Path, rows: Tuple[int, int], dim: int = 32, lr: float = 0.1, batch: int = 4096
) -> Tuple[Dict, float]:
    """Plain matrix factorisation, one pass over the training split (see the module docstring), its
    tables ``rows`` (users, videos) long as the preparation's; the global mean mu by Adam.

    Returns:
        (the user and video factor tables, row 0 out-of-vocabulary; the validation MSE).
    """
    columns = ["user_id", "content_id", "watch_ratio"]
    train = ds.dataset(prepared / "train").to_table(columns=columns)
    user = torch.from_numpy(train.column("user_id").to_numpy().astype(np.int64))
    video = torch.from_numpy(train.column("content_id").to_numpy().astype(np.int64))
    label = torch.from_numpy(train.column("watch_ratio").to_numpy())
    torch.manual_seed(0)
    tables = []
    for length in rows:
        table = torch.nn.Embedding(length, dim + 1, sparse=True)  # the last column: the bias
        torch.nn.init.uniform_(table.weight, -(length**-0.5), length**-0.5)  # TorchRec's default start
        tables.append(table)
    sums = [torch.zeros(t.weight.shape[0]) for t in tables]  # row-wise Adagrad's accumulators
    mu = torch.zeros((), requires_grad=True)
    adam = torch.optim.Adam([mu], lr=0.01)

    def predict(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, q = tables[0](u), tables[1](v)
        return torch.sigmoid(mu + p[:, dim] + q[:, dim] + (p[:, :dim] * q[:, :dim]).sum(1))

    for start in range(0, len(label), batch):
        chunk = slice(start, start + batch)
        loss = ((predict(user[chunk], video[chunk]) - label[chunk]) ** 2).mean()
        adam.zero_grad()
        for table in tables:
            table.weight.grad = None
        loss.backward()
        adam.step()
        with torch.no_grad():
            for table, accumulated in zip(tables, sums, strict=True):
                grad = table.weight.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                accumulated[rows] += values.pow(2).mean(1)
                table.weight[rows] -= lr * values / (accumulated[rows].sqrt() + 1e-8)[:, None]
    val = ds.dataset(prepared / "val").to_table(columns=columns)
    with torch.no_grad():
        u = torch.from_numpy(val.column("user_id").to_numpy().astype(np.int64))
        v = torch.from_numpy(val.column("content_id").to_numpy().astype(np.int64))
        mse = float(((predict(u, v) - torch.from_numpy(val.column("watch_ratio").to_numpy())) ** 2).mean())
    return {kind: t.weight.detach()[:, :dim].numpy() for kind, t in zip(TABLES, tables, strict=True)}, mse


def recovery(
    tables: Dict[str, np.ndarray], world, users: np.ndarray, videos: np.ndarray, groups: List[np.ndarray]
) -> List[float]:
    """R^2 of the users' factors, then of the videos' factors and biases in each group of
    vocabulary positions (``groups``: one per ``VIDEO_GROUPS``)."""
    out = [r_squared(tables["user"][1 : len(users) + 1], world.user_factors[users])]
    for rows in groups:
        learned = tables["video"][rows + 1]
        out += [
            r_squared(learned, world.video_factors[videos[rows]]),
            r_squared(learned, world.video_bias[videos[rows]]),
        ]
    return out


def main() -> None:
    """Fit the truth from each run's tables (and the MF reference's) and write the section."""
    from engagerec.data.kuairand_generator import kuairand_world

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", required=True, help="write_kuairand_1k's directory (its noise_floor.json)")
    parser.add_argument("--prepared", required=True, help="the runs' preparation of that log")
    parser.add_argument("--runs", nargs="*", default=[], help="run directories")
    parser.add_argument("--names", nargs="*", default=[], help="a name for each run")
    parser.add_argument("--mf", action="store_true", help="add one pass of plain matrix factorisation")
    parser.add_argument("--section", default="factor_recovery", help="the RESULTS.md section written")
    args = parser.parse_args()
    if len(args.names) != len(args.runs):
        raise SystemExit(f"give one --names per run: {len(args.runs)} runs, {len(args.names)} names")
    made = json.loads((Path(args.raw) / "noise_floor.json").read_text())
    world = kuairand_world(made["scale"], made["seed"], made["popularity_skew"], made["videos"])
    prepared = Path(args.prepared)
    users, videos = vocabulary(prepared, "user_id"), vocabulary(prepared, "content_id")
    views = training_views(prepared, len(videos) + 1)[1:]  # by vocabulary position
    groups = [np.nonzero((views >= low) & (views <= (high or np.inf)))[0] for low, high in VIDEO_GROUPS]
    rows = [
        (name, recovery(run_tables(Path(run)), world, users, videos, groups))
        for name, run in zip(args.names, args.runs, strict=True)
    ]
    mf_line = []
    if args.mf:
        tables, mse = one_pass_mf(prepared, (len(users) + 1, len(videos) + 1))
        rows.append(
            (
                "plain matrix factorisation, one pass (reference)",
                recovery(tables, world, users, videos, groups),
            )
        )
        mf_line = [
            f"The reference's validation watch-ratio MSE: {mse:.4f}. Its rows' bias column is left out of "
            "the fit (its factor columns alone are read), so its bias R^2 is about 0 by construction.",
            "",
        ]
    labels = [f"{low}+" if high is None else f"{low}-{high}" for low, high in VIDEO_GROUPS]
    header = "| tables of | users: factors | " + " | ".join(
        f"videos seen {label} times ({len(rows):,}): factors / bias"
        for label, rows in zip(labels, groups, strict=True)
    )
    lines = [
        f"Data: `{args.raw}` (scale {made['scale']}, seed {made['seed']}), preparation `{args.prepared}`. "
        "R^2 of a least-squares linear map from the learned rows to the generator's hidden values "
        "(1: the rows hold them up to a linear map; 0: nothing of them).",
        "",
        header + " |",
        "|---|---:|" + "---:|" * len(groups),
    ]
    for name, values in rows:
        cells = [f"{values[0]:.3f}"] + [
            f"{values[1 + 2 * i]:.3f} / {values[2 + 2 * i]:.3f}" for i in range(len(groups))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *mf_line]
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
