"""A warm start (train.init_from / --init-from): another run's model and optimiser state as the
starting point, checked first, resharded onto any plan and world size, grown tables included."""

import dataclasses
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import EQUAL_METRICS, REPO, torchrun
from engagerec.config import TowerConfig
from engagerec.errors import ConfigError
from engagerec.runs import open_run, run_config
from engagerec.train import train

EMBEDDINGS = "sparse_arch.embedding_bags.t_content_id.weight"


def _frozen(run, **train_changes):
    """The run's config, warm-started from it with learning rates of 0: training changes nothing,
    so the new run's model is exactly what it loaded."""
    cfg = run_config(run)
    changes = {
        "init_from": str(run),
        "dense_lr": 0.0,
        "sparse_lr": 0.0,
        "progress_bar": False,
        **train_changes,
    }
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def _rewrite_manifest(data_dir):
    """A prepared directory's manifest, written again after a test changed its files."""
    from engagerec.data.manifest import read_manifest, write_manifest

    rows = {name: entry["rows"] for name, entry in read_manifest(data_dir).items() if "rows" in entry}
    (data_dir / "manifest.json").unlink()
    write_manifest(data_dir, rows)


def _grown_copy(data_dir, out):
    """``data_dir`` with one new id appended to the content vocabulary (its table grows by a row),
    the manifest rewritten: what a preparation against a base with one new video gives."""
    shutil.copytree(data_dir, out)
    vocab = out / "vocabs" / "content_id.parquet"
    tokens = pq.read_table(vocab)
    new = pa.table([pa.array([10**12], type=tokens.schema.field(0).type)], schema=tokens.schema)
    pq.write_table(pa.concat_tables([tokens, new]), vocab)
    schema = json.loads((out / "schema.json").read_text())
    schema["vocab_sizes"]["content_id"] += 1
    (out / "schema.json").write_text(json.dumps(schema))
    _rewrite_manifest(out)
    return out


def test_a_warm_start_loads_every_tensor_and_resharded_scores_as_the_run_it_came_from(kuairand_run, tmp_path):
    """At learning rate 0 a warm start's test metrics are its source's, exactly: every table,
    tower and head tensor was loaded (a fresh start scores otherwise). Its results name the
    checkpoint, and a run that resumes ignores init_from."""
    run, _ = kuairand_run
    source = json.loads((run / "results.json").read_text())
    warm = train(_frozen(run), tmp_path / "warm")
    assert warm["init_from"]["checkpoint"].endswith(f"best-step-{source['steps']}")
    assert warm["init_from"]["grown"] == {}
    for key in EQUAL_METRICS:
        assert warm["test"][key] == pytest.approx(source["test"][key], rel=1e-6, abs=1e-7), key
    cold = _frozen(run)
    fresh = train(
        dataclasses.replace(cold, train=dataclasses.replace(cold.train, init_from=None)), tmp_path / "fresh"
    )
    assert fresh["test"]["watch_ratio/mse"] != pytest.approx(source["test"]["watch_ratio/mse"], rel=1e-3)


def test_a_grown_table_keeps_the_saved_rows_and_a_fresh_new_row(kuairand_run, tmp_path, capsys):
    """A content vocabulary with one id appended: the table's first rows are the source's, its
    new row is a fresh start's; the run says what grew."""
    run, data_dir = kuairand_run
    grown_data = _grown_copy(data_dir, tmp_path / "grown_data")
    cfg = _frozen(run, data_dir=str(grown_data), epochs=1)
    warm = train(cfg, tmp_path / "warm")
    rows = warm["init_from"]["grown"]["t_content_id"]
    assert rows[1] == rows[0] + 1
    assert f"t_content_id {rows[0]:,} -> {rows[1]:,} rows" in capsys.readouterr().out
    fresh = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None, max_steps=1))
    train(fresh, tmp_path / "fresh")  # the fresh initialisation of the grown table (seeded)

    def table(run_dir, name="latest"):
        with open_run(run_dir, name, device="cpu") as opened:
            return opened.dmp.module.state_dict()[EMBEDDINGS].local_shards()[0].tensor.clone()

    saved, loaded, initial = table(run, "best"), table(tmp_path / "warm"), table(tmp_path / "fresh")
    assert torch.equal(loaded[: rows[0]], saved)
    assert torch.equal(loaded[rows[0] :], initial[rows[0] :])


