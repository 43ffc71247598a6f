"""What each choice in configs/kuairand_random.yaml is worth, on the VALIDATION split only.

Each variant changes the shipped config in one way (drops the id statistics or part of
them, reverts the embedding width or the batch size, switches target attention over the
history on or off, drops the id embeddings), is prepared into its own directory
when its features differ, and trained with ``engagerec train`` for each seed; the table
gives each variant's validation watch-ratio MSE and skip AUC at its best epoch, mean ± 95%
interval over seeds. The test metrics each run computes (train() evaluates its best
checkpoint) are left unread: validation is how the config was chosen.

    .venv/bin/python benchmarks/validation_ablation.py --seeds 0,1,2 --out runs/validation_ablation

It prints the markdown table and writes it, with the machine and the command, to
``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from engagerec.config import ExperimentConfig, TargetAttentionConfig, load_config
from engagerec.data.prepare import prepare
from engagerec.data.target_stats import STAT_KINDS
from engagerec.report import ci95
from engagerec.train import train

Change = Callable[[ExperimentConfig], ExperimentConfig]


def _features(keep: Callable) -> Change:
    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        features = [f for f in cfg.data.features if keep(f)]
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features))

    return change


def _train(**changes) -> Change:
    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))

    return change


def _dim(dim: int) -> Change:
    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        embeddings = dataclasses.replace(cfg.model.embeddings, dim=dim)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embeddings=embeddings))

    return change


def _toggle_attention(cfg: ExperimentConfig) -> ExperimentConfig:
    """Target attention (DIN) over the history switched on (positional history) or off."""
    on = cfg.model.target_attention is None
    features = [dataclasses.replace(f, positions=on) if f.kind == "history" else f for f in cfg.data.features]
    model = dataclasses.replace(cfg.model, target_attention=TargetAttentionConfig() if on else None)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features), model=model)


ID_EMBEDDINGS = ("user_id", "content_id", "history", "author_id")  # kuairand_random's id features
VIDEO_EMBEDDINGS = ("content_id", "history")  # the video table's features


def _min_count(names, count: int) -> Change:
    """Ids of these features seen in fewer than ``count`` training rows go to the OOV row."""

    def change(cfg: ExperimentConfig) -> ExperimentConfig:
        features = [
            dataclasses.replace(f, min_count=count) if f.name in names else f for f in cfg.data.features
        ]
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, features=features))

    return change


VARIANTS: List[Tuple[str, Change]] = [
    ("shipped config", lambda cfg: cfg),
    ("without id statistics", _features(lambda f: f.kind not in STAT_KINDS)),
    ("id counts only (no target means)", _features(lambda f: f.kind != "target_mean")),
    ("target means only (no id counts)", _features(lambda f: f.kind != "id_count")),
    ("embedding width 16 (was 8)", _dim(16)),
    ("batch 1024 (was 256)", _train(batch_size=1024)),
    ("target attention (DIN) switched on, or off where the config has it", _toggle_attention),
    ("dense lr 0.003 (was 0.001)", _train(dense_lr=0.003)),
    ("without the video embeddings and the id history", _features(lambda f: f.name not in VIDEO_EMBEDDINGS)),
    ("video ids with fewer than 20 training views to the OOV row", _min_count(VIDEO_EMBEDDINGS, 20)),
    (
        "without id embeddings (user, video, author, history)",
        _features(lambda f: f.name not in ID_EMBEDDINGS),
    ),
    (
        "without id embeddings, dense lr 0.003 (the *_stats configs)",
        lambda cfg: _train(dense_lr=0.003)(_features(lambda f: f.name not in ID_EMBEDDINGS)(cfg)),
    ),
]


def main(argv=None) -> int:
    """Run every variant for every seed; print and write the validation table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/kuairand_random.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/validation_ablation")
    args = parser.parse_args(argv)
    base = load_config(args.config)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    rows, prepared = [], {}
    started = time.perf_counter()
    for name, change in VARIANTS:
        cfg = change(base)
        features = tuple((f.name, f.positions, f.min_count) for f in cfg.data.features)
        if features not in prepared:  # variants with the shipped features share its data
            data_dir = out / f"data{len(prepared)}"
            with open(out / "prepare.out", "a") as sink, redirect_stdout(sink):
                prepare(cfg.data, data_dir)
            prepared[features] = str(data_dir)
        values: Dict[str, List[float]] = {"watch_ratio/mse": [], "skip/auc": []}
        for seed in seeds:
            run_cfg = _train(seed=seed, data_dir=prepared[features], progress_bar=False)(cfg)
            run_dir = out / f"variant{len(rows)}" / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "train.out", "w") as sink, redirect_stdout(sink), redirect_stderr(sink):
                results = train(run_cfg, run_dir, resume=False)
            for key in values:
                values[key].append(results["val"][key])
        cells = [f"{np.mean(v):.4f} ± {ci95(np.array(v)):.4f}" for v in values.values()]
        rows.append(f"| {name} | {' | '.join(cells)} | {len(seeds)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    header = f"| variant ({args.config}, mmoe) | val watch_ratio MSE | val skip AUC | seeds |"
    table = "\n".join([header, "|---|---:|---:|---:|"] + rows)
    command = (
        f".venv/bin/python benchmarks/validation_ablation.py --config {args.config} "
        f"--seeds {args.seeds} --out {args.out}"
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import machine_block

    text = f"{machine_block(command)}\n- seconds: {time.perf_counter() - started:.0f}\n\n{table}\n"
    (out / "ablation.md").write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
