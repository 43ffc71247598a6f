"""engagerec compare: every tower x seed trained on one config (and the GBDT reference beside
them), then the report (engagerec_study.report) with intervals and paired tests."""

from __future__ import annotations

import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, List, Optional

from tqdm import tqdm

from engagerec.config import ExperimentConfig, load_config, prepared_dir, with_tower
from engagerec.data.reader import ShardReader
from engagerec.model_builder import configured_tasks
from engagerec.runs import seed_run_dir
from engagerec.train import train
from engagerec_study.gbdt import gbdt_reference
from engagerec_study.report import GBDT, write_report


def _tower_line(tower: str, runs: List[Dict]) -> str:
    """One line for a tower's finished seeds: each task's main test metric, mean over seeds, and
    the best epochs.

    Example::

        >>> _tower_line("mmoe", [{"best_epoch": 3, "test": {"skip/auc": 0.80, "skip/accuracy": 0.7}},
        ...                      {"best_epoch": 5, "test": {"skip/auc": 0.82, "skip/accuracy": 0.7}}])
        'mmoe: 2 seeds, test skip/auc 0.8100 (mean); best epochs 4, 6'
    """
    tested = [r for r in runs if "test" in r]  # data without test rows gives no test metrics
    keys = [k for k in tested[0]["test"] if k.endswith(("/mse", "/auc"))] if tested else []
    means = ", ".join(f"{k} {sum(r['test'][k] for r in tested) / len(tested):.4f}" for k in keys)
    epochs = [r["best_epoch"] + 1 for r in runs if r.get("best_epoch") is not None]  # 1-based, as the bars
    line = f"{tower}: {len(runs)} seed{'s' if len(runs) > 1 else ''}, test {means} (mean)"
    return line + (f"; best epochs {', '.join(map(str, epochs))}" if epochs else "")


