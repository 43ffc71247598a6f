"""Adapters: KuaiRand's official file layout, the generic tables adapter with a column mapping."""

import shutil

import pandas as pd
from conftest import KUAIRAND

from engagerec.config import SourceConfig, config_from_dict
from engagerec.data.adapters import KUAIRAND_POST_EXPOSURE, load_tables
from engagerec.data.prepare import prepare


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


def test_kuairand_official_layout_reads_every_log_file_and_drops_leaks(tmp_path):
    data, sample = _official_layout(tmp_path)
    source = SourceConfig(
        adapter="kuairand",
        interactions=str(data),
        users=str(data / "user_features_pure.csv"),
        content=str(data / "video_features_basic_pure.csv"),
    )
    tables = load_tables(source)
    assert len(tables.interactions) == 200
    assert not (set(tables.interactions.columns) & KUAIRAND_POST_EXPOSURE)
    assert {"user_id", "content_id", "watch_time", "duration", "tab"} <= set(tables.interactions.columns)
    assert (tables.interactions["watch_time"].to_numpy() == sample["play_time_ms"].to_numpy()).all()
    # tag lists become the genres column; -124 (the dataset's missing marker) becomes missing
    assert "genres" in tables.content.columns and tables.content["genres"].astype(str).str.contains(",").any()
    assert not tables.users.isin([-124]).any().any()


def test_kuairand_official_layout_prepares_with_multi_hot_genres(tmp_path):
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


def test_tables_adapter_maps_column_names(tmp_path):
    pd.DataFrame(
        {"uid": [1, 1, 2], "item": [5, 6, 5], "secs": [3.0, 4.0, 5.0], "len": [10.0, 8.0, 10.0]}
    ).to_csv(tmp_path / "log.csv", index=False)
    source = SourceConfig(
        adapter="tables",
        interactions=str(tmp_path / "log.csv"),
        columns={"user_id": "uid", "content_id": "item", "watch_time": "secs", "duration": "len"},
    )
    frame = load_tables(source).interactions
    assert list(frame.columns) == ["user_id", "content_id", "watch_time", "duration"]
    assert frame["watch_time"].tolist() == [3.0, 4.0, 5.0]


def test_tab_separated_csv_is_detected(tmp_path):
    pd.DataFrame({"user_id": [1], "content_id": [2], "watch_time": [1.0]}).to_csv(
        tmp_path / "t.csv", sep="\t", index=False
    )
    frame = load_tables(SourceConfig(adapter="tables", interactions=str(tmp_path / "t.csv"))).interactions
    assert frame.shape == (1, 3)
