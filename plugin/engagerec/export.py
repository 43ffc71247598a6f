"""A trained run as one unsharded inference program that needs only PyTorch to load.

``export_run`` reads the run's checkpoint with torch.distributed.checkpoint into an unsharded
model (DCP gathers whatever sharding the run trained with: table-wise over N ranks, column-wise,
...), turns it into ``ServingModel``, and saves it with ``torch.export`` as a ``.pt2`` program
of ATen operators: embedding bags, the tower's matmuls, the heads. A serving process loads it
with ``torch.export.load`` alone: no engagerec, no torchrec, no fbgemm-gpu.

``model_raw_<kind>.pt2`` is the same model behind prepare's encoding (engagerec.raw_inputs):
it takes raw values (integer ids, numbers, the user's recent views and outcomes) and encodes
them inside the graph, so a client re-implements no vocabulary, normalisation or id statistic.
Inputs a tensor program cannot encode (text tokens, hashed id spaces) it takes encoded, and
inputs.json says which.

int8 is row-wise: every embedding row is stored as 8-bit codes plus its own fp32 scale and
offset (PyTorch's ``quantized::embedding_bag_byte_*`` operators, the CPU counterpart of the
FBGEMM kernels torchrec.inference uses), a quarter of the fp32 table bytes. The tower stays fp32.

Output directory::

    model_fp32.pt2  model_raw_fp32.pt2  [model_int8.pt2  model_raw_int8.pt2]
    inputs.json  export.json  encoding/
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.export import Dim
from torchrec.modules.embedding_configs import PoolingType

from engagerec import checkpoint
from engagerec.aoti import compile_package, package_name
from engagerec.batch import Batch
from engagerec.config import FeatureConfig, history_length, prepared_dir
from engagerec.data.errors import DataError
from engagerec.data.manifest import check_prepared
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import MANAGED_INPUT_BUCKETS, SCHEMA_FILE, VOCAB_DIR, DatasetSchema
from engagerec.data.target_stats import STATS_DIR
from engagerec.distributed import world_size
from engagerec.errors import CheckpointError, ConfigError
from engagerec.managed_ids import frozen_remaps, remap_frozen
from engagerec.metrics import binary_auc
from engagerec.model import MultiTaskModel
from engagerec.model_builder import build_model
from engagerec.raw_inputs import MISSING_ID, RawEncoder, RawServingModel
from engagerec.runs import for_cpu, run_config

ENCODING_DIR = "encoding"  # beside the programs: the training data's encoding, for clients

ServingInputs = Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]
RAW_CALL = "program(ids, numbers, recent, recent_lengths, dense, sparse_ids, sparse_offsets) -> [B, tasks]"
MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


class ServingModel(nn.Module):
    """
    A MultiTaskModel for inference in plain PyTorch operators: per sparse feature an embedding
    bag over its table (fp32, or row-wise int8), the pooled embeddings and dense features into
    the tower, one head per task, each task's prediction (the regression estimate, or the
    probability of a binary task). What ``export_run`` saves with torch.export.

    Args:
        model (MultiTaskModel): a trained, unsharded model (tables on CPU).
        int8 (bool): store the tables as row-wise int8 codes with a fp32 scale and offset per
            row. Default: False.

    Call Args:
        dense (torch.Tensor): [B, dense features] float32, in ``dense_names`` order (encoded
            as prepare encodes them).
        ids (Dict[str, torch.Tensor]): per sparse feature, the int64 ids of every row, concatenated.
        offsets (Dict[str, torch.Tensor]): per sparse feature, [B] int64: where each row's ids start.

    Returns:
        torch.Tensor: [B, tasks] predictions, columns in ``task_names`` order.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> from engagerec.config import study_tasks
        >>> from engagerec.towers import build_tower
        >>> _ = torch.manual_seed(0)
        >>> table = EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=4, feature_names=["item"])
        >>> tower = build_tower("mmoe", 4 + 1, 2, num_experts=2, expert_sizes=[8])
        >>> model = MultiTaskModel(EmbeddingBagCollection(tables=[table]), 1, tower, study_tasks())
        >>> serving = ServingModel(model)
        >>> out = serving(torch.randn(3, 1), {"item": torch.tensor([1, 4, 7])}, {"item": torch.arange(3)})
        >>> out.shape, serving.task_names
        (torch.Size([3, 2]), ['watch_ratio', 'skip'])
        >>> bool(((out[:, 1] > 0) & (out[:, 1] < 1)).all())  # skip: a probability
        True
    """

    def __init__(self, model: MultiTaskModel, int8: bool = False) -> None:
        super().__init__()
        self.int8 = int8
        self.feature_names: List[str] = list(model.feature_names) if model.has_sparse else []
        self.tasks = list(model.tasks)
        self.task_names = [t.name for t in model.tasks]
        self.features: List[Tuple[str, str, str]] = []  # (feature, its table's buffer, sum | mean)
        # a managed-collision table's remapping, frozen: feature -> (ids buffer, rows buffer, shared row)
        self.remapped: Dict[str, Tuple[str, str, int]] = {}
        remaps = frozen_remaps(model)
        for table in model.tables:
            if table.name in remaps:
                sorted_ids, rows, shared = remaps[table.name]
                self.register_buffer(f"remap_ids_{table.name}", sorted_ids)
                self.register_buffer(f"remap_rows_{table.name}", rows)
                for name in table.feature_names:
                    self.remapped[name] = (f"remap_ids_{table.name}", f"remap_rows_{table.name}", shared)
            weight = model.sparse_arch.embedding_bags[table.name].weight.detach().float().cpu()
            buffer = f"table_{table.name}"
            self.register_buffer(
                buffer, torch.ops.quantized.embedding_bag_byte_prepack(weight) if int8 else weight.clone()
            )
            mode = MODES[table.pooling]
            self.features += [
                (name, buffer, mode) for name in table.feature_names if name in self.feature_names
            ]
        # in the model's pooled order, which any subset of the tables' features may set
        self.features.sort(key=lambda feature: self.feature_names.index(feature[0]))
        self.input_arch = model.input_arch
        self.tower = model.tower
        self.heads = model.heads
        self.logit_offsets = model.logit_offsets

    def forward(
        self, dense: torch.Tensor, ids: Dict[str, torch.Tensor], offsets: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(dense, ids, offsets) -> [B, tasks] predictions (see the class docstring)."""
        pooled = []
        for name, buffer, mode in self.features:
            table = getattr(self, buffer)
            mean = mode == "mean"
            rows = ids[name]
            if name in self.remapped:  # managed collisions: hashed ids -> rows, as training left them
                sorted_ids, mapping, shared = self.remapped[name]
                rows = remap_frozen(rows, getattr(self, sorted_ids), getattr(self, mapping), shared)
            if self.int8:  # the operator sums whatever its mode says: a mean divides by the bag sizes
                summed = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                    table, rows, offsets[name], False, 0, False, None, None, False
                )
                if mean:
                    end = torch.full_like(offsets[name][:1], ids[name].shape[0])
                    sizes = torch.diff(offsets[name], append=end).clamp(min=1)
                    summed = summed / sizes.unsqueeze(1).to(summed.dtype)
                pooled.append(summed)
            else:
                pooled.append(F.embedding_bag(rows, table, offsets[name], mode=mode))
        shifts = self.logit_offsets(torch.cat(pooled, dim=1)) if self.logit_offsets is not None else None
        if self.input_arch is not None:  # e.g. target attention over the history's positions
            pooled = [self.input_arch(torch.cat(pooled, dim=1))]
        representations = self.tower(torch.cat([*pooled, dense], dim=1))
        outputs = []
        for i, head in enumerate(self.heads):
            output = head(representations[i], None if shifts is None else shifts[:, i])
            outputs.append(self.tasks[i].prediction(output))
        return torch.stack(outputs, dim=1)


