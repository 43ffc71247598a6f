"""engagerec refit: a run chosen on validation trained again on its training and validation rows
together (the same test rows), for the epochs its validation chose: its data config prepared
again with ``split.val_fraction: 0`` (``prepare_refit_data``), then its own config trained on it
(``refit_run``)."""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Dict, Optional

from engagerec.config import DataConfig, config_changes, prepared_dir
from engagerec.data.reader import ShardReader
from engagerec.data.schema import DatasetSchema
from engagerec.distributed import is_rank_zero, world_size
from engagerec.errors import ConfigError
from engagerec.preemption import PREEMPTED
from engagerec.runs import run_config
from engagerec.train import train


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
    # under torchrun, rank 0 writes train.out
    with open(run_dir / "train.out" if is_rank_zero() else os.devnull, "a") as sink:
        with redirect_stdout(sink), redirect_stderr(sink):
            return train(refit, run_dir, resume=resume)


def refit(
    run_dir: str | Path, data_dir: Optional[str | Path] = None, out: Optional[str | Path] = None,
    prepare_only: bool = False,
) -> int:  # fmt: skip
    """``engagerec refit``: prepare the chosen run's refit data unless it is there (one process
    prepares it: under torchrun it must exist), then ``refit_run``; rank 0 prints what was done.

    Args:
        run_dir: the chosen run (written by ``engagerec train``).
        data_dir: its data without validation rows (default: the run's data directory +
            ``_refit``); prepared when absent, refused when it holds other data.
        out: the refit run's directory (default: ``<run_dir>_refit`` beside the run).
        prepare_only: prepare the refit's data, then stop.

    Returns:
        int: 0, or ``PREEMPTED`` (75) when SIGTERM stopped the refit (the same command resumes).

    Raises:
        ConfigError: ``out`` is the chosen run; under torchrun, the data is not prepared yet; and
            ``prepare_refit_data``'s and ``refit_run``'s refusals.
    """
    chosen = Path(run_dir)
    chosen_data = Path(prepared_dir(run_config(chosen))).resolve()
    data = Path(data_dir) if data_dir else chosen_data.with_name(chosen_data.name + "_refit")
    out_dir = Path(out) if out else chosen.resolve().with_name(chosen.resolve().name + "_refit")
    if out_dir.resolve() == chosen.resolve():
        raise ConfigError(f"--out {out_dir} is the chosen run itself: the refit would overwrite it")
    if world_size() > 1:  # one process prepares; ranks would race
        if not (data / "schema.json").is_file():
            raise ConfigError(
                f"under torchrun the refit's data must be prepared first: run `engagerec refit "
                f"--run-dir {chosen} --data-dir {data} --prepare-only` in one process"
            )
    elif not prepare_refit_data(chosen, data):
        print(f"refit data: {data} (already prepared)")
    if prepare_only:
        return 0
    results = refit_run(chosen, data, out_dir)
    if not is_rank_zero():
        return PREEMPTED if results.get("preempted") else 0
    if results.get("preempted"):
        print(
            f"stopped by SIGTERM; run the same command to resume the refit in {out_dir} "
            f"(exit status {PREEMPTED})"
        )
        return PREEMPTED
    print(f"refit {chosen} on train + val for {len(results['history'])} epoch(s) (its validation's choice)")
    if "test" in results:
        print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items() if k != "rows"))
    print(f"run directory: {out_dir} (its own output: {out_dir / 'train.out'})")
    return 0