def test_a_warm_start_from_another_model_or_moved_ids_is_refused_naming_why(kuairand_run, tmp_path, capsys):
    """Another tower, or a vocabulary whose ids moved: a ConfigError naming the difference, and
    nothing trained or written."""
    run, data_dir = kuairand_run
    cfg = _frozen(run)
    other = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, tower=TowerConfig(name="cross_stitch"))
    )
    with pytest.raises(ConfigError, match=r"model\.tower\.name: '\w+' -> 'cross_stitch'"):
        train(other, tmp_path / "other")
    assert not (tmp_path / "other" / "checkpoints").exists() or not any(
        (tmp_path / "other" / "checkpoints").iterdir()
    )

    # the command line's --init-from: a directory without checkpoints is refused in one line
    import yaml

    from engagerec.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(json.loads((run / "config.json").read_text())))
    (tmp_path / "empty").mkdir()
    argv = [
        "train",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "cli"),
        "--init-from",
        str(tmp_path / "empty"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "engagerec train: error: train.init_from" in err and "no checkpoint that checks out" in err

    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    vocab = moved / "vocabs" / "content_id.parquet"
    tokens = pq.read_table(vocab)
    pq.write_table(
        tokens.take(pa.array([1, 0] + list(range(2, tokens.num_rows)))), vocab
    )  # two ids swap rows
    _rewrite_manifest(moved)
    with pytest.raises(
        ConfigError, match=r"id space 'content_id': row 1 holds id .* a warm start needs each"
    ):
        train(_frozen(run, data_dir=str(moved)), tmp_path / "moved_run")


@pytest.mark.slow
def test_two_ranks_warm_start_a_grown_table_as_one_rank_does(kuairand_run, tmp_path):
    """The grown table split by columns over 2 ranks: each rank loads its columns of the saved
    rows; the test metrics equal one rank's warm start."""
    import os
    import subprocess

    import yaml

    run, data_dir = kuairand_run
    grown_data = _grown_copy(data_dir, tmp_path / "grown_data")
    one = train(_frozen(run, data_dir=str(grown_data)), tmp_path / "one")
    config = json.loads((run / "config.json").read_text())
    config["train"].update(
        init_from=str(run), dense_lr=0.0, sparse_lr=0.0, progress_bar=False, data_dir=str(grown_data),
        sharding={"content_id": ["column_wise"]},
    )  # fmt: skip
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*torchrun(2), "-m", "engagerec", "train", "--config", str(path), "--out", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["init_from"]["grown"] == one["init_from"]["grown"]
    assert "column_wise" in (tmp_path / "two" / "plan.json").read_text()
    for key in EQUAL_METRICS:
        assert two["test"][key] == pytest.approx(one["test"][key], rel=1e-5, abs=1e-6), key


def test_a_warm_started_run_stopped_mid_epoch_resumes_to_the_metrics_of_one_never_stopped(
    kuairand_run, tmp_path
):
    """A warm start that learns (the run's own learning rates), stopped at max_steps and run
    again with the same command: it resumes its own checkpoint (init_from is not reloaded) and
    ends where an uninterrupted warm start ends."""
    run, _ = kuairand_run
    cfg = run_config(run)
    warm = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, init_from=str(run), progress_bar=False)
    )
    uninterrupted = train(warm, tmp_path / "a")
    stopped = dataclasses.replace(
        warm, train=dataclasses.replace(warm.train, max_steps=uninterrupted["steps"] // 2)
    )
    assert "test" not in train(stopped, tmp_path / "b")  # mid-epoch: a step checkpoint, no test yet
    resumed = train(warm, tmp_path / "b")
    assert resumed["steps"] == uninterrupted["steps"] and resumed["init_from"] == uninterrupted["init_from"]
    for key in EQUAL_METRICS:
        assert resumed["test"][key] == pytest.approx(uninterrupted["test"][key], rel=1e-5, abs=1e-6), key
    assert uninterrupted["test"]["watch_ratio/mse"] != pytest.approx(
        json.loads((run / "results.json").read_text())["test"]["watch_ratio/mse"], rel=1e-6
    )  # it trained
