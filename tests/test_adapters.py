"""Adapters: KuaiRand's official file layout, the generic tables adapter with a column mapping."""

import shutil
from dataclasses import replace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import KUAIRAND
from engagerec.config import config_from_dict
from engagerec.data.adapters import KUAIRAND_POST_EXPOSURE
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.data.schema import DatasetSchema


def _official_layout(tmp_path):
    """The official layout: data/log_*.csv + user_features_pure.csv + video_features_basic_pure.csv.
    The log is the real 200-row KuaiRand-1K random-exposure sample, split in two files."""
    data = tmp_path / "data"
    data.mkdir()
    sample = pd.read_csv(KUAIRAND / "kuairand_sample.csv")
    log_columns = [
        "user_id",
        "video_id",
        "is_click",
        "play_time_ms",
        "duration_ms",
        "profile_stay_time",
        "comment_stay_time",
        "tab",
    ]
    sample[log_columns].iloc[:120].to_csv(data / "log_random_4_22_to_5_08_part1.csv", index=False)
    sample[log_columns].iloc[120:].to_csv(data / "log_random_4_22_to_5_08_part2.csv", index=False)
    shutil.copy(KUAIRAND / "user_features_pure.csv", data / "user_features_pure.csv")
    shutil.copy(KUAIRAND / "video_features_basic_pure.csv", data / "video_features_basic_pure.csv")
    return data, sample


def _prepare_official(data, out, features, **data_overrides):
    cfg = config_from_dict(
        {
            "data": {
                "source": {
                    "adapter": "kuairand",
                    "interactions": str(data),
                    "users": str(data / "user_features_pure.csv"),
                    "content": str(data / "video_features_basic_pure.csv"),
                    "unjoined_content": "keep",
                },
                "features": features,
                "filters": {"min_user_views": 0, "drop_zero_watch_time": False},
                "split": {"kind": "random", "test_fraction": 0.0, "val_fraction": 0.0},
                **data_overrides,
            }
        }
    )
    return prepare(cfg.data, out)


def test_kuairand_official_layout_reads_every_log_file_and_refuses_leaks(tmp_path):
    data, sample = _official_layout(tmp_path)
    features = [{"name": "user_id"}, {"name": "tab"}, {"name": "is_live_streamer"}]
    summary = _prepare_official(data, tmp_path / "out", features)
    assert summary["rows_read"] == 200  # both log files
    kept = sample[sample.duration_ms > 0]
    ratio = (kept.play_time_ms / kept.duration_ms).clip(upper=1.0)
    assert summary["all"]["labels"]["watch_ratio"]["mean"] == pytest.approx(ratio.mean(), rel=1e-9)
    schema = DatasetSchema.load(tmp_path / "out")
    assert not (set(schema.input_columns) & KUAIRAND_POST_EXPOSURE)
    # -124 (the dataset's missing marker) is missing, not a category
    assert -124 not in schema.vocab(tmp_path / "out", "is_live_streamer")
    for column in ("is_click", "play_time_ms", "profile_stay_time"):
        with pytest.raises(DataError, match="a label or a leak"):
            _prepare_official(data, tmp_path / "leak", [{"name": "user_id"}, {"name": column}])
    # ... but a post-exposure column may be a label
    summary = _prepare_official(
        data, tmp_path / "click", features, labels=[{"name": "click", "kind": "binary", "column": "is_click"}]
    )
    assert summary["all"]["labels"]["click"]["mean"] == pytest.approx(kept.is_click.mean(), rel=1e-9)


