"""FeatureSpec: which prepared sparse features become which TorchRec embedding tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from engagerec.config import EmbeddingConfig
from engagerec.data.schema import DatasetSchema, position_names
from engagerec.embedding_backward import LOOP_SUFFIX
from engagerec.errors import ConfigError

POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_name(id_space: str, feature: Optional[str] = None) -> str:
    """
    The name of an embedding table: an id space's (features sharing an id space share it), or
    one feature's own table of that space (``EmbeddingConfig.own_table``).

    Args:
        id_space (str): the id space, e.g. ``"content_id"``.
        feature (Optional[str]): the feature with a table of its own; None for the space's
            shared table. Default: None.

    Returns:
        str: ``"t_" + id_space``, with ``"__" + feature`` for a feature's own table.

    Example::

        >>> from engagerec.features import table_name
        >>> table_name("content_id"), table_name("content_id", "history")
        ('t_content_id', 't_content_id__history')
    """
    return f"t_{id_space}" if feature is None else f"t_{id_space}__{feature}"


def table_space(table: EmbeddingBagConfig) -> str:
    """
    The id space of a table named by ``table_name``: its name without ``t_``, and for a
    feature's own table (one feature, named ``t_<space>__<feature>``) without that suffix.
    ``FeatureSpec.from_schema`` refuses tables whose names would read otherwise.

    Args:
        table (EmbeddingBagConfig): the table.

    Returns:
        str: its id space.

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig
        >>> from engagerec.features import table_space
        >>> own = EmbeddingBagConfig(num_embeddings=4, embedding_dim=4, name="t_item__history",
        ...     feature_names=["history"])
        >>> table_space(own)
        'item'
    """
    return _space_in_name(table.name, table.feature_names)


def _space_in_name(name: str, feature_names: List[str]) -> str:
    """``table_space`` of a table called ``name`` that holds ``feature_names`` (a companion
    feature of engagerec.embedding_backward aside: it reads no ids)."""
    name = name.removeprefix("t_")
    features = [f for f in feature_names if not f.endswith(LOOP_SUFFIX)]
    suffix = f"__{features[0]}" if len(features) == 1 else ""
    return name[: -len(suffix)] if suffix and name.endswith(suffix) else name


def auto_dim(rows: int, largest: int) -> int:
    """
    An embedding width by the rule of thumb 6 * rows^(1/4), rounded to a multiple of 4
    (FBGEMM and column-wise sharding like those) and kept in [4, largest]. Used for
    every table without an explicit width when ``EmbeddingConfig.auto_dim`` is set.

    Args:
        rows (int): the table's number of rows.
        largest (int): the widest it may be (``EmbeddingConfig.dim``).

    Returns:
        int: the width.

    Example::

        >>> from engagerec.features import auto_dim
        >>> [auto_dim(rows, 16) for rows in (3, 10, 100, 1_000_000)]
        [8, 12, 16, 16]
    """
    return max(4, min(largest, 4 * round(6 * rows**0.25 / 4)))


@dataclass
class FeatureSpec:
    """
    Which prepared sparse features become which TorchRec embedding tables, and how wide the
    tower input is: one table per id space (``table_name(id_space)``), holding every
    feature of that space but those with a table of their own (``EmbeddingConfig.own_table``),
    then the dense features. ``feature_names`` is the order of the
    pooled embeddings in the tower input, which is ``[pooled (sparse_dim) | dense (dense_dim)]``,
    ``input_dim`` wide. Usually built with ``from_schema``.

    Args:
        tables (List[EmbeddingBagConfig]): one config per table, for the
            EmbeddingBagCollection.
        dense_dim (int): number of dense features (one column each).

    Example::

        >>> from engagerec.config import EmbeddingConfig
        >>> from engagerec.data.schema import DatasetSchema, DenseFeature, SparseFeature
        >>> from engagerec.features import FeatureSpec
        >>> schema = DatasetSchema(
        ...     features=[{"name": "item", "kind": "categorical"}, {"name": "history", "kind": "history"}],
        ...     sparse=[
        ...         SparseFeature("item", "item", multi=False),
        ...         SparseFeature("history", "item", multi=True),
        ...     ],
        ...     dense=[DenseFeature("x", "x", "none", 0.0, 1.0, None)],
        ...     labels=[],
        ...     vocab_sizes={"item": 9},
        ... )
        >>> spec = FeatureSpec.from_schema(schema, EmbeddingConfig(dim=4))
        >>> [(t.name, t.num_embeddings, t.embedding_dim, t.feature_names) for t in spec.tables]
        [('t_item', 10, 4, ['item', 'history'])]
        >>> spec.feature_names, spec.sparse_dim, spec.dense_dim, spec.input_dim
        (['item', 'history'], 8, 1, 9)
        >>> own = FeatureSpec.from_schema(schema, EmbeddingConfig(dim=4, own_table=["history"]))
        >>> [(t.name, t.num_embeddings, t.feature_names) for t in own.tables]
        [('t_item', 10, ['item']), ('t_item__history', 10, ['history'])]
        >>> own.spaces
        {'t_item': 'item', 't_item__history': 'item'}
    """

    tables: List[EmbeddingBagConfig]
    dense_dim: int

    @property
    def spaces(self) -> Dict[str, str]:
        """Each table's id space (whose vocabulary its rows follow), by table name."""
        return {table.name: table_space(table) for table in self.tables}

    @property
    def sparse_dim(self) -> int:
        """Width of the pooled embeddings: every feature's table width, summed."""
        return sum(t.embedding_dim * len(t.feature_names) for t in self.tables)

    @property
    def input_dim(self) -> int:
        """Width of the tower input: every pooled embedding plus the dense features."""
        return self.sparse_dim + self.dense_dim

    @property
    def feature_names(self) -> List[str]:
        """The sparse features, table by table: the order of the pooled embeddings in the tower input."""
        return [name for table in self.tables for name in table.feature_names]

    @property
    def feature_widths(self) -> Dict[str, int]:
        """Each sparse feature's pooled width (its table's), in ``feature_names`` order."""
        return {name: table.embedding_dim for table in self.tables for name in table.feature_names}

    @classmethod
    def from_schema(cls, schema: DatasetSchema, cfg: EmbeddingConfig) -> "FeatureSpec":
        """
        The spec for prepared data: one table per id space, and one per feature of
        ``cfg.own_table``, with the space's ``schema.num_embeddings`` rows (the known ids plus
        the out-of-vocabulary row), ``cfg.dims[space]`` wide, else ``auto_dim`` or ``cfg.dim``;
        pooling per ``cfg.pooling`` (default: mean for history features, sum for the rest).

        Args:
            schema (DatasetSchema): the prepared data's schema.
            cfg (EmbeddingConfig): the model's embedding settings.

        Returns:
            FeatureSpec: the tables and the dense width.

        Raises:
            ConfigError: if ``cfg`` names an unknown feature or id space, a pooling other than
                sum and mean, or two multi-valued features sharing a table ask for different
                poolings; or ``cfg.own_table`` names a feature twice, one that is not sparse,
                a positional history, one of a managed-collision space, or one whose table
                name another space gives (a feature alone in its space keeps its space's table);
                or a sparse feature's name ends in ``__loop`` (engagerec.embedding_backward's).
        """
        kinds = {f["name"]: f["kind"] for f in schema.features}
        space_of = {f.name: f.id_space for f in schema.sparse}
        reserved = [name for name in space_of if name.endswith(LOOP_SUFFIX)]
        if reserved:  # engagerec.embedding_backward's companions are named so
            raise ConfigError(f"sparse features {reserved}: names ending in '{LOOP_SUFFIX}' are reserved")
        id_spaces = set(space_of.values())
        unknown = (set(cfg.pooling) | set(cfg.dims)) - set(kinds) - id_spaces - set(schema.sparse_names)
        if unknown:
            raise ConfigError(f"model.embeddings names unknown features or id spaces: {sorted(unknown)}")
        for name, scale in cfg.init_scale.items():
            if name not in id_spaces:  # a table's start: by its id space, not a feature
                hint = f" (its table is id space '{space_of[name]}')" if name in space_of else ""
                raise ConfigError(
                    f"model.embeddings.init_scale.{name}: not an id space{hint}; "
                    f"id spaces: {sorted(id_spaces)}"
                )
            if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
                raise ConfigError(f"model.embeddings.init_scale.{name}: {scale!r}, expected a number > 0")
        own = _own_table_features(schema, cfg)
        groups: Dict[str, List] = {}  # table name -> its features, in the schema's order
        for feature in schema.sparse:
            name = table_name(feature.id_space, feature.name if feature.name in own else None)
            groups.setdefault(name, []).append(feature)
        # with own tables, each name must read back (table_space) as the one space of its features:
        # not so for an own table t_a__b of space a beside a space named a__b (one name, two
        # spaces); without them every name is t_<its space>
        ambiguous = [
            name
            for name, features in groups.items()
            if own and {f.id_space for f in features} != {_space_in_name(name, [f.name for f in features])}
        ]
        if ambiguous:
            raise ConfigError(
                f"model.embeddings.own_table: the table names {ambiguous} would read as another id "
                "space's (t_<id space>__<feature>); rename the id spaces that hold '__'"
            )
        tables = []
        for name, features in groups.items():
            space = features[0].id_space
            pooling = None
            for feature in features:
                wanted = cfg.pooling.get(
                    feature.name, "mean" if kinds.get(feature.name) == "history" else "sum"
                )
                if wanted not in POOLINGS:
                    raise ConfigError(
                        f"model.embeddings.pooling.{feature.name}: '{wanted}', expected sum or mean"
                    )
                if not feature.multi:
                    continue  # one id per row: sum and mean agree, so the table's pooling decides
                if pooling not in (None, wanted):
                    raise ConfigError(
                        f"features {[f.name for f in features]} share the table of id space '{space}' "
                        "but ask for different poolings; a table has one (or name one in "
                        "model.embeddings.own_table)"
                    )
                pooling = wanted
            rows = schema.num_embeddings(space)
            scale = cfg.init_scale.get(space)  # None: TorchRec's default, +-1/sqrt(rows)
            init = {} if scale is None else {"weight_init_min": -scale, "weight_init_max": scale}
            tables.append(
                EmbeddingBagConfig(
                    name=name,
                    num_embeddings=rows,
                    embedding_dim=cfg.dims.get(space, auto_dim(rows, cfg.dim) if cfg.auto_dim else cfg.dim),
                    feature_names=[f.name for f in features],
                    pooling=POOLINGS[pooling or "sum"],
                    **init,
                )
            )
        return cls(tables=tables, dense_dim=len(schema.dense))