def run_comparison(
    cfg: ExperimentConfig,
    towers: List[str],
    seeds: List[int],
    out_dir: Path,
    resume: bool = True,
    gbdt: bool = False,
    reference: Optional[str] = None,
    gbdt_rows: Optional[int] = None,
) -> str:
    """
    Train every tower with every seed (and the GBDT reference), then write the report (paired
    against ``reference``, see ``write_report``). One progress bar per run; each run's own
    output is in its run directory's train.out (``engagerec.runs.seed_run_dir(out_dir, tower, seed)``).

    Args:
        cfg: the experiment (its prepared data must exist); each run swaps in a tower and a seed.
        towers: the towers trained.
        seeds: the seeds each tower is trained with.
        out_dir: the runs (``seed_run_dir(out_dir, tower, seed)``) and the report (compare.md,
            .json, .png).
        resume: continue runs found in ``out_dir``; False starts each afresh.
        gbdt: also fit the scikit-learn GBDT reference per seed (engagerec_study.gbdt).
        gbdt_rows: the GBDT fits on a seeded sample of this many training rows (default all).
        reference: the model the others are paired with (default the GBDT, else the first).

    Returns:
        str: the report's markdown table.

    Raises:
        ValueError: the data has no test rows, or ``gbdt`` is asked of data without validation
            rows (before any run trains).

    Example::

        >>> import contextlib, io, tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> out = Path(tempfile.mkdtemp())
        >>> cfg = load_config("synthetic_study", ["data.source.synthetic.num_rows=3000",
        ...                   "train.epochs=1", f"train.data_dir={out / 'data'}"])
        >>> _ = prepare(cfg.data, cfg.train.data_dir)
        >>> with contextlib.redirect_stdout(io.StringIO()):  # not the bars: they go to sys.__stdout__
        ...     table = run_comparison(cfg, ["mmoe", "ple"], [0], out / "compare")
        >>> sorted(p.name for p in (out / "compare").iterdir())
        ['compare.json', 'compare.md', 'compare.png', 'mmoe', 'ple']
    """
    data_dir = prepared_dir(cfg)  # checked before any training
    if not ShardReader(data_dir, "test").total_rows:
        raise ValueError(f"{data_dir} has no test rows: a comparison reports test metrics")
    if gbdt and not ShardReader(data_dir, "val").total_rows:
        raise ValueError(f"{data_dir} has no validation rows to choose the GBDT's iterations on")
    runs = []
    monitor = cfg.train.monitor
    for tower in towers:
        for seed in seeds:
            run_dir = seed_run_dir(out_dir, tower, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            # one bar per run while it trains (epochs, the monitored validation metric), then one
            # line per tower; the run's own output (sharding plan, epoch lines) goes to its train.out
            bar = tqdm(
                total=cfg.train.epochs,
                desc=f"{tower} seed {seed}",
                unit="epoch",
                file=sys.__stdout__,
                leave=False,
            )

            def on_epoch(state, val, bar=bar) -> None:
                bar.update(1)
                if val:  # none when the data has no validation rows
                    bar.set_postfix_str(f"val {monitor} {val[monitor]:.4f}")

            with open(run_dir / "train.out", "a") as sink, redirect_stdout(sink), redirect_stderr(sink):
                print(f"--- engagerec compare: {tower}, seed {seed}, resume={resume}", flush=True)
                try:
                    results = train(
                        with_tower(cfg, tower, seed=seed, progress_bar=False), run_dir, resume=resume,
                        on_epoch=on_epoch,
                    )  # fmt: skip
                except Exception:
                    traceback.print_exc()  # into train.out, beside the run's own lines
                    bar.close()
                    print(f"{tower} seed {seed} failed: see {run_dir / 'train.out'}", file=sys.__stderr__)
                    raise
            bar.close()
            runs.append(results)
        print(_tower_line(tower, [r for r in runs if r["tower"] == tower]), file=sys.__stdout__, flush=True)
    if gbdt:
        # the towers' tasks (names, labels, kinds), so that the GBDT lands in their columns
        tasks = [(t.name, t.label, t.kind) for t in configured_tasks(cfg)]

        for seed in tqdm(seeds, desc=GBDT, unit="seed", file=sys.__stdout__, leave=False):
            runs.append(
                {
                    "tower": GBDT,
                    "seed": seed,
                    "test": gbdt_reference(prepared_dir(cfg), seed, tasks, train_rows=gbdt_rows),
                }
            )
        print(_tower_line(GBDT, [r for r in runs if r["tower"] == GBDT]), file=sys.__stdout__, flush=True)
    return write_report(runs, out_dir, f"{cfg.name}: towers x seeds", reference)


def compare(
    config: str,
    sets: List[str],
    towers: Optional[List[str]],
    seeds: List[int],
    out: Optional[str] = None,
    resume: bool = True,
    gbdt: bool = False,
    reference: Optional[str] = None,
    gbdt_rows: Optional[int] = None,
) -> int:
    """``engagerec compare``: ``run_comparison`` on a config file, the table printed with where
    the report went.

    Args:
        config: the config file (or a shipped config's name).
        sets: ``key=value`` overrides.
        towers: the towers trained (default: the config's tower).
        seeds: the seeds each tower is trained with.
        out: the output directory (default ``runs/<name>/compare``).
        resume: continue runs found in the output directory.
        gbdt: also fit the GBDT reference.
        reference: the model the others are paired with (see ``run_comparison``).
        gbdt_rows: the GBDT's training rows (a seeded sample; default all).

    Returns:
        int: 0.
    """
    cfg = load_config(config, sets)
    out_dir = Path(out or f"runs/{cfg.name}/compare")
    started = time.perf_counter()
    table = run_comparison(
        cfg,
        towers or [cfg.model.tower.name],
        seeds,
        out_dir,
        resume=resume,
        gbdt=gbdt,
        reference=reference,
        gbdt_rows=gbdt_rows,
    )
    print(table)
    print(f"wrote {out_dir}/compare.md, compare.json, compare.png in {time.perf_counter() - started:.0f} s")
    return 0
