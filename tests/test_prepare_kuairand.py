"""prepare() on the real bundled KuaiRand subset."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import KUAIRAND

from engagerec.config import load_config
from engagerec.data.adapters import KUAIRAND_POST_EXPOSURE
from engagerec.data.prepare import format_summary, prepare
from engagerec.data.schema import DatasetSchema


def _raw_log():
    log = pd.read_csv(KUAIRAND / "processed_standard_kcore_15.csv", sep="\t")
    return log


def test_summary_counts_every_row(kuairand_random):
    _, summary, _ = kuairand_random
    log = _raw_log()
    assert summary["rows_read"] == len(log) == 41_828
    assert summary["dropped"]["zero or negative duration"] == int((log.duration_ms <= 0).sum()) == 7_738
    assert summary["rows_read"] - summary["rows_dropped"] == summary["rows_kept"]
    split = summary["split"]
    assert split["train"]["rows"] + split["val"]["rows"] + split["test"]["rows"] == summary["rows_kept"]
    # zero play time is a real skip in this config: kept and counted, not dropped
    assert summary["counted_not_dropped"]["zero watch time (kept: ratio 0, a skip)"] == int(
        ((log.play_time_ms == 0) & (log.duration_ms > 0)).sum()
    )
    text = format_summary(summary)
    assert "rows read" in text and "skip rate" in text and "zero or negative duration" in text


def test_labels_match_the_definition(kuairand_random):
    out, summary, cfg = kuairand_random
    log = _raw_log()
    log = log[log.duration_ms > 0]
    ratio = np.minimum(log.play_time_ms / log.duration_ms, cfg.data.labels.ratio_cap)
    views = log.groupby("user_id").user_id.transform("size")
    kept = ratio[views > cfg.data.filters.min_user_views]
    assert summary["all"]["mean_watch_ratio"] == pytest.approx(kept.mean(), rel=1e-9)
    assert summary["all"]["skip_rate"] == pytest.approx((kept < 0.5).mean(), rel=1e-9)
    table = pq.read_table(out / "test").to_pandas()
    assert set(np.unique(table["skip"])) <= {0.0, 1.0}
    assert ((table["skip"] == 1) == (table["watch_ratio"] < 0.5)).all()
    assert table["watch_ratio"].between(0, 1).all()


def test_no_post_exposure_column_is_a_feature(kuairand_random):
    out, _, _ = kuairand_random
    schema = DatasetSchema.load(out)
    assert not (set(schema.input_columns) & KUAIRAND_POST_EXPOSURE)
    columns = set(pq.read_schema(next((out / "train").glob("*.parquet"))).names)
    assert not (columns & KUAIRAND_POST_EXPOSURE)


def test_vocabulary_is_fitted_on_train_only(kuairand_random):
    out, _, _ = kuairand_random
    schema = DatasetSchema.load(out)
    train = pq.read_table(out / "train").to_pandas()
    test = pq.read_table(out / "test").to_pandas()
    # every known content id was seen in train; ids only in test fall to row 0
    assert set(train["content_id"]) - {0} == set(range(1, schema.num_embeddings("content_id")))
    assert (test["content_id"] == 0).sum() > 0
    # normalisation statistics are train's: standardised train columns have mean 0, std 1
    assert abs(train["duration"].mean()) < 1e-3 and train["duration"].std(ddof=0) == pytest.approx(
        1, abs=1e-3
    )
    # history shares the content id space (one table)
    history_space = next(f.id_space for f in schema.sparse if f.name == "history")
    assert history_space == "content_id"


def test_temporal_split_puts_the_latest_rows_in_test(repo, tmp_path):
    cfg = load_config(repo / "configs" / "kuairand_temporal.yaml")
    summary = prepare(cfg.data, tmp_path)
    assert summary["split"]["kind"] == "temporal"
    assert summary["split"]["test"]["rows"] == round(summary["rows_kept"] * 0.3)


def test_schema_json_is_self_describing(kuairand_random):
    out, _, _ = kuairand_random
    raw = json.loads((out / "schema.json").read_text())
    assert raw["version"] == 1
    assert raw["meta"]["splits"]["train"]["files"] == ["part-00000.parquet"]
    assert raw["labels"] == [
        {"name": "watch_ratio", "kind": "regression"},
        {"name": "skip", "kind": "binary"},
    ]