def _own_table_features(schema: DatasetSchema, cfg: EmbeddingConfig) -> set:
    """``cfg.own_table``, checked against the prepared features (each a sparse feature of a
    vocabulary or hashed id space, named once), less those alone in their id space."""
    named = set(cfg.own_table)
    if len(named) != len(cfg.own_table):
        raise ConfigError(f"model.embeddings.own_table names a feature twice: {cfg.own_table}")
    space_of = {f.name: f.id_space for f in schema.sparse}
    for name in cfg.own_table:
        if position_names(name, 1)[0] in space_of:
            raise ConfigError(
                f"model.embeddings.own_table: '{name}' is a history with positions ({name}@0, ...), "
                "whose positions and the candidate share a table for target attention; "
                "set model.embeddings.own_table: []"
            )
        if name not in space_of:
            raise ConfigError(
                f"model.embeddings.own_table: '{name}' is no sparse feature of the prepared data; "
                f"its sparse features: {sorted(space_of)}"
            )
        if space_of[name] in schema.managed:
            raise ConfigError(
                f"model.embeddings.own_table: '{name}' is in id space '{space_of[name]}', whose rows "
                "are assigned while training (managed_collisions): each table would assign its own"
            )
    # the only feature of its space keeps the space's table, its own already (a derived config may
    # have dropped the features it shared it with)
    return {name for name in named if sum(space == space_of[name] for space in space_of.values()) > 1}
