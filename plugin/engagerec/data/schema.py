"""DatasetSchema: vocabularies, buckets and normalisation fitted on TRAIN rows only.

It is written as schema.json beside the parquet shards, so that training, evaluation
and prediction encode data identically. Encoding conventions:

* every id space has a vocabulary; row 0 of its table is the out-of-vocabulary /
  missing row, known ids are 1..len(vocab);
* numeric features become standardised float32 dense columns (train mean / std);
  ``buckets`` > 0 adds ``<name>_bucket``, a sparse feature over train quantiles;
* labels are float32 columns (watch_ratio, skip, ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from engagerec.config import FeatureConfig
from engagerec.data.errors import DataError
from engagerec.data.jagged import list_array_parts, to_list_array
from engagerec.data.raw import SOURCE_ROW
from engagerec.data.tables import as_numeric

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1
FEATURE_KINDS = ("categorical", "multi_hot", "numeric", "history", "history_mean")
PAST_LABELS = ("watch_ratio", "skip")  # what a history_mean feature may average
TRANSFORMS = ("none", "log1p")


def history_column(feature: FeatureConfig) -> str:
    """Name of the precomputed raw-id history column a history feature reads."""
    return f"__history__{feature.of}__{feature.length}"


@dataclass
class SparseFeature:
    name: str
    id_space: str
    multi: bool  # several ids per row (genres, history) or exactly one


@dataclass
class DenseFeature:
    name: str
    column: str
    transform: str
    mean: float
    std: float
    fill: Optional[float]  # imputed value for missing entries (train mean), or None: missing is an error


@dataclass
class LabelSpec:
    name: str
    kind: str  # regression | binary


@dataclass
class DatasetSchema:
    features: List[Dict[str, Any]]  # the FeatureConfigs it was fitted with
    sparse: List[SparseFeature]
    dense: List[DenseFeature]
    labels: List[LabelSpec]
    vocabs: Dict[str, List[Any]]  # id space -> tokens (index = position + 1)
    buckets: Dict[str, List[float]] = field(default_factory=dict)  # feature -> boundaries
    input_columns: Dict[str, str] = field(default_factory=dict)  # column -> "number" | "text" | "list"
    meta: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def sparse_names(self) -> List[str]:
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> List[str]:
        return [f.name for f in self.dense]

    @property
    def label_names(self) -> List[str]:
        return [label.name for label in self.labels]

    def num_embeddings(self, id_space: str) -> int:
        """Rows of the id space's table: its vocabulary plus the out-of-vocabulary row 0."""
        return len(self.vocabs[id_space]) + 1

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        train: pd.DataFrame,
        features: List[FeatureConfig],
        labels: List[LabelSpec],
        post_exposure: FrozenSet[str] = frozenset(),
    ) -> "DatasetSchema":
        _validate_features(train, features, post_exposure)
        schema = cls(
            features=[asdict(f) for f in features], sparse=[], dense=[], labels=list(labels), vocabs={}
        )
        for feature in features:
            column = feature.column or feature.name
            space = feature.id_space or column
            if feature.kind == "categorical":
                if space not in schema.vocabs:
                    schema.vocabs[space] = _fit_vocab(_category_tokens(train, column), feature.min_count)
                schema.sparse.append(SparseFeature(feature.name, space, multi=False))
            elif feature.kind == "multi_hot":
                if space not in schema.vocabs:
                    tokens = _split_tokens(train[column], feature.separator).flatten()
                    schema.vocabs[space] = _fit_vocab(pa.array(tokens), feature.min_count)
                schema.sparse.append(SparseFeature(feature.name, space, multi=True))
            elif feature.kind == "history":
                space = feature.id_space or feature.of
                if space not in schema.vocabs:
                    schema.vocabs[space] = _fit_vocab(_category_tokens(train, feature.of), feature.min_count)
                schema.sparse.append(SparseFeature(feature.name, space, multi=True))
            else:  # numeric, or history_mean (a numeric column prepare computed; first views impute)
                values = _numeric_input(train, column, feature)
                finite = values[~np.isnan(values)]
                if finite.size == 0:
                    raise DataError(
                        "numeric feature has no values in the training split",
                        column=column,
                        expected="at least one number",
                    )
                mean, std = float(finite.mean()), float(finite.std())
                fill = mean if feature.missing == "mean" or feature.kind == "history_mean" else None
                schema.dense.append(
                    DenseFeature(feature.name, column, feature.transform, mean, std if std > 0 else 1.0, fill)
                )
                if feature.buckets > 0:
                    bucket_name = f"{feature.name}_bucket"
                    quantiles = np.linspace(0, 1, feature.buckets + 1)[1:-1]
                    schema.buckets[bucket_name] = np.unique(np.quantile(finite, quantiles)).tolist()
                    schema.vocabs[bucket_name] = list(range(len(schema.buckets[bucket_name]) + 1))
                    schema.sparse.append(SparseFeature(bucket_name, bucket_name, multi=False))
        schema.input_columns = {c: _column_kind(train[c]) for c in _input_columns(features)}
        return schema

    # --------------------------------------------------------------- encoding
    def check_columns(self, frame: pd.DataFrame, file: Optional[str] = None) -> None:
        """Schema drift: new data must carry the columns, of the kinds, this schema was fitted on."""
        file = file or frame.attrs.get("source_file")
        for column, kind in self.input_columns.items():
            if column not in frame.columns:
                raise DataError(
                    "schema drift: column is missing from new data",
                    file=file,
                    column=column,
                    expected=f"a {kind} column as in {SCHEMA_FILE}",
                )
            got = _column_kind(frame[column])
            if got != kind and not (kind == "text" and got == "number"):
                raise DataError(
                    "schema drift: column changed kind",
                    file=file,
                    column=column,
                    expected=f"{kind} as in {SCHEMA_FILE}",
                    got=got,
                )

    def encode(self, frame: pd.DataFrame) -> pa.Table:
        """Encode rows into the shard layout: sparse int32 / list<int32>, dense and labels float32."""
        self.check_columns(frame)
        columns: Dict[str, pa.Array] = {}
        configs = [FeatureConfig(**f) for f in self.features]
        for feature in configs:
            column = feature.column or feature.name
            space = feature.id_space or (feature.of if feature.kind == "history" else column)
            if feature.kind == "categorical":
                columns[feature.name] = _lookup(self.vocabs[space], _category_tokens(frame, column))
            elif feature.kind == "multi_hot":
                lists = _split_tokens(frame[column], feature.separator)
                offsets, tokens = lists.offsets.to_numpy(), lists.flatten()
                columns[feature.name] = to_list_array(
                    offsets - offsets[0], _lookup(self.vocabs[space], tokens).to_numpy()
                )
            elif feature.kind == "history":
                offsets, raw = list_array_parts(pa.array(frame[history_column(feature)]))
                columns[feature.name] = to_list_array(
                    offsets, _lookup(self.vocabs[space], _tokens_like(raw)).to_numpy()
                )
        for dense in self.dense:
            feature = next(f for f in configs if f.name == dense.name)
            values = _numeric_input(frame, dense.column, feature)
            missing = np.isnan(values)
            if missing.any():
                if dense.fill is None:
                    row = int(np.flatnonzero(missing)[0])
                    if SOURCE_ROW in frame.columns:
                        row = int(frame[SOURCE_ROW].iloc[row])
                    raise DataError(
                        "numeric feature value is missing",
                        file=frame.attrs.get("source_file"),
                        column=dense.column,
                        row=row,
                        expected="a number (or set missing: mean on the feature to impute)",
                    )
                values = np.where(missing, dense.fill, values)
            columns[dense.name] = pa.array(((values - dense.mean) / dense.std).astype(np.float32))
            bucket_name = f"{dense.name}_bucket"
            if bucket_name in self.buckets:
                index = np.searchsorted(np.asarray(self.buckets[bucket_name]), values, side="right") + 1
                columns[bucket_name] = pa.array(np.where(missing, 0, index).astype(np.int32))
        for label in self.labels:
            columns[label.name] = pa.array(frame[label.name].to_numpy(dtype=np.float32))
        order = self.sparse_names + self.dense_names + self.label_names
        return pa.table({name: columns[name] for name in order})

    # ---------------------------------------------------------------- storage
    def to_json(self) -> Dict[str, Any]:
        return {"version": SCHEMA_VERSION, **asdict(self)}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        tmp.replace(path)  # atomic: a reader never sees half a schema
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetSchema":
        path = Path(directory) / SCHEMA_FILE
        if not path.is_file():
            raise DataError("schema not found; run `engagerec prepare` first", file=str(path))
        raw = json.loads(path.read_text())
        if raw.pop("version", None) != SCHEMA_VERSION:
            raise DataError(
                "unsupported schema version", file=str(path), expected=f"version {SCHEMA_VERSION}"
            )
        return cls(
            features=raw["features"],
            sparse=[SparseFeature(**f) for f in raw["sparse"]],
            dense=[DenseFeature(**f) for f in raw["dense"]],
            labels=[LabelSpec(**label) for label in raw["labels"]],
            vocabs=raw["vocabs"],
            buckets=raw.get("buckets", {}),
            input_columns=raw.get("input_columns", {}),
            meta=raw.get("meta", {}),
        )


