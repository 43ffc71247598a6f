"""A warm start (train.init_from / --init-from): another run's model and optimiser state as the
starting point, checked first, ids matched between the two runs' vocabularies, resharded onto
any plan and world size."""

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import EQUAL_METRICS, REPO, torchrun
from engagerec.config import TowerConfig
from engagerec.errors import ConfigError
from engagerec.runs import open_run, run_config
from engagerec.train import train

CONTENT = "sparse_arch.embedding_bags.t_content_id.weight"


def _warm(run, **train_changes):
    """The run's config, warm-started from it with learning rates of 0: training changes no
    weight, so the new run's model is what it loaded."""
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


def _next_day(data_dir, out):
    """``data_dir`` as the next day's preparation would encode it: its content vocabulary loses
    one id, gains two new ones, and the ids after them move rows (sorted order)."""
    shutil.copytree(data_dir, out)
    path = out / "vocabs" / "content_id.parquet"
    tokens = pq.read_table(path)
    ids = tokens.column(0).to_pylist()
    ids = sorted(ids[1:] + [-1, 10**12])  # -1 sorts first: every other id moves a row
    pq.write_table(pa.table([pa.array(ids, type=tokens.schema.field(0).type)], schema=tokens.schema), path)
    schema = json.loads((out / "schema.json").read_text())
    schema["vocab_sizes"]["content_id"] = len(ids)
    (out / "schema.json").write_text(json.dumps(schema))
    _rewrite_manifest(out)
    return out, tokens.column(0).to_pylist(), ids


def _table(run_dir, name="latest", key=CONTENT):
    """A run's content table, or the table of state-dict ``key`` (one process: the whole table)."""
    with open_run(run_dir, name, device="cpu") as opened:
        return opened.dmp.module.state_dict()[key].local_shards()[0].tensor.clone()


def test_a_warm_start_loads_every_tensor_and_scores_as_the_run_it_came_from(kuairand_run, tmp_path):
    """At learning rate 0 a warm start's test metrics are its source's, exactly: every table,
    tower and head tensor was loaded (a fresh start at learning rate 0 scores otherwise)."""
    run, _ = kuairand_run
    source = json.loads((run / "results.json").read_text())
    warm = train(_warm(run), tmp_path / "warm")
    assert warm["init_from"]["checkpoint"].endswith(f"best-step-{source['steps']}")
    assert warm["init_from"]["moved"] == {} and warm["init_from"]["fresh_optimizer_state"] == []
    for key in EQUAL_METRICS:
        assert warm["test"][key] == pytest.approx(source["test"][key], rel=1e-6, abs=1e-7), key
    cold = _warm(run)
    fresh = train(
        dataclasses.replace(cold, train=dataclasses.replace(cold.train, init_from=None)), tmp_path / "fresh"
    )
    assert fresh["test"]["watch_ratio/mse"] != pytest.approx(source["test"]["watch_ratio/mse"], rel=1e-3)


def test_each_id_keeps_its_learned_row_and_optimiser_state_where_the_next_days_vocabulary_puts_it(
    kuairand_run, tmp_path, capsys
):
    """The next day's vocabulary drops an id, adds two and moves the others: each id of both
    gets its saved row and its row-wise optimiser state at its new row; the new ids get a fresh
    start's rows; the run says what moved."""
    import torch.distributed.checkpoint as dcp

    from engagerec.distributed import close_runtime, init_runtime
    from engagerec.preemption import Preemption
    from engagerec.train import Trainer

    run, data_dir = kuairand_run
    day2, before, after = _next_day(data_dir, tmp_path / "day2")
    cfg = _warm(run, data_dir=str(day2), epochs=1)
    runtime = init_runtime("cpu")
    try:
        with Preemption() as preemption:
            trainer = Trainer(cfg, tmp_path / "state", runtime, preemption)
            weights = trainer.dmp.state_dict()[CONTENT].local_shards()[0].tensor.clone()
            optimiser = trainer.optimizer.state_dict()["state"][CONTENT]["t_content_id.momentum1"]
            momentum = optimiser.local_shards()[0].tensor.clone()
            loaded = trainer.state.init_from
    finally:
        close_runtime(runtime)
    assert loaded["moved"] == {
        "t_content_id": {"rows": [len(before) + 1, len(after) + 1], "kept": len(after) - 1}
    }
    saved_path = loaded["checkpoint"]
    saved = {
        "model": {CONTENT: torch.zeros(len(before) + 1, weights.shape[1])},
        "optim": {"state": {CONTENT: {"t_content_id.momentum1": torch.zeros(len(before) + 1)}}},
    }
    dcp.load(saved, checkpoint_id=saved_path)
    saved_row = {token: i + 1 for i, token in enumerate(before)}
    new_ids = [i + 1 for i, token in enumerate(after) if token not in saved_row]
    assert len(new_ids) == 2
    for row, token in enumerate(after, start=1):
        if token in saved_row:
            assert torch.equal(weights[row], saved["model"][CONTENT][saved_row[token]]), token
            assert (
                momentum[row] == saved["optim"]["state"][CONTENT]["t_content_id.momentum1"][saved_row[token]]
            )
    assert torch.equal(weights[0], saved["model"][CONTENT][0])  # the out-of-vocabulary row stays
    assert (momentum[new_ids] == 0).all() and (
        saved["optim"]["state"][CONTENT]["t_content_id.momentum1"] > 0
    ).any()

    # trained (at learning rate 0) and opened again: the same rows; the new ids' rows are a fresh start's
    train(cfg, tmp_path / "warm")
    assert "t_content_id: " in capsys.readouterr().out
    fresh = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None, max_steps=1))
    train(fresh, tmp_path / "fresh")
    warm_table, fresh_table = _table(tmp_path / "warm"), _table(tmp_path / "fresh")
    assert torch.equal(warm_table, weights)
    assert torch.equal(warm_table[new_ids], fresh_table[new_ids])


