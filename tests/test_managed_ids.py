"""Managed collisions (``managed_collisions`` on an id space): ids get table rows while the model
trains, through torchrec's MCH module, so ids that appear after prepare get rows of their own."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from conftest import EQUAL_METRICS, REPO, built_once, torchrun
from engagerec.config import load_config
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.export import export_run
from engagerec.managed_ids import ManagedCollisionTables, remap_frozen, reset_rows
from engagerec.predict import predict
from engagerec.runs import open_run
from engagerec.train import train

ROWS = 1000  # of 5,290 distinct training videos: admissions evict
TABLE = "t_content_id"


def _config_file(path, rows=ROWS, interval=1, features=None):
    """configs/kuairand_temporal.yaml with content ids and their history managed (or ``features``,
    YAML entries of data.features, instead)."""
    settings = f"managed_collisions: {rows}, eviction_interval: {interval}"
    features = features or [f"{{name: content_id, {settings}}}", f"{{name: history, {settings}}}"]
    entries = "".join(f"    - {entry}\n" for entry in features)
    path.write_text(
        f"base: {REPO}/configs/kuairand_temporal.yaml\nname: kuairand_managed\ndata:\n  features:\n{entries}"
    )
    return path


def _managed_config(path, data_dir, overrides=(), **train_changes):
    cfg = load_config(path, list(overrides))
    changes = {
        "data_dir": str(data_dir),
        "epochs": 1,
        "progress_bar": False,
        "device": "cpu",
        **train_changes,
    }
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


@pytest.fixture(scope="module")
def managed_data(tmp_path_factory):
    """The bundled data under configs/kuairand_temporal.yaml, content ids (and their history)
    managed in 1,000 rows admitted every 3 steps: (config file, prepared directory)."""

    def build(out):
        config = _config_file(out / "managed.yaml", interval=3)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(REPO)
            prepare(load_config(config).data, out / "data")

    out = built_once(tmp_path_factory, "managed_data", build)
    return out / "managed.yaml", out / "data"


def _mch(run_dir, name="latest"):
    """A run's remapping of the content table: (sorted admitted ids, their rows)."""
    with open_run(run_dir, name, device="cpu") as opened:
        state = opened.dmp.module.state_dict()
    prefix = f"sparse_arch.remap.managed_collision_collection._managed_collision_modules.{TABLE}."
    return state[prefix + "_mch_sorted_raw_ids"].clone(), state[prefix + "_mch_remapped_ids_mapping"].clone()


def test_ids_are_admitted_to_rows_and_an_evicted_row_starts_afresh():
    """Four rows, three for ids (the last is shared), least frequent evicted: the first batch's
    ids take the three rows; after training moves them, a batch of two new frequent ids evicts
    the two rarest, whose rows are drawn afresh for the newcomers; an id never admitted reads
    the shared row."""
    torch.manual_seed(0)
    table = EmbeddingBagConfig(name="t", num_embeddings=4, embedding_dim=3, feature_names=["video"])
    spec = {"eviction_policy": "lfu", "eviction_interval": 1, "ids_per_row": 1}
    tables = ManagedCollisionTables(EmbeddingBagCollection(tables=[table]), {"t": spec})
    weight = tables.embedding_bags["t"].weight

    def batch(ids):
        return KeyedJaggedTensor.from_lengths_sync(
            ["video"], torch.tensor(ids), torch.ones(len(ids), dtype=torch.int32)
        )

    first = tables(batch([7, 7, 7, 9, 5]))
    first.values().sum().backward()
    with torch.no_grad():
        weight -= 10.0 * weight.grad  # every admitted row moves far outside the initial range
    sorted_ids, rows, shared = tables.frozen_rows("t")
    before = {i: int(remap_frozen(torch.tensor([i]), sorted_ids, rows, shared)) for i in (7, 9, 5)}
    assert sorted(before.values()) == [0, 1, 2] and shared == 3
    trained = weight.detach().clone()

    tables(batch([11, 11, 12, 12, 7, 7]))  # 7 stays (5 views in all); 9 and 5 (1 view) make way
    sorted_ids, rows, shared = tables.frozen_rows("t")
    after = {i: int(remap_frozen(torch.tensor([i]), sorted_ids, rows, shared)) for i in (7, 9, 5, 11, 12)}
    assert after[7] == before[7] and after[9] == after[5] == shared
    assert {after[11], after[12]} == {before[9], before[5]}  # the evicted ids' rows, reused
    bound = table.get_weight_init_max()
    for new in (after[11], after[12]):
        assert weight[new].abs().max() <= bound and not torch.equal(weight[new], trained[new])
    assert torch.equal(weight[before[7]], trained[before[7]])  # a kept id keeps what it learned
    tables.eval()  # scoring reads the remapping and admits nothing
    pooled = tables(batch([13, 11])).values()
    assert torch.equal(pooled[0], weight[shared].detach()) and torch.equal(
        pooled[1], weight[after[11]].detach()
    )
    assert int(remap_frozen(torch.tensor([13]), *tables.frozen_rows("t"))) == shared


