"""Id spaces whose rows are managed while training: torchrec's managed-collision hashing (MCH).

A vocabulary is frozen when the data is prepared, so every id first seen afterwards shares the
out-of-vocabulary row until the data is prepared again. With ``managed_collisions: N`` on a
feature, prepare stores every id as a 31-bit hash (``MANAGED_INPUT_BUCKETS`` values) and the
model keeps a torchrec ``MCHManagedCollisionModule`` per such table: it counts the ids the
training batches bring, admits the ones its eviction policy ranks highest into the table's
``N - 1`` rows (evicting the lowest ranked when full), and maps every other id to the table's
last row, which they share. An admitted id keeps its row until it is evicted; an evicted row is
drawn afresh, with its optimiser state zeroed, before its new id trains it (as torchrec's sharded
managed-collision module does on GPU).

``ManagedCollisionTables`` wraps an EmbeddingBagCollection: its remapping runs unsharded ahead
of the tables, which DistributedModelParallel shards as usual. Every rank would admit the ids of
its own batches, so the remappings of several ranks would drift apart: training with managed
collisions runs on one rank (``check_world_size``). Scoring (``eval()``) only reads the
remapping, so it runs on any number of ranks. The remapping is part of the model's state dict
(checkpoints, warm starts, export), with the ids counted since the last admission, so a
resumed run admits ids exactly when one never stopped does.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from engagerec.data.schema import MANAGED_INPUT_BUCKETS
from engagerec.errors import ConfigError

POLICIES = {"distance_lfu": DistanceLFU_EvictionPolicy, "lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}


class _BoundedMCH(MCHManagedCollisionModule):
    """An MCH module whose buffer of ids counted between admissions holds every id the
    training batches can bring (``ids_per_row`` per row), where torchrec sizes it from the
    first batch and drops the ids of a later, fuller batch that do not fit."""

    def __init__(self, ids_per_row: int, features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ids_per_row, self._features = ids_per_row, features

    def get_extra_state(self) -> bytes:
        # the ids counted since the last admission, which torchrec keeps outside the state dict:
        # saved, a resumed run admits them when an uninterrupted one would. One opaque value
        # (bytes), which torch.distributed.checkpoint stores whole whatever its size
        offset = self._current_history_buffer_offset
        state = {
            "pending": self._history_accumulator[:offset].cpu().clone() if offset else None,
            "metadata": {name: b[:offset].cpu().clone() for name, b in self._history_metadata.items()},
            "iteration": self._current_iter,
            "last_admission": self._last_eviction_iter,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def set_extra_state(self, state: bytes) -> None:
        restored = torch.load(io.BytesIO(state), weights_only=True)
        if restored["iteration"] >= 0:
            self._current_iter, self._last_eviction_iter = restored["iteration"], restored["last_admission"]
        self._restored = restored if restored["pending"] is not None else None

    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        """torchrec's counting, after making room for this batch's ids (torchrec drops the ids
        past its buffer's end)."""
        if self.training and self._input_history_buffer_size != -1:
            incoming = sum(f.values().numel() for f in features.values())
            needed = self._current_history_buffer_offset + incoming
            if needed > self._input_history_buffer_size:
                self._grow(2 * needed)
        return super().profile(features)

    def _grow(self, size: int) -> None:
        """The counting buffers, ``size`` long, keeping the ids counted so far."""
        kept = self._current_history_buffer_offset
        accumulator = torch.empty(size, dtype=torch.int64, device=self.device)
        accumulator[:kept] = self._history_accumulator[:kept]
        self._history_accumulator, self._input_history_buffer_size = accumulator, size
        for name in list(self._history_metadata):
            grown = torch.zeros(size, dtype=torch.int64, device=self.device)
            grown[:kept] = self._history_metadata[name][:kept]
            setattr(self, "_history_" + name, grown)
            self._history_metadata[name] = grown

    def _init_history_buffers(self, features: Dict[str, JaggedTensor]) -> None:
        super()._init_history_buffers(features)
        rows = sum(f.lengths().numel() for f in features.values()) // self._features
        restored = getattr(self, "_restored", None)
        waiting = restored["pending"].numel() if restored is not None else 0
        wanted = rows * self._ids_per_row * self._eviction_interval + waiting
        if wanted > self._input_history_buffer_size:
            self._grow(wanted)  # nothing counted yet: offset 0, nothing to keep
        if restored is not None:  # a checkpoint's pending ids go back where they were
            self._history_accumulator[:waiting] = restored["pending"].to(self.device)
            for name, values in restored["metadata"].items():
                self._history_metadata[name][:waiting] = values.to(self.device)
            self._current_history_buffer_offset, self._restored = waiting, None


class ManagedIdRemap(nn.Module):
    """The remapping half of ``ManagedCollisionTables``: raw (hashed) ids of its tables'
    features in, table rows out; every other feature passes through. Kept as a module of its
    own so that torchrec's train pipeline treats it as one step (a leaf) when it traces.

    Args:
        tables (List[EmbeddingBagConfig]): the managed tables.
        specs (Dict[str, Dict[str, Any]]): per table, ``DatasetSchema.managed``'s entry (rows,
            eviction_policy, eviction_interval) and ``ids_per_row``: the most ids a row brings
            to the table (1 per single-id feature, the length of a history).

    Example: ``ManagedCollisionTables``' example (it builds one).
    """

    def __init__(self, tables: List[EmbeddingBagConfig], specs: Dict[str, Dict[str, Any]]) -> None:
        super().__init__()
        modules = {}
        for table in tables:
            spec = specs[table.name]
            modules[table.name] = _BoundedMCH(
                ids_per_row=int(spec["ids_per_row"]),
                features=len(table.feature_names),
                zch_size=table.num_embeddings,
                device=torch.device("cpu"),
                eviction_policy=POLICIES[spec["eviction_policy"]](),
                eviction_interval=int(spec["eviction_interval"]),
                input_hash_size=MANAGED_INPUT_BUCKETS + 1,
                name=table.name,
            )
        self.managed_collision_collection = ManagedCollisionCollection(modules, tables)
        self.managed_features = [name for table in tables for name in table.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The batch's features with the managed ones' ids replaced by their rows (counting
        them first while training)."""
        keys = features.keys()
        managed = set(self.managed_features)
        inside = [i for i, key in enumerate(keys) if key in managed]
        outside = [i for i, key in enumerate(keys) if key not in managed]
        remapped = self.managed_collision_collection(features.permute(inside))
        if not outside:
            return remapped
        return KeyedJaggedTensor.concat([remapped, features.permute(outside)])

    def place(self, device: torch.device) -> None:
        """Move the remapping to ``device``, where the batches' ids are (torchrec's module
        allocates its counting buffers on the device it was built for)."""
        self.to(device)
        for module in self.modules_by_table().values():
            module._device = device

    def modules_by_table(self) -> Dict[str, MCHManagedCollisionModule]:
        """The MCH module of every managed table."""
        return dict(self.managed_collision_collection._managed_collision_modules.items())


class ManagedCollisionTables(nn.Module):
    """
    An EmbeddingBagCollection whose ``managed`` tables get their rows from torchrec's
    managed-collision hashing: ids are admitted to rows while the model trains (see the module
    docstring), so ids that appear after the data was prepared get rows of their own.

    It keeps ``embedding_bag_configs()``, so ``MultiTaskModel`` takes it as it takes an
    EmbeddingBagCollection; DistributedModelParallel shards the inner collection.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): the tables, managed ones included
            (on any device, ``meta`` too).
        managed (Dict[str, Dict[str, Any]]): per managed table name, its rows, eviction_policy,
            eviction_interval and ids_per_row (see ``ManagedIdRemap``).

    Call Args:
        features (KeyedJaggedTensor): every table's features; a managed feature's values are
            its ids hashed as prepare stores them.

    Returns:
        KeyedTensor: the pooled embeddings, as the collection returns them.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        >>> table = EmbeddingBagConfig(
        ...     name="t_video", num_embeddings=4, embedding_dim=2, feature_names=["video"]
        ... )
        >>> spec = {"eviction_policy": "lfu", "eviction_interval": 1, "ids_per_row": 1}
        >>> tables = ManagedCollisionTables(EmbeddingBagCollection(tables=[table]), {"t_video": spec})
        >>> batch = KeyedJaggedTensor.from_lengths_sync(
        ...     ["video"], torch.tensor([7, 7, 9, 5]), torch.ones(4, dtype=torch.int32)
        ... )
        >>> tables(batch).values().shape
        torch.Size([4, 2])
        >>> rows = tables.frozen_rows("t_video")  # what an exported program looks ids up in
        >>> remap_frozen(torch.tensor([7, 9, 5, 123]), *rows).tolist()  # 3 rows for ids; 123 shares row 3
        [0, 2, 1, 3]
    """

    def __init__(
        self, embedding_bag_collection: EmbeddingBagCollection, managed: Dict[str, Dict[str, Any]]
    ) -> None:
        super().__init__()
        tables = [t for t in embedding_bag_collection.embedding_bag_configs() if t.name in managed]
        self.remap = ManagedIdRemap(tables, managed)
        self.embedding_bag_collection = embedding_bag_collection
        self._configs = {t.name: t for t in tables}
        # evicted rows are drawn from a generator of (this seed, table, step), not the global one:
        # a resumed run draws what an uninterrupted one draws
        self._seed = torch.initial_seed()

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The collection's table configs (all of them, managed or not)."""
        return self.embedding_bag_collection.embedding_bag_configs()

    @property
    def embedding_bags(self) -> nn.ModuleDict:
        """The unsharded collection's tables by name (what export reads)."""
        return self.embedding_bag_collection.embedding_bags

    def forward(self, features: KeyedJaggedTensor):
        """features -> pooled embeddings (see the class docstring)."""
        remapped = self.remap(features)
        if self.training:
            self._reset_evicted()
        return self.embedding_bag_collection(remapped)

    def frozen_rows(self, table: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The remapping of ``table`` as it stands: (sorted admitted ids, their rows, the shared
        row), what ``remap_frozen`` and an exported program look ids up in."""
        module = self.remap.modules_by_table()[table]
        return (
            module._mch_sorted_raw_ids.detach().clone(),
            module._mch_remapped_ids_mapping.detach().clone(),
            module.output_size() - 1,
        )

    def _reset_evicted(self) -> None:
        evictions = self.remap.managed_collision_collection.evict()
        modules = self.remap.modules_by_table()
        for table, rows in evictions.items():
            if rows is not None and rows.numel():
                key = (self._seed, zlib.crc32(table.encode()), modules[table]._current_iter)
                generator = torch.Generator().manual_seed(hash(key) % 2**62)
                reset_rows(self.embedding_bag_collection, self._configs[table], rows, generator)


def remap_frozen(
    ids: torch.Tensor, sorted_ids: torch.Tensor, rows: torch.Tensor, shared_row: int
) -> torch.Tensor:
    """Ids to table rows by a frozen remapping (``ManagedCollisionTables.frozen_rows``), in
    operators torch.export keeps: an id not admitted gets ``shared_row``.

    Args:
        ids (torch.Tensor): int64 ids, hashed as prepare stores them.
        sorted_ids (torch.Tensor): the admitted ids, sorted (the last entry is never matched,
            as in torchrec's remapping).
        rows (torch.Tensor): the row of each sorted id.
        shared_row (int): the row of every other id.

    Returns:
        torch.Tensor: int64 rows, the shape of ``ids``.

    Example: ``ManagedCollisionTables``' example.
    """
    position = torch.searchsorted(sorted_ids[:-1], ids)
    found = sorted_ids[position] == ids
    return torch.where(found, rows[position], torch.full_like(ids, shared_row))


def reset_rows(
    collection: nn.Module,
    table: EmbeddingBagConfig,
    rows: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Draw ``rows`` of ``table`` afresh from the table's initial distribution and zero their
    optimiser state, in an EmbeddingBagCollection or its sharded form (FBGEMM's fused tables:
    each rank resets the rows it holds).

    Args:
        collection (nn.Module): an EmbeddingBagCollection, or the ShardedEmbeddingBagCollection
            DistributedModelParallel made of one.
        table (EmbeddingBagConfig): the table's config (its initial range).
        rows (torch.Tensor): the rows to reset.
        generator (Optional[torch.Generator]): what the new weights are drawn with (default:
            torch's global generator).

    Raises:
        ConfigError: ``collection`` is neither, or holds no table of that name.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> table = EmbeddingBagConfig(name="t", num_embeddings=4, embedding_dim=2, feature_names=["f"])
        >>> collection = EmbeddingBagCollection(tables=[table])
        >>> with torch.no_grad():
        ...     _ = collection.embedding_bags["t"].weight.fill_(5.0)
        >>> reset_rows(collection, table, torch.tensor([1]))
        >>> (collection.embedding_bags["t"].weight.abs() < 1).sum(dim=1).tolist()  # row 1, drawn again
        [0, 2, 0, 0]
    """
    low, high = table.get_weight_init_min(), table.get_weight_init_max()

    def draw(count: int, width: int) -> torch.Tensor:
        return torch.empty(count, width).uniform_(low, high, generator=generator)

    with torch.no_grad():
        if isinstance(collection, EmbeddingBagCollection):
            weight = collection.embedding_bags[table.name].weight
            weight[rows.to(weight.device)] = draw(rows.numel(), weight.shape[1]).to(
                weight.device, weight.dtype
            )
            return
        found = False
        for lookup in getattr(collection, "_lookups", []):
            lookup = getattr(lookup, "module", lookup)  # a data-parallel lookup is wrapped in DDP
            for group in getattr(lookup, "_emb_modules", []):
                found |= _reset_in_group(group, table.name, rows, draw)
        if not found:
            raise ConfigError(
                f"cannot reset rows of table {table.name} in a {type(collection).__name__}: managed "
                "collisions need an EmbeddingBagCollection or its sharded form"
            )


def _reset_in_group(group: nn.Module, name: str, rows: torch.Tensor, draw) -> bool:
    """Reset the rows of table ``name`` that one group of tables holds (weights, and the
    optimiser state of fused tables; a data-parallel table's state lives in the dense optimiser,
    which keeps it); False if the group holds none of the table."""
    tables = group.config.embedding_tables
    found = [i for i, t in enumerate(tables) if t.name == name]  # column shards: one entry each
    for index in found:
        _reset_shard(group, index, rows, draw)
    return bool(found)


def _reset_shard(group: nn.Module, index: int, rows: torch.Tensor, draw) -> None:
    """Reset ``rows`` in the ``index``-th table shard of a group: its rows and columns only."""
    shard = group.config.embedding_tables[index]
    start = shard.local_metadata.shard_offsets[0] if shard.local_metadata is not None else 0
    weight = group.split_embedding_weights()[index]
    local = rows.to(weight.device) - start
    local = local[(local >= 0) & (local < weight.shape[0])]
    if local.numel() == 0:
        return
    width = weight.shape[1]  # this shard's columns of the table
    weight[local] = draw(local.numel(), width).to(weight.device, weight.dtype)
    if not hasattr(group.emb_module, "split_optimizer_states"):
        return  # a data-parallel table: its state is the dense optimiser's
    states = group.emb_module.split_optimizer_states()[index]
    for state in states if isinstance(states, (list, tuple)) else [states]:
        if state.dim() > 0 and state.shape[0] == weight.shape[0]:
            state[local] = 0


def frozen_remaps(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]:
    """Every managed table's remapping inside ``model``, as it stands (``frozen_rows``), by
    table name: what export freezes into its program and predict counts unadmitted ids with.

    Args:
        model (nn.Module): any module (a MultiTaskModel, a DistributedModelParallel).

    Example::

        >>> frozen_remaps(torch.nn.Linear(2, 2))
        {}
    """
    return {
        name: tables.frozen_rows(name)
        for tables in managed_tables(model)
        for name in tables.remap.modules_by_table()
    }


def managed_tables(model: nn.Module) -> List[ManagedCollisionTables]:
    """Every ManagedCollisionTables inside ``model`` (a DistributedModelParallel too).

    Args:
        model (nn.Module): any module.

    Example::

        >>> managed_tables(torch.nn.Linear(2, 2))
        []
    """
    return [m for m in model.modules() if isinstance(m, ManagedCollisionTables)]


def check_world_size(model: nn.Module, world_size: int) -> None:
    """Refuse to train managed collisions on several ranks.

    Args:
        model (nn.Module): the model to train (its managed tables are looked for).
        world_size (int): the ranks it would train on.

    Raises:
        ConfigError: ``model`` has managed tables and ``world_size`` > 1.

    Example::

        >>> check_world_size(torch.nn.Linear(2, 2), 4)  # no managed tables: any world size
    """
    if world_size > 1 and managed_tables(model):
        names = sorted(name for m in managed_tables(model) for name in m._configs)
        raise ConfigError(
            f"tables {names} have managed collisions, which train on one rank: each rank would "
            f"admit the ids of its own batches and the {world_size} ranks' remappings would drift "
            "apart (torchrec shards the remapping row-wise, which its CPU planner does not offer). "
            "Train on one rank; predict and evaluate run on any number"
        )


def managed_specs(
    schema: Any, tables: List[EmbeddingBagConfig], lengths: Optional[Dict[str, int]] = None
) -> Dict[str, Dict[str, Any]]:
    """Per managed table, ``ManagedCollisionTables``' spec from the prepared data's schema.

    Args:
        schema: the DatasetSchema (its ``managed`` spaces and sparse features).
        tables (List[EmbeddingBagConfig]): the model's tables (``FeatureSpec.tables``).
        lengths (Optional[Dict[str, int]]): the most ids per row of each multi-id feature
            (history lengths); single-id features bring one.

    Returns:
        Dict[str, Dict[str, Any]]: table name -> rows, eviction_policy, eviction_interval, ids_per_row.

    Example::

        >>> from engagerec.data.schema import DatasetSchema, SparseFeature
        >>> schema = DatasetSchema(features=[], sparse=[SparseFeature("video", "video", multi=False)],
        ...     dense=[], labels=[], vocab_sizes={},
        ...     managed={"video": {"rows": 8, "eviction_policy": "lfu", "eviction_interval": 1}})
        >>> table = EmbeddingBagConfig(name="t_video", num_embeddings=8, embedding_dim=2,
        ...     feature_names=["video"])
        >>> managed_specs(schema, [table])["t_video"]["ids_per_row"]
        1
    """
    lengths = lengths or {}
    space_of = {f.name: f.id_space for f in schema.sparse}
    specs = {}
    for table in tables:
        spaces = {space_of.get(name) for name in table.feature_names}
        managed = [schema.managed[s] for s in spaces if s in schema.managed]
        if managed:
            per_row = sum(lengths.get(name, 1) for name in table.feature_names)
            specs[table.name] = {**managed[0], "ids_per_row": per_row}
    return specs