def serving_inputs(batch: Batch, feature_names: List[str]) -> ServingInputs:
    """A reader's Batch as ServingModel's inputs.

    Args:
        batch: a Batch from ``ShardReader``.
        feature_names: the sparse features ServingModel reads (``ServingModel.feature_names``).

    Returns:
        (the dense matrix, per feature its ids, per feature its row offsets): the
        KeyedJaggedTensor taken apart by key.
    """
    jagged = batch.sparse_features.to_dict() if feature_names else {}
    ids = {name: jagged[name].values().long() for name in feature_names}
    offsets = {name: jagged[name].offsets()[:-1].long() for name in feature_names}
    return batch.dense_features.float(), ids, offsets


def unsharded_model(run_dir: str | Path, checkpoint_name: str = "best") -> Tuple[MultiTaskModel, Path, Any]:
    """The run's model on CPU, unsharded, with the checkpoint's weights (DCP reads any sharding
    the run was trained with); also the checkpoint's path and the run's (CPU-ready) config.

    Raises:
        CheckpointError: no run directory, or no checkpoint of that kind that checks out.
    """
    cfg = for_cpu(run_config(run_dir))
    schema = DatasetSchema.load(prepared_dir(cfg))
    model = build_model(schema, cfg.model, device=torch.device("cpu"))
    pattern = checkpoint.BEST_PATTERN if checkpoint_name == "best" else checkpoint.STEP_PATTERN
    path = checkpoint.latest(Path(run_dir) / "checkpoints", pattern)
    if path is None:
        raise CheckpointError(f"no {checkpoint_name} checkpoint under {Path(run_dir) / 'checkpoints'}")
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming ... a single process": exactly the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)  # one process gathers every shard
    model.load_state_dict(state["model"])
    return model.eval(), path, cfg