def test_a_managed_run_resumes_exactly_and_exports_what_predict_scores(managed_data, tmp_path):
    """Admissions every 3 steps, stopped at step 40 (ids counted since step 39 pending): the
    resumed run ends with the remapping, weights and test metrics of one never stopped. Its
    export scores the test split as predict does, to 1e-6."""
    config, data_dir = managed_data
    cfg = _managed_config(config, data_dir)
    uninterrupted = train(cfg, tmp_path / "a")
    stopped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=40))
    assert "test" not in train(stopped, tmp_path / "b")
    resumed = train(cfg, tmp_path / "b")
    for key in EQUAL_METRICS:
        assert resumed["test"][key] == pytest.approx(uninterrupted["test"][key], rel=1e-5, abs=1e-6), key
    ids_a, rows_a = _mch(tmp_path / "a")
    ids_b, rows_b = _mch(tmp_path / "b")
    assert torch.equal(ids_a, ids_b) and torch.equal(rows_a, rows_b)
    admitted = ids_a[ids_a != torch.iinfo(torch.int64).max]
    assert len(admitted) == ROWS - 1  # every row but the shared one holds an id

    summary = predict(tmp_path / "a", data_dir, tmp_path / "p.parquet")
    scored = pq.read_table(summary["out"]).to_pandas()
    videos = torch.from_numpy(pq.read_table(data_dir / "test", columns=["content_id"]).column(0).to_numpy())
    on_shared = int((remap_frozen(videos.long(), ids_a, rows_a, ROWS - 1) == ROWS - 1).sum())
    assert summary["oov_rows"]["content_id"] == on_shared > 0  # videos never admitted, counted
    record = export_run(tmp_path / "a", tmp_path / "export")
    assert record["max_abs_difference_fp32_vs_eager"] < 1e-6
    from engagerec.data.reader import ShardReader, make_loader
    from engagerec.export import serving_inputs

    program = torch.export.load(str(tmp_path / "export" / "model_fp32.pt2")).module()
    names = json.loads((tmp_path / "export" / "inputs.json").read_text())["sparse"]["features"]
    with torch.no_grad():
        out = np.concatenate(
            [
                program(*serving_inputs(batch, names)).numpy()
                for batch in make_loader(ShardReader(data_dir, "test", batch_size=4096, rank=0, world_size=1))
            ]
        )
    np.testing.assert_allclose(out[:, 0], scored["watch_ratio"], atol=1e-6)
    np.testing.assert_allclose(out[:, 1], scored["skip_probability"], atol=1e-6)