def test_a_features_own_table_moves_its_rows_with_its_id_space(kuairand_random, tmp_path):
    """model.embeddings.own_table: the history's table follows the video vocabulary as the
    video table does; each id keeps its learned history row at its new row."""
    data_dir, _, cfg = kuairand_random
    embeddings = dataclasses.replace(cfg.model.embeddings, own_table=["history"])
    changes = {"data_dir": str(data_dir), "epochs": 1, "progress_bar": False, "device": "cpu"}
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, embeddings=embeddings),
        train=dataclasses.replace(cfg.train, **changes),
    )
    train(cfg, tmp_path / "source")
    day2, before, after = _next_day(data_dir, tmp_path / "day2")
    warm = train(_warm(tmp_path / "source", data_dir=str(day2)), tmp_path / "warm")
    moved = {"rows": [len(before) + 1, len(after) + 1], "kept": len(after) - 1}
    assert warm["init_from"]["moved"] == {"t_content_id": moved, "t_content_id__history": moved}
    key = "sparse_arch.embedding_bags.t_content_id__history.weight"
    saved, loaded = _table(tmp_path / "source", "best", key), _table(tmp_path / "warm", key=key)
    assert not torch.equal(saved, _table(tmp_path / "source", "best"))  # two tables, not one
    saved_row = {token: i + 1 for i, token in enumerate(before)}
    for row, token in enumerate(after, start=1):
        if token in saved_row:
            assert torch.equal(loaded[row], saved[saved_row[token]]), token


def test_a_warm_start_from_another_model_or_from_data_prepared_again_is_refused_naming_why(
    kuairand_run, tmp_path, capsys
):
    """Another tower; an earlier run whose prepared data was prepared again since; an init_from
    without checkpoints: each a one-line error naming why, and nothing written."""
    import yaml

    from engagerec.cli import main

    run, data_dir = kuairand_run
    cfg = _warm(run)
    other = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, tower=TowerConfig(name="cross_stitch"))
    )
    with pytest.raises(ConfigError, match=r"model\.tower\.name: '\w+' -> 'cross_stitch'"):
        train(other, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # refused before the run directory was made
    dots = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dot_interactions=[["user_id", "content_id"]])
    )
    with pytest.raises(ConfigError, match=r"model\.dot_interactions"):
        train(dots, tmp_path / "dots")

    # a copy of the run and of its data; the data is then prepared again (a vocabulary changed)
    copy_run, copy_data = tmp_path / "copy_run", tmp_path / "copy_data"
    shutil.copytree(run, copy_run)
    shutil.copytree(data_dir, copy_data)
    record = json.loads((copy_run / "vocabularies.json").read_text())
    (copy_run / "vocabularies.json").write_text(json.dumps({**record, "data_dir": str(copy_data)}))
    assert train(_warm(copy_run, max_steps=1), tmp_path / "from_copy")["init_from"]["moved"] == {}
    vocab = copy_data / "vocabs" / "content_id.parquet"
    tokens = pq.read_table(vocab)
    pq.write_table(tokens.slice(1), vocab)
    _rewrite_manifest(copy_data)
    with pytest.raises(ConfigError, match=r"was prepared again since \(vocabs/content_id.parquet differ\)"):
        train(_warm(copy_run), tmp_path / "after_reprepare")

    # the command line: a directory without checkpoints, named like a date (a path, not a YAML date)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(json.loads((run / "config.json").read_text())))
    (tmp_path / "2024-06-01").mkdir()
    argv = [
        "train",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "cli"),
        "--init-from",
        str(tmp_path / "2024-06-01"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "engagerec train: error: train.init_from" in err and "no checkpoint that checks out" in err
    assert main(["train", "--config", str(config), "--out", str(tmp_path), "--init-from", str(copy_run)]) == 2
    assert "lies inside this run's directory" in capsys.readouterr().err


def test_a_warm_started_run_stopped_mid_epoch_resumes_to_the_metrics_of_one_never_stopped(
    kuairand_run, tmp_path
):
    """A warm start that learns (the run's own learning rates), stopped at max_steps and run
    again with the same command: it resumes its own checkpoint (init_from is not loaded again)
    and ends where an uninterrupted warm start ends."""
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


@pytest.mark.slow
def test_two_ranks_warm_start_moved_ids_as_one_rank_does(kuairand_run, tmp_path):
    """The next day's content table split by columns over 2 ranks (its row-wise optimiser state
    is laid out per column shard, so it starts fresh, and is reported): each rank loads its
    columns of the moved rows; at learning rate 0 the test metrics equal one rank's warm start."""
    import os
    import subprocess

    import yaml

    run, data_dir = kuairand_run
    day2, _, _ = _next_day(data_dir, tmp_path / "day2")
    one = train(_warm(run, data_dir=str(day2)), tmp_path / "one")
    config = json.loads((run / "config.json").read_text())
    config["train"].update(
        init_from=str(run), dense_lr=0.0, sparse_lr=0.0, progress_bar=False, data_dir=str(day2),
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
    assert two["world_size"] == 2 and two["init_from"]["moved"] == one["init_from"]["moved"]
    assert "column_wise" in (tmp_path / "two" / "plan.json").read_text()
    assert any("t_content_id.momentum1" in key for key in two["init_from"]["fresh_optimizer_state"])
    for key in EQUAL_METRICS:
        assert two["test"][key] == pytest.approx(one["test"][key], rel=1e-5, abs=1e-6), key
    assert np.isfinite(two["test"]["watch_ratio/mse"])