def _example_batch(data_dir: str, rows: int = 64) -> Batch:
    """The first rows of the validation split (of the training split for data prepared for a
    refit, which has none): export's example input and its eager check."""
    for split in ("val", "train"):
        reader = ShardReader(data_dir, split, batch_size=rows, rank=0, world_size=1)
        if reader.total_rows:
            return next(iter(make_loader(reader)))
    raise DataError("no validation or training rows for export's example input", file=str(data_dir))


def _dynamic_shapes(feature_names: List[str]) -> Dict[str, Any]:
    """The batch and every feature's id count vary from call to call."""
    batch = Dim("batch", min=2)
    return {
        "dense": {0: batch},
        "ids": {name: {0: Dim(f"ids_{i}", min=1)} for i, name in enumerate(feature_names)},
        "offsets": {name: {0: batch} for name in feature_names},
    }


def quality(
    program: nn.Module,
    model: MultiTaskModel,
    data_dir: str,
    split: str,
    max_rows: int,
    batch_size: int = 4096,
) -> Dict[str, float]:
    """Per task, MSE (regression) or AUC (binary; NaN when the rows hold one class) of
    ``program``'s predictions on the first ``max_rows`` rows of ``split``, rows whose label is
    missing left out.

    Args:
        program: ServingModel or the module of a loaded export.
        model: the eager model (its tasks and feature names).
        data_dir: the prepared data directory.
        split: the split to read.
        max_rows: at most this many rows.
        batch_size: rows per batch.

    Returns:
        ``rows`` and ``<task>/mse`` or ``<task>/auc`` per task.
    """
    reader = ShardReader(data_dir, split, batch_size=min(batch_size, max_rows), rank=0, world_size=1)
    predictions, labels, kept = [], {t.name: [] for t in model.tasks}, 0
    with torch.no_grad():
        for batch in make_loader(reader):
            predictions.append(program(*serving_inputs(batch, model.feature_names)).numpy())
            for task in model.tasks:
                present = batch.label_weights[task.label].numpy() > 0
                labels[task.name].append(np.where(present, batch.labels[task.label].numpy(), np.nan))
            kept += batch.batch_size
            if kept >= max_rows:
                break
    scores = np.concatenate(predictions)[:max_rows]
    out = {"rows": float(len(scores))}
    for i, task in enumerate(model.tasks):
        label = np.concatenate(labels[task.name])[:max_rows]
        present = ~np.isnan(label)
        if task.kind == "binary":
            two_classes = len(np.unique(label[present])) == 2
            auc = binary_auc(scores[present, i], label[present]) if two_classes else float("nan")
            out[f"{task.name}/auc"] = float(auc)
        else:
            out[f"{task.name}/mse"] = float(np.mean((scores[present, i] - label[present]) ** 2))
    return out


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    int8: bool = False,
    aoti: bool = False,
    checkpoint_name: str = "best",
    check_split: str = "test",
    check_rows: int = 200_000,
) -> Dict[str, Any]:
    """Export a run's checkpoint as ``model_fp32.pt2`` (and ``model_int8.pt2``) in ``out_dir``.

    Args:
        run_dir: a directory written by ``engagerec train`` (any world size).
        out_dir: the output directory (created).
        int8: also export row-wise int8 tables.
        aoti: also compile the raw fp32 program into an AOTInductor package for C++
            (engagerec.aoti.compile_package).
        checkpoint_name: "best" or "latest".
        check_split: the split on which the exported programs' quality is measured.
        check_rows: at most this many rows of it.

    Returns:
        What export.json records: the checkpoint, files and sizes, the largest difference
        between the exported fp32 program and the eager model, and the quality of each program
        on ``check_split`` (so the int8 loss is stated, never assumed).

    Raises:
        CheckpointError: no run directory or no checkpoint that checks out.
    """
    if world_size() > 1:
        raise ConfigError(
            "export runs in one process (it gathers every rank's shards itself): run it without torchrun"
        )
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, path, cfg = unsharded_model(run_dir, checkpoint_name)
    data_dir = prepared_dir(cfg)
    schema = DatasetSchema.load(data_dir)
    names = model.feature_names if model.has_sparse else []
    batch = _example_batch(data_dir)
    example = serving_inputs(batch, names)
    record: Dict[str, Any] = {"run": str(run_dir), "checkpoint": str(path), "programs": {}}
    for kind in ("fp32", "int8") if int8 else ("fp32",):
        serving = ServingModel(model, int8=kind == "int8").eval()
        with torch.no_grad(), warnings.catch_warnings():
            # towers keep their last gate weights for analysis (an attribute, not state)
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            program = torch.export.export(serving, example, dynamic_shapes=_dynamic_shapes(names))
        file = out_dir / f"model_{kind}.pt2"
        torch.export.save(program, str(file))
        loaded = torch.export.load(str(file)).module()
        record["programs"][kind] = {
            "file": file.name,
            "bytes": file.stat().st_size,
            "table_bytes": sum(
                b.numel() * b.element_size() for n, b in serving.named_buffers() if n.startswith("table_")
            ),
            check_split: quality(loaded, model, data_dir, check_split, check_rows),
        }
        if kind == "fp32":
            with torch.no_grad():
                _, (_, eager, _, _) = model(batch)
                exported = loaded(*example)
            eager = torch.stack([eager[t] for t in serving.task_names], dim=1)
            record["max_abs_difference_fp32_vs_eager"] = float((exported - eager).abs().max())
    record["encoding"] = _copy_encoding(Path(data_dir), out_dir / ENCODING_DIR)
    # the raw programs encode with the copy that ships beside them
    encoder = RawEncoder(schema, out_dir / ENCODING_DIR, names)
    record["raw_programs"] = {
        kind: _export_raw(
            RawServingModel(encoder, ServingModel(model, int8=kind == "int8")).eval(), out_dir, kind
        )
        for kind in record["programs"]
    }
    _write_inputs(out_dir, schema, model, encoder, [p["file"] for p in record["raw_programs"].values()])
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "export.json").write_text(json.dumps(record, indent=1))
    for kind in ("fp32", "int8"):  # an earlier export's package would not match these programs
        (out_dir / package_name(kind)).unlink(missing_ok=True)
    if aoti:  # records itself in export.json and inputs.json
        record["aoti"] = {"fp32": compile_package(out_dir, "fp32")}
    return record


