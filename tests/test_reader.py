"""ShardReader: batches equal the encoded rows; sharding and shuffling lose and repeat nothing."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import prepare_synthetic, study_config, study_files
from engagerec.data.prepare import prepare
from engagerec.data.reader import ShardReader, make_loader


@pytest.fixture(scope="module")
def multi_chunk(tmp_path_factory):
    """Study-schema synthetic data in several files and row groups, with two multi-valued features."""
    out = tmp_path_factory.mktemp("multi_chunk")
    return prepare_synthetic(out, {"num_rows": 5_000}, row_group_size=300, rows_per_file=1_000)


def _rows(batches, key="user_id"):
    return torch.cat([b.sparse_features[key].values() for b in batches]).numpy()


def _signature(batches):
    """One tuple per row: (user, content, age, watch_ratio), to compare row multisets."""
    out = []
    for b in batches:
        kjt = b.sparse_features
        for u, c, a, w in zip(
            kjt["user_id"].values().tolist(),
            kjt["content_id"].values().tolist(),
            b.dense_features[:, 0].tolist(),
            b.labels["watch_ratio"].tolist(),
            strict=True,
        ):
            out.append((u, c, round(a, 5), round(w, 6)))
    return sorted(out)


def test_batches_equal_the_parquet_rows(multi_chunk):
    reader = ShardReader(multi_chunk, "train", batch_size=128)
    table = pq.read_table(multi_chunk / "train").to_pandas()
    batches = list(reader)
    assert len(reader.chunks) > 3 and len(batches) == len(reader) == -(-len(table) // 128)
    assert np.array_equal(_rows(batches, "content_id"), table["content_id"].to_numpy())
    genres = torch.cat([b.sparse_features["genres"].values() for b in batches]).numpy()
    assert np.array_equal(genres, np.concatenate(table["genres"].to_numpy()))
    lengths = torch.cat([b.sparse_features["genres"].lengths() for b in batches]).numpy()
    assert np.array_equal(lengths, table["genres"].map(len).to_numpy())
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    assert np.allclose(dense[:, 0], table["age"]) and np.allclose(dense[:, 1], table["duration"])
    skip = torch.cat([b.labels["skip"] for b in batches]).numpy()
    assert np.array_equal(skip, table["skip"].to_numpy())
    assert all(torch.equal(b.label_weights[k], b.weights) for b in batches for k in ("watch_ratio", "skip"))
    assert torch.cat([b.weights for b in batches]).eq(1).all()  # no label is missing in this data
    first = batches[0].sparse_features
    assert first.keys() == reader.keys and first.values().dtype == torch.int64
    assert first.stride() == 128  # every key has one bag per row


def test_shuffle_is_a_seeded_permutation_that_changes_each_epoch(multi_chunk):
    plain = _signature(ShardReader(multi_chunk, "train", batch_size=100))
    reader = ShardReader(multi_chunk, "train", batch_size=100, shuffle=True, seed=7)
    epoch0 = list(reader)
    reader.set_epoch(1)
    epoch1 = list(reader)
    again = list(ShardReader(multi_chunk, "train", batch_size=100, shuffle=True, seed=7))
    assert _signature(epoch0) == plain == _signature(epoch1)
    assert not np.array_equal(_rows(epoch0), _rows(epoch1))
    assert np.array_equal(_rows(epoch0), _rows(again))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_the_rows(multi_chunk, world_size):
    whole = _signature(ShardReader(multi_chunk, "train", batch_size=64, shuffle=True, seed=1))
    parts = [
        ShardReader(multi_chunk, "train", batch_size=64, shuffle=True, seed=1, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    assert sorted(sum((_signature(p) for p in parts), [])) == whole
    sizes = [sum(b.batch_size for b in p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_chunks_are_decoded_ahead_on_one_thread_once_each_and_only_this_ranks(multi_chunk):
    """The next row group decodes on the reader's own thread while batches come from the current
    one: every chunk holding this rank's rows is decoded exactly once, off the caller's thread,
    and none that holds only another rank's rows."""
    import threading

    reader = ShardReader(multi_chunk, "train", batch_size=64, shuffle=True, seed=1, rank=0, world_size=2)
    loads, load = [], reader._load
    reader._load = lambda chunk: (loads.append((chunk, threading.current_thread().name)), load(chunk))[1]
    rows = sum(batch.batch_size for batch in reader)
    order = reader._chunk_order()
    start, end = reader._rank_rows(0)
    sizes = np.array([reader.chunks[c][2] for c in order])
    firsts = np.cumsum(sizes) - sizes  # each chunk's first row in the epoch's order
    mine = [
        int(c)
        for c, first, size in zip(order, firsts, sizes, strict=True)
        if first < end and first + size > start
    ]
    assert rows == end - start and [chunk for chunk, _ in loads] == mine
    assert all(name.startswith("engagerec-decode") for _, name in loads)  # off the caller's thread


