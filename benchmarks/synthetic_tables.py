"""A recommender-shaped model input at any table size, for the scale benchmarks: as pre-built
batches (the model alone) or as prepared shards (read by engagerec's reader, end to end).

The shape: user (1,000 ids), video (``rows`` ids) and author (rows / 5) ids, a 20-long viewing
history sharing the video table, 4 dense features, a watch ratio and a skip label. Ids are
skewed as real popularity is (id = 1 + floor(u^3 * size), u uniform: a few ids are hot, most
are rare), so a batch touches a realistic share of distinct rows. With ``history_table`` the
history has a table of its own (an id space ``history`` of as many rows; configs/kuairand_1k.yaml
gives it one with ``model.embeddings.own_table``): every table is then read by one feature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator

import torch

USERS, HISTORY, DENSE = 1_000, 20, 4
LABEL_STATS = {
    "watch_ratio": {"min": 0.0, "max": 1.0, "mean": 0.5},
    "skip": {"min": 0.0, "max": 1.0, "mean": 0.5},
}


def synthetic_schema(rows: int, history_table: bool = False):
    """The DatasetSchema of the synthetic input with a ``rows``-row video table (and a history
    table of ``rows`` rows of its own with ``history_table``)."""
    from engagerec.data.schema import DatasetSchema, DenseFeature, LabelSpec, SparseFeature

    return DatasetSchema(
        features=[{"name": "history", "kind": "history"}],
        sparse=[
            SparseFeature("user_id", "user_id", multi=False),
            SparseFeature("content_id", "content_id", multi=False),
            SparseFeature("author_id", "author_id", multi=False),
            SparseFeature("history", "history" if history_table else "content_id", multi=True),
        ],
        dense=[DenseFeature(f"x{i}", f"x{i}", "none", 0.0, 1.0, None) for i in range(DENSE)],
        labels=[LabelSpec("watch_ratio", "regression"), LabelSpec("skip", "binary")],
        vocab_sizes={
            "user_id": USERS,
            "content_id": rows,
            "author_id": max(rows // 5, 1),
            **({"history": rows} if history_table else {}),
        },
        # the labels' train statistics (uniform ratio; skip = ratio < 0.5), as prepare records them
        meta={"summary": {"split": {"train": {"labels": LABEL_STATS}}}},
    )


def synthetic_columns(rows: int, n: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """``n`` rows of the synthetic input: id columns (history as [n, 20]), dense, labels."""

    def ids(size: int, count: int) -> torch.Tensor:  # skewed: low ids are popular
        return (torch.rand(count, generator=generator) ** 3 * size).long() + 1

    ratio = torch.rand(n, generator=generator)
    return {
        "user_id": ids(USERS, n),
        "content_id": ids(rows, n),
        "author_id": ids(max(rows // 5, 1), n),
        "history": ids(rows, n * HISTORY).view(n, HISTORY),
        "dense": torch.randn(n, DENSE, generator=generator),
        "watch_ratio": ratio,
        "skip": (ratio < 0.5).float(),
    }


class SyntheticSource:
    """``count`` pre-built batches over a ``rows``-row video table, cycled: the model alone,
    without the reader."""

    def __init__(
        self, rows: int, batch_size: int, count: int = 16, seed: int = 0, history_table: bool = False
    ) -> None:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from engagerec.batch import Batch

        self.schema = synthetic_schema(rows, history_table)
        generator = torch.Generator().manual_seed(seed)
        self.prebuilt = []
        b = batch_size
        for _ in range(count):
            c = synthetic_columns(rows, b, generator)
            values = torch.cat([c["user_id"], c["content_id"], c["author_id"], c["history"].reshape(-1)])
            lengths = torch.cat(
                [torch.ones(3 * b, dtype=torch.int32), torch.full((b,), HISTORY, dtype=torch.int32)]
            )
            kjt = KeyedJaggedTensor(
                keys=["user_id", "content_id", "author_id", "history"], values=values, lengths=lengths
            )
            self.prebuilt.append(
                Batch(
                    dense_features=c["dense"],
                    sparse_features=kjt,
                    labels={"watch_ratio": c["watch_ratio"], "skip": c["skip"]},
                    weights=torch.ones(b),
                    label_weights={"watch_ratio": torch.ones(b), "skip": torch.ones(b)},
                )
            )
        self.description = f"pre-built batches, a {rows:,}-row video table"

    def batches(self) -> Iterator:
        """The pre-built batches, round and round."""
        while True:
            yield from self.prebuilt


def write_synthetic_shards(
    directory: Path,
    rows: int,
    train_rows: int,
    seed: int = 0,
    rows_per_group: int = 131_072,
    history_table: bool = False,
) -> Path:
    """A prepared dataset (schema.json + train/part-*.parquet, as ``engagerec prepare`` writes
    them) of ``train_rows`` synthetic rows over a ``rows``-row video table, for reading with
    engagerec's ShardReader. Written once per (rows, train_rows, seed, history_table): an existing complete
    one is kept. `engagerec train` reads it too (``train.data_dir``, with ``train.max_steps``:
    it has no val split)."""
    import pyarrow as pa

    from engagerec.data.manifest import MANIFEST_FILE, write_manifest
    from engagerec.data.shards import ShardWriter

    directory = Path(directory)
    stamp = directory / "synthetic.json"
    wanted = {"rows": rows, "train_rows": train_rows, "seed": seed}
    if history_table:  # only then: the stamps of shards written before stay valid
        wanted["history_table"] = True
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and (directory / MANIFEST_FILE).is_file():
        return directory
    writer = ShardWriter(directory / "train", rows_per_file=8 * rows_per_group, row_group_size=rows_per_group)
    generator = torch.Generator().manual_seed(seed)
    done = 0
    while done < train_rows:
        n = min(rows_per_group, train_rows - done)
        c = synthetic_columns(rows, n, generator)
        history = pa.ListArray.from_arrays(
            pa.array(torch.arange(0, (n + 1) * HISTORY, HISTORY, dtype=torch.int32).numpy()),
            pa.array(c["history"].reshape(-1).to(torch.int32).numpy()),
        )
        columns = {
            name: pa.array(c[name].to(torch.int32).numpy()) for name in ("user_id", "content_id", "author_id")
        }
        columns["history"] = history
        columns.update({f"x{i}": pa.array(c["dense"][:, i].numpy()) for i in range(DENSE)})
        columns.update({name: pa.array(c[name].numpy()) for name in ("watch_ratio", "skip")})
        writer.write(pa.table(columns))
        done += n
    schema = synthetic_schema(rows, history_table)
    files = writer.close()
    schema.meta["splits"] = {"train": {"rows": train_rows, "files": files}}
    schema.save(directory)
    write_manifest(directory, {f"train/{name}": n for name, n in zip(files, writer.file_rows, strict=True)})
    stamp.write_text(json.dumps(wanted))
    return directory
