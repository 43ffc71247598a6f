"""engagerec compare: every tower x seed trained on one config (and the GBDT reference beside
them), then the report (engagerec.report) with intervals and paired tests."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Dict, List, Optional

from tqdm import tqdm

# the GBDT (scikit-learn) before anything that imports torch: the OpenMP runtime loaded first
# decides how the two share the cores, and with torch's first the GBDT fitted after the towers
# in one process ran 3x slower (make demo: 21 s a seed against 7; tests/test_imports.py)
from engagerec.gbdt import gbdt_reference  # isort: skip
from engagerec.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    config_changes,
    prepared_dir,
    with_tower,
)
from engagerec.data.reader import ShardReader
from engagerec.data.schema import DatasetSchema
from engagerec.model_builder import configured_tasks
from engagerec.report import GBDT, write_report
from engagerec.runs import run_config
from engagerec.train import train


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
) -> str:
    """
    Train every tower with every seed (and the GBDT reference), then write the report (paired
    against ``reference``, see ``write_report``). One progress bar per run; each run's own
    output is in ``<out_dir>/<tower>/seed<k>/train.out``.

    Args:
        cfg: the experiment (its prepared data must exist); each run swaps in a tower and a seed.
        towers: the towers trained.
        seeds: the seeds each tower is trained with.
        out_dir: the runs (``<tower>/seed<k>``) and the report (compare.md, .json, .png).
        resume: continue runs found in ``out_dir``; False starts each afresh.
        gbdt: also fit the scikit-learn GBDT reference per seed (engagerec.gbdt).
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
            run_dir = out_dir / tower / f"seed{seed}"
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
            runs.append({"tower": GBDT, "seed": seed, "test": gbdt_reference(prepared_dir(cfg), seed, tasks)})
        print(_tower_line(GBDT, [r for r in runs if r["tower"] == GBDT]), file=sys.__stdout__, flush=True)
    return write_report(runs, out_dir, f"{cfg.name}: towers x seeds", reference)


def refit_data_config(chosen: str | Path) -> DataConfig:
    """The data config a refit of ``chosen`` trains on: the run's own, with no validation rows
    (``split.val_fraction: 0``: the same test rows, every other row for training).

    Args:
        chosen: a run directory (its config.json).

    Returns:
        DataConfig: the run's data config with ``split.val_fraction`` 0.

    Raises:
        CheckpointError: ``chosen`` is no run directory (no config.json).

    Example::

        >>> import tempfile
        >>> from engagerec.config import load_config
        >>> run = Path(tempfile.mkdtemp())
        >>> cfg = load_config("synthetic_study")
        >>> _ = (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        >>> refit_data_config(run).split.val_fraction, cfg.data.split.val_fraction
        (0.0, 0.1)
    """
    data = run_config(chosen).data
    return dataclasses.replace(data, split=dataclasses.replace(data.split, val_fraction=0.0))


def _refit_epochs(chosen: Path) -> int:
    """The epochs the chosen run's validation picked (its best epoch + 1)."""
    path = chosen / "results.json"
    picked = json.loads(path.read_text()) if path.is_file() else {}
    if picked.get("best_epoch") is None:
        raise ConfigError(f"{chosen} has no best epoch (it did not finish, no {path.name}): nothing to refit")
    return int(picked["best_epoch"]) + 1


def _check_refit_data(chosen: Path, data_dir: Path) -> None:
    """Refuse ``data_dir`` unless it was prepared from ``refit_data_config(chosen)``."""
    if ShardReader(data_dir, "val").total_rows:
        raise ConfigError(f"{data_dir} has validation rows: prepare the refit with split.val_fraction 0")
    held = DatasetSchema.load(data_dir).meta.get("config", {})
    differences = config_changes(dataclasses.asdict(refit_data_config(chosen)), held, "data.")
    if differences:
        raise ConfigError(
            f"{data_dir} was not prepared from {chosen}'s data config with split.val_fraction 0: "
            + "; ".join(differences)
        )


def prepare_refit_data(chosen: str | Path, data_dir: str | Path) -> bool:
    """Prepare ``refit_data_config(chosen)`` into ``data_dir`` when it holds no prepared data
    yet; data already there must be exactly that (never overwritten): what ``engagerec refit``
    runs before ``refit_run``.

    Args:
        chosen: a finished run directory (config.json, results.json).
        data_dir: where the refit's data goes.

    Returns:
        bool: whether it was prepared now (False: the data was there already).

    Raises:
        ConfigError: ``chosen`` did not finish (checked before any preparing), or ``data_dir``
            holds other prepared data (the differing keys named).
        CheckpointError: ``chosen`` is no run directory.
    """
    from engagerec.data.prepare import format_summary, prepare

    chosen, data_dir = Path(chosen), Path(data_dir)
    _refit_epochs(chosen)
    if (data_dir / "schema.json").is_file():
        _check_refit_data(chosen, data_dir)
        return False
    print(format_summary(prepare(refit_data_config(chosen), data_dir), data_dir), flush=True)
    return True


def refit_run(
    chosen: str | Path, data_dir: str | Path, run_dir: str | Path, resume: bool = True
) -> Dict[str, Any]:
    """
    Refit a run chosen on validation on the training and validation rows together: the chosen
    run's own config (tower, tasks, optimiser, seed) trained on ``data_dir``, its data section
    prepared again with ``split.val_fraction: 0`` (the same test rows; every other row trains),
    for as many epochs as its validation picked (its best epoch + 1), then evaluated on test
    when the data has test rows. More rows for the weights and for the id statistics, no early
    stopping. The run's own output goes to ``<run_dir>/train.out`` (rank 0's, under torchrun).

    Args:
        chosen: a finished run (config.json, results.json) on data with validation rows.
        data_dir: the chosen run's data config prepared with ``split.val_fraction: 0``.
        run_dir: where the refit run goes.
        resume: continue a refit interrupted in ``run_dir`` (the same config); False starts over.

    Returns:
        Dict[str, Any]: the refit run's results (``train``'s).

    Raises:
        ConfigError: ``chosen`` did not finish (no best epoch); ``data_dir`` has validation
            rows, or was prepared from another data config than the chosen run's (the keys named).

    Example::

        >>> import contextlib, io, tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> tmp = Path(tempfile.mkdtemp())
        >>> sets = ["data.source.synthetic.num_rows=2000", "train.epochs=2", "train.progress_bar=false"]
        >>> cfg = load_config("synthetic_study", sets + [f"train.data_dir={tmp / 'data'}"])
        >>> refit_data = load_config("synthetic_study", sets + ["data.split.val_fraction=0"]).data
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     _ = prepare(cfg.data, tmp / "data"), prepare(refit_data, tmp / "refit_data")
        ...     chosen = train(cfg, tmp / "chosen")
        >>> results = refit_run(tmp / "chosen", tmp / "refit_data", tmp / "refit")
        >>> len(results["history"]) == chosen["best_epoch"] + 1, "test" in results
        (True, True)
    """
    chosen, data_dir, run_dir = Path(chosen), Path(data_dir), Path(run_dir)
    epochs = _refit_epochs(chosen)
    _check_refit_data(chosen, data_dir)
    cfg = run_config(chosen)
    train_cfg = dataclasses.replace(cfg.train, data_dir=str(data_dir), epochs=epochs, progress_bar=False)
    refit = dataclasses.replace(cfg, data=refit_data_config(chosen), train=train_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 writes train.out
    with open(run_dir / "train.out" if main else os.devnull, "a") as sink:
        with redirect_stdout(sink), redirect_stderr(sink):
            return train(refit, run_dir, resume=resume)