def test_drop_last_gives_every_rank_the_same_number_of_full_batches(multi_chunk):
    parts = [
        ShardReader(multi_chunk, "train", batch_size=64, rank=r, world_size=3, drop_last=True)
        for r in range(3)
    ]
    counts = [len(list(p)) for p in parts]
    assert len(set(counts)) == 1 and counts[0] == len(parts[0])
    assert all(b.batch_size == 64 for p in parts for b in p)
    total = sum(p.rows_dropped for p in parts) + sum(counts) * 64
    assert total == parts[0].total_rows


def test_worker_count_does_not_change_the_order(multi_chunk):
    reader = ShardReader(multi_chunk, "train", batch_size=100, shuffle=True, seed=3)
    single = _rows(list(reader))
    for workers in (1, 2, 3):
        assert np.array_equal(_rows(list(make_loader(reader, num_workers=workers))), single)


def test_start_batch_resumes_mid_epoch(multi_chunk):
    full = list(ShardReader(multi_chunk, "train", batch_size=100, shuffle=True, seed=3))
    resumed = ShardReader(multi_chunk, "train", batch_size=100, shuffle=True, seed=3, start_batch=5)
    rest = list(resumed)
    assert len(rest) == len(resumed) == len(full) - 5
    assert np.array_equal(_rows(rest), _rows(full[5:]))


def test_batch_moves_as_a_pipelineable(multi_chunk):
    batch = next(iter(ShardReader(multi_chunk, "val", batch_size=16)))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(moved.dense_features, batch.dense_features)
    assert moved.sparse_features.keys() == batch.sparse_features.keys()
    assert set(moved.labels) == {"watch_ratio", "skip"}


def test_unknown_split_is_a_clear_error(multi_chunk):
    from engagerec.data.errors import DataError

    with pytest.raises(DataError, match="split 'dev' is not in this dataset"):
        ShardReader(multi_chunk, "dev")


def test_even_batches_pad_with_zero_weight_rows_only(multi_chunk):
    total = ShardReader(multi_chunk, "train").total_rows
    world = next(w for w in range(2, 8) if total % w)  # ranks get unequal rows...
    batch_size = total // world  # ...so the larger ranks need one batch more
    parts = [
        ShardReader(multi_chunk, "train", batch_size=batch_size, rank=r, world_size=world, even_batches=True)
        for r in range(world)
    ]
    counts = [len(list(p)) for p in parts]
    assert len(set(counts)) == 1
    weights = torch.cat([b.weights for p in parts for b in p])
    assert weights.sum().item() == total  # every real row once, with weight 1
    # batch k has one size on every rank (sharded lookups need it); padding has weight 0
    sizes = [[b.batch_size for b in p] for p in parts]
    assert all(len(set(column)) == 1 for column in zip(*sizes, strict=True))
    padded = sum(b.batch_size - int(b.weights.sum()) for p in parts for b in p)
    assert padded > 0 and padded == sum(map(sum, sizes)) - total
    # a padding row weighs nothing for any task either
    assert all(
        torch.equal(b.label_weights[k], b.weights) for p in parts for b in p for k in ("watch_ratio", "skip")
    )


def test_a_missing_raw_label_reads_as_zero_with_weight_zero_for_that_label_only(tmp_path):
    """A raw label column with empty cells: NaN in the shard; the reader gives label 0 at weight 0
    for that label, and weight 1 for the other labels of the same rows."""
    files = study_files(tmp_path)
    interactions = pd.read_csv(files["interactions"])
    interactions["liked"] = np.where(
        np.arange(len(interactions)) % 3 == 0, np.nan, np.arange(len(interactions)) % 2
    )
    files = study_files(tmp_path, interactions=interactions)
    labels = [{"name": "watch_ratio"}, {"name": "liked", "kind": "binary", "column": "liked"}]
    summary = prepare(study_config(files, labels=labels).data, tmp_path / "out")
    missing = int(interactions["liked"].isna().sum())
    assert summary["rows_kept"] == len(interactions) and summary["label_missing"]["liked"] == missing
    seen = 0
    for split in ("train", "val", "test"):
        shard = pq.read_table(tmp_path / "out" / split).to_pandas()["liked"].to_numpy()
        batches = list(ShardReader(tmp_path / "out", split, batch_size=7))
        liked = torch.cat([b.labels["liked"] for b in batches]).numpy()
        weight = torch.cat([b.label_weights["liked"] for b in batches]).numpy()
        absent = np.isnan(shard)
        assert np.array_equal(weight, np.where(absent, 0.0, 1.0)) and (liked[absent] == 0).all()
        assert np.array_equal(liked[~absent], shard[~absent])
        assert all(b.label_weights["watch_ratio"].eq(1).all() for b in batches)
        seen += int(absent.sum())
    assert seen == missing
