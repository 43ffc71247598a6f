"""Prepare's encoding as tensor operations, so an exported program takes raw values.

``RawEncoder`` holds what ``engagerec prepare`` fitted (the vocabularies of integer id spaces,
normalisation, bucket edges, the id statistics' per-id values) as buffers, and encodes raw
values into the inputs ``engagerec.export.ServingModel`` takes, exactly as
engagerec.data.scoring encodes a raw row for ``engagerec predict``:

* an integer id: ``torch.searchsorted`` over the vocabulary's sorted tokens; an id not in
  it, or missing (``MISSING_ID``), goes to row 0 (out of vocabulary);
* a number (float64, NaN = missing): ``ln(1 + x)`` if the feature says log1p, the fill for a
  missing value, ``(x - mean) / std`` as float32; a bucket is ``1 + (edges <= x)``, 0 when missing;
* an id statistic (target_mean, id_count): the per-id value, looked up by the raw id (the
  prior, or 0 views, for an id without training rows), then the numeric steps above;
* a history: the user's most recent earlier views, raw (ids, outcomes), encoded per id and
  averaged over the last ``length`` outcomes inside the program.

What a tensor program cannot reproduce stays an input the client encodes (``plan_inputs``
says which, and why): text tokens (multi-hot lists such as genres ``"1,2"``, id spaces of
strings), and hashed id spaces (DuckDB's ``hash()``). engagerec.data.scoring encodes those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from engagerec.config import feature_with_defaults
from engagerec.data.schema import VOCAB_DIR, DatasetSchema, position_names
from engagerec.data.target_stats import STAT_KINDS, STATS_DIR

MISSING_ID = -(2**63)  # an integer id column's missing value (no vocabulary holds it: checked)
TEXT = "its tokens are text, which a tensor program cannot hold: the client encodes it"
HASHED = "its id space is hashed with DuckDB's hash(), which torch does not reproduce: the client encodes it"
SENTINEL = f"its vocabulary holds {MISSING_ID}, the raw program's missing id: the client encodes it"

Tensors = Dict[str, torch.Tensor]


@dataclass
class InputPlan:
    """How one model input (a sparse feature or a dense column) reaches the raw program.

    Args:
        name (str): the input as the model reads it (``duration``, ``duration_bucket``, ``history@0``).
        kind (str): the feature kind that makes it (``categorical``, ``multi_hot``, ``numeric``,
            ``bucket``, ``history``, ``history_mean``, ``target_mean``, ``id_count``).
        reads (str): the raw column it is computed from (for a history, the column of the
            user's earlier views; for a history_mean, the label of the earlier views).
        raw (bool): encoded inside the program (True) or by the client (False).
        why (str): why the client encodes it ("" when raw).

    Example::

        >>> InputPlan("genres", "multi_hot", "genres", raw=False, why=TEXT).to_json()["input"]
        'encoded'
    """

    name: str
    kind: str
    reads: str
    raw: bool
    why: str = ""

    def to_json(self) -> Dict[str, Any]:
        """What inputs.json says of the input."""
        out = {"input": "raw" if self.raw else "encoded", "kind": self.kind, "reads": self.reads}
        return {**out, "why": self.why} if self.why else out


def _features(schema: DatasetSchema) -> List[Dict[str, Any]]:
    """The FeatureConfigs the data was prepared with, a field it does not record at its default."""
    return [feature_with_defaults(feature) for feature in schema.features]


def _int_tokens(directory: Path, name: str, folder: str = VOCAB_DIR) -> Optional[np.ndarray]:
    """A vocabulary (or statistics) file's tokens as int64 in file order."""
    import pyarrow.parquet as pq  # [data]: read once, at export; the program holds tensors

    return (
        pq.read_table(Path(directory) / folder / f"{name}.parquet")
        .column("token")
        .to_numpy()
        .astype(np.int64)
    )


def plan_inputs(schema: DatasetSchema, directory: str | Path) -> Dict[str, InputPlan]:
    """Per model input (every sparse feature and dense column of ``schema``), whether the raw
    program encodes it and from which raw column.

    Args:
        schema (DatasetSchema): the training data's schema.
        directory (str | Path): the directory holding it (its ``vocabs/``).

    Returns:
        Dict[str, InputPlan]: sparse features first, in ``schema.sparse`` order, then dense.

    Example::

        >>> import tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from engagerec.data.schema import DenseFeature, LabelSpec, SparseFeature
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "vocabs").mkdir()
        >>> pq.write_table(pa.table({"token": [7, 3, 9]}), folder / "vocabs" / "item.parquet")
        >>> schema = DatasetSchema(
        ...     features=[{"name": "item"}, {"name": "genres", "kind": "multi_hot"},
        ...               {"name": "age", "kind": "numeric"}],
        ...     sparse=[SparseFeature("item", "item", False), SparseFeature("genres", "genres", True)],
        ...     dense=[DenseFeature("age", "age", "none", 30.0, 10.0, 30.0)],
        ...     labels=[LabelSpec("skip", "binary")], vocab_sizes={"item": 3, "genres": 2},
        ...     token_types={"item": "BIGINT", "genres": "VARCHAR"})
        >>> {name: plan.raw for name, plan in plan_inputs(schema, folder).items()}
        {'item': True, 'genres': False, 'age': True}
    """
    plans: Dict[str, InputPlan] = {}
    by_name = {f["name"]: f for f in _features(schema)}

    def space_plan(name: str, kind: str, space: str, reads: str) -> InputPlan:
        if space in schema.hashed:
            return InputPlan(name, kind, reads, False, HASHED)
        if schema.token_types.get(space) != "BIGINT":
            return InputPlan(name, kind, reads, False, TEXT)
        if MISSING_ID in _int_tokens(directory, space):
            return InputPlan(name, kind, reads, False, SENTINEL)
        return InputPlan(name, kind, reads, True)

    for sparse in schema.sparse:
        if sparse.name.endswith("_bucket") and sparse.name in schema.buckets:
            continue  # after its number (below): raw when the number is
        base = by_name.get(sparse.name) or by_name[sparse.name.rsplit("@", 1)[0]]
        if base["kind"] == "multi_hot":
            plans[sparse.name] = InputPlan(
                sparse.name, "multi_hot", base["column"] or base["name"], False, TEXT
            )
        elif base["kind"] == "history":
            plans[sparse.name] = space_plan(sparse.name, "history", sparse.id_space, base["of"])
        else:
            plans[sparse.name] = space_plan(
                sparse.name, "categorical", sparse.id_space, base["column"] or base["name"]
            )
    dense_plans = {}
    for dense in schema.dense:
        feature = by_name[dense.name]
        kind = feature["kind"]
        if kind in STAT_KINDS:
            meta = schema.target_stats[dense.name]
            text = meta["token_type"] != "BIGINT"
            plan = InputPlan(dense.name, kind, meta["column"], not text, TEXT if text else "")
        elif kind == "history_mean":
            plan = InputPlan(dense.name, kind, feature["of"], True)
        else:
            plan = InputPlan(dense.name, kind, dense.column, True)
        dense_plans[dense.name] = plan
        bucket = f"{dense.name}_bucket"
        if bucket in schema.buckets and bucket in schema.sparse_names:
            why = "" if plan.raw else f"its number ({dense.name}) is encoded by the client"
            plans[bucket] = InputPlan(bucket, "bucket", plan.reads, plan.raw, why)
    order = [s.name for s in schema.sparse] + [d.name for d in schema.dense]
    return {name: {**plans, **dense_plans}[name] for name in order}


def _stat_values(
    schema: DatasetSchema, directory: Path, name: str, smoothing: float
) -> Tuple[np.ndarray, np.ndarray, float]:
    """A statistic's per-id values from ``stats/<name>.parquet``, as engagerec.data.target_stats
    computes them for a row that is not a training row: (tokens with ``MISSING_ID`` first, sorted;
    their values, the missing id's first; an unseen id's value)."""
    import pyarrow.parquet as pq

    meta = schema.target_stats[name]
    table = pq.read_table(Path(directory) / STATS_DIR / f"{name}.parquet").to_pandas()
    tokens = table["token"].to_numpy().astype(np.int64)
    if meta["kind"] == "id_count":
        values, unseen, missing = table["n"].to_numpy(np.float64), 0.0, 0.0
    else:
        m, prior = float(smoothing), float(meta["prior"])
        s = table["s"].astype(np.float64).fillna(0.0).to_numpy()  # no labelled rows: a NULL sum
        c = table["c"].astype(np.float64).fillna(0.0).to_numpy()
        # the SQL's operations in its order, in float64: the same values to the last bit
        values, unseen, missing = (s + m * prior) / (c + m), (0.0 + m * prior) / (0.0 + m), prior
    order = np.argsort(tokens, kind="stable")
    return (
        np.concatenate([[MISSING_ID], tokens[order]]),
        np.concatenate([[missing], values[order]]),
        unseen,
    )


class RawEncoder(nn.Module):
    """
    Encodes raw values as ``engagerec prepare`` encoded the training data (see the module
    docstring), into ServingModel's inputs. Inputs that ``plan_inputs`` leaves to the client
    pass through from ``dense``, ``sparse_ids`` and ``sparse_offsets``.

    Args:
        schema (DatasetSchema): the training data's schema.
        directory (str | Path): the directory holding it, its ``vocabs/`` and ``stats/``.
        feature_names (List[str]): the sparse features the model reads, in its order.

    Call Args:
        ids (Dict[str, torch.Tensor]): per integer id column, int64 [B]; ``MISSING_ID`` = missing.
        numbers (Dict[str, torch.Tensor]): per numeric column, float64 [B]; NaN = missing.
        recent (Dict[str, torch.Tensor]): the user's earlier views, oldest first, [B, N]: per id
            column a history reads, int64 ids; per label a history_mean reads, float64 outcomes
            (NaN = unknown).
        recent_lengths (torch.Tensor): int64 [B], how many of row b's N entries are real views
            (the first ones; the rest is padding).
        dense (Dict[str, torch.Tensor]): per dense feature the client encodes, float32 [B].
        sparse_ids (Dict[str, torch.Tensor]): per sparse feature the client encodes, int64 ids.
        sparse_offsets (Dict[str, torch.Tensor]): per such feature, int64 [B] row offsets.

    Returns:
        Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]: ServingModel's
        ``(dense, ids, offsets)``.

    Example::

        >>> import tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from engagerec.data.schema import DenseFeature, LabelSpec, SparseFeature
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "vocabs").mkdir()
        >>> # a vocabulary lists tokens by index (index = row + 1); one grown by prepare --base is
        >>> # not sorted: its appended ids follow the base's
        >>> pq.write_table(pa.table({"token": [7, 9, 3]}), folder / "vocabs" / "item.parquet")
        >>> schema = DatasetSchema(
        ...     features=[{"name": "item"}, {"name": "age", "kind": "numeric", "buckets": 2}],
        ...     sparse=[SparseFeature("item", "item", False),
        ...             SparseFeature("age_bucket", "age_bucket", False)],
        ...     dense=[DenseFeature("age", "age", "none", 30.0, 10.0, 30.0)],
        ...     labels=[LabelSpec("skip", "binary")], vocab_sizes={"item": 3, "age_bucket": 2},
        ...     buckets={"age_bucket": [30.0]}, token_types={"item": "BIGINT"})
        >>> encoder = RawEncoder(schema, folder, ["item", "age_bucket"])
        >>> dense, ids, offsets = encoder(
        ...     {"item": torch.tensor([3, 5, MISSING_ID])},
        ...     {"age": torch.tensor([50.0, float("nan"), 20.0], dtype=torch.float64)},
        ...     {}, torch.zeros(3, dtype=torch.int64), {}, {}, {})
        >>> ids["item"].tolist(), ids["age_bucket"].tolist(), dense[:, 0].tolist()
        ([3, 0, 0], [2, 0, 1], [2.0, 0.0, -1.0])
    """

    def __init__(self, schema: DatasetSchema, directory: str | Path, feature_names: List[str]) -> None:
        super().__init__()
        directory = Path(directory)
        self.plans = plan_inputs(schema, directory)
        features = {f["name"]: f for f in _features(schema)}
        spaces: Dict[str, str] = {}  # id space -> its buffers' prefix

        def vocabulary(space: str) -> str:
            if space not in spaces:
                tokens = _int_tokens(directory, space)
                order = np.argsort(tokens, kind="stable")  # a grown vocabulary appends: not sorted
                prefix = spaces[space] = f"vocab{len(spaces)}"
                # MISSING_ID first, on row 0: a missing id finds it and gets the OOV row
                self.register_buffer(
                    f"{prefix}_tokens", torch.from_numpy(np.concatenate([[MISSING_ID], tokens[order]]))
                )
                self.register_buffer(
                    f"{prefix}_rows", torch.from_numpy(np.concatenate([[0], order + 1]).astype(np.int64))
                )
            return spaces[space]

        # (feature, kind, column, buffers, length, position): what forward computes per sparse input
        self.sparse: List[Tuple[str, str, str, str, int, int]] = []
        for name in feature_names:
            plan = self.plans[name]
            if not plan.raw:
                self.sparse.append((name, "encoded", "", "", 0, 0))
            elif plan.kind == "bucket":
                self.sparse.append((name, "bucket", name[: -len("_bucket")], "", 0, 0))
            elif plan.kind == "history":
                base = features.get(name) or features[name.rsplit("@", 1)[0]]
                space = next(s.id_space for s in schema.sparse if s.name == name)
                position = (
                    position_names(base["name"], base["length"]).index(name) if base["positions"] else -1
                )
                self.sparse.append((name, "history", plan.reads, vocabulary(space), base["length"], position))
            else:
                space = next(s.id_space for s in schema.sparse if s.name == name)
                self.sparse.append((name, "categorical", plan.reads, vocabulary(space), 0, 0))
        # (feature, kind, column, transform is log1p, mean, std, fill, length, unseen): per dense column
        self.dense: List[Tuple[str, str, str, bool, float, float, Optional[float], int, float]] = []
        self.edges: Dict[str, str] = {}  # feature -> its bucket edges' buffer
        for i, column in enumerate(schema.dense):
            plan, feature = self.plans[column.name], features[column.name]
            kind = plan.kind if plan.raw else "encoded"
            unseen = 0.0
            if kind in STAT_KINDS:
                tokens, values, unseen = _stat_values(schema, directory, column.name, feature["smoothing"])
                self.register_buffer(f"stat{i}_tokens", torch.from_numpy(tokens))
                self.register_buffer(f"stat{i}_values", torch.from_numpy(values))
            log1p = column.transform == "log1p"
            self.dense.append((column.name, kind, plan.reads, log1p, column.mean, column.std, column.fill,
                               feature["length"], unseen))  # fmt: skip
            bucket = f"{column.name}_bucket"
            if bucket in schema.buckets:
                self.edges[column.name] = f"edges{i}"
                self.register_buffer(f"edges{i}", torch.tensor(schema.buckets[bucket], dtype=torch.float64))

    # ------------------------------------------------------------------ inputs
    def recent_ids(self) -> List[str]:
        """The id columns whose earlier views ``recent`` must hold (int64)."""
        return sorted({column for _, kind, column, *_ in self.sparse if kind == "history"})

    def recent_outcomes(self) -> List[str]:
        """The labels whose earlier outcomes ``recent`` must hold (float64)."""
        return sorted({column for _, kind, column, *_ in self.dense if kind == "history_mean"})

    def id_columns(self) -> List[str]:
        """The integer id columns ``ids`` must hold."""
        single = {column for _, kind, column, *_ in self.sparse if kind == "categorical"}
        return sorted(single | {column for _, kind, column, *_ in self.dense if kind in STAT_KINDS})

    def number_columns(self) -> List[str]:
        """The numeric columns ``numbers`` must hold."""
        return sorted({column for _, kind, column, *_ in self.dense if kind == "numeric"})

    def encoded_dense(self) -> List[str]:
        """The dense features the client encodes (``dense``)."""
        return [name for name, kind, *_ in self.dense if kind == "encoded"]

    def encoded_sparse(self) -> List[str]:
        """The sparse features the client encodes (``sparse_ids``, ``sparse_offsets``)."""
        return [name for name, kind, *_ in self.sparse if kind == "encoded"]

    # ------------------------------------------------------------------ steps
    def _lookup(self, prefix: str, raw: torch.Tensor) -> torch.Tensor:
        """Raw ids (any shape) -> table rows: the vocabulary's row, 0 for an unseen or missing id."""
        tokens, rows = getattr(self, f"{prefix}_tokens"), getattr(self, f"{prefix}_rows")
        at = torch.searchsorted(tokens, raw.contiguous()).clamp(max=tokens.shape[0] - 1)
        return torch.where(tokens[at] == raw, rows[at], torch.zeros_like(raw))

    @staticmethod
    def _window(
        values: torch.Tensor, lengths: torch.Tensor, length: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The last ``length`` real entries of each row of ``values`` [B, N], oldest first, as a
        [B, length] window and its mask (a row with fewer views fills its first places)."""
        real = lengths.clamp(min=0, max=values.shape[1])
        kept = real.clamp(max=length)
        place = torch.arange(length, device=values.device)
        source = (real - kept).unsqueeze(1) + place
        window = torch.gather(values, 1, source.clamp(max=values.shape[1] - 1))
        return window, place.unsqueeze(0) < kept.unsqueeze(1)

    def _number(
        self, spec, ids: Tensors, numbers: Tensors, recent: Tensors, lengths: torch.Tensor
    ) -> torch.Tensor:
        """A dense feature's value before normalisation, float64 [B], NaN where missing."""
        name, kind, column, _, _, _, _, length, unseen = spec
        if kind == "numeric":
            return numbers[column].to(torch.float64)
        if kind == "history_mean":  # the mean of the known outcomes among the last `length` views
            window, real = self._window(recent[column].to(torch.float64), lengths, length)
            known = real & ~torch.isnan(window)
            total = torch.where(known, window, torch.zeros_like(window)).sum(dim=1)
            return total / known.sum(dim=1).to(torch.float64)  # 0 / 0: NaN, no earlier outcome
        i = [n for n, *_ in self.dense].index(name)
        tokens, values = getattr(self, f"stat{i}_tokens"), getattr(self, f"stat{i}_values")
        raw = ids[column]
        at = torch.searchsorted(tokens, raw).clamp(max=tokens.shape[0] - 1)
        return torch.where(tokens[at] == raw, values[at], torch.full_like(values[at], unseen))

    def forward(
        self,
        ids: Tensors,
        numbers: Tensors,
        recent: Tensors,
        recent_lengths: torch.Tensor,
        dense: Tensors,
        sparse_ids: Tensors,
        sparse_offsets: Tensors,
    ) -> Tuple[torch.Tensor, Tensors, Tensors]:
        """Raw values -> ServingModel's ``(dense, ids, offsets)`` (see the class docstring)."""
        columns, filled, missing = [], {}, {}
        for spec in self.dense:
            name, kind, _, log1p, mean, std, fill, _, _ = spec
            if kind == "encoded":
                columns.append(dense[name].to(torch.float32))
                continue
            value = self._number(spec, ids, numbers, recent, recent_lengths)
            negative = value < 0 if log1p else None  # prepare refuses these: a NaN score, never a guess
            if log1p:
                value = torch.log(1 + value)  # ln(1 + x), as prepare's SQL writes it
            missing[name] = torch.isnan(value)
            # no fill (missing: error): NaN goes on, and so the prediction is NaN, never a guess
            filled[name] = (
                value if fill is None else torch.where(missing[name], torch.full_like(value, mean), value)
            )
            standard = (filled[name] - mean) / std  # float64, then float32: as the SQL
            if negative is not None:
                standard = torch.where(negative, torch.full_like(standard, float("nan")), standard)
            columns.append(standard.to(torch.float32))
        batch = recent_lengths.shape[0]
        out_dense = torch.stack(columns, dim=1) if columns else torch.zeros(batch, 0)
        out_ids, out_offsets = {}, {}
        for name, kind, column, prefix, length, position in self.sparse:
            if kind == "encoded":
                out_ids[name], out_offsets[name] = sparse_ids[name], sparse_offsets[name]
                continue
            if kind == "history":
                window, real = self._window(recent[column], recent_lengths, length)
                rows = self._lookup(prefix, window)
                if position >= 0:  # one place of the window: a bag of 0 or 1 id
                    rows, real = rows[:, position : position + 1], real[:, position : position + 1]
                sizes = real.sum(dim=1)
                out_ids[name], out_offsets[name] = rows[real], torch.cumsum(sizes, 0) - sizes
                continue
            if kind == "bucket":
                edges = getattr(self, self.edges[column])
                counted = torch.searchsorted(edges, filled[column].contiguous(), right=True)  # edges <= x
                rows = torch.where(missing[column], torch.zeros_like(counted), counted + 1)
            else:
                rows = self._lookup(prefix, ids[column])
            out_ids[name], out_offsets[name] = rows, torch.arange(rows.shape[0], device=rows.device)
        return out_dense, out_ids, out_offsets


class RawServingModel(nn.Module):
    """
    ``RawEncoder`` then a ServingModel: raw values in, predictions out (``engagerec export``
    saves it as ``model_raw_fp32.pt2``).

    Args:
        encoder (RawEncoder): the training data's encoding.
        serving (nn.Module): an ``engagerec.export.ServingModel`` (fp32 or int8 tables).

    Call Args:
        as ``RawEncoder``.

    Returns:
        torch.Tensor: [B, tasks] predictions, as ServingModel's.

    Example::

        >>> import tempfile
        >>> import pyarrow as pa, pyarrow.parquet as pq
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> from engagerec.config import study_tasks
        >>> from engagerec.data.schema import DenseFeature, LabelSpec, SparseFeature
        >>> from engagerec.export import ServingModel
        >>> from engagerec.model import MultiTaskModel
        >>> from engagerec.towers import build_tower
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "vocabs").mkdir()
        >>> pq.write_table(pa.table({"token": [3, 7, 9]}), folder / "vocabs" / "item.parquet")
        >>> schema = DatasetSchema(
        ...     features=[{"name": "item"}, {"name": "age", "kind": "numeric"}],
        ...     sparse=[SparseFeature("item", "item", False)],
        ...     dense=[DenseFeature("age", "age", "none", 30.0, 10.0, 30.0)],
        ...     labels=[LabelSpec("skip", "binary")], vocab_sizes={"item": 3},
        ...     token_types={"item": "BIGINT"})
        >>> table = EmbeddingBagConfig(name="t", num_embeddings=4, embedding_dim=4, feature_names=["item"])
        >>> tower = build_tower("mmoe", 4 + 1, 2, num_experts=2, expert_sizes=[8])
        >>> model = MultiTaskModel(EmbeddingBagCollection(tables=[table]), 1, tower, study_tasks())
        >>> serving = ServingModel(model).eval()
        >>> raw = RawServingModel(RawEncoder(schema, folder, ["item"]), serving)
        >>> ages = torch.tensor([40.0, 25.0], dtype=torch.float64)
        >>> out = raw({"item": torch.tensor([9, 4])}, {"age": ages}, {}, torch.zeros(2, dtype=torch.int64),
        ...           {}, {}, {})
        >>> dense, ids = torch.tensor([[1.0], [-0.5]]), {"item": torch.tensor([3, 0])}
        >>> encoded = serving(dense, ids, {"item": torch.arange(2)})
        >>> bool(torch.equal(out, encoded))
        True
    """

    def __init__(self, encoder: RawEncoder, serving: nn.Module) -> None:
        super().__init__()
        self.encoder, self.serving = encoder, serving

    def forward(
        self,
        ids: Tensors,
        numbers: Tensors,
        recent: Tensors,
        recent_lengths: torch.Tensor,
        dense: Tensors,
        sparse_ids: Tensors,
        sparse_offsets: Tensors,
    ) -> torch.Tensor:
        """Raw values -> [B, tasks] predictions (see ``RawEncoder`` for the inputs)."""
        return self.serving(
            *self.encoder(ids, numbers, recent, recent_lengths, dense, sparse_ids, sparse_offsets)
        )