def test_kuairand_official_layout_prepares_with_multi_hot_genres_and_the_first_genre_alone(tmp_path):
    """genres is the video's whole tag list as one bag; first_genre (max_items: 1) the list's
    first tag only, with an id space of its own; max_items on another kind is refused."""
    data, _ = _official_layout(tmp_path)
    cfg = config_from_dict(
        {
            "data": {
                "source": {
                    "adapter": "kuairand",
                    "interactions": str(data / "log_*.csv"),
                    "users": str(data / "user_features_pure.csv"),
                    "content": str(data / "video_features_basic_pure.csv"),
                    "unjoined_content": "keep",
                },
                "features": [
                    {"name": "content_id"},
                    {"name": "tab"},
                    {"name": "genres", "kind": "multi_hot"},
                    {
                        "name": "first_genre",
                        "kind": "multi_hot",
                        "column": "genres",
                        "max_items": 1,
                        "id_space": "first_genre",
                    },
                    {"name": "duration", "kind": "numeric", "transform": "log1p"},
                ],
                "filters": {"min_user_views": 0},
            }
        }
    )
    summary = prepare(cfg.data, tmp_path / "out")
    assert summary["rows_read"] == 200
    assert summary["rows_kept"] + summary["rows_dropped"] == 200
    assert summary["sparse_features"]["genres"] > 2
    schema = DatasetSchema.load(tmp_path / "out")
    tags, firsts = (schema.vocab(tmp_path / "out", space) for space in ("genres", "first_genre"))
    train = pq.read_table(tmp_path / "out" / "train", columns=["genres", "first_genre"]).to_pydict()
    several = 0
    for bag, first in zip(train["genres"], train["first_genre"], strict=True):
        assert len(first) == min(len(bag), 1)  # (ids are vocabulary positions + 1)
        assert [firsts[i - 1] for i in first] == [tags[i - 1] for i in bag[:1]]
        several += len(bag) > 1
    assert several > 0 and len(firsts) < len(tags)  # later tags are in the bag, not in first_genre
    features = list(cfg.data.features)  # content_id, tab, genres, first_genre, duration
    refused = {
        1: (dict(max_items=1), r"\('tab'\): max_items 1 on a categorical feature"),
        2: (dict(max_items=-1), r"\('genres'\): max_items -1; expected max_items >= 1"),
        # in the bag's id space a shorter list would fit the vocabulary the bag reads
        3: (dict(id_space=None), r"\('first_genre'\) shares id space 'genres' with .* another max_items"),
    }
    for index, (change, message) in refused.items():
        cfg.data.features = [replace(f, **change) if i == index else f for i, f in enumerate(features)]
        with pytest.raises(DataError, match=message):
            prepare(cfg.data, tmp_path / "refused")


def _tables_config(path, **source):
    return config_from_dict(
        {
            "data": {
                "source": {"adapter": "tables", "interactions": str(path), **source},
                "features": [{"name": "user_id"}],
                "filters": {"min_user_views": 0},
                "split": {"kind": "random", "test_fraction": 0.0, "val_fraction": 0.0},
            }
        }
    )


def test_tables_adapter_maps_column_names(tmp_path):
    pd.DataFrame(
        {"uid": [1, 1, 2], "item": [5, 6, 5], "secs": [3.0, 4.0, 5.0], "len": [10.0, 8.0, 10.0]}
    ).to_csv(tmp_path / "log.csv", index=False)
    columns = {"user_id": "uid", "content_id": "item", "watch_time": "secs", "duration": "len"}
    summary = prepare(_tables_config(tmp_path / "log.csv", columns=columns).data, tmp_path / "out")
    assert summary["rows_kept"] == 3 and summary["all"]["users"] == 2 and summary["all"]["items"] == 2
    assert summary["all"]["labels"]["watch_ratio"]["mean"] == pytest.approx((0.3 + 0.5 + 0.5) / 3)


def test_tab_separated_csv_is_detected(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "content_id": [2, 3], "watch_time": [1.0, 2.0], "duration": 4.0}).to_csv(
        tmp_path / "t.csv", sep="\t", index=False
    )
    summary = prepare(_tables_config(tmp_path / "t.csv").data, tmp_path / "out")
    assert summary["rows_kept"] == 2 and summary["all"]["labels"]["watch_ratio"]["mean"] == pytest.approx(
        0.375
    )