# ------------------------------------------------------------------- helpers


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _input_columns(features: List[FeatureConfig]) -> List[str]:
    columns = []
    for feature in features:
        if feature.kind == "history_mean":
            continue  # computed by prepare from earlier rows, not read from the input tables
        column = feature.of if feature.kind == "history" else (feature.column or feature.name)
        if column not in columns:
            columns.append(column)
    return columns


def _validate_features(
    frame: pd.DataFrame, features: List[FeatureConfig], post_exposure: FrozenSet[str]
) -> None:
    seen = set()
    for i, feature in enumerate(features):
        where = f"data.features[{i}] ('{feature.name}')"
        if feature.name in seen:
            raise DataError(f"{where}: duplicate feature name")
        seen.add(feature.name)
        if feature.kind not in FEATURE_KINDS:
            raise DataError(f"{where}: unknown kind '{feature.kind}'", expected=f"one of {FEATURE_KINDS}")
        if feature.transform not in TRANSFORMS:
            raise DataError(
                f"{where}: unknown transform '{feature.transform}'", expected=f"one of {TRANSFORMS}"
            )
        if feature.missing not in ("error", "mean"):
            raise DataError(f"{where}: unknown missing policy '{feature.missing}'", expected="error or mean")
        if feature.kind == "history_mean":
            if feature.of not in PAST_LABELS:
                raise DataError(
                    f"{where}: history_mean averages a label of earlier views",
                    expected=f"of: one of {PAST_LABELS}",
                    got=feature.of,
                )
            continue
        column = feature.of if feature.kind == "history" else (feature.column or feature.name)
        if column in post_exposure or column in ("watch_time", "watch_ratio", "skip"):
            raise DataError(
                f"{where}: column '{column}' is observed during or after the view "
                "(a label or a leak) and cannot be a feature"
            )
        if column not in frame.columns:
            raise DataError(
                f"{where}: reads column '{column}', which no table has",
                expected=f"one of {sorted(c for c in frame.columns if not c.startswith('__'))}",
            )


