"""Inputs that once slipped through the writer: each gives the right rows or a clear error."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engagerec.config import config_from_dict
from engagerec.data.errors import DataError
from engagerec.data.prepare import format_summary, prepare
from engagerec.data.schema import DatasetSchema
from engagerec.data.shards import ShardWriter


def _log(n=12, **columns):
    frame = pd.DataFrame(
        {
            "user_id": [0] * n,
            "content_id": np.arange(n) % 3,
            "watch_time": np.linspace(1, 9, n),
            "duration": 10.0,
            "timestamp": np.arange(n),
        }
    )
    return frame.assign(**columns)


def _config(interactions, features=({"name": "content_id"},), **data):
    return config_from_dict(
        {
            "data": {
                "source": {"adapter": "tables", "interactions": str(interactions)},
                "features": list(features),
                "filters": {"min_user_views": 0, "drop_zero_watch_time": False},
                "split": {"kind": "temporal", "test_fraction": 0.25, "val_fraction": 0.0},
                **data,
            }
        }
    )


def test_a_label_may_not_take_a_feature_or_key_column_name(tmp_path):
    _log().to_csv(tmp_path / "log.csv", index=False)
    for name in ("duration", "content_id", "__split"):
        with pytest.raises(DataError, match="a label name of its own"):
            prepare(_config(tmp_path / "log.csv", labels=[{"name": name}]).data, tmp_path / "out")


def test_date_time_text_with_offsets_orders_views_in_utc_and_may_be_a_feature(tmp_path):
    # 00:30+02:00 is 22:30 UTC the day before: the earliest view, whatever the machine's zone
    times = [
        "2021-10-31 00:30:00+02:00",
        "2021-10-31 00:10:00Z",
        "2021-10-31 01:00:00Z",
        "2021-10-31 02:00:00Z",
    ]
    _log(4, timestamp=times, watch_time=[1.0, 2.0, 3.0, 4.0]).to_csv(tmp_path / "log.csv", index=False)
    features = [{"name": "when", "column": "timestamp", "kind": "numeric"}]
    prepare(_config(tmp_path / "log.csv", features).data, tmp_path / "out")
    test = pq.read_table(tmp_path / "out" / "test").to_pandas()
    assert test["watch_ratio"].tolist() == pytest.approx([0.4])  # the latest view, 02:00Z
    train = pq.read_table(tmp_path / "out" / "train").to_pandas()
    dense = DatasetSchema.load(tmp_path / "out").dense[0]
    first = train.loc[train["watch_ratio"].idxmin(), "when"] * dense.std + dense.mean
    assert first == pytest.approx(pd.Timestamp("2021-10-30 22:30:00Z").value // 10**6)


def test_nan_in_a_raw_label_is_a_missing_label(tmp_path):
    _log(long_view=[1, np.nan, 0, 1] * 3).to_csv(tmp_path / "log.csv", index=False)
    labels = [{"name": "watch_ratio"}, {"name": "lv", "kind": "binary", "column": "long_view"}]
    summary = prepare(_config(tmp_path / "log.csv", labels=labels).data, tmp_path / "out")
    assert summary["label_missing"] == {"watch_ratio": 0, "lv": 3}
    assert summary["all"]["labels"]["lv"]["mean"] == pytest.approx(6 / 9)
    assert "missing 3 (weight 0)" in format_summary(summary)


def test_shards_dictionary_encode_small_vocabularies_and_binary_labels_only(tmp_path):
    """A dictionary where it pays (few distinct values); plain values for the ids of a large table,
    dense features and regression labels, whose dictionaries cost time and bytes."""
    tags, words = ["a,b", "b"] * 6, [f"w{i},w{i + 12}" for i in range(12)]
    _log(long_view=[1, 0, 0, 1] * 3, creator=np.arange(12), tags=tags, words=words).to_csv(
        tmp_path / "log.csv", index=False
    )
    features = [
        {"name": "content_id"},
        {"name": "creator"},
        {"name": "tags", "kind": "multi_hot"},
        {"name": "words", "kind": "multi_hot"},
        {"name": "when", "column": "timestamp", "kind": "numeric"},
    ]
    labels = [{"name": "watch_ratio"}, {"name": "lv", "kind": "binary", "column": "long_view"}]
    # row groups of 8 rows: a table of up to 4 rows is small
    prepare(_config(tmp_path / "log.csv", features, labels=labels, row_group_size=8).data, tmp_path / "out")
    shard = pq.ParquetFile(next((tmp_path / "out" / "train").glob("*.parquet")))
    row_group = shard.metadata.row_group(0)
    dictionary = {
        row_group.column(i).path_in_schema: any("DICTIONARY" in e for e in row_group.column(i).encodings)
        for i in range(row_group.num_columns)
    }
    # content_id: 3 videos + the OOV row fit 4 rows, as do 2 tags; 9 training creators and 18
    # words do not (a list column's values are named by their path)
    assert dictionary == {
        "content_id": True,
        "creator": False,
        "tags.list.element": True,
        "words.list.element": False,
        "when": False,
        "watch_ratio": False,
        "lv": True,
    }


def test_the_shard_writer_refuses_dictionary_columns_it_does_not_write(tmp_path):
    # any list type's values are named by their path (pyarrow would ignore the bare name)
    table = pa.table({"x": [1, 2], "ids": pa.array([[1], [2, 3]], type=pa.large_list(pa.int32()))})
    writer = ShardWriter(tmp_path / "d", rows_per_file=10, row_group_size=10, dictionary=["ids"])
    writer.write(table)
    column = pq.ParquetFile(tmp_path / "d" / writer.close()[0]).metadata.row_group(0).column(1)
    assert column.path_in_schema == "ids.list.element" and any("DICTIONARY" in e for e in column.encodings)
    writer = ShardWriter(tmp_path / "a", rows_per_file=10, row_group_size=10, dictionary=["ids", "y"])
    with pytest.raises(ValueError, match="'y' is not among the columns written"):
        writer.write(table)
        writer.close()
    with pytest.raises(TypeError, match="not one string"):
        ShardWriter(tmp_path / "b", rows_per_file=10, row_group_size=10, dictionary="ids")
    with pytest.raises(ValueError, match="must be positive"):
        ShardWriter(tmp_path / "c", rows_per_file=0, row_group_size=10)


def test_nan_in_a_float_id_column_is_a_missing_id(tmp_path):
    _log(tab=[1.0, 2.0, np.nan] * 4).to_csv(tmp_path / "log.csv", index=False, na_rep="nan")
    prepare(_config(tmp_path / "log.csv", [{"name": "tab"}]).data, tmp_path / "out")
    assert DatasetSchema.load(tmp_path / "out").vocab(tmp_path / "out", "tab") == [1, 2]
    tabs = pq.read_table(tmp_path / "out" / "train").column("tab").to_numpy()
    assert (tabs == 0).sum() == 3  # the NaN rows of train: the OOV row


def test_files_of_one_table_must_agree(tmp_path):
    _log().drop(columns=["duration"]).to_csv(tmp_path / "log_1.csv", index=False)
    _log().to_csv(tmp_path / "log_2.csv", index=False)
    cfg = _config(tmp_path / "log_*.csv")
    with pytest.raises(DataError) as caught:
        prepare(cfg.data, tmp_path / "out")
    assert "log_1.csv" in str(caught.value) or "log_2.csv" in str(caught.value)
    assert "duration" in str(caught.value) and "same columns" in str(caught.value)


def test_a_later_file_is_read_with_the_first_files_types(tmp_path):
    _log().to_csv(tmp_path / "log_1.csv", index=False)
    _log(content_id=[1.5] * 12).to_csv(tmp_path / "log_2.csv", index=False)  # ids were integers
    cfg = _config(tmp_path / "log_*.csv")
    with pytest.raises(DataError) as caught:
        prepare(cfg.data, tmp_path / "out")
    assert "log_2.csv" in str(caught.value) and "row 0 (line 2)" in str(caught.value)


def test_numbers_stored_as_text_in_parquet(tmp_path):
    frame = _log().astype({"watch_time": str})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "log.parquet")
    summary = prepare(_config(tmp_path / "log.parquet").data, tmp_path / "ok")
    assert summary["all"]["labels"]["watch_ratio"]["mean"] == pytest.approx(0.5)
    frame.loc[7, "watch_time"] = "seven"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "log.parquet")
    with pytest.raises(DataError) as caught:
        prepare(_config(tmp_path / "log.parquet").data, tmp_path / "bad")
    assert (
        "log.parquet" in str(caught.value) and "row 7" in str(caught.value) and "seven" in str(caught.value)
    )


def test_a_split_seed_out_of_range_is_refused(tmp_path):
    _log().to_csv(tmp_path / "log.csv", index=False)
    cfg = _config(tmp_path / "log.csv", split={"kind": "random", "seed": 2**40})
    with pytest.raises(DataError, match="seed"):
        prepare(cfg.data, tmp_path / "out")


def test_an_auto_memory_limit_follows_the_source_files_bytes_and_is_recorded(tmp_path):
    """data.memory_limit: auto resolves from the source files' bytes (at least 1 GB for small
    data); a size given passes through; schema.json's summary and the printed one say which."""
    from conftest import prepare_synthetic
    from engagerec.data.tables import resolve_memory_limit

    auto = DatasetSchema.load(prepare_synthetic(tmp_path / "auto")).meta["summary"]
    assert auto["memory_limit"] == "1000MB"
    assert "DuckDB memory limit: 1000MB" in format_summary(auto)
    given = DatasetSchema.load(prepare_synthetic(tmp_path / "given", memory_limit="700MB"))
    assert given.meta["summary"]["memory_limit"] == "700MB"
    # larger sources get more, up to half the machine
    assert resolve_memory_limit("auto", 5 * 10**9, 64 * 10**9) == "3000MB"
    assert resolve_memory_limit("auto", 5 * 10**9, 4 * 10**9) == "2000MB"
