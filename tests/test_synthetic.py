"""The generators are deterministic by seed and carry the signal they claim to plant."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import synthetic_mmoe_config
from engagerec.config import SyntheticConfig, config_from_dict
from engagerec.data.prepare import prepare
from engagerec.data.reader import ShardReader
from engagerec.data.schema import DatasetSchema
from engagerec.data.synthetic import (
    iter_study_interactions,
    mmoe_arrays,
    study_world,
    write_mmoe_table,
    write_study_tables,
)


def _interactions(cfg, chunk_rows=1_000_000):
    """Every generated interaction, in memory."""
    return pd.concat(list(iter_study_interactions(study_world(cfg), cfg, chunk_rows)), ignore_index=True)


def test_study_generator_is_deterministic_by_seed():
    cfg = SyntheticConfig(num_rows=3_000, num_users=100, num_contents=50, seed=5)
    a, b = _interactions(cfg, chunk_rows=1_000), _interactions(cfg, chunk_rows=1_000)
    assert len(a) == 3_000
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(study_world(cfg).content, study_world(cfg).content)
    pd.testing.assert_frame_equal(study_world(cfg).users, study_world(cfg).users)
    c = _interactions(
        SyntheticConfig(num_rows=3_000, num_users=100, num_contents=50, seed=6), chunk_rows=1_000
    )
    assert not a["watch_time"].equals(c["watch_time"])


def test_study_generator_plants_duration_and_genre_signal():
    cfg = SyntheticConfig(num_rows=60_000, num_users=200, num_contents=300, noise=0.3, seed=0)
    world = study_world(cfg)
    events = _interactions(cfg).merge(world.content, on="content_id")
    ratio = np.minimum(events.watch_time / events.duration, 1.0)
    # longer videos are watched less (planted: -0.6 per unit of log duration)
    assert np.corrcoef(np.log(events.duration), ratio)[0, 1] < -0.1
    # a user's favourite genre is watched more than their least favourite one
    first_genre = world.content_genres[events.content_id.to_numpy(), 0]
    preference = world.genre_preference[events.user_id.to_numpy(), first_genre]
    assert ratio[preference > 0.7].mean() > ratio[preference < -0.7].mean() + 0.1
    # replays exist (ratio above 1) and are rare
    raw = events.watch_time / events.duration
    assert 0.001 < (raw > 1.0).mean() < 0.1


def test_study_tables_stream_to_parquet_in_chunks(tmp_path):
    cfg = SyntheticConfig(num_rows=25_000, num_users=500, num_contents=100, seed=2)
    write_study_tables(tmp_path, cfg, chunk_rows=10_000)
    meta = pq.ParquetFile(tmp_path / "interactions.parquet").metadata
    assert meta.num_rows == 25_000 and meta.num_row_groups == 3  # one row group per generated chunk
    written = pq.read_table(tmp_path / "interactions.parquet").to_pandas()
    pd.testing.assert_frame_equal(written, _interactions(cfg, chunk_rows=10_000), check_like=True)
    assert not list(tmp_path.glob(".*tmp"))


def test_the_synthetic_adapter_prepares_like_its_tables_through_the_study_adapter(tmp_path):
    """data.source.adapter: synthetic generates the study tables and prepares them as real data:
    the same shards and schema as write_study_tables' files given to the study adapter."""
    synthetic = {"num_rows": 5_000, "num_users": 100, "num_contents": 80}
    write_study_tables(tmp_path / "raw", SyntheticConfig(**synthetic))
    data = {
        "features": [
            {"name": "user_id"},
            {"name": "history", "kind": "history", "of": "content_id", "length": 5},
            {"name": "gender"},
            {"name": "genres", "kind": "multi_hot"},
            {"name": "age", "kind": "numeric"},
            {"name": "rating", "kind": "numeric"},
        ],
    }
    study = {
        "adapter": "study",
        "interactions": str(tmp_path / "raw/interactions.parquet"),
        "users": str(tmp_path / "raw/users.parquet"),
        "content": str(tmp_path / "raw/content.parquet"),
    }
    summary = prepare(config_from_dict({"data": {"source": study, **data}}).data, tmp_path / "study")
    assert summary["rows_read"] == 5_000 and summary["rows_kept"] > 4_000
    assert summary["sparse_features"]["gender"] == 3  # F, M and the OOV row
    generated = {"adapter": "synthetic", "synthetic": synthetic}
    again = prepare(config_from_dict({"data": {"source": generated, **data}}).data, tmp_path / "synthetic")
    assert again["adapter"] == "synthetic" and again["rows_kept"] == summary["rows_kept"]
    assert again["split"] == summary["split"] and again["sparse_features"] == summary["sparse_features"]
    for split in ("train", "val", "test"):
        rows = pq.read_table(tmp_path / "study" / split)
        assert rows.num_rows > 0 and rows.equals(pq.read_table(tmp_path / "synthetic" / split))
    histories = pq.read_table(tmp_path / "synthetic/train").column("history").to_pylist()
    assert max(map(len, histories)) == 5  # history features work on generated data too
    schema = DatasetSchema.load(tmp_path / "synthetic")
    assert schema.vocab(tmp_path / "synthetic", "gender") == ["F", "M"]


