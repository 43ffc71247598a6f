"""engagerec predict: scores equal evaluation's, raw rows are encoded exactly as prepare encoded
them, new ids are counted, and schema drift is a clear error."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from conftest import torchrun
from engagerec.cli import main
from engagerec.config import load_config
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.data.schema import DatasetSchema
from engagerec.data.scoring import encode_for_scoring
from engagerec.predict import predict
from engagerec.runs import evaluate_run

# the configs and the raw rows these tests score name the bundled files relative to the repository
pytestmark = pytest.mark.usefixtures("in_repo")

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "datasets" / "kuairand" / "processed_standard_kcore_15.csv"


def _read_log():
    return pd.read_csv(LOG, sep="\t")  # KuaiRand's logs are tab-separated


def test_predictions_on_the_prepared_test_split_give_evaluates_metrics(kuairand_run, tmp_path):
    run, data_dir = kuairand_run
    summary = predict(run, data_dir, tmp_path / "preds.parquet")
    preds = pq.read_table(tmp_path / "preds.parquet").to_pandas()
    labels = ds.dataset(data_dir / "test").to_table(columns=["watch_ratio", "skip"]).to_pandas()
    metrics = evaluate_run(run, "test")
    assert summary["rows_scored"] == len(preds) == len(labels) == metrics["rows"]
    assert list(preds.columns) == [
        "row",
        "user_id_index",  # a prepared split holds encoded ids: the embedding rows
        "content_id_index",
        "watch_ratio",
        "skip_probability",
        "skip_flag",
    ]
    assert (preds["row"] == np.arange(len(preds))).all()
    mse = float(((preds["watch_ratio"] - labels["watch_ratio"]) ** 2).mean())
    assert mse == pytest.approx(metrics["watch_ratio/mse"], rel=1e-5)
    assert roc_auc_score(labels["skip"], preds["skip_probability"]) == pytest.approx(
        metrics["skip/auc"], rel=1e-4
    )
    assert (preds["skip_flag"] == (preds["skip_probability"] >= 0.5)).all()


def _kept_rows(directory, splits, unordered=()):
    """Every encoded row of ``splits``, features and labels, in one canonical order (by every
    column but ``unordered``), with the split each came from."""
    frames = [ds.dataset(Path(directory) / s).to_table().to_pandas().assign(split=s) for s in splits]
    frame = pd.concat(frames, ignore_index=True)
    for column in frame.columns:
        if frame[column].dtype == object:  # id lists (history, genres) compare as tuples
            frame[column] = frame[column].map(tuple)
    floats = [c for c in frame.columns if frame[c].dtype.kind == "f"]
    key = frame.assign(**{c: frame[c].round(4) for c in floats})
    order = [c for c in frame.columns if c not in unordered and c != "split"]
    return frame.loc[key.sort_values(order).index].reset_index(drop=True)


def test_raw_rows_are_encoded_exactly_as_prepare_encoded_them(tmp_path):
    """Scoring the very rows a run was prepared from reproduces prepare's encoding of every row:
    vocabularies, OOV, hashing-free lookups, buckets, normalisation, histories, labels."""
    log = _read_log()
    log = log[log["duration_ms"] > 0]  # rows prepare keeps (scoring keeps the others, unlabelled)
    path = tmp_path / "log.csv"
    log.to_csv(sep="\t", path_or_buf=path, index=False)
    cfg = load_config(
        REPO / "configs" / "kuairand_random.yaml",
        [f"data.source.interactions={path}", "data.filters.min_user_views=0"],
    )
    prepare(cfg.data, tmp_path / "prepared")
    summary = encode_for_scoring(cfg.data, tmp_path / "prepared", str(path), tmp_path / "scored")
    assert summary["rows_read"] == summary["rows_scored"] == len(log)
    assert sum(summary["unseen_ids"].values()) > 0  # val and test rows hold ids train never saw
    # id statistics: prepare cross-fits training rows; a scored row is never a training row
    stats = set(json.loads((tmp_path / "prepared" / "schema.json").read_text())["target_stats"])
    assert stats
    fitted = _kept_rows(tmp_path / "prepared", ["train", "val", "test"], unordered=stats)
    scored = _kept_rows(tmp_path / "scored", ["test"], unordered=stats)
    assert list(fitted.columns) == list(scored.columns) and len(fitted) == len(scored)
    held_out = (fitted.split != "train").to_numpy()
    for column in fitted.columns.drop("split"):
        rows = held_out if column in stats else slice(None)
        if fitted[column].dtype.kind == "f":
            np.testing.assert_allclose(
                scored[column][rows], fitted[column][rows], rtol=1e-5, atol=1e-6, err_msg=column
            )
        else:
            assert (scored[column][rows] == fitted[column][rows]).all(), column


def test_new_ids_go_to_the_oov_row_and_are_counted(kuairand_run, tmp_path):
    run, data_dir = kuairand_run
    log = _read_log().head(300)
    known = tmp_path / "known.csv"
    log.to_csv(sep="\t", path_or_buf=known, index=False)
    before = predict(run, known, tmp_path / "known.parquet")
    changed = log.copy()
    changed.loc[:49, "video_id"] = np.arange(50) + 10**9  # 50 videos nobody has seen
    new = tmp_path / "new.csv"
    changed.to_csv(sep="\t", path_or_buf=new, index=False)
    after = predict(run, new, tmp_path / "new.parquet")
    assert after["rows_scored"] == before["rows_scored"] == 300  # new ids are scored, not dropped
    vocabulary = set(DatasetSchema.load(data_dir).vocab(data_dir, "content_id"))
    was_known = int(log["video_id"][:50].isin(vocabulary).sum())
    assert after["unseen_ids"]["content_id"] == before["unseen_ids"]["content_id"] + was_known
    scored = pq.read_table(tmp_path / "new.parquet").to_pandas()
    assert (scored["row"] == np.arange(300)).all() and (
        scored["content_id"][:50] == changed["video_id"][:50]
    ).all()
    assert scored["watch_ratio"].between(0, 1).all()


def test_schema_drift_is_a_clear_error_naming_file_and_column(kuairand_run, tmp_path):
    run, _ = kuairand_run
    log = _read_log().head(100)
    missing = tmp_path / "missing.csv"
    log.drop(columns=["hourmin"]).to_csv(sep="\t", path_or_buf=missing, index=False)
    with pytest.raises(
        DataError,
        match=r"missing.csv.*column 'hour': a feature column of the trained model is missing from the input",
    ):
        predict(run, missing, tmp_path / "p.parquet")
    retyped = tmp_path / "retyped.csv"
    log.assign(user_id="u" + log["user_id"].astype(str)).to_csv(sep="\t", path_or_buf=retyped, index=False)
    with pytest.raises(
        DataError,
        match=r"retyped.csv, column 'user_id': the column's type changed since training; expected number",
    ):
        predict(run, retyped, tmp_path / "p.parquet")
    assert not list(tmp_path.glob(".p-*"))  # the scratch directory is gone after an error


def test_predict_command_prints_what_it_counted(kuairand_run, tmp_path, capsys):
    run, _ = kuairand_run
    log = _read_log().head(200)
    log.loc[:9, "duration_ms"] = 0  # no label can be derived: kept and scored, counted
    path = tmp_path / "log.csv"
    log.to_csv(sep="\t", path_or_buf=path, index=False)
    out = tmp_path / "p.parquet"
    assert main(["predict", "--run-dir", str(run), "--input", str(path), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"rows scored +200\n", said)
    zero = int((log["duration_ms"] <= 0).sum())  # the 10 set here, and any the sample had
    assert zero >= 10 and re.search(
        rf"zero or negative duration \(kept, derived labels missing\) +{zero}\n", said
    )
    assert pq.read_table(out).num_rows == 200
    assert (
        main(["predict", "--run-dir", str(run), "--input", str(path), "--out", str(tmp_path / "p.csv")]) == 2
    )
    assert "predictions are written as parquet" in capsys.readouterr().err
    assert main(["predict", "--run-dir", str(tmp_path), "--input", str(path), "--out", str(out)]) == 2
    assert "is no run directory" in capsys.readouterr().err


def test_a_prepared_input_encoded_differently_is_refused(kuairand_run, tmp_path):
    run, data_dir = kuairand_run
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    schema = json.loads((other / "schema.json").read_text())
    schema["vocab_sizes"]["user_id"] += 1  # e.g. prepared from other rows: another vocabulary
    (other / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(DataError, match="this prepared data is encoded differently from the run's"):
        predict(run, other, tmp_path / "p.parquet")


def test_rows_without_a_watch_time_column_are_scored_and_counted(kuairand_run, tmp_path):
    """Rows to score usually have no outcome yet: no watch time, so no derived label."""
    run, _ = kuairand_run
    log = _read_log().head(150).drop(columns=["play_time_ms"])
    path = tmp_path / "unwatched.csv"
    log.to_csv(sep="\t", path_or_buf=path, index=False)
    summary = predict(run, path, tmp_path / "p.parquet")
    assert summary["rows_scored"] == 150
    assert summary["counted_not_dropped"]["no watch time column (kept, derived labels missing)"] == 150
    assert pq.read_table(tmp_path / "p.parquet").column("skip_probability").null_count == 0


@pytest.fixture(scope="module")
def two_runs(kuairand_run, tmp_path_factory):
    """The kuairand run and the same config trained with seed 1: two members of an ensemble."""
    import dataclasses

    from engagerec.runs import run_config
    from engagerec.train import train

    run, _ = kuairand_run
    cfg = run_config(run)
    other = tmp_path_factory.mktemp("seed1") / "run"
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1)), other)
    return run, other


@pytest.mark.slow
def test_several_runs_predict_the_mean_of_their_predictions(two_runs, tmp_path, capsys):
    """--run-dir twice: each prediction is the two runs' mean, each flag the mean's, rows and
    ids as one run gives them; bad outputs and runs of other tasks are refused before scoring."""
    import dataclasses

    from engagerec.config import TaskConfig
    from engagerec.runs import run_config
    from engagerec.train import train

    run, other = two_runs
    path = tmp_path / "log.csv"
    _read_log().head(300).to_csv(sep="\t", path_or_buf=path, index=False)
    singles = []
    for i, directory in enumerate((run, other)):
        predict(directory, path, tmp_path / f"one{i}.parquet", threshold=0.4)
        singles.append(pq.read_table(tmp_path / f"one{i}.parquet"))
    out = tmp_path / "mean.parquet"
    argv = ["predict", "--run-dir", str(run), "--run-dir", str(other), "--input", str(path)]
    assert main(argv + ["--out", str(out), "--threshold", "0.4"]) == 0
    assert "the mean of 2 runs" in capsys.readouterr().out
    table = pq.read_table(out)
    assert table.schema == singles[0].schema  # the same columns and types (float32, bool)
    mean, one, two = table.to_pandas(), singles[0].to_pandas(), singles[1].to_pandas()
    assert mean[["row", "user_id", "content_id"]].equals(one[["row", "user_id", "content_id"]])
    assert list(mean["row"]) == list(range(300))
    assert not np.allclose(one["watch_ratio"], two["watch_ratio"])  # two different models
    for column in ("watch_ratio", "skip_probability"):
        np.testing.assert_allclose(mean[column], (one[column] + two[column]) / 2, rtol=1e-6)
    assert (mean["skip_flag"] == (mean["skip_probability"] >= 0.4)).all()
    assert {p.name for p in tmp_path.glob(".*")} == set()  # no scratch file or directory left

    assert main(argv + ["--out", str(tmp_path / "p.csv")]) == 2
    assert "predictions are written as parquet" in capsys.readouterr().err
    cfg = run_config(run)
    watch_only = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, tasks=[TaskConfig("watch_ratio", "watch_ratio")])
    )
    train(watch_only, tmp_path / "watch_only")
    assert main(argv + ["--run-dir", str(tmp_path / "watch_only"), "--out", str(out)]) == 2
    assert "the runs predict different tasks" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_average_what_one_process_averages(two_runs, tmp_path):
    """Several runs under torchrun: one process group for all of them, the same output, row by
    row. (One run is the same path: ``engagerec predict`` always averages, here over one.)"""
    from engagerec.predict import predict_mean

    path = tmp_path / "log.csv"
    _read_log().head(2000).to_csv(sep="\t", path_or_buf=path, index=False)
    predict_mean(list(two_runs), path, tmp_path / "one.parquet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [arg for run in two_runs for arg in ("--run-dir", str(run))]
    done = subprocess.run(
        [*torchrun(2), "-m", "engagerec", "predict", *runs, "--input", str(path),
         "--out", str(tmp_path / "two.parquet"), "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (pq.read_table(tmp_path / f"{n}.parquet").to_pandas() for n in ("one", "two"))
    assert len(one) == len(two) == 2000 == json.loads(done.stdout[done.stdout.index("{") :])["rows_scored"]
    keys = ["row", "user_id", "content_id", "skip_flag"]
    assert (one[keys] == two[keys]).all().all()
    np.testing.assert_allclose(two["watch_ratio"], one["watch_ratio"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two["skip_probability"], one["skip_probability"], rtol=1e-5, atol=1e-6)
    assert {p.name for p in tmp_path.glob(".*")} == set()
