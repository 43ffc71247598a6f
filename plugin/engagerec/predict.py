"""Score new rows with a trained run: raw tables in the run's source layout, or a prepared split.

Every task gets a column: a regression task its prediction (the watch ratio), a binary task
its probability (``<task>_probability``) and a thresholded flag (``<task>_flag``). The rows
keep the input's order and ids (``row``: the input row; ``user_id`` / ``content_id``).

Memory is bounded: raw rows are encoded out of core (engagerec.data.scoring), batches stream
through the model, and each rank writes its share of the rows, which rank 0 then stitches to
one parquet file batch by batch. Under torchrun every rank scores a contiguous share of the
rows (the same reader as evaluation), so the output is the same on 1 process or N.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engagerec.data.errors import DataError
from engagerec.data.growth import known_rows
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import SCHEMA_FILE, DatasetSchema
from engagerec.data.scoring import IDS_FILE, ROW, encode_for_scoring
from engagerec.distributed import close_runtime, init_runtime, is_rank_zero
from engagerec.managed_ids import frozen_remaps, remap_frozen
from engagerec.model_builder import configured_tasks
from engagerec.runs import OpenedRun, open_run, run_config
from engagerec.tasks import Task

ID_COLUMNS = ("user_id", "content_id")  # kept beside the predictions where the input has them
STITCH_ROWS = 65_536  # rows per output batch when rank 0 joins the ranks' parts


def output_columns(tasks: List[Task]) -> List[str]:
    """The prediction columns for ``tasks``, in order: ``<task>`` for a regression task,
    ``<task>_probability`` and ``<task>_flag`` for a binary one.

    Example::

        >>> from engagerec.config import study_tasks
        >>> output_columns([Task(cfg) for cfg in study_tasks()])
        ['watch_ratio', 'skip_probability', 'skip_flag']
    """
    columns = []
    for task in tasks:
        columns += [f"{task.name}_probability", f"{task.name}_flag"] if task.kind == "binary" else [task.name]
    return columns


def predict(
    run_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    users: Optional[str] = None,
    content: Optional[str] = None,
    threshold: float = 0.5,
    batch_size: Optional[int] = None,
    checkpoint_name: str = "best",
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """Score ``input_path`` with the run in ``run_dir`` into the parquet file ``out``.

    Args:
        run_dir: a directory written by ``engagerec train``.
        input_path: raw interactions in the run's source layout (a file, directory or glob,
            read by the run's adapter and column mapping), or a prepared data directory (one
            holding schema.json), whose ``split`` is scored.
        out: the output parquet file.
        split: the split of a prepared input.
        users: with raw input, the users table (default: the run's).
        content: with raw input, the content table (default: the run's).
        threshold: a binary task's flag is ``probability >= threshold``.
        batch_size: rows per batch and rank (default the run's ``eval_batch_size``).
        checkpoint_name: "best" or "latest".
        device: "cpu", "cuda" or "auto" (default the run's ``train.device``).

    Returns:
        The summary (also printed by ``engagerec predict``): rows read and scored, rows dropped
        or kept without labels by reason, rows with ids unseen in training per feature, the
        output file and its columns.

    Raises:
        DataError: the input's columns or types differ from the training data's, a bad value,
            or a prepared input encoded differently from the run's data.
        CheckpointError: no run directory, or no checkpoint that checks out.
    """
    out = Path(out)
    _check_output(out, threshold)
    with open_run(run_dir, checkpoint_name, device) as run:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = _shared_workdir(out)
        try:
            scored, summary = _scoring_input(run, Path(input_path), split, users, content, work)
            parts, oov = _score(run, scored, threshold, batch_size, work)
            if oov:
                summary["oov_rows"] = oov
            if dist.is_initialized():
                dist.barrier()  # every rank's part is closed before rank 0 reads them
            if is_rank_zero():
                rows = _stitch(scored.ids(), parts, out)
                summary.update(rows_scored=rows, out=str(out), columns=pq.read_schema(out).names)
            if dist.is_initialized():
                dist.barrier()  # every rank's part was read before the directory goes
        finally:
            if is_rank_zero():
                shutil.rmtree(work, ignore_errors=True)
    return summary


def predict_mean(
    run_dirs: Sequence[str | Path], input_path: str | Path, out: str | Path, **options: Any
) -> Dict[str, Any]:
    """Score ``input_path`` with every run in ``run_dirs`` and write the mean of their
    predictions (a seed ensemble: RESULTS.md's ensemble section measures what it gains).

    Each run scores the input as ``predict`` does (its own schema and checkpoint); the output
    has the same columns, each regression estimate and probability averaged over the runs and
    each flag recomputed from the averaged probability.

    Args:
        run_dirs: directories written by ``engagerec train`` with the same tasks (one run is
            ``predict`` itself).
        input_path: as for ``predict``.
        out: the output parquet file (the runs' own go to a scratch directory beside it).
        **options: ``predict``'s keyword arguments (``threshold``, ``split``, ...).

    Returns:
        The first run's summary with ``runs`` (the run directories) and the output file.

    Raises:
        DataError: no run, runs with different tasks (checked before scoring), outputs of
            different rows, or what ``predict`` refuses (a bad output path, threshold, input).

    Example::

        >>> import contextlib, io, tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> from engagerec.train import train
        >>> data, runs = tempfile.mkdtemp(), []
        >>> for seed in (0, 1):
        ...     cfg = load_config("synthetic_study", ["data.source.synthetic.num_rows=2000",
        ...         f"train.data_dir={data}", "train.epochs=1", "train.progress_bar=false",
        ...         f"train.seed={seed}"])
        ...     _ = prepare(cfg.data, data) if seed == 0 else None
        ...     runs.append(tempfile.mkdtemp())
        ...     with contextlib.redirect_stdout(io.StringIO()):
        ...         _ = train(cfg, runs[-1])
        >>> out = Path(tempfile.mkdtemp()) / "mean.parquet"
        >>> summary = predict_mean(runs, data, out)
        >>> len(summary["runs"]), pq.read_schema(out).names[-3:]
        (2, ['watch_ratio', 'skip_probability', 'skip_flag'])
    """
    if not run_dirs:
        raise DataError("no run to predict with", expected="at least one run directory (--run-dir)")
    if len(run_dirs) == 1:
        return predict(run_dirs[0], input_path, out, **options)
    out = Path(out)
    threshold = options.get("threshold", 0.5)
    _check_output(out, threshold)
    tasks = [_run_tasks(run) for run in run_dirs]
    for run, theirs in zip(run_dirs[1:], tasks[1:], strict=True):
        if theirs != tasks[0]:
            raise DataError(
                "the runs predict different tasks", file=str(run), expected=f"tasks {tasks[0]}", got=theirs
            )
    # one process group for every run (re-creating it per run hangs some backends), and one
    # scratch directory for the runs' outputs
    runtime = init_runtime(options.get("device") or run_config(run_dirs[0]).train.device)
    try:
        work = _shared_workdir(out)
        try:
            members = [work / f"run{i}.parquet" for i in range(len(run_dirs))]
            summaries = [
                predict(run, input_path, m, **options) for run, m in zip(run_dirs, members, strict=True)
            ]
            outcome: List[Any] = [None]
            if is_rank_zero():
                try:
                    _average(members, out, threshold)
                except Exception as err:  # every rank must hear of it, as with the encoding
                    outcome[0] = err
            if runtime.world_size > 1:
                dist.broadcast_object_list(outcome, src=0)
            if isinstance(outcome[0], Exception):
                if is_rank_zero() or isinstance(outcome[0], DataError):
                    raise outcome[0]
                raise RuntimeError(f"rank 0 failed to average the runs: {outcome[0]!r}")
        finally:
            if runtime.world_size > 1:
                dist.barrier()  # no rank still reads a member when rank 0 removes them
            if is_rank_zero():
                shutil.rmtree(work, ignore_errors=True)
    finally:
        close_runtime(runtime)
    return dict(summaries[0], runs=[str(run) for run in run_dirs], out=str(out))


def _check_output(out: Path, threshold: float) -> None:
    """Predictions go to a parquet file; a flag's threshold is a probability."""
    if out.suffix != ".parquet":
        raise DataError(
            "predictions are written as parquet", file=str(out), expected="a path ending in .parquet"
        )
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"--threshold {threshold}", expected="a probability in [0, 1]")


def _run_tasks(run_dir: str | Path) -> List[Tuple[str, str]]:
    """A run's tasks as (name, kind): its config's, or one per label of its prepared data."""
    return [(task.name, task.kind) for task in configured_tasks(run_config(run_dir))]


def _average(members: List[Path], out: Path, threshold: float) -> None:
    """``out``: the members' rows with each prediction averaged, flags from the mean probability."""
    files = [pq.ParquetFile(member) for member in members]
    names = files[0].schema_arrow.names
    for member, file in zip(members[1:], files[1:], strict=True):
        if file.schema_arrow.names != names:
            raise DataError("the runs predict different tasks", file=str(member), expected=f"columns {names}")
        if file.metadata.num_rows != files[0].metadata.num_rows:
            raise DataError("the runs scored different rows", file=str(member), expected="the same input")
    averaged = [n for n in names if n not in (ROW, *ID_COLUMNS, *(f"{k}_index" for k in ID_COLUMNS))]
    averaged = [n for n in averaged if not n.endswith("_flag")]
    tmp, writer = out.with_name(f".{out.name}.tmp"), None
    for batches in zip(*(file.iter_batches(batch_size=STITCH_ROWS) for file in files), strict=True):
        first = batches[0]
        if any(not batch.column(ROW).equals(first.column(ROW)) for batch in batches[1:]):
            raise DataError("the runs scored different rows", file=str(out), expected="the same input")
        columns = {name: first.column(name) for name in names}
        for name in averaged:
            mean = sum(batch.column(name).to_numpy(zero_copy_only=False) for batch in batches) / len(batches)
            columns[name] = pa.array(mean.astype(first.column(name).type.to_pandas_dtype()))
            if name.endswith("_probability"):
                flag = name[: -len("_probability")] + "_flag"
                columns[flag] = pa.array(mean >= threshold)
        table = pa.Table.from_pydict(columns, schema=first.schema)
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    if writer is None:
        raise RuntimeError("no rows to average")  # predict writes at least a schema's worth of rows
    writer.close()
    tmp.replace(out)


@dataclass
class _Scored:
    """What is scored: a split of a prepared directory, and where its rows' ids come from
    (``ids.parquet`` of encoded raw input, or the split's own encoded id columns)."""

    data_dir: Path
    split: str
    raw: bool
    # a later window of the run's data: per sparse feature whose table grew, the run's table
    # rows (ids appended since score on row 0, as a frozen vocabulary would put them); and the
    # single-id features whose rows scored on row 0 are counted (a prepared input's)
    limits: Dict[str, int] = field(default_factory=dict)
    counted: List[str] = field(default_factory=list)

    def ids(self) -> Iterator[pa.RecordBatch]:
        """The rows' ids in row order: ``row`` and the id columns (a prepared split holds
        encoded ids only: ``user_id_index``, ``content_id_index``, the embedding rows)."""
        if self.raw:
            yield from pq.ParquetFile(self.data_dir / IDS_FILE).iter_batches(batch_size=STITCH_ROWS)
            return
        schema = DatasetSchema.load(self.data_dir)
        kept = [name for name in ID_COLUMNS if name in schema.sparse_names]
        start = 0
        for name in schema.meta["splits"][self.split]["files"]:  # the reader's order, unshuffled
            shard = pq.ParquetFile(self.data_dir / self.split / name, page_checksum_verification=True)
            for batch in shard.iter_batches(batch_size=STITCH_ROWS, columns=kept):
                rows = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))  # no int objects
                start += batch.num_rows
                yield pa.record_batch([rows, *batch.columns], names=[ROW, *(f"{k}_index" for k in kept)])


def _shared_workdir(out: Path) -> Path:
    """A scratch directory beside ``out`` that every rank sees (rank 0 names it)."""
    name = [tempfile.mkdtemp(prefix=f".{out.stem}-", dir=out.parent) if is_rank_zero() else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _scoring_input(
    run: OpenedRun, path: Path, split: str, users, content, work: Path
) -> "tuple[_Scored, Dict[str, Any]]":
    """(what to score, the summary so far): a prepared input as it is, after checking it was
    encoded like the run's data; raw input encoded by rank 0 with the run's schema. An error
    on rank 0 reaches every rank (all raise it)."""
    if (path / SCHEMA_FILE).is_file():
        given = DatasetSchema.load(path)
        limits = _check_prepared(
            given, DatasetSchema.load(run.data_dir), path, Path(run.data_dir), run.model.tasks
        )
        if split not in given.meta.get("splits", {}):
            raise DataError(f"split '{split}' is not in this prepared data", file=str(path / SCHEMA_FILE))
        rows = given.meta["splits"][split]["rows"]
        single = {f.name for f in given.sparse if not f.multi}
        scored = _Scored(path, split, raw=False, limits=limits, counted=sorted(single))
        return scored, {"input": f"{path} ({split})", "rows_read": rows}
    outcome: List[Any] = [None]
    if is_rank_zero():
        try:
            outcome[0] = encode_for_scoring(
                run.cfg.data, run.data_dir, str(path), work / "encoded", users=users, content=content
            )
        except Exception as err:  # every rank must hear of it, or the others wait on the broadcast
            outcome[0] = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        if is_rank_zero() or isinstance(outcome[0], DataError):
            raise outcome[0]
        raise RuntimeError(f"rank 0 failed to encode the input: {outcome[0]!r}")
    return _Scored(work / "encoded", "test", raw=True), {"input": str(path), **outcome[0]}


def _check_prepared(
    given: DatasetSchema, trained: DatasetSchema, path: Path, trained_dir: Path, tasks: List[Task]
) -> Dict[str, int]:
    """A prepared input must be encoded as the run's data was: the same sparse features over
    tables of the same sizes (or a later window of the run's data, whose tables grew: returns
    per sparse feature the run's table rows, ids past them to score on row 0), the same dense
    features, and the tasks' label columns."""
    where = str(path / SCHEMA_FILE)

    def tables(schema: DatasetSchema) -> Dict[str, int]:
        return {f.name: schema.num_embeddings(f.id_space) for f in schema.sparse}

    limits: Dict[str, int] = {}
    if path.resolve() != trained_dir.resolve() and set(tables(given)) == set(tables(trained)):
        try:  # the run's data again, or a later window of it: the run's ids keep their rows
            known = known_rows(path, trained_dir)
        except DataError as err:
            raise DataError(
                f"this prepared data is encoded differently from the run's, and does not continue it ({err})",
                file=where,
            ) from None
        limits = {f.name: known[f.id_space] for f in given.sparse if f.id_space in known}
    if {name: limits.get(name, rows) for name, rows in tables(given).items()} != tables(trained):
        raise DataError(
            "this prepared data is encoded differently from the run's (sparse features or their table sizes)",
            file=where,
            expected=f"{tables(trained)}",
            got=tables(given),
        )
    if given.dense_names != trained.dense_names:
        raise DataError(
            "this prepared data has other dense features than the run's",
            file=where,
            expected=f"{trained.dense_names}",
            got=given.dense_names,
        )

    def numbers(schema: DatasetSchema) -> Dict[str, Any]:
        dense = {d.name: (round(d.mean, 9), round(d.std, 9), d.fill) for d in schema.dense}
        return {"dense": dense, "buckets": schema.buckets, "hashed": schema.hashed}

    if numbers(given) != numbers(trained):
        raise DataError(
            "this prepared data is encoded differently from the run's (normalisation, bucket edges or "
            "hashing were fitted on other rows)",
            file=where,
        )
    missing = [t.label for t in tasks if t.label not in given.label_names]
    if missing:
        raise DataError(f"label columns {missing} of the run's tasks are missing", file=where)
    return limits


def _score(
    run: OpenedRun, scored: _Scored, threshold: float, batch_size: Optional[int], work: Path
) -> Tuple[List[Path], Dict[str, int]]:
    """Every rank scores its rows into ``work/part-<rank>.parquet``; returns all ranks' parts in
    rank order (= row order), and over all ranks, per feature of ``scored.counted``, the rows
    scored on row 0 (an id unseen in the run's training, or appended after its data, or missing)."""
    tasks = run.model.tasks
    device = run.runtime.device
    size = batch_size or run.cfg.train.eval_batch_size
    reader = ShardReader(scored.data_dir, scored.split, batch_size=size, even_batches=True)
    if reader.total_rows == 0:  # every rank sees it: no rank is left waiting for the others
        raise DataError(f"no rows to score in split '{scored.split}'", file=str(scored.data_dir))
    columns = output_columns(tasks)
    layout = pa.schema(
        [(c, pa.bool_() if c.endswith("_flag") else pa.float32()) for c in columns]  # flags are booleans
    )
    own = work / f"part-{run.runtime.rank:05d}.parquet"
    cuda = device.type == "cuda"
    oov = torch.zeros(len(scored.counted), dtype=torch.int64)
    shared = _shared_rows(run.model)
    with pq.ParquetWriter(own, layout) as writer, torch.no_grad():
        for batch in make_loader(reader, pin_memory=cuda):
            real = int(batch.weights.gt(0).sum())  # padding (even_batches) comes last, at weight 0
            if scored.counted:
                batch = _on_known_rows(batch, scored.limits, scored.counted, real, oov, shared)
            _, (_, predictions, _, _) = run.dmp(batch.to(device, non_blocking=cuda))
            arrays = []
            for task in tasks:
                values = predictions[task.name][:real].float().cpu().numpy()
                arrays.append(pa.array(values))
                if task.kind == "binary":
                    arrays.append(pa.array(values >= threshold))
            writer.write_batch(pa.record_batch(arrays, schema=layout))
    if dist.is_initialized() and dist.get_world_size() > 1 and len(oov):
        # a tensor on the process group's device (NCCL reduces CUDA tensors only)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        total = oov.to(device)
        dist.all_reduce(total)
        oov = total.cpu()
    parts = [work / f"part-{rank:05d}.parquet" for rank in range(run.runtime.world_size)]
    return parts, {name: int(n) for name, n in zip(scored.counted, oov.tolist(), strict=True)}


def _shared_rows(model) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]:
    """Per feature of a managed-collision table, its remapping (``frozen_rows``): what tells
    the ids it never admitted, which score on the table's shared row."""
    remaps, found = frozen_remaps(model), {}
    for table in model.tables:
        if table.name in remaps:
            ids, rows, shared = remaps[table.name]  # on CPU, where the batch's ids are counted
            found.update({name: (ids.cpu(), rows.cpu(), shared) for name in table.feature_names})
    return found


def _on_known_rows(
    batch,
    limits: Dict[str, int],
    counted: List[str],
    real: int,
    oov: torch.Tensor,
    shared: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]] = None,
):
    """``batch`` with every id at or past its feature's limit on row 0 (the out-of-vocabulary
    row), counting, per feature of ``counted`` (one id a row), the real rows on row 0 then (on
    the shared row for a managed-collision feature of ``shared``)."""
    shared = shared or {}
    kjt = batch.sparse_features
    keys, lengths = kjt.keys(), kjt.length_per_key()
    limit = torch.repeat_interleave(
        torch.tensor([limits.get(key, 2**62) for key in keys]), torch.tensor(lengths)
    )
    values = kjt.values()
    past = values >= limit
    for i, name in enumerate(counted):
        start = sum(lengths[: keys.index(name)])
        row = values[start : start + real]  # one id a row: the first ``real`` values are the real rows
        if name in shared:  # an id the remapping never admitted
            sorted_ids, rows, shared_row = shared[name]
            oov[i] += int((remap_frozen(row.long(), sorted_ids, rows, shared_row) == shared_row).sum())
            continue
        oov[i] += int(((row == 0) | past[start : start + real]).sum())
    if not limits:
        return batch
    moved = KeyedJaggedTensor(
        keys=keys,
        values=torch.where(past, torch.zeros_like(values), values),
        lengths=kjt.lengths(),
    )
    return dataclasses.replace(batch, sparse_features=moved)


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """The rows of ``batches`` as tables of exactly ``rows`` rows (the last one shorter)."""
    pending: List[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def _stitch(ids: Iterator[pa.RecordBatch], parts: List[Path], out: Path) -> int:
    """Write ``out``: the ids beside every rank's predictions, in row order, ``STITCH_ROWS``
    rows at a time. Returns the rows written."""

    def predictions() -> Iterator[pa.RecordBatch]:
        for part in parts:
            yield from pq.ParquetFile(part).iter_batches(batch_size=STITCH_ROWS)

    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    id_tables = _rebatch(ids, STITCH_ROWS)
    writer = None
    for scored in _rebatch(predictions(), STITCH_ROWS):
        keys = next(id_tables)
        if keys.num_rows != scored.num_rows:
            raise RuntimeError(f"ids and predictions disagree at row {rows}")  # a bug, not bad input
        table = pa.Table.from_arrays(
            keys.columns + scored.columns, names=keys.column_names + scored.column_names
        )
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
        rows += table.num_rows
    if writer is None or next(id_tables, None) is not None:
        raise RuntimeError(f"ids and predictions disagree after row {rows}")  # a bug, not bad input
    writer.close()
    tmp.replace(out)  # atomic: a reader never sees half the predictions
    return rows


def format_summary(summary: Dict[str, Any]) -> str:
    """The text `engagerec predict` prints: rows in and out, what was counted, where it went."""
    lines = [f"engagerec predict: {summary['input']} -> {summary['out']}"]
    if len(summary.get("runs", [])) > 1:
        lines.append(f"  the mean of {len(summary['runs'])} runs: {', '.join(summary['runs'])}")
    counts = [("rows read", summary.get("rows_read")), ("rows scored", summary["rows_scored"])]
    counts += [(f"dropped: {k}", v) for k, v in summary.get("dropped", {}).items() if v]
    counts += [(f"counted: {k}", v) for k, v in summary.get("counted_not_dropped", {}).items() if v]
    counts += [
        (f"id unseen in training (OOV row): {k}", v) for k, v in summary.get("unseen_ids", {}).items() if v
    ]
    counts += [
        (f"scored on the OOV row (id unseen in training, or missing): {k}", v)
        for k, v in summary.get("oov_rows", {}).items()
        if v
    ]
    width = max(len(name) for name, _ in counts)
    lines += [f"  {name:<{width}} {value:>12,}" for name, value in counts if value is not None]
    lines.append(f"  columns: {', '.join(summary['columns'])}")
    return "\n".join(lines)
