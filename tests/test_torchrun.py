"""Real multi-process runs: torchrun with 2 gloo ranks on CPU."""

import csv
import json
import os
import subprocess

import pytest
from conftest import EQUAL_METRICS, torchrun, write_study_config

from engagerec.runs import evaluate_run

pytestmark = pytest.mark.slow


def _torchrun(nproc, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun(nproc), "-m", "engagerec", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _write_config(path, data_dir, **train):
    return write_study_config(path, data_dir, sharding={"*": ["table_wise"]}, **train)


def test_two_gloo_ranks_shard_tables_train_and_evaluate_like_one(study_data, tmp_path):
    config = _write_config(tmp_path / "run.yaml", study_data)
    run = tmp_path / "run"
    _torchrun(2, "train", "--config", str(config), "--out", str(run), cwd=tmp_path)

    plan = json.loads((run / "plan.json").read_text())
    assert {tuple(t["ranks"]) for t in plan.values()} == {(0,), (1,)}  # tables placed on both ranks
    rows = [r for r in csv.DictReader(open(run / "log.csv")) if r["phase"] == "train"]
    assert float(rows[-1]["skip/loss"]) < float(rows[0]["skip/loss"])  # the loss fell
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["skip/auc"] > 0.7

    # the same checkpoint evaluated on 2 ranks and on 1 rank: the same metrics
    two = tmp_path / "two.json"
    _torchrun(2, "evaluate", "--run-dir", str(run), "--json-out", str(two), cwd=tmp_path)
    two, one = json.loads(two.read_text()), evaluate_run(run, "test")  # 1 rank: in this process
    assert one["rows"] == two["rows"] == results["test"]["rows"]
    for key in EQUAL_METRICS:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key  # float32 AUC sums
        assert two[key] == pytest.approx(results["test"][key], rel=1e-5, abs=1e-5), key

    # its tables, sharded over 2 ranks, gathered into one exported program: the same test metrics
    from engagerec.export import export_run

    exported = export_run(run, tmp_path / "export")["programs"]["fp32"]["test"]
    assert exported["rows"] == results["test"]["rows"]
    assert exported["watch_ratio/mse"] == pytest.approx(results["test"]["watch_ratio/mse"], rel=1e-5)
    assert exported["skip/auc"] == pytest.approx(results["test"]["skip/auc"], rel=1e-4)


def test_column_wise_sharding_splits_every_table_over_two_ranks(study_data, tmp_path):
    """Column-wise constraints give every rank half of each table's columns (the per-rank table
    memory halves), and the sharded model trains and evaluates like the 2-rank table-wise one."""
    config = write_study_config(tmp_path / "cw.yaml", study_data, sharding={"*": ["column_wise"]}, epochs=1)
    run = tmp_path / "run"
    _torchrun(2, "train", "--config", str(config), "--out", str(run), cwd=tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    assert all(t["sharding_type"] == "column_wise" and sorted(t["ranks"]) == [0, 1] for t in plan.values())
    one = evaluate_run(run, "test")  # 1 rank: in this process
    results = json.loads((run / "results.json").read_text())
    for key in EQUAL_METRICS:  # resharded from 2 column-wise ranks onto 1: the same model
        assert one[key] == pytest.approx(results["test"][key], rel=1e-5, abs=1e-5), key


def test_resume_on_another_world_size_is_refused_mid_epoch_and_reshards_at_an_epoch_end(
    study_data, tmp_path, capsys
):
    from engagerec.cli import main

    def config(name, **train):
        return str(_write_config(tmp_path / f"{name}.yaml", study_data, **train))

    run = tmp_path / "run"
    _torchrun(2, "train", "--config", config("stop", max_steps=5), "--out", str(run), cwd=tmp_path)
    # 1 rank: this process, as `engagerec train` without torchrun
    assert main(["train", "--config", config("one"), "--out", str(run)]) == 2
    assert (
        "stopped mid-epoch (batch 5 of epoch 0, 2,560 samples) on 2 rank(s); on 1 rank(s)"
        in capsys.readouterr().err
    )
    # the same run finishes its first epoch on 2 ranks, then goes on on 1: the tables reshard
    _torchrun(2, "train", "--config", config("epoch", epochs=1), "--out", str(run), cwd=tmp_path)
    assert main(["train", "--config", config("more", epochs=2), "--out", str(run)]) == 0
    assert "resumed from" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 1 and len(results["history"]) == 2 and results["test"]["skip/auc"] > 0.7
