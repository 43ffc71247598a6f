"""Levers on quality at the KuaiRand-1K shape, chosen on the validation split only.

    .venv/bin/python benchmarks/quality_levers.py --data-dir D --noise-floor RAW/noise_floor.json \\
        --runs DIR [--config C] [--seeds 0 1 2] [--variants NAME ...] [--section quality_levers]

Each variant is `engagerec train --config C` (``--config``, configs/kuairand_1k.yaml unless
given) on D, a preparation of C, with the variant's overrides (``VARIANTS_OF[C]``), one fresh process
per seed; validation picks each run's best epoch, and only that
epoch's validation metrics are read: the test split decides nothing here (benchmarks/
quality_at_scale.py tests the chosen variant beside the GBDT). Reported per variant, mean ± 95%
CI over seeds: validation loss, watch-ratio MSE, the share of the explainable watch-ratio
variance recovered on validation, (train-mean constant - MSE) / (constant - the generator's
noise floor), the AUCs, and the epoch chosen of those trained. Runs under ``--runs`` holding a
results.json are read, not trained again. Writes the section ``--section`` (``quality_levers``) of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import FLOAT32, other_settings, record_section  # noqa: E402

CONFIG = "configs/kuairand_1k.yaml"
# the products an MLP learns poorly from concatenated embeddings: how this user likes this
# video, its genres, its author, and what the user watched before (engagerec.interactions)
DOTS = (
    "model.dot_interactions=[[user_id, content_id], [user_id, genres], [user_id, history], "
    "[content_id, history], [user_id, author_id]]"
)
# every variant reads the history from the video's table, as when these sections were measured and
# as configs/kuairand_1k_dots.yaml does (configs/kuairand_1k.yaml gives the history a table of its
# own since: a speed setting, the same validation metrics, section train_levers_history)
SHARED_TABLE = "model.embeddings.own_table=[]"
# the tables of the dotted features (history shares content_id's); auto_dim would keep genres at 16
WIDE = "model.embeddings.dims={user_id: 32, content_id: 32, author_id: 32, genres: 32}"
WIDER = "model.embeddings.dims={user_id: 64, content_id: 64, author_id: 64, genres: 64}"
WIDEST = "model.embeddings.dims={user_id: 128, content_id: 128, author_id: 128, genres: 128}"
# the products also added to the watch ratio's logit, and the user, video and history embeddings
# trained by that path alone (model.dot_logits; configs/kuairand_1k_factors.yaml)
FACTORS = "model.dot_logits={tasks: [watch_ratio], detached: [user_id, content_id, history]}"
FIRST = "dot interactions, id embeddings 32 wide, sparse lr 0.1"  # the dots config's variant
MIN_COUNT_5 = ("data.features.content_id.min_count=5", "data.features.author_id.min_count=5")
VARIANTS: Dict[str, List[str]] = {
    "as shipped": [],
    "dot interactions": [DOTS],
    "dot interactions, sparse lr 0.03": [DOTS, "train.sparse_lr=0.03"],
    "dot interactions, sparse lr 0.1": [DOTS, "train.sparse_lr=0.1"],
    "dot interactions, up to 3 epochs": [DOTS, "train.epochs=3"],
    "dot interactions, id embeddings 32 wide": [DOTS, WIDE],
    "dot interactions, id embeddings 32 wide, sparse lr 0.1": [DOTS, WIDE, "train.sparse_lr=0.1"],
    "dot interactions, id embeddings 32 wide, sparse lr 0.3": [DOTS, WIDE, "train.sparse_lr=0.3"],
    "dot interactions, id embeddings 64 wide, sparse lr 0.1": [DOTS, WIDER, "train.sparse_lr=0.1"],
    "dot interactions, id embeddings 64 wide, sparse lr 0.3": [DOTS, WIDER, "train.sparse_lr=0.3"],
    **{
        f"dots, 32 wide, sparse lr {lr:g}, linear decay": [
            DOTS,
            WIDE,
            f"train.sparse_lr={lr:g}",
            "train.lr_schedule=linear",
        ]
        for lr in (0.1, 0.3)
    },
    # videos and authors seen fewer than 5 times in training share the out-of-vocabulary row (their
    # id statistics still describe them): none has a row of its own to memorise over epochs.
    # Needs a preparation with the same two overrides (--data-dir)
    "dots, 32 wide, sparse lr 0.1, ids seen 5+ times, up to 3 epochs": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        *MIN_COUNT_5,
        "train.epochs=3",
    ],
    # the dots config's run, then up to 3 more epochs of its embeddings alone (the tower frozen,
    # dense lr 0: from a second epoch on, the tower adapting to rows that have seen its training
    # rows is what loses); trains the dots config's run of the seed first if it is missing
    "dots, 32 wide, sparse lr 0.1, then up to 3 embedding-only epochs": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        "train.init_from={first}",
        "train.dense_lr=0",
        "train.epochs=3",
    ],
    # four times the steps per epoch: each user's row is updated four times as often
    "dots, 32 wide, sparse lr 0.1, batch 1024": [DOTS, WIDE, "train.sparse_lr=0.1", "train.batch_size=1024"],
    "dots, 32 wide, sparse lr 0.1, experts 4 x [256, 64]": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        "model.tower.params.expert_sizes=[256, 64]",
    ],
    "dots, 32 wide, sparse lr 0.1, embedding l2 0.01, up to 3 epochs": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        "train.embedding_l2=0.01",
        "train.epochs=3",
    ],
    # a learned table holds the video's bias but none of its user-by-video factors (linear R^2
    # about 0 at scale 1): row-wise Adagrad scales a row's whole step by one norm, which the bias
    # signal dominates; element-wise Adagrad scales each column alone
    "dots, 32 wide, sparse lr 0.1, element-wise adagrad": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        "train.sparse_optimizer=adagrad",
    ],
    # the products also added to the watch ratio's logit (a factorisation machine's term), and
    # the user, video and history embeddings trained by that path alone: the tower reads them and
    # their products without passing its gradient back (model.dot_logits)
    "dots, 32 wide, sparse lr 0.1, dot logits on the watch ratio": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        "model.dot_logits.tasks=[watch_ratio]",
    ],
    "dots, 32 wide, sparse lr 0.1, dot logits on the watch ratio, user, video and history detached": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        FACTORS,
    ],
    # the same (configs/kuairand_1k_factors.yaml) with one change each
    "factors, up to 2 epochs": [DOTS, WIDE, FACTORS, "train.sparse_lr=0.1", "train.epochs=2"],
    "factors, 64 wide": [DOTS, WIDER, FACTORS, "train.sparse_lr=0.1"],
    "factors, 64 wide, sparse lr 0.3": [DOTS, WIDER, FACTORS, "train.sparse_lr=0.3"],
    "factors, 128 wide": [DOTS, WIDEST, FACTORS, "train.sparse_lr=0.1"],
    # the user's and the video's embeddings also add a learned linear term to the watch ratio's
    # logit (the machine's first-order term): detached, the video table had no path to its bias
    # (factor_recovery: bias R^2 0.045 for videos seen 100+ times, against 0.733 through the tower)
    **{
        f"factors, {width} wide, first-order user and video": [
            DOTS,
            dims,
            FACTORS,
            "train.sparse_lr=0.1",
            "model.dot_logits.first_order=[user_id, content_id]",
        ]
        for width, dims in ((32, WIDE), (64, WIDER))
    },
    # the user table alone learns from the dot logits only: the video and history columns, and
    # their product, pass the tower's gradient (a video's bias through the tower, as before)
    "factors, only the user detached": [
        DOTS,
        WIDE,
        "train.sparse_lr=0.1",
        "model.dot_logits={tasks: [watch_ratio], detached: [user_id]}",
    ],
    # the dotted tables' rows start in [-s, s], not TorchRec's [-1/sqrt(rows), 1/sqrt(rows)]
    # (7e-4 for the video table): matrix factorisation grows its factors out of that start (measured:
    # no gain; one pass of plain MF learns them from TorchRec's start, benchmarks/factor_recovery.py)
    **{
        f"dots, 32 wide, sparse lr 0.1, id rows start in +-{scale:g}": [
            DOTS,
            WIDE,
            "train.sparse_lr=0.1",
            "model.embeddings.init_scale={"
            + ", ".join(f"{table}: {scale:g}" for table in ("user_id", "content_id", "author_id", "genres"))
            + "}",
        ]
        for scale in (0.1,)
    },
}
GENRE_CONFIG = "configs/kuairand_1k_factors_genre.yaml"
# the variants of --config GENRE_CONFIG (on its preparation): the factors config plus the video's
# first listed genre dotted with the user, at two table widths
GENRE_VARIANTS: Dict[str, List[str]] = {
    f"genre config, {width} wide": [
        "model.embeddings.dims={"
        + ", ".join(f"{t}: {width}" for t in ("user_id", "content_id", "author_id", "genres", "first_genre"))
        + "}"
    ]
    for width in (64, 128)
}
VARIANTS_OF = {CONFIG: VARIANTS, GENRE_CONFIG: GENRE_VARIANTS}  # --config -> the variants it takes
KEYS = ("loss", "watch_ratio/mse", "skip/auc", "long_view/auc", "click/auc")


def run_dir(runs: Path, name: str, seed: int) -> Path:
    """Where variant ``name``'s run of ``seed`` lives under ``runs``."""
    slug = name.replace(", ", "_").replace(" ", "_")
    return runs / slug / f"seed{seed}"