def _copy_encoding(data_dir: Path, target: Path) -> List[str]:
    """What a client needs to encode raw rows as training did, beside the program: schema.json
    (normalisation, bucket edges, hashing, token types, id statistics' priors), the
    vocabularies (index = file row + 1) and the id statistics' per-id sums. Returns the files."""
    check_prepared(data_dir)  # copies of damaged vocabularies would serve wrong ids
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copy2(data_dir / SCHEMA_FILE, target / SCHEMA_FILE)
    for folder in (VOCAB_DIR, STATS_DIR):
        if (data_dir / folder).is_dir():
            shutil.copytree(data_dir / folder, target / folder)
    return sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())


def raw_example(encoder: RawEncoder, batch: int = 4, recent: int = 3) -> Tuple[Any, ...]:
    """Inputs of the right kinds and shapes for ``RawServingModel`` (what torch.export traces
    with): zeros, every row with ``recent`` earlier views but the first, which has none, and two
    ids per row for the sparse features the client encodes.

    Args:
        encoder: the raw program's encoder (which inputs it takes).
        batch: rows (2 or more).
        recent: earlier views per row (2 or more).

    Returns:
        ``(ids, numbers, recent, recent_lengths, dense, sparse_ids, sparse_offsets)``.

    Example::

        >>> import tempfile
        >>> from engagerec.data.schema import DenseFeature, LabelSpec
        >>> schema = DatasetSchema(features=[{"name": "age", "kind": "numeric"}], sparse=[],
        ...     dense=[DenseFeature("age", "age", "none", 30.0, 10.0, 30.0)],
        ...     labels=[LabelSpec("skip", "binary")], vocab_sizes={})
        >>> example = raw_example(RawEncoder(schema, tempfile.mkdtemp(), []))
        >>> example[1]["age"].dtype, example[3].tolist()
        (torch.float64, [0, 3, 3, 3])
    """
    long, double = torch.int64, torch.float64
    outcomes = set(encoder.recent_outcomes())
    lengths = torch.full((batch,), recent, dtype=long)
    lengths[0] = 0
    return (
        {column: torch.zeros(batch, dtype=long) for column in encoder.id_columns()},
        {column: torch.zeros(batch, dtype=double) for column in encoder.number_columns()},
        {
            column: torch.zeros(batch, recent, dtype=double if column in outcomes else long)
            for column in encoder.recent_ids() + encoder.recent_outcomes()
        },
        lengths,
        {name: torch.zeros(batch) for name in encoder.encoded_dense()},
        {name: torch.zeros(2 * batch, dtype=long) for name in encoder.encoded_sparse()},
        {name: torch.arange(0, 2 * batch, 2) for name in encoder.encoded_sparse()},
    )


