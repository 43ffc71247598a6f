"""Dot interactions (model.dot_interactions): the tower reads each chosen pair's dot product
beside the pooled embeddings, the gradient of a product reaches both embeddings, a bad pair
is a ConfigError naming it, and a model with them trains, exports and predicts like any other."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_attention import SMALL  # 4,000 synthetic rows, batches of 128

from engagerec.attention import TargetAttention
from engagerec.config import load_config
from engagerec.data.prepare import prepare
from engagerec.data.schema import DatasetSchema
from engagerec.errors import ConfigError
from engagerec.interactions import DotInteraction
from engagerec.model_builder import build_model

DOTS = "model.dot_interactions=[[user_id, content_id], [user_id, genres], [content_id, history]]"


def test_each_pair_gets_its_dot_product_after_the_pooled_columns_and_both_sides_their_gradient():
    torch.manual_seed(0)
    names, widths = ["user", "hour", "item", "genre", "tag"], [4, 2, 4, 4, 2]
    arch = DotInteraction(widths, names, [("user", "item"), ("item", "genre"), ("hour", "tag")])
    pooled = torch.randn(5, sum(widths), requires_grad=True)
    out = arch(pooled)
    assert out.shape == (5, sum(widths) + 3) and arch.output_dim == sum(widths) + 3
    assert torch.equal(out[:, : sum(widths)], pooled)
    user, hour, item, genre, tag = pooled.split(widths, dim=1)
    expected = torch.stack([(user * item).sum(1), (item * genre).sum(1), (hour * tag).sum(1)], dim=1)
    torch.testing.assert_close(out[:, sum(widths) :], expected)
    # d<u, v>/du = v and d<u, v>/dv = u: the products train both embeddings directly
    out[:, sum(widths)].sum().backward()
    grad_user, _, grad_item, grad_genre, _ = pooled.grad.split(widths, dim=1)
    torch.testing.assert_close(grad_user, item.detach())
    torch.testing.assert_close(grad_item, user.detach())
    assert torch.equal(grad_genre, torch.zeros_like(grad_genre))  # not in the first pair


def test_after_a_target_attention_the_products_follow_its_output_and_read_the_pooled_input():
    torch.manual_seed(0)
    names = ["user", "item", "h@0", "h@1"]
    attention = TargetAttention([2] * 4, names, "item", ["h@0", "h@1"])
    arch = DotInteraction([2] * 4, names, [("user", "h@0")], inner=attention)
    pooled = torch.randn(3, 8)
    out = arch(pooled)
    assert arch.output_dim == attention.output_dim + 1 == out.shape[1]
    torch.testing.assert_close(out[:, :-1], attention(pooled))
    torch.testing.assert_close(out[:, -1], (pooled[:, 0:2] * pooled[:, 4:6]).sum(1))


def test_a_pair_of_unknown_or_unequal_features_a_repeat_or_not_a_pair_is_a_config_error_naming_it(tmp_path):
    cfg = load_config("synthetic_study", SMALL)
    prepare(cfg.data, tmp_path / "data")
    schema = DatasetSchema.load(tmp_path / "data")
    bad = {
        "[[user_id, nope]]": r"features \['nope'\] are not embedded",
        "[[user_id, user_id]]": "names one feature twice",
        "[[user_id, content_id, genres]]": "each entry is a pair of two feature names",
        "[[user_id, gender]]": r"'user_id' is 16 wide and 'gender' 4",
        "[[user_id, content_id], [content_id, user_id]]": r"the pair \(content_id, user_id\) is given twice",
    }
    for pairs, message in bad.items():
        changed = load_config(
            "synthetic_study",
            SMALL + [f"model.dot_interactions={pairs}", "model.embeddings={dim: 16, dims: {gender: 4}}"],
        )
        with pytest.raises(ConfigError, match=r"model\.dot_interactions: .*" + message):
            build_model(schema, changed.model)


@pytest.mark.slow
def test_a_model_with_dot_interactions_trains_exports_and_predicts_what_it_exported(tmp_path):
    from engagerec.export import export_run
    from engagerec.predict import predict
    from engagerec.train import train

    data = tmp_path / "data"
    cfg = load_config("synthetic_study", SMALL + [DOTS, f"train.data_dir={data}"])
    prepare(cfg.data, data)
    run = tmp_path / "run"
    results = train(cfg, run)
    test = results["test"]
    assert test["watch_ratio/mse"] < 0.9 * test["watch_ratio/baseline_mse_train_mean"]
    assert test["skip/auc"] > 0.65
    model = build_model(DatasetSchema.load(data), cfg.model)
    assert isinstance(model.input_arch, DotInteraction)
    assert model.input_arch.output_dim == model.sparse_dim + 3
    record = export_run(run, tmp_path / "export")
    assert record["max_abs_difference_fp32_vs_eager"] < 1e-5  # the program computes the products too
    summary = predict(run, data, tmp_path / "preds.parquet")
    preds = pq.read_table(tmp_path / "preds.parquet").column("watch_ratio").to_numpy()
    labels = pq.read_table(data / "test").column("watch_ratio").to_numpy()
    assert summary["rows_scored"] == len(labels) == test["rows"]
    assert float(((preds - labels) ** 2).mean()) == pytest.approx(test["watch_ratio/mse"], rel=1e-5)
    saved = json.loads((run / "config.json").read_text())["model"]["dot_interactions"]
    assert saved[0] == ["user_id", "content_id"]