def validation(name: str, config: str, data_dir: Path, seed: int, runs: Path) -> Dict:
    """Variant ``name``'s run of ``seed`` on ``config`` (trained if missing): its best epoch's validation
    metrics, that epoch (from 1), how many it trained and the validation loss after each."""
    from engagerec.config import load_config

    out = run_dir(runs, name, seed)
    overrides = VARIANTS_OF[config][name]
    if any("{first}" in o for o in overrides):  # a warm start from the dots config's run
        validation(FIRST, config, data_dir, seed, runs)  # trained first if missing
    variant = [o.replace("{first}", str(run_dir(runs, FIRST, seed))) for o in overrides]
    sets = [f"train.data_dir={data_dir}", f"train.seed={seed}", FLOAT32, SHARED_TABLE, *variant]
    if not (out / "results.json").is_file():
        command = [sys.executable, "-m", "engagerec", "train", "--config", config, "--out", str(out)]
        command += [a for kv in [*sets, "train.progress_bar=false"] for a in ("--set", kv)]
        subprocess.run(command, check=True, cwd=REPO)
    other = other_settings(out, load_config(str(REPO / config), sets), ignored=("progress_bar",))
    if other:
        raise SystemExit(
            f"{out} holds a run of other data or settings than variant '{name}' with seed {seed} "
            f"({', '.join(other)}): give another --runs"
        )
    results = json.loads((out / "results.json").read_text())
    best = results["history"][results["best_epoch"]]
    return {
        **best,
        "epoch": results["best_epoch"] + 1,
        "epochs": len(results["history"]),
        "val_loss": [round(epoch["loss"], 4) for epoch in results["history"]],
    }