def _raw_dynamic_shapes(encoder: RawEncoder) -> Tuple[Any, ...]:
    """The batch, the earlier views per row and every client-encoded feature's id count vary."""
    batch, recent = Dim("batch", min=2), Dim("recent", min=1)
    rows = {0: batch}
    return (
        {column: rows for column in encoder.id_columns()},
        {column: rows for column in encoder.number_columns()},
        {column: {0: batch, 1: recent} for column in encoder.recent_ids() + encoder.recent_outcomes()},
        rows,
        {name: rows for name in encoder.encoded_dense()},
        {name: {0: Dim(f"ids_{i}", min=1)} for i, name in enumerate(encoder.encoded_sparse())},
        {name: rows for name in encoder.encoded_sparse()},
    )


def _export_raw(raw: RawServingModel, out_dir: Path, kind: str) -> Dict[str, Any]:
    """Save ``raw`` as ``model_raw_<kind>.pt2``; its file, size, and the loaded program's largest
    difference from the module on ``raw_example``."""
    example = raw_example(raw.encoder)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        program = torch.export.export(raw, example, dynamic_shapes=_raw_dynamic_shapes(raw.encoder))
        file = out_dir / f"model_raw_{kind}.pt2"
        torch.export.save(program, str(file))
        difference = (torch.export.load(str(file)).module()(*example) - raw(*example)).abs().max()
    return {
        "file": file.name,
        "bytes": file.stat().st_size,
        "max_abs_difference_vs_module": float(difference),
    }


def _raw_inputs(encoder: RawEncoder, programs: List[str], views: int) -> Dict[str, Any]:
    """inputs.json's ``raw`` section: the raw programs' call, and per input raw or encoded
    (``views``: the earlier views the longest history reads)."""
    return {
        "programs": programs,
        "call": RAW_CALL,
        "ids": {"columns": encoder.id_columns(), "dtype": "int64", "shape": "[B]", "missing": MISSING_ID},
        "numbers": {
            "columns": encoder.number_columns(),
            "dtype": "float64",
            "shape": "[B]",
            "missing": "NaN",
        },
        "recent": {
            "ids": encoder.recent_ids(),
            "outcomes": encoder.recent_outcomes(),
            "shape": "[B, N]: the user's N most recent earlier views, oldest first (ids int64; "
            "outcomes float64, the label as the run derives it, NaN when unknown)",
            "views_needed": views,
            "views_note": "the longest history reads this many earlier views; fewer (a short "
            "history, a new user) are encoded as training encoded them, more are cut",
        },
        "recent_lengths": "int64 [B]: how many of each row's N entries are views (the first ones)",
        "dense": {"features": encoder.encoded_dense(), "dtype": "float32", "shape": "[B]"},
        "sparse": {
            "features": encoder.encoded_sparse(),
            "ids": "per feature: int64, every row's ids concatenated",
            "offsets": "per feature: int64 [B], where each row's ids start",
        },
        "features": {name: plan.to_json() for name, plan in encoder.plans.items()},
        "encode_with": "engagerec.data.scoring.encode_for_scoring (or encoding/: schema.json, vocabs/)",
    }


