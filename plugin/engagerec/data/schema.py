"""DatasetSchema: what a prepared dataset holds and how its inputs were encoded (the contract).

It is written as schema.json (plus one parquet file per vocabulary under ``vocabs/``) beside
the shards, so that training, evaluation and prediction encode data identically.
Encoding conventions:

* every id space has a vocabulary; row 0 of its table is the out-of-vocabulary /
  missing row, known ids are 1..len(vocab) in sorted token order. An id space bigger than
  the feature's ``hash_buckets`` is hashed instead: row 1 + hash(id) % hash_buckets;
* a managed-collision id space (``managed_collisions``) has no vocabulary: its ids are stored
  hashed as above into ``MANAGED_INPUT_BUCKETS`` values, and the model's managed-collision
  module (engagerec.managed_ids) gives them rows of its table while it trains;
* numeric features become standardised float32 dense columns (train mean / std);
  ``buckets`` > 0 adds ``<name>_bucket``, a sparse feature over exact train quantiles;
* labels are float32 columns, NaN where a raw label is missing (weight 0 for that task).

This module is what readers, the model builder, predict and export need at run time, and it
imports no DuckDB, pandas or pyarrow (a test holds it to that). The fitting, SQL over the
``events`` table run out of core by prepare, is engagerec.data.fitting.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from engagerec.data.errors import DataError
from engagerec.data.staging import incomplete_note

SCHEMA_FILE = "schema.json"
VOCAB_DIR = "vocabs"
SCHEMA_VERSION = 2
# a managed-collision space's stored ids: 1 + hash(id) % this (< 2^31, so int32 holds them);
# 10^7 distinct ids collide in about 0.5% of cases
MANAGED_INPUT_BUCKETS = 2**31 - 2


def managed_spec(feature: Any) -> Dict[str, Any]:
    """What ``DatasetSchema.managed`` records of a feature with ``managed_collisions``: its
    table's rows, eviction policy and interval (a FeatureConfig or its dict)."""
    get = feature.get if isinstance(feature, dict) else lambda key: getattr(feature, key)
    return {
        "rows": int(get("managed_collisions")),
        "eviction_policy": str(get("eviction_policy")),
        "eviction_interval": int(get("eviction_interval")),
    }


@dataclass
class SparseFeature:
    """One sparse (id) input: its name in the shards, its id space (table), and whether a row
    holds several ids (genres, history) or exactly one."""

    name: str
    id_space: str
    multi: bool


@dataclass
class DenseFeature:
    """One dense input: standardised by the train ``mean`` and ``std``; ``fill`` imputes
    missing values (the train mean), or is None when a missing value is an error."""

    name: str
    column: str
    transform: str
    mean: float
    std: float
    fill: Optional[float]


@dataclass
class LabelSpec:
    """One label column of the shards: its name and kind (regression | binary)."""

    name: str
    kind: str


@dataclass
class DatasetSchema:
    """What a prepared dataset holds and how its inputs were encoded (see the module docstring).

    Example::

        schema = DatasetSchema.load("prepared/kuairand_random")
        schema.sparse_names, schema.dense_names, schema.label_names
        schema.num_embeddings("content_id")  # rows of that id space's table, OOV row included
    """

    features: List[Dict[str, Any]]  # the FeatureConfigs it was fitted with
    sparse: List[SparseFeature]
    dense: List[DenseFeature]
    labels: List[LabelSpec]
    vocab_sizes: Dict[str, int]  # id space -> known ids (table rows = size + 1)
    hashed: Dict[str, int] = field(default_factory=dict)  # id space -> hash buckets
    # id space -> managed_spec (rows, eviction_policy, eviction_interval); such a space is also
    # in ``hashed``, with MANAGED_INPUT_BUCKETS
    managed: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    buckets: Dict[str, List[float]] = field(default_factory=dict)  # feature -> boundaries
    input_columns: Dict[str, str] = field(default_factory=dict)  # column -> "number" | "text"
    token_types: Dict[str, str] = field(default_factory=dict)  # id space -> BIGINT | VARCHAR tokens
    # target_mean / id_count feature -> its id column, token type and prior (engagerec.data.target_stats)
    target_stats: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ queries
    @property
    def sparse_names(self) -> List[str]:
        """The sparse features' names."""
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> List[str]:
        """The dense features' names, in the order of ``Batch.dense_features``' columns."""
        return [f.name for f in self.dense]

    @property
    def label_names(self) -> List[str]:
        """The label columns' names."""
        return [label.name for label in self.labels]

    def num_embeddings(self, id_space: str) -> int:
        """Rows of the id space's table: its vocabulary (or hash buckets) plus the OOV row 0;
        a managed-collision space's configured rows."""
        if id_space in self.managed:
            return self.managed[id_space]["rows"]
        if id_space in self.hashed:
            return self.hashed[id_space] + 1
        return self.vocab_sizes[id_space] + 1

    def vocab(self, directory: str | Path, id_space: str) -> List[Any]:
        """The tokens of an id space, in index order (index = position + 1).

        Args:
            directory: the prepared dataset's directory (the one holding ``vocabs/``).
            id_space: the id space, e.g. ``content_id``.
        """
        # imported here, not at the top: the contract itself loads without pyarrow
        import pyarrow.parquet as pq

        return pq.read_table(Path(directory) / VOCAB_DIR / f"{id_space}.parquet").column("token").to_pylist()

    # ---------------------------------------------------------------- storage
    def to_json(self) -> Dict[str, Any]:
        """The schema as a JSON-ready mapping, with the schema version."""
        return {"version": SCHEMA_VERSION, **asdict(self)}

    def save(self, directory: str | Path) -> Path:
        """Write ``directory``/schema.json atomically; returns its path."""
        path = Path(directory) / SCHEMA_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        tmp.replace(path)  # atomic: a reader never sees half a schema
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetSchema":
        """Read ``directory``/schema.json.

        Raises:
            DataError: if the file is missing or was written with another schema version.
        """
        path = Path(directory) / SCHEMA_FILE
        if not path.is_file():
            note = incomplete_note(directory) if not path.parent.exists() else None
            raise DataError(note or "schema not found; run `engagerec prepare` first", file=str(path))
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot be read ({err})", file=str(path)) from None
        if not isinstance(raw, dict) or raw.pop("version", None) != SCHEMA_VERSION:
            raise DataError(
                "unsupported schema version (prepared by another engagerec release): prepare the data again",
                file=str(path),
                expected=f"version {SCHEMA_VERSION}",
            )
        return cls(
            features=raw["features"],
            sparse=[SparseFeature(**f) for f in raw["sparse"]],
            dense=[DenseFeature(**f) for f in raw["dense"]],
            labels=[LabelSpec(**label) for label in raw["labels"]],
            vocab_sizes=raw["vocab_sizes"],
            hashed=raw.get("hashed", {}),
            managed=raw.get("managed", {}),
            buckets=raw.get("buckets", {}),
            input_columns=raw.get("input_columns", {}),
            token_types=raw.get("token_types", {}),
            target_stats=raw.get("target_stats", {}),
            meta=raw.get("meta", {}),
        )


def position_names(history: str, length: int) -> List[str]:
    """The features of a positional history (``positions: true``), oldest position first.

    Example::

        >>> position_names("history", 3)
        ['history@0', 'history@1', 'history@2']
    """
    return [f"{history}@{p}" for p in range(length)]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