def main() -> None:
    """Train (or read) every variant's seeds and write the section."""
    from engagerec_study.sections.common import cell, mean_ci

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=CONFIG,
        choices=list(VARIANTS_OF),
        help="the config the variants' overrides change",
    )
    parser.add_argument("--data-dir", required=True, help="a KuaiRand-1K-shaped preparation of it")
    parser.add_argument("--noise-floor", required=True, help="the generator's noise_floor.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", help="names of the config's variants (default: all of them)")
    parser.add_argument("--runs", required=True, help="where the runs go (kept; read again if there)")
    parser.add_argument("--section", default="quality_levers", help="the RESULTS.md section written")
    args = parser.parse_args()
    variants = VARIANTS_OF[args.config]
    unknown = [name for name in args.variants or [] if name not in variants]
    if unknown:  # before anything trains
        parser.error(f"--variants {unknown} are not variants of {args.config}: {list(variants)}")
    args.variants = args.variants or list(variants)
    data_dir, runs = Path(args.data_dir).resolve(), Path(args.runs).resolve()
    floor = json.loads(Path(args.noise_floor).read_text())["watch_ratio"]["mse"]
    found = {
        name: [validation(name, args.config, data_dir, s, runs) for s in args.seeds] for name in args.variants
    }
    lines = [
        f"`engagerec train --config {args.config}` on one KuaiRand-1K-shaped preparation with each "
        f"variant's overrides, seeds {', '.join(map(str, args.seeds))}; the validation split's metrics "
        "at the epoch validation chose (the test split is not read)"
        + (", mean ± 95% CI over seeds. " if len(args.seeds) > 1 else ". ")
        + "Explainable: (the train-mean constant's MSE - the model's) / (the constant's - the "
        f"generator's noise floor, {floor:.4f}).",
        "",
        "| variant | overrides | " + " | ".join(KEYS[:2]) + " | explainable | " + " | ".join(KEYS[2:])
        + " | epoch chosen / trained |",
        "|---|---|" + "---:|" * (len(KEYS) + 2),
    ]  # fmt: skip
    for name, seeds in found.items():
        explained = [
            (s["watch_ratio/baseline_mse_train_mean"] - s["watch_ratio/mse"])
            / (s["watch_ratio/baseline_mse_train_mean"] - floor)
            for s in seeds
        ]
        overrides = "; ".join(f"`{o}`" for o in variants[name]) or "none"
        metrics = [cell(mean_ci([s[key] for s in seeds])) for key in KEYS]
        epochs = ", ".join(f"{s['epoch']}/{s['epochs']}" for s in seeds)
        lines.append(
            f"| {name} | {overrides} | {' | '.join(metrics[:2])} | {cell(mean_ci(explained))} | "
            f"{' | '.join(metrics[2:])} | {epochs} |"
        )
    longer = [
        f"{name}, seed {seed}: {runs_[i]['val_loss']}"
        for name, runs_ in found.items()
        for i, seed in enumerate(args.seeds)
        if runs_[i]["epochs"] > 1
    ]
    if longer:
        lines += ["", f"Validation loss after each epoch: {'; '.join(longer)}."]
    if len(found) > 1:
        best = min(found, key=lambda name: sum(s["loss"] for s in found[name]))
        lines += ["", f"Lowest mean validation loss: **{best}**."]
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
