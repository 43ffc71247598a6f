"""A warm start (``train.init_from``, ``engagerec train --init-from RUN``): a new run that begins
from another run's model and optimiser state instead of a fresh initialisation, as a team that
retrains every day on the next day's log does.

What is checked before anything is loaded, so that a refused start changes nothing:

* the two runs learn the same thing from the same inputs: the same features, tasks, tower and
  embedding settings (each difference is named);
* every id keeps its row: each table's vocabulary starts with the earlier run's vocabulary, in
  the same order (a table may only grow by ids appended at its end), and a hashed id space keeps
  its number of buckets.

Then ``engagerec.checkpoint.warm_start`` loads every tensor, resharding onto this run's plan and
world size; grown tables keep their fresh initialisation in their new rows. The run's progress
starts at zero (its own epochs, steps, early stopping and RNG); a warm-started run checkpoints and
resumes like any run, and ``predict`` and ``export`` treat it like any run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List

import pyarrow.parquet as pq

from engagerec import checkpoint
from engagerec.config import ExperimentConfig, config_changes, prepared_dir
from engagerec.data.errors import DataError
from engagerec.data.manifest import check_prepared
from engagerec.data.schema import VOCAB_DIR, DatasetSchema
from engagerec.errors import CheckpointError, ConfigError
from engagerec.runs import run_config

# what must match for the saved tensors to mean the same thing in the new run
COMPARED = (
    "data.features",
    "data.labels",
    "model.embeddings",
    "model.tower",
    "model.tasks",
    "model.target_attention",
)


def source_checkpoint(source: str | Path) -> Path:
    """
    The checkpoint a warm start loads: a checkpoint directory as given, or a run directory's best
    checkpoint (the model its ``predict`` uses), else its newest step checkpoint.

    Args:
        source (str | Path): a run directory, or one of its ``checkpoints/<name>`` directories.

    Returns:
        Path: the checkpoint directory (its manifest is checked when it is loaded).

    Raises:
        CheckpointError: no checkpoint there.

    Example::

        >>> # source_checkpoint("runs/day1")  ->  runs/day1/checkpoints/best-step-800
    """
    path = Path(source)
    if (path / checkpoint.MANIFEST).is_file() and path.parent.name == "checkpoints":
        return path
    root = path / "checkpoints"
    found = checkpoint.latest(root, checkpoint.BEST_PATTERN) or checkpoint.latest(root)
    if found is None:
        raise CheckpointError(f"train.init_from {source}: no checkpoint that checks out under {root}")
    return found


def check_compatible(source_run: Path, cfg: ExperimentConfig) -> DatasetSchema:
    """
    Refuse a warm start whose saved tensors would mean something else in this run: another
    feature set, tasks, tower or embedding settings, or ids that moved to other rows.

    Args:
        source_run (Path): the run directory the checkpoint belongs to.
        cfg (ExperimentConfig): the new run's config (its prepared data must exist).

    Returns:
        DatasetSchema: the new run's data schema (checked).

    Raises:
        ConfigError: the configs differ in what the model learns (each difference named), or a
            table's ids do not keep their rows (the table and the first differing row named).

    Example::

        >>> # cfg = load_config("kuairand_1k", ["train.data_dir=prepared/day2"])
        >>> # check_compatible(Path("runs/day1"), cfg)  # the schema of prepared/day2
    """
    theirs = run_config(source_run)
    old, new = dataclasses.asdict(theirs), dataclasses.asdict(cfg)
    changes: List[str] = []
    for dotted in COMPARED:
        section, key = dotted.split(".")
        changes += config_changes({key: old[section][key]}, {key: new[section][key]}, f"{section}.")
    if changes:
        raise ConfigError(
            f"train.init_from {source_run}: that run learned from other inputs or with another model: "
            + "; ".join(changes)
        )
    source_data, data = Path(prepared_dir(theirs)), Path(prepared_dir(cfg))
    try:
        check_prepared(source_data)  # its vocabularies are read below
        before = DatasetSchema.load(source_data)
    except DataError as err:  # the earlier preparation removed or damaged
        raise ConfigError(
            f"train.init_from {source_run}: its prepared data {source_data} is needed to check that "
            f"every id keeps its row, and cannot be used ({err})"
        ) from None
    check_prepared(data)
    schema = DatasetSchema.load(data)
    for space in sorted({f.id_space for f in schema.sparse}):
        _check_rows_kept(space, before, source_data, schema, data, source_run)
    return schema


def _check_rows_kept(
    space: str, before: DatasetSchema, source_data: Path, now: DatasetSchema, data: Path, source_run: Path
) -> None:
    """An id space's ids keep their rows: the earlier vocabulary is this one's beginning (a
    hashed space: the same buckets)."""
    where = f"train.init_from {source_run}: id space '{space}'"
    if space not in before.vocab_sizes:
        raise ConfigError(f"{where} is not in that run's data ({source_data})")
    old_rows, rows = before.num_embeddings(space), now.num_embeddings(space)
    old_file, new_file = source_data / VOCAB_DIR / f"{space}.parquet", data / VOCAB_DIR / f"{space}.parquet"
    if not (old_file.is_file() and new_file.is_file()):  # hashed: rows are buckets, not ids
        if rows != old_rows:
            raise ConfigError(f"{where}: {old_rows:,} hash buckets there, {rows:,} here; ids would move")
        return
    if rows < old_rows:
        raise ConfigError(f"{where}: {old_rows:,} rows there, {rows:,} here; a table may only grow")
    earlier = pq.read_table(old_file).column(0)
    current = pq.read_table(new_file).column(0).slice(0, len(earlier))
    if not current.equals(earlier):
        first = next(i for i in range(len(earlier)) if current[i] != earlier[i])
        raise ConfigError(
            f"{where}: row {first + 1} holds id {current[first].as_py()!r} here and "
            f"{earlier[first].as_py()!r} there; a warm start needs each earlier id at its row "
            "(new ids appended at the end)"
        )


def warm_start(source: str | Path, cfg: ExperimentConfig, dmp: Any, optimizer: Any) -> Dict[str, Any]:
    """
    Load ``source``'s model and optimiser state into a freshly built run, after the checks.

    Args:
        source (str | Path): a run directory or one of its checkpoints (``train.init_from``).
        cfg (ExperimentConfig): the new run's config.
        dmp: the new run's DistributedModelParallel model.
        optimizer: its optimiser.

    Returns:
        Dict[str, Any]: what was loaded: ``checkpoint`` and, per grown table, its rows before
        and now (results.json keeps it as ``init_from``).

    Example::

        >>> # warm_start("runs/day1", cfg, dmp, optimizer)
        >>> # {'checkpoint': 'runs/day1/checkpoints/best-step-800', 'grown': {'t_content_id': [5746, 6102]}}
    """
    path = source_checkpoint(source)
    check_compatible(path.parent.parent, cfg)
    grown = checkpoint.warm_start(path, dmp, optimizer)
    tables = {
        key.split(".")[-2]: list(rows) for key, rows in grown.items() if key.startswith("model.")
    }  # model.<...>.t_<space>.weight -> t_<space>
    return {"checkpoint": str(path), "grown": tables}