def _write_inputs(
    out_dir: Path, schema: DatasetSchema, model: MultiTaskModel, encoder: RawEncoder, raw_programs: List[str]
) -> None:
    """inputs.json: what a client passes and gets back, and the encoding the inputs need
    (``raw_programs``: the raw programs this export wrote, never an earlier export's left there)."""
    spec = {
        "call": "program(dense, ids, offsets) -> predictions [B, tasks]",
        "dense": {"columns": schema.dense_names, "dtype": "float32", "shape": "[B, len(columns)]"},
        "sparse": {
            "features": model.feature_names if model.has_sparse else [],
            "ids": "per feature: int64, every row's ids concatenated (0 = unseen/missing; a "
            "managed-collision feature's ids hashed as prepare stores them)",
            "offsets": "per feature: int64 [B], where each row's ids start",
        },
        "tasks": [{"name": t.name, "kind": t.kind, "label": t.label} for t in model.tasks],
        "predictions": "regression: the estimate; binary: the probability of the positive class",
        "encoding": f"as `engagerec prepare` writes shards; {ENCODING_DIR}/ holds the training data's "
        "schema.json, vocabs/ and stats/ (what `engagerec predict` encodes raw rows with)",
        "raw": _raw_inputs(
            encoder, sorted(raw_programs), history_length([FeatureConfig(**f) for f in schema.features])
        ),
        "torch": torch.__version__,
    }
    # the largest id each client-encoded feature may hold (a table's last row; a managed
    # table's hashed ids before its remapping), what engagerec serve checks a request against
    managed = frozen_remaps(model)
    spec["raw"]["sparse"]["max_id"] = {
        name: (MANAGED_INPUT_BUCKETS if table.name in managed else table.num_embeddings - 1)
        for table in model.tables
        for name in table.feature_names
        if name in encoder.encoded_sparse()
    }
    (out_dir / "inputs.json").write_text(json.dumps(spec, indent=1))


def format_record(record: Dict[str, Any], out_dir: str | Path) -> str:
    """What `engagerec export` prints: each program, its size and its quality beside fp32's."""
    lines = [f"engagerec export: {record['checkpoint']} -> {out_dir} ({record['seconds']} s)"]
    for program in record["programs"].values():
        split = next(k for k, v in program.items() if isinstance(v, dict))
        metrics = ", ".join(f"{k} {v:.5f}" for k, v in program[split].items() if k != "rows")
        size, tables = program["bytes"] / 2**20, program["table_bytes"] / 2**20
        lines.append(
            f"  {program['file']:<16} {size:8.2f} MiB (tables {tables:.2f} MiB)"
            f"  {split} ({int(program[split]['rows']):,} rows): {metrics}"
        )
    difference = record["max_abs_difference_fp32_vs_eager"]
    lines.append(f"  fp32 program vs the eager model: largest difference {difference:.2e}")
    for program in record.get("raw_programs", {}).values():
        lines.append(f"  {program['file']:<20} {program['bytes'] / 2**20:8.2f} MiB  raw values in")
    for package in record.get("aoti", {}).values():
        size, gap = package["bytes"] / 2**20, package["max_abs_difference_vs_program"]
        lines.append(
            f"  {package['file']:<20} {size:8.2f} MiB  AOTInductor ({package['cpu_isa']}, compiled in "
            f"{package['compile_seconds']} s; largest difference from the program {gap:.1e})"
        )
    lines.append(f"  inputs and outputs: {Path(out_dir) / 'inputs.json'}; a client: docs/SERVING.md")
    return "\n".join(lines)


def check_out_dir(out_dir: Path) -> None:
    """Refuse to export over a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError("the export directory is a file", file=str(out_dir), expected="a directory")
