"""A warm start (``train.init_from``, ``engagerec train --init-from RUN``): a new run that begins
from another run's model and optimiser state instead of a fresh initialisation, as a team that
retrains every day on the next day's log does.

Each id keeps what it learned, wherever the new preparation put it: every run records the
vocabularies it trained with (``vocabularies.json``: each file's CRC-32 from the prepared data's
manifest), and a warm start matches the earlier run's vocabulary with this run's, id by id. An id
of both gets its saved row; a new id starts fresh; an id no longer in the vocabulary is dropped.
Hashed id spaces keep their rows when they keep their bucket count.

Refused before anything is built or written, each reason named:

* another feature set, labels, tasks, tower or embedding settings (``COMPARED``);
* an earlier run whose prepared data changed since it trained (its vocabularies are needed to
  move the rows), or that recorded none (trained by an earlier engagerec);
* a hashed id space whose bucket count changed, or an id space the earlier run did not have;
* an ``init_from`` inside this run's own directory.

Then ``engagerec.checkpoint.warm_start`` loads every tensor, resharding onto this run's plan and
world size. The run's progress starts at zero (its own epochs, steps, early stopping and RNG); a
warm-started run checkpoints and resumes like any run (a resume ignores ``init_from``), and
``predict`` and ``export`` treat it like any run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch.distributed as dist

from engagerec import checkpoint
from engagerec.config import ExperimentConfig, config_changes, prepared_dir
from engagerec.data.errors import DataError
from engagerec.data.manifest import check_prepared
from engagerec.data.schema import VOCAB_DIR, DatasetSchema
from engagerec.distributed import is_rank_zero
from engagerec.errors import ConfigError
from engagerec.features import FeatureSpec
from engagerec.runs import run_config

# what must match for the saved tensors to mean the same thing in the new run
COMPARED = (
    "data.features",
    "data.labels",
    "model.embeddings",
    "model.tower",
    "model.tasks",
    "model.target_attention",
    "model.dot_interactions",
    "model.dot_logits",
)
VOCABULARIES_FILE = "vocabularies.json"  # in a run directory: the vocabularies it trained with


def record_vocabularies(run_dir: Path, data_dir: str | Path) -> None:
    """
    Write ``run_dir/vocabularies.json``: where the run's prepared data is, and the size and CRC-32
    of each of its vocabulary files (from its manifest): what a later warm start checks that the
    data still holds.

    Args:
        run_dir (Path): the run directory.
        data_dir (str | Path): its prepared data.

    Example::

        >>> # record_vocabularies(Path("runs/day1"), "prepared/kuairand_1k")
    """
    entries = check_prepared(data_dir)
    vocabularies = {name: entry for name, entry in entries.items() if name.startswith(f"{VOCAB_DIR}/")}
    record = {"data_dir": str(Path(data_dir).resolve()), "files": vocabularies}
    (run_dir / VOCABULARIES_FILE).write_text(json.dumps(record, indent=1))


@dataclass
class WarmStartPlan:
    """What a checked warm start loads: the checkpoint, and for each table whose rows moved,
    the saved row of each of its rows (-1: a new id, fresh)."""

    checkpoint: Path
    source_rows: Dict[str, np.ndarray]


def plan_warm_start(source: str | Path, cfg: ExperimentConfig, run_dir: Path) -> WarmStartPlan:
    """
    Check a warm start and match its ids, before any model is built (the same on every rank:
    rank 0 picks the checkpoint, so a source run that is still writing cannot split the ranks).

    Args:
        source (str | Path): ``train.init_from``: a run directory (its best checkpoint, else its
            newest) or one of its ``checkpoints/<name>`` directories.
        cfg (ExperimentConfig): the new run's config (its prepared data must exist).
        run_dir (Path): the new run's directory.

    Returns:
        WarmStartPlan: the checkpoint and the row maps of the tables whose ids moved.

    Raises:
        ConfigError: a reason above, named.
        CheckpointError: no checkpoint that checks out.

    Example::

        >>> # plan = plan_warm_start("runs/day1", cfg, Path("runs/day2"))
        >>> # plan.checkpoint, {t: (rows >= 0).sum() for t, rows in plan.source_rows.items()}
    """
    where = f"train.init_from {source}"
    if Path(source).resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(f"{where}: it lies inside this run's directory {run_dir}; start from another run")
    chosen = [str(_source_checkpoint(source)) if is_rank_zero() else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    path = Path(chosen[0])
    source_run = path.parent.parent
    theirs = run_config(source_run)
    old, new = dataclasses.asdict(theirs), dataclasses.asdict(cfg)
    changes: List[str] = []
    for dotted in COMPARED:
        section, key = dotted.split(".")
        changes += config_changes({key: old[section][key]}, {key: new[section][key]}, f"{section}.")
    if changes:
        raise ConfigError(
            f"{where}: that run learned from other inputs or with another model: " + "; ".join(changes)
        )
    before_dir = _trained_data(source_run, where)
    before, now_dir = DatasetSchema.load(before_dir), Path(prepared_dir(cfg))
    check_prepared(now_dir)
    now = DatasetSchema.load(now_dir)
    moved = {
        space: _source_rows(space, before, before_dir, now, now_dir, where)
        for space in sorted({f.id_space for f in now.sparse})
    }
    tables = FeatureSpec.from_schema(now, cfg.model.embeddings).spaces  # a space may have several
    source_rows = {table: moved[space] for table, space in tables.items() if moved[space] is not None}
    return WarmStartPlan(path, source_rows)


def apply_warm_start(plan: WarmStartPlan, dmp: Any, optimizer: Any) -> Dict[str, Any]:
    """
    Load a planned warm start into a freshly built run.

    Args:
        plan (WarmStartPlan): from ``plan_warm_start``.
        dmp: the new run's DistributedModelParallel model.
        optimizer: its optimiser.

    Returns:
        Dict[str, Any]: ``checkpoint``, ``moved`` (per table whose ids moved: its saved and its
        rows, and the rows that kept a saved value) and ``fresh_optimizer_state`` (what starts
        fresh); results.json keeps it as ``init_from``.

    Example::

        >>> # apply_warm_start(plan, dmp, optimizer)["moved"]
        >>> # {'t_content_id': {'rows': [5746, 6102], 'kept': 5500}}
    """
    loaded = checkpoint.warm_start(plan.checkpoint, dmp, optimizer, plan.source_rows)
    return {"checkpoint": str(plan.checkpoint), **loaded}


def _source_checkpoint(source: str | Path) -> Path:
    """A checkpoint directory as given, or a run's best checkpoint, else its newest step one."""
    path = Path(source)
    if (path / checkpoint.MANIFEST).is_file() and path.parent.name == "checkpoints":
        checkpoint.verify(path)
        return path
    root = path / "checkpoints"
    found = checkpoint.latest(root, checkpoint.BEST_PATTERN) or checkpoint.latest(root)
    if found is None:
        raise ConfigError(f"train.init_from {source}: no checkpoint that checks out under {root}")
    return found


