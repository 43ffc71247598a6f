"""FeatureSpec: which prepared sparse features become which TorchRec embedding tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from engagerec.config import EmbeddingConfig
from engagerec.data.schema import DatasetSchema

POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_name(id_space: str) -> str:
    return f"t_{id_space}"


def auto_dim(rows: int, largest: int) -> int:
    """6 * rows^(1/4), rounded to a multiple of 4 (FBGEMM and column-wise sharding like those),
    in [4, largest]."""
    return max(4, min(largest, 4 * round(6 * rows**0.25 / 4)))


@dataclass
class FeatureSpec:
    """tables: one EmbeddingBagConfig per id space; dense_dim: width of the dense input."""

    tables: List[EmbeddingBagConfig]
    dense_dim: int

    @property
    def sparse_dim(self) -> int:
        return sum(t.embedding_dim * len(t.feature_names) for t in self.tables)

    @property
    def input_dim(self) -> int:
        """Width of the tower input: every pooled embedding plus the dense features."""
        return self.sparse_dim + self.dense_dim

    @property
    def feature_names(self) -> List[str]:
        return [name for table in self.tables for name in table.feature_names]

    @classmethod
    def from_schema(cls, schema: DatasetSchema, cfg: EmbeddingConfig) -> "FeatureSpec":
        kinds = {f["name"]: f["kind"] for f in schema.features}
        unknown = (
            (set(cfg.pooling) | set(cfg.dims))
            - set(kinds)
            - {f.id_space for f in schema.sparse}
            - set(schema.sparse_names)
        )
        if unknown:
            raise ValueError(f"model.embeddings names unknown features or id spaces: {sorted(unknown)}")
        spaces: Dict[str, List] = {}
        for feature in schema.sparse:
            spaces.setdefault(feature.id_space, []).append(feature)
        tables = []
        for space, features in spaces.items():
            pooling = None
            for feature in features:
                wanted = cfg.pooling.get(
                    feature.name, "mean" if kinds.get(feature.name) == "history" else "sum"
                )
                if wanted not in POOLINGS:
                    raise ValueError(
                        f"model.embeddings.pooling.{feature.name}: '{wanted}', expected sum or mean"
                    )
                if not feature.multi:
                    continue  # one id per row: sum and mean agree, so the table's pooling decides
                if pooling not in (None, wanted):
                    raise ValueError(
                        f"features {[f.name for f in features]} share the table of id space '{space}' "
                        f"but ask for different poolings; a table has one"
                    )
                pooling = wanted
            rows = schema.num_embeddings(space)
            tables.append(
                EmbeddingBagConfig(
                    name=table_name(space),
                    num_embeddings=rows,
                    embedding_dim=cfg.dims.get(space, auto_dim(rows, cfg.dim) if cfg.auto_dim else cfg.dim),
                    feature_names=[f.name for f in features],
                    pooling=POOLINGS[pooling or "sum"],
                )
            )
        return cls(tables=tables, dense_dim=len(schema.dense))