def test_evicted_rows_are_reset_in_the_sharded_fused_tables(managed_data, tmp_path):
    """reset_rows on DistributedModelParallel's fused table: the rows' weights are drawn again
    within the table's initial range and their Adagrad state is zero; other rows keep theirs."""
    config, data_dir = managed_data
    run = tmp_path / "run"
    train(_managed_config(config, data_dir, max_steps=20), run)
    with open_run(run, "latest", device="cpu") as opened:
        sharded = opened.dmp.module.sparse_arch.embedding_bag_collection
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.{TABLE}.weight"

        def weight():
            return opened.dmp.module.state_dict()[key].local_shards()[0].tensor.clone()

        def momentum():
            state = opened.dmp.fused_optimizer.state_dict()["state"][key]
            return next(v for k, v in state.items() if "momentum" in k).local_shards()[0].tensor.clone()

        state = opened.dmp.fused_optimizer.state_dict()["state"][key]  # views of FBGEMM's buffers
        next(v for k, v in state.items() if "momentum" in k).local_shards()[0].tensor.fill_(1.0)
        before, moment = weight(), momentum()
        assert (before.abs().max(dim=1).values > 0.05).sum() > 10 and (moment == 1).all()  # trained
        config_ = next(t for t in opened.model.tables if t.name == TABLE)
        rows = torch.tensor([3, 100, 998])
        reset_rows(sharded, config_, rows)
        after, moment_after = weight(), momentum()
    keep = torch.ones(len(before), dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(after[keep], before[keep]) and not torch.equal(after[rows], before[rows])
    assert after[rows].abs().max() <= config_.get_weight_init_max()
    assert (moment_after[rows] == 0).all() and torch.equal(moment_after[keep], moment[keep])


def test_training_managed_ids_on_two_ranks_is_refused_naming_why(managed_data, tmp_path):
    """Two ranks would admit different ids: the run stops before training, saying so."""
    import subprocess

    config, data_dir = managed_data
    command = torchrun(2) + [
        "-m", "engagerec", "train", "--config", str(config), "--out", str(tmp_path / "run"),
        "--set", f"train.data_dir={data_dir}", "--set", "train.device=cpu",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "managed collisions, which train on one rank" in done.stderr
    assert "[rank0]: Traceback" not in done.stderr  # the ranks' error; torchrun reports their exit
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_managed_settings_that_cannot_hold_are_refused_before_anything_is_written(tmp_path):
    """A kind without ids, a history managed otherwise than the ids it shares a table with
    (here: not at all), or too few rows."""
    refused = [
        (["{name: genres, managed_collisions: 50}"], "managed_collisions on a multi_hot feature"),
        (["{name: content_id, managed_collisions: 50}"], "with other managed_collisions settings"),
        (
            ["{name: content_id, managed_collisions: 1}", "{name: history, managed_collisions: 1}"],
            "managed_collisions >= 2 rows",
        ),
    ]
    for i, (features, message) in enumerate(refused):
        config = _config_file(tmp_path / f"bad{i}.yaml", features=features)
        with pytest.MonkeyPatch.context() as patch, pytest.raises(DataError, match=message):
            patch.chdir(REPO)
            prepare(load_config(config).data, tmp_path / "data")
        assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_the_next_days_new_videos_get_rows_in_a_warm_start_without_preparing_vocabularies(tmp_path):
    """Days 1..7 of the bundled log, then day 8 prepared against them (``--base``): the hashed
    ids need no vocabulary to grow. A warm start on day 8 begins from day 7's remapping and
    admits videos that day 7's model never saw; day 7's model, frozen, scores them on the
    shared row."""
    from engagerec_study.sections.replay import OVERRIDES, day_files

    config = _config_file(tmp_path / "managed.yaml")
    day = list(OVERRIDES[:3])  # every view of a day kept; no test split: the next day tests
    log = REPO / load_config(config).data.source.interactions
    days = day_files(log, tmp_path / "days", last_day=8)
    base, day8 = tmp_path / "base", tmp_path / "day8"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        first_days = day + [f"data.source.interactions={tmp_path / 'days' / 'upto_07.csv'}"]
        prepare(load_config(config, first_days).data, base)
        prepare(load_config(config, day + [f"data.source.interactions={days[7]}"]).data, day8, base=base)
    assert json.loads((day8 / "schema.json").read_text())["managed"]["content_id"]["rows"] == ROWS
    train(_managed_config(config, base, day), tmp_path / "day7")
    train(_managed_config(config, day8, day, init_from=str(tmp_path / "day7")), tmp_path / "warm")

    def videos(data_dir):
        return set(pq.read_table(data_dir / "train", columns=["content_id"]).column(0).to_numpy().tolist())

    new = videos(day8) - videos(base)
    assert len(new) > 50
    ids_7, rows_7 = _mch(tmp_path / "day7", "best")
    ids_8, rows_8 = _mch(tmp_path / "warm", "latest")
    admitted_7, admitted_8 = set(ids_7.tolist()), set(ids_8.tolist())
    # a full table: a new video is admitted once it outranks an old one (distance-weighted LFU)
    assert not new & admitted_7 and len(new & admitted_8) > 20
    kept = [i for i in admitted_7 & admitted_8 if i != torch.iinfo(torch.int64).max]
    assert len(kept) > 100  # the warm start began from day 7's remapping: known videos kept their ids
    row_7 = dict(zip(ids_7.tolist(), rows_7.tolist(), strict=True))
    row_8 = dict(zip(ids_8.tolist(), rows_8.tolist(), strict=True))
    assert all(row_7[i] == row_8[i] for i in kept)  # ... and their rows


@pytest.mark.gpu
def test_managed_ids_train_on_one_gpu_and_score_alike_on_cpu(managed_data, tmp_path):
    """The remapping follows the batches to the GPU (DMP moves parameters, not buffers), admits
    ids there, and its checkpoint scores on CPU as on the GPU."""
    from engagerec.runs import evaluate_run

    config, data_dir = managed_data
    results = train(_managed_config(config, data_dir, device="cuda"), tmp_path / "run")
    ids, _ = _mch(tmp_path / "run")
    assert int((ids != torch.iinfo(torch.int64).max).sum()) == ROWS - 1
    on_cpu = evaluate_run(tmp_path / "run", "test", device="cpu")
    for key in EQUAL_METRICS:
        assert on_cpu[key] == pytest.approx(results["test"][key], rel=1e-3, abs=1e-4), key


def test_a_batch_with_more_ids_than_the_first_has_every_id_counted():
    """torchrec sizes its buffer of counted ids from the first batch and drops what a fuller
    batch brings past it; here the buffer grows: admitted every 2 steps, a first batch of 1 id
    and a second of 6 new ones put all 7 in the table."""
    table = EmbeddingBagConfig(name="t", num_embeddings=16, embedding_dim=2, feature_names=["video"])
    spec = {"eviction_policy": "lfu", "eviction_interval": 2, "ids_per_row": 1}
    tables = ManagedCollisionTables(EmbeddingBagCollection(tables=[table]), {"t": spec})
    for ids in ([5], [11, 12, 13, 14, 15, 16]):
        tables(
            KeyedJaggedTensor.from_lengths_sync(
                ["video"], torch.tensor(ids), torch.ones(len(ids), dtype=torch.int32)
            )
        )
    sorted_ids, _, _ = tables.frozen_rows("t")
    assert set(sorted_ids.tolist()) >= {5, 11, 12, 13, 14, 15, 16}