def _column_kind(series: pd.Series) -> str:
    if isinstance(series.dtype, pd.ArrowDtype) and pa.types.is_list(series.dtype.pyarrow_dtype):
        return "list"
    return "number" if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series) else "text"


def _tokens_like(values: np.ndarray) -> pa.Array:
    """Integral floats (ids read with NaN present) become int64 so 3.0 and 3 are one token."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        finite = values[~np.isnan(values)]
        if np.array_equal(finite, np.round(finite)):
            return pa.array(np.where(np.isnan(values), np.nan, values), mask=np.isnan(values)).cast(
                pa.int64()
            )
    if values.dtype.kind in "iub":
        return pa.array(values.astype(np.int64))
    return pa.array(values.astype(str))


def _category_tokens(frame: pd.DataFrame, column: str) -> pa.Array:
    series = frame[column]
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return _tokens_like(
            series.to_numpy(dtype=np.float64, na_value=np.nan) if series.isna().any() else series.to_numpy()
        )
    return pa.array(series.astype("string").to_numpy(dtype=object, na_value=None), type=pa.string())


def _split_tokens(series: pd.Series, separator: str) -> pa.ListArray:
    """'3,17' -> ['3', '17']; empty or missing -> []; whitespace around tokens ignored."""
    text = pa.array(series.astype("string").fillna("").to_numpy(dtype=object), type=pa.string())
    lists = pc.split_pattern(text, separator)
    tokens = pc.utf8_trim_whitespace(lists.flatten())
    keep = pc.not_equal(tokens, "")
    row_of_token = np.repeat(np.arange(len(lists)), np.diff(lists.offsets.to_numpy()))
    kept_rows = row_of_token[keep.to_numpy(zero_copy_only=False)]
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(np.bincount(kept_rows, minlength=len(lists)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), tokens.filter(keep))


def _fit_vocab(tokens: pa.Array, min_count: int) -> List[Any]:
    counts = pc.value_counts(tokens.drop_null())
    values = counts.field("values").to_pylist()
    frequent = [v for v, n in zip(values, counts.field("counts").to_pylist(), strict=True) if n >= min_count]
    return sorted(frequent, key=lambda v: (isinstance(v, str), v))


def _lookup(vocab: List[Any], tokens: pa.Array) -> pa.Array:
    """Token -> 1..len(vocab); unseen or missing -> 0 (the out-of-vocabulary row)."""
    if len(vocab) == 0:
        return pa.array(np.zeros(len(tokens), dtype=np.int32))
    value_set = pa.array(vocab)
    if value_set.type != tokens.type:
        try:
            tokens = tokens.cast(value_set.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            tokens = tokens.cast(pa.string())
            value_set = value_set.cast(pa.string())
    index = pc.index_in(tokens, value_set=value_set)
    return pa.array(pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.int32))


def _numeric_input(frame: pd.DataFrame, column: str, feature: FeatureConfig) -> np.ndarray:
    values = as_numeric(frame, column, allow_nan=True).to_numpy()
    if feature.transform == "log1p":
        negative = values < 0
        if negative.any():
            row = int(np.flatnonzero(negative)[0])
            raise DataError(
                "log1p transform needs values >= 0",
                file=frame.attrs.get("source_file"),
                column=column,
                row=row,
                expected="a non-negative number",
                got=float(values[row]),
            )
        values = np.log1p(values)
    return values
