"""Target attention (DIN) over a positional history: the positions hold exactly the history's
ids, attention ignores empty positions and their order, and a model with it trains, shards,
exports and predicts like any other."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from engagerec.attention import TargetAttention
from engagerec.config import load_config
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.data.schema import DatasetSchema
from engagerec.errors import ConfigError
from engagerec.model_builder import build_model

# 4,000 rows over 200 users (about 3,700 kept past min_user_views, histories of 0 to 20 views) and
# batches of 128: an epoch is 18 steps. (5,000 users kept 189 rows and a 1,024 batch took no step.)
SMALL = [
    "data.source.synthetic.num_rows=4000",
    "data.source.synthetic.num_users=200",
    "data.source.synthetic.num_contents=300",
    "train.progress_bar=false",
    "train.epochs=1",
    "train.batch_size=128",
    "train.dense_lr=0.003",
]
POSITIONAL = "data.features.2.positions=true"  # synthetic_study's feature 2 is its history
ATTENTION = "model.target_attention={history: history, candidate: content_id, hidden_sizes: [8]}"


@pytest.fixture(scope="module")
def din_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("din_data")
    cfg = load_config("synthetic_study", SMALL + [POSITIONAL, ATTENTION, f"train.data_dir={data}"])
    prepare(cfg.data, data)
    return cfg, data


def test_the_positions_hold_the_histories_ids_in_window_order(tmp_path, din_data):
    _, positional = din_data
    cfg = load_config("synthetic_study", SMALL)  # the same data with the history as one bag
    prepare(cfg.data, tmp_path / "bag")
    for split in ("train", "test"):
        bag = pq.read_table(tmp_path / "bag" / split).column("history").to_pylist()
        table = pq.read_table(positional / split)
        positions = [table.column(f"history@{p}").to_pylist() for p in range(20)]
        rebuilt = [[i for p in range(20) for i in positions[p][row]] for row in range(len(bag))]
        assert rebuilt == bag
        assert all(len(positions[p][row]) <= 1 for p in range(20) for row in range(len(bag)))
        assert any(len(h) == 0 for h in bag) and any(len(h) == 20 for h in bag)
    names = DatasetSchema.load(positional).sparse_names
    assert "history" not in names and names.count("history@0") == 1 and "history@19" in names


def test_empty_positions_weigh_nothing_and_a_row_without_history_attends_to_zero():
    torch.manual_seed(0)
    arch = TargetAttention([3] * 4, ["item", "h@0", "h@1", "h@2"], "item", ["h@0", "h@1", "h@2"])
    pooled = torch.randn(4, 12)
    pooled[1, 3:] = 0.0  # no earlier views
    pooled[2, 9:] = 0.0  # two earlier views
    out = arch(pooled)
    assert torch.equal(out[1, 3:], torch.zeros(3))
    two_views = pooled[2:3, :9]
    alone = TargetAttention([3] * 3, ["item", "h@0", "h@1"], "item", ["h@0", "h@1"])
    alone.load_state_dict(arch.state_dict())
    torch.testing.assert_close(alone(two_views), out[2:3])  # the empty third position added nothing
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch.score.parameters())


def test_attention_is_refused_over_a_history_without_positions_or_a_foreign_candidate(tmp_path):
    cfg = load_config("synthetic_study", SMALL + [ATTENTION])
    prepare(cfg.data, tmp_path / "bag")
    schema = DatasetSchema.load(tmp_path / "bag")
    with pytest.raises(ConfigError, match="no history feature with positions: true"):
        build_model(schema, cfg.model)
    cfg = load_config("synthetic_study", SMALL + [POSITIONAL, ATTENTION.replace("content_id", "user_id")])
    prepare(cfg.data, tmp_path / "pos")
    with pytest.raises(ConfigError, match="candidate 'user_id' is not embedded in the history's table"):
        build_model(DatasetSchema.load(tmp_path / "pos"), cfg.model)
    cfg = load_config("synthetic_study", SMALL + ["data.features.0.positions=true"])  # user_id
    with pytest.raises(DataError, match="positions: true on a categorical feature"):
        prepare(cfg.data, tmp_path / "bad")


@pytest.mark.slow
def test_a_model_with_attention_trains_exports_and_predicts_what_it_exported(din_data, tmp_path):
    from engagerec.export import export_run
    from engagerec.train import train

    cfg, data = din_data
    run = tmp_path / "run"
    results = train(cfg, run)
    test = results["test"]
    # it learned: beats the constant predictions (seeds 0-2 here: MSE 0.79-0.81 of the train
    # mean's, AUC 0.737-0.738)
    assert results["steps"] == 18
    assert test["watch_ratio/mse"] < 0.9 * test["watch_ratio/baseline_mse_train_mean"]
    assert test["skip/auc"] > 0.65 and test["skip/accuracy"] > test["skip/baseline_accuracy_majority"]
    model = build_model(DatasetSchema.load(data), cfg.model)
    assert isinstance(model.input_arch, TargetAttention)
    assert model.input_arch.output_dim == model.sparse_dim - 19 * model.input_arch.dim
    record = export_run(run, tmp_path / "export")
    assert record["max_abs_difference_fp32_vs_eager"] < 1e-5  # the program applies the attention too
    inputs = json.loads((tmp_path / "export" / "inputs.json").read_text())
    assert "history@19" in inputs["sparse"]["features"]
    # predict scores the prepared test split through the same attention: evaluate's metrics
    from engagerec.predict import predict

    summary = predict(run, data, tmp_path / "preds.parquet")
    preds = pq.read_table(tmp_path / "preds.parquet").to_pandas()
    labels = pq.read_table(data / "test").column("watch_ratio").to_numpy()
    assert summary["rows_scored"] == len(labels) == results["test"]["rows"]
    mse = float(((preds["watch_ratio"].to_numpy() - labels) ** 2).mean())
    assert mse == pytest.approx(results["test"]["watch_ratio/mse"], rel=1e-5)
    # describe counts the attention's parameters and the tower's real input width
    from engagerec.runs import describe

    text = describe(cfg, ["mmoe"], str(data))
    assert "| input arch |" in text
    assert f"({model.input_arch.output_dim + model.dense_in_features} tower inputs" in text


@pytest.mark.slow
def test_two_gloo_ranks_train_with_attention_and_one_rank_evaluates_the_same(din_data, tmp_path):
    import dataclasses

    import yaml
    from test_torchrun import _torchrun

    cfg, data = din_data
    train_cfg = dataclasses.replace(cfg.train, sharding={"*": ["table_wise"]}, device="cpu")
    config = tmp_path / "din.yaml"
    config.write_text(yaml.safe_dump(dataclasses.asdict(dataclasses.replace(cfg, train=train_cfg))))
    run = tmp_path / "run"
    _torchrun(2, "train", "--config", str(config), "--out", str(run), cwd=tmp_path)
    plan = json.loads((run / "plan.json").read_text())
    assert {tuple(t["ranks"]) for t in plan.values()} == {(0,), (1,)}  # tables on both ranks
    results = json.loads((run / "results.json").read_text())
    from engagerec.runs import evaluate_run

    one = evaluate_run(run, "test")  # 1 rank: in this process
    assert results["world_size"] == 2 and one["rows"] == results["test"]["rows"]
    for key in ("watch_ratio/mse", "skip/auc"):
        assert one[key] == pytest.approx(results["test"][key], rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_raw_rows_to_score_get_the_positions_prepare_gave_them(tmp_path, in_repo):
    from test_predict import REPO, _kept_rows, _read_log

    from engagerec.data.scoring import encode_for_scoring

    log = _read_log()
    log = log[(log["duration_ms"] > 0) & (log["user_id"] % 3 == 0)]  # a third of the users, whole
    path = tmp_path / "log.csv"
    log.to_csv(sep="\t", path_or_buf=path, index=False)
    cfg = load_config(REPO / "configs" / "kuairand_din.yaml",
                      [f"data.source.interactions={path}", "data.filters.min_user_views=0"])  # fmt: skip
    prepare(cfg.data, tmp_path / "prepared")
    encode_for_scoring(cfg.data, tmp_path / "prepared", str(path), tmp_path / "scored")
    positions = [f"history@{p}" for p in range(20)]
    columns = ["user_id", "content_id", "hour", *positions]
    fitted = _kept_rows(tmp_path / "prepared", ["train", "val", "test"])[columns]
    scored = _kept_rows(tmp_path / "scored", ["test"])[columns]
    fitted = fitted.sort_values(columns).reset_index(drop=True)
    scored = scored.sort_values(columns).reset_index(drop=True)
    assert len(fitted) == len(scored) == len(log)
    assert fitted.equals(scored)
    assert (fitted["history@19"].map(len) == 1).any() and (fitted["history@0"].map(len) == 0).any()