def _trained_data(source_run: Path, where: str) -> Path:
    """The prepared directory the source run trained on, checked to still hold the vocabularies
    it recorded."""
    record_path = source_run / VOCABULARIES_FILE
    if not record_path.is_file():
        raise ConfigError(
            f"{where}: that run recorded no vocabularies ({VOCABULARIES_FILE}: trained by an earlier "
            "engagerec), so its ids cannot be matched with this run's"
        )
    record = json.loads(record_path.read_text())
    data_dir = Path(record["data_dir"])
    try:
        entries = check_prepared(data_dir)
    except DataError as err:
        raise ConfigError(
            f"{where}: the prepared data it trained on, {data_dir}, is needed to match its ids and cannot "
            f"be used ({err})"
        ) from None
    changed = sorted(
        name
        for name, entry in record["files"].items()
        if (entries.get(name) or {}).get("crc32") != entry["crc32"]
    )
    changed += sorted(
        name for name in entries if name.startswith(f"{VOCAB_DIR}/") and name not in record["files"]
    )
    if changed:
        raise ConfigError(
            f"{where}: the prepared data it trained on, {data_dir}, was prepared again since "
            f"({', '.join(changed)} differ): its ids can no longer be matched. Keep each day's "
            "preparation until the next day's run has started from it"
        )
    return data_dir


def _source_rows(
    space: str, before: DatasetSchema, before_dir: Path, now: DatasetSchema, now_dir: Path, where: str
) -> Optional[np.ndarray]:
    """For each row of ``space``'s table here, the earlier run's row of the same id (-1: a new
    id); None when no row moved."""
    if space not in before.vocab_sizes and space not in before.hashed:
        raise ConfigError(f"{where}: id space '{space}' is not in that run's data")
    if (space in before.hashed) != (space in now.hashed):
        raise ConfigError(
            f"{where}: id space '{space}' is hashed in one run and has a vocabulary in the other"
        )
    if space in now.hashed:
        if now.hashed[space] != before.hashed[space]:
            raise ConfigError(
                f"{where}: id space '{space}' has {before.hashed[space]:,} hash buckets there and "
                f"{now.hashed[space]:,} here; ids would move to other buckets"
            )
        return None
    earlier_file, current_file = (d / VOCAB_DIR / f"{space}.parquet" for d in (before_dir, now_dir))
    if not (earlier_file.is_file() or current_file.is_file()):  # rows are buckets of a number
        rows, old_rows = now.num_embeddings(space), before.num_embeddings(space)
        if rows != old_rows:
            raise ConfigError(f"{where}: id space '{space}' has {old_rows:,} rows there and {rows:,} here")
        return None
    earlier, current = (pq.read_table(path).column(0) for path in (earlier_file, current_file))
    if earlier.type != current.type:
        raise ConfigError(
            f"{where}: id space '{space}' holds {earlier.type} ids there and {current.type} here"
        )
    if current.equals(earlier):
        return None
    found = pc.index_in(current, value_set=earlier)  # position in the earlier vocabulary, or null
    positions = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.empty(len(current) + 1, dtype=np.int64)
    rows[0] = 0  # the out-of-vocabulary row stays the out-of-vocabulary row
    rows[1:] = np.where(positions >= 0, positions + 1, -1)
    return rows
