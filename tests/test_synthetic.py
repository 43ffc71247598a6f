"""The generators are deterministic by seed and carry the signal they claim to plant."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from engagerec.config import DataConfig, SyntheticConfig, config_from_dict
from engagerec.data.reader import ShardReader
from engagerec.data.synthetic import (
    mmoe_arrays,
    study_tables,
    study_world,
    write_mmoe_prepared,
    write_study_tables,
)


def test_study_generator_is_deterministic_by_seed():
    cfg = SyntheticConfig(num_rows=3_000, num_users=100, num_contents=50, seed=5)
    a, b = study_tables(cfg, chunk_rows=1_000), study_tables(cfg, chunk_rows=1_000)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.content, b.content)
    c = study_tables(
        SyntheticConfig(num_rows=3_000, num_users=100, num_contents=50, seed=6), chunk_rows=1_000
    )
    assert not a.interactions["watch_time"].equals(c.interactions["watch_time"])


def test_study_generator_plants_duration_and_genre_signal():
    cfg = SyntheticConfig(num_rows=60_000, num_users=200, num_contents=300, noise=0.3, seed=0)
    world = study_world(cfg)
    tables = study_tables(cfg)
    events = tables.interactions.merge(world.content, on="content_id")
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
    pd.testing.assert_frame_equal(written, study_tables(cfg, chunk_rows=10_000).interactions, check_like=True)
    assert not list(tmp_path.glob(".*tmp"))


def test_study_tables_prepare_through_the_study_adapter(tmp_path):
    from engagerec.data.prepare import prepare

    write_study_tables(tmp_path / "raw", SyntheticConfig(num_rows=5_000, num_users=100, num_contents=80))
    cfg = config_from_dict(
        {
            "data": {
                "source": {
                    "adapter": "study",
                    "interactions": str(tmp_path / "raw/interactions.parquet"),
                    "users": str(tmp_path / "raw/users.parquet"),
                    "content": str(tmp_path / "raw/content.parquet"),
                },
                "features": [
                    {"name": "user_id"},
                    {"name": "gender"},
                    {"name": "genres", "kind": "multi_hot"},
                    {"name": "age", "kind": "numeric"},
                    {"name": "rating", "kind": "numeric"},
                ],
            }
        }
    )
    summary = prepare(cfg.data, tmp_path / "prepared")
    assert summary["rows_read"] == 5_000 and summary["rows_kept"] > 4_000
    assert summary["sparse_features"]["gender"] == 3  # F, M and the OOV row


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


def test_mmoe_prepared_reads_back(tmp_path):
    cfg = SyntheticConfig(kind="mmoe", num_rows=4_000, input_dim=8, seed=3)
    write_mmoe_prepared(tmp_path, cfg, DataConfig(), chunk_rows=1_500)
    reader = ShardReader(tmp_path, "train", batch_size=512)
    x = np.concatenate([b.dense_features.numpy() for b in reader])
    sizes = sum(ShardReader(tmp_path, s).total_rows for s in ("train", "val", "test"))
    assert sizes == 4_000 and x.shape[1] == 8
    full_x, full_y = mmoe_arrays(cfg, chunk_rows=1_500)
    # train rows are a subset of the generated rows, labels attached to the right x
    y1 = np.concatenate([b.labels["y1"].numpy() for b in reader])
    index = {tuple(np.round(r, 5)): i for i, r in enumerate(full_x)}
    rows = [index[tuple(np.round(r, 5))] for r in x]
    assert np.allclose(full_y[rows, 0], y1, atol=1e-6)