def test_mmoe_label_correlation_rises_with_p():
    def label_corr(p):
        _, y = mmoe_arrays(
            SyntheticConfig(kind="mmoe", num_rows=20_000, input_dim=20, task_correlation=p, seed=1)
        )
        return np.corrcoef(y[:, 0], y[:, 1])[0, 1]

    correlations = [label_corr(p) for p in (0.0, 0.5, 0.9, 1.0)]
    assert abs(correlations[0]) < 0.05 and correlations[-1] > 0.95
    assert all(b > a + 0.15 for a, b in zip(correlations[:-1], correlations[1:], strict=True))


def test_mmoe_weights_have_the_requested_cosine():
    from engagerec.data.synthetic import mmoe_parameters

    params = mmoe_parameters(SyntheticConfig(kind="mmoe", input_dim=30, task_correlation=0.3))
    assert np.dot(params["w1"], params["w2"]) == pytest.approx(0.3)
    assert np.linalg.norm(params["w1"]) == pytest.approx(1) and np.linalg.norm(params["w2"]) == pytest.approx(
        1
    )


def test_mmoe_table_streams_in_chunks(tmp_path):
    cfg = SyntheticConfig(kind="mmoe", num_rows=4_000, input_dim=8, seed=3)
    write_mmoe_table(tmp_path, cfg, chunk_rows=1_500)
    meta = pq.ParquetFile(tmp_path / "interactions.parquet").metadata
    assert meta.num_rows == 4_000 and meta.num_row_groups == 3
    written = pq.read_table(tmp_path / "interactions.parquet").to_pandas()
    assert list(written.columns) == [f"x{i}" for i in range(8)] + ["y1", "y2"]
    x, y = mmoe_arrays(cfg, chunk_rows=1_500)
    assert np.array_equal(written.iloc[:, :8].to_numpy(), x) and np.array_equal(written[["y1", "y2"]], y)
    assert not list(tmp_path.glob(".*tmp"))


def test_mmoe_prepared_reads_back(tmp_path):
    """configs/synthetic_mmoe.yaml through prepare(): every generated row once, across the splits,
    its labels beside its own inputs (standardised with the train mean and std)."""
    cfg = synthetic_mmoe_config(
        tmp_path, num_rows=4_000, input_dim=8, overrides=["data.source.synthetic.seed=3"]
    )
    prepare(cfg.data, tmp_path)
    schema = DatasetSchema.load(tmp_path)
    assert schema.dense_names == [f"x{i}" for i in range(8)] and schema.sparse == []
    assert schema.label_names == ["y1", "y2"]
    mean = np.array([f.mean for f in schema.dense])
    std = np.array([f.std for f in schema.dense])
    full_x, full_y = mmoe_arrays(cfg.data.source.synthetic)
    index = {(a, b): i for i, (a, b) in enumerate(full_y.tolist())}
    assert len(index) == 4_000
    rows = []
    for split in ("train", "val", "test"):
        for batch in ShardReader(tmp_path, split, batch_size=512):
            x = batch.dense_features.numpy() * std + mean
            y = torch.stack([batch.labels["y1"], batch.labels["y2"]], dim=1).tolist()
            found = [index[tuple(pair)] for pair in y]
            assert np.allclose(x, full_x[found], atol=1e-4)
            rows += found
    assert sorted(rows) == list(range(4_000))
