"""Streaming reader: prepared parquet shards -> Batch, vectorised, sharded by rank and worker.

Order is defined once per epoch and does not depend on the number of loader workers:

1. the split's row groups ("chunks") are put in a seeded order (``shuffle``), and
   the rows inside each chunk are permuted by a seed of (seed, epoch, chunk);
2. the resulting row sequence is cut into one contiguous range per rank (sizes
   differ by at most one row);
3. a rank's range is cut into batches; loader worker ``w`` of ``W`` makes batches
   ``w, w+W, ...``, which a torch DataLoader hands out round-robin, i.e. in order.

So batch ``k`` of an epoch is the same whatever the worker count, which is what an
exact resume needs (``start_batch``). Memory holds two decoded chunks per worker (the one
read and the next, decoded ahead on a thread of its own while batches are made from the
first), whatever the dataset size.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from engagerec.batch import Batch
from engagerec.data.errors import DataError, first_line
from engagerec.data.jagged import gather_rows, list_array_parts
from engagerec.data.manifest import check_prepared, written_rows
from engagerec.data.schema import DatasetSchema


@dataclass
class _Chunk:
    """One decoded row group. singles is feature-major [S, rows] so that a batch's slice
    ``singles[:, lo:hi]`` flattens straight into the KJT's key-major value layout."""

    singles: np.ndarray
    multis: List[Tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray
    labels: np.ndarray


class ShardReader(IterableDataset):
    """Iterate ``Batch`` objects over one split of a prepared dataset.

    Args:
        data_dir: a directory written by ``engagerec prepare`` (holds schema.json).
        split: "train", "val" or "test".
        batch_size: rows per batch on this rank.
        shuffle: seeded chunk order and in-chunk row order, new each ``set_epoch``.
        rank, world_size: default to torch.distributed's when it is initialised.
        drop_last: every rank yields the same number of full batches (what lock-step
            distributed training needs); the rows left over are counted in ``rows_dropped``.
        even_batches: without drop_last, every rank yields the same number of batches, and
            batch k has the same size on every rank: the shorter ones are padded with copies
            of one row at weight 0. Lock-step evaluation over sharded tables needs both, and
            every real row is still seen exactly once (weight 1).
        start_batch: skip this many batches of the epoch (resume).
        empty_keys: sparse feature keys every batch carries with no ids, after the data's own:
            the companions a model built with ``loop_backward`` reads
            (engagerec.embedding_backward.loop_keys).

    Example::

        >>> import tempfile
        >>> from engagerec.config import config_from_dict
        >>> from engagerec.data.prepare import prepare
        >>> synthetic = {"num_rows": 3000, "num_users": 40, "num_contents": 30}
        >>> cfg = config_from_dict({"data": {
        ...     "source": {"adapter": "synthetic", "synthetic": synthetic},
        ...     "features": [{"name": "user_id"}, {"name": "rating", "kind": "numeric"}]}})
        >>> out = tempfile.mkdtemp()
        >>> _ = prepare(cfg.data, out)
        >>> reader = ShardReader(out, "train", batch_size=256, shuffle=True, drop_last=True)
        >>> reader.set_epoch(0)
        >>> batch = next(iter(make_loader(reader)))
        >>> batch.sparse_features.keys(), tuple(batch.dense_features.shape), sorted(batch.labels)
        (['user_id'], (256, 1), ['skip', 'watch_ratio'])
        >>> bool(batch.label_weights["skip"].eq(1).all())  # no padding, no missing label
        True
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8192,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        drop_last: bool = False,
        even_batches: bool = False,
        start_batch: int = 0,
        empty_keys: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        written = check_prepared(self.data_dir)  # sizes and checksums: before anything is read
        self.schema = DatasetSchema.load(self.data_dir)
        splits = self.schema.meta.get("splits", {})
        if split not in splits:
            raise DataError(
                f"split '{split}' is not in this dataset",
                file=str(self.data_dir / "schema.json"),
                expected=f"one of {sorted(splits)}",
            )
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.drop_last, self.even_batches, self.start_batch, self.epoch = (
            drop_last,
            even_batches,
            start_batch,
            0,
        )
        if world_size is None:
            initialised = dist.is_available() and dist.is_initialized()
            world_size = dist.get_world_size() if initialised else 1
            rank = dist.get_rank() if initialised else 0
        self.rank, self.world_size = int(rank or 0), int(world_size)
        self.single_names = [f.name for f in self.schema.sparse if not f.multi]
        self.multi_names = [f.name for f in self.schema.sparse if f.multi]
        self.empty_keys = list(empty_keys)
        self.keys = self.single_names + self.multi_names + self.empty_keys
        written = written_rows(written, split)
        self.chunks: List[Tuple[Path, int, int]] = []  # (file, row group, rows)
        for name in splits[split]["files"]:
            path = self.data_dir / split / name
            if name not in written:
                raise DataError("shard listed in schema.json is not in manifest.json", file=str(path))
            metadata = _footer(path)
            if metadata.num_rows != written[name]:
                raise DataError(
                    f"holds {metadata.num_rows:,} rows, but engagerec prepare wrote {written[name]:,}",
                    file=str(path),
                    expected="the shard as prepare wrote it: run `engagerec prepare` again",
                )
            self.chunks += [(path, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
        self.total_rows = sum(rows for _, _, rows in self.chunks)
        self._files: dict = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # open parquet handles stay in the process that opened them
        return state

    # ------------------------------------------------------------ bookkeeping
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which with ``seed`` seeds the shuffle: each epoch reads its own order."""
        self.epoch = epoch

    def _rank_rows(self, rank: int) -> Tuple[int, int]:
        return rank * self.total_rows // self.world_size, (rank + 1) * self.total_rows // self.world_size

    def _own_batches(self, rank: int) -> int:  # batches holding at least one of this rank's rows
        start, end = self._rank_rows(rank)
        return -(-(end - start) // self.batch_size)

    def num_batches(self) -> int:
        """Batches this rank yields in one epoch (before ``start_batch``)."""
        if self.drop_last:
            fewest = min(end - start for start, end in map(self._rank_rows, range(self.world_size)))
            return fewest // self.batch_size
        if self.even_batches:
            return max(self._own_batches(r) for r in range(self.world_size))
        return self._own_batches(self.rank)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)

    @property
    def rows_dropped(self) -> int:
        """This rank's rows that an epoch does not yield (only ``drop_last`` drops any)."""
        start, end = self._rank_rows(self.rank)
        return (end - start) - min(end - start, self.num_batches() * self.batch_size)

    # --------------------------------------------------------------- reading
    def _chunk_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.chunks))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.chunks))

    def _load(self, chunk_id: int) -> _Chunk:
        path, group, rows = self.chunks[chunk_id]
        try:
            files = self._files  # one open file per worker; every page's CRC checked
            if path not in files:  # a local dict: another iterator's decoding thread may swap it
                files = self._files = {path: pq.ParquetFile(path, page_checksum_verification=True)}
            table = files[path].read_row_group(group, use_threads=False)
        except (OSError, pa.ArrowException) as err:
            raise DataError(
                f"row group {group} cannot be read ({first_line(err)}): the shard is damaged",
                file=str(path),
                expected=f"an intact shard: `engagerec prepare --verify {self.data_dir}` checks every "
                "file, and `engagerec prepare` writes them again",
            ) from None
        order = (
            np.random.default_rng([self.seed, self.epoch, chunk_id]).permutation(rows)
            if self.shuffle
            else None
        )

        def matrix(names: List[str], dtype, axis: int) -> np.ndarray:
            if not names:
                return np.zeros((0, rows) if axis == 0 else (rows, 0), dtype=dtype)
            stacked = np.stack(
                [table.column(n).to_numpy().astype(dtype, copy=False) for n in names], axis=axis
            )
            return stacked if order is None else np.take(stacked, order, axis=1 - axis)

        multis = []
        for name in self.multi_names:
            offsets, values = list_array_parts(table.column(name))
            multis.append((offsets, values) if order is None else gather_rows(offsets, values, order))
        return _Chunk(
            singles=matrix(self.single_names, np.int32, axis=0),
            multis=multis,
            dense=matrix(self.schema.dense_names, np.float32, axis=1),
            labels=matrix(self.schema.label_names, np.float32, axis=1),
        )

    def _make_batch(self, pieces: List[Tuple[_Chunk, int, int, int, float]]) -> Batch:
        """pieces: (chunk, lo, hi, times, weight): rows lo..hi of a chunk, repeated ``times``
        times, at ``weight`` (1 for real rows; padding repeats one row at 0)."""

        def rows(array: np.ndarray, lo: int, hi: int, times: int, axis: int = 0) -> np.ndarray:
            part = array[:, lo:hi] if axis == 1 else array[lo:hi]
            return part if times == 1 else np.concatenate([part] * times, axis=axis)

        def cat(arrays: List[np.ndarray], axis: int = 0) -> np.ndarray:
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)

        singles = cat([rows(c.singles, lo, hi, n, axis=1) for c, lo, hi, n, _ in pieces], axis=1)
        values = [singles.reshape(-1)]
        lengths = [np.ones(singles.size, dtype=np.int32)]
        for k in range(len(self.multi_names)):
            for chunk, lo, hi, times, _ in pieces:
                offsets, flat = chunk.multis[k]
                values.append(np.tile(flat[offsets[lo] : offsets[hi]], times))
                lengths.append(np.tile(np.diff(offsets[lo : hi + 1]).astype(np.int32), times))
        labels = cat([rows(c.labels, lo, hi, n) for c, lo, hi, n, _ in pieces])
        lengths.append(np.zeros(len(labels) * len(self.empty_keys), dtype=np.int32))
        weights = np.concatenate([np.full((hi - lo) * n, w, dtype=np.float32) for _, lo, hi, n, w in pieces])
        present = ~np.isnan(labels)  # a missing raw label (NaN in the shard) weighs 0 for its task only
        label_weights = torch.from_numpy(np.where(present, weights[:, None], np.float32(0)))
        labels = torch.from_numpy(np.where(present, labels, np.float32(0)))
        return Batch(
            dense_features=torch.from_numpy(cat([rows(c.dense, lo, hi, n) for c, lo, hi, n, _ in pieces])),
            sparse_features=KeyedJaggedTensor(
                keys=self.keys,
                values=torch.from_numpy(np.concatenate(values, dtype=np.int64)),
                lengths=torch.from_numpy(np.concatenate(lengths)),
            ),
            labels={name: labels[:, i] for i, name in enumerate(self.schema.label_names)},
            weights=torch.from_numpy(weights),
            label_weights={name: label_weights[:, i] for i, name in enumerate(self.schema.label_names)},
        )

    def _batch_rows(self, b: int) -> Tuple[int, int, int]:
        """(lo, hi, pad): this rank's real rows of batch b, and the padding rows that make the
        batch as large as the largest rank's batch b (even_batches: ranks stay in lock-step,
        and sharded embedding lookups need the same batch size on every rank)."""
        start, end = self._rank_rows(self.rank)
        lo = min(start + b * self.batch_size, end)
        hi = min(lo + self.batch_size, end)
        if not self.even_batches:
            return lo, hi, 0
        widest = max(
            min(max(e - s - b * self.batch_size, 0), self.batch_size)
            for s, e in map(self._rank_rows, range(self.world_size))
        )
        return lo, hi, widest - (hi - lo)

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        order = self._chunk_order()
        sizes = np.array([self.chunks[c][2] for c in order], dtype=np.int64)
        ends = np.cumsum(sizes)
        rank_start, rank_end = self._rank_rows(self.rank)
        cache: dict = {}
        # every chunk is decoded on one thread of its own, the next one ahead while batches are
        # made from the current: decoding (parquet pages, the shuffle's gathers) mostly releases
        # the GIL, so it overlaps training steps instead of stalling the step that needs the chunk
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engagerec-decode")
        ahead: Tuple[int, Optional[Future]] = (-1, None)

        def locate(row: int) -> Tuple[int, int]:
            """(position in the epoch's chunk order, row within that chunk) of a rank-global row."""
            position = int(np.searchsorted(ends, row, side="right"))
            return position, row - int(ends[position] - sizes[position])

        def chunk_at(position: int) -> _Chunk:
            nonlocal cache, ahead
            chunk_id = int(order[position])
            if chunk_id not in cache:
                pending = ahead[1] if ahead[0] == chunk_id else decoder.submit(self._load, chunk_id)
                cache = {chunk_id: pending.result()}  # keep one decoded chunk (its errors raise here)
                # the next chunk, when it holds rows of this rank
                following = int(order[position + 1]) if ends[position] < rank_end else -1
                ahead = (following, decoder.submit(self._load, following) if following >= 0 else None)
            return cache[chunk_id]

        try:
            for b in range(self.start_batch + worker_id, self.num_batches(), num_workers):
                lo, hi, pad = self._batch_rows(b)
                pieces = []
                while lo < hi:  # gather [lo, hi) from the chunks it spans
                    position, offset = locate(lo)
                    take = min(hi - lo, int(sizes[position]) - offset)
                    pieces.append((chunk_at(position), offset, offset + take, 1, 1.0))
                    lo += take
                if pad:  # repeat one row (this rank's last, or row 0 if it has none) at weight 0
                    position, offset = locate(rank_end - 1 if rank_end > rank_start else 0)
                    pieces.append((chunk_at(position), offset, offset + 1, pad, 0.0))
                yield self._make_batch(pieces)
        finally:  # the iterator is done or dropped: no decoding left running for it
            decoder.shutdown(wait=False, cancel_futures=True)


def _footer(path: Path) -> pq.FileMetaData:
    """A shard's parquet footer; a damaged one is a DataError naming the file."""
    try:
        return pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as err:
        raise DataError(
            f"the parquet footer cannot be read ({first_line(err)}): the shard is damaged",
            file=str(path),
            expected="an intact shard: run `engagerec prepare` again",
        ) from None


def make_loader(reader: ShardReader, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that keeps the reader's batch order (batches are made by the reader).

    Args:
        reader: the ShardReader whose batches to load.
        num_workers: loader processes; the batch order does not depend on it.
        pin_memory: page-locked batches, for asynchronous copies to a GPU.

    Returns:
        A torch DataLoader yielding ``Batch`` objects (see ``ShardReader`` for an example).
    """
    return DataLoader(
        reader,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        # the loader draws its workers' base seed when an iterator starts: from its own generator,
        # never torch's global one, which a resume has just restored (a draw there moved every
        # later dropout mask of a resumed run off an uninterrupted one's)
        generator=torch.Generator(),
    )
