"""Dot interactions (model.dot_interactions): the tower reads each chosen pair's dot product
beside the pooled embeddings, the gradient of a product reaches both embeddings, a bad pair
is a ConfigError naming it, and a model with them trains, exports and predicts like any other."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_attention import ATTENTION, SMALL  # 4,000 synthetic rows, batches of 128

from engagerec.attention import TargetAttention
from engagerec.config import load_config
from engagerec.data.prepare import prepare
from engagerec.data.schema import DatasetSchema
from engagerec.errors import ConfigError
from engagerec.interactions import DotInteraction, DotLogits
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


def test_detached_features_and_their_products_reach_the_tower_as_they_are_but_pass_no_gradient_back():
    torch.manual_seed(0)
    names, widths = ["user", "hour", "item", "genre"], [2, 1, 2, 2]
    pairs = [("user", "item"), ("item", "genre")]
    plain = DotInteraction(widths, names, pairs)
    detached = DotInteraction(widths, names, pairs, detached=["user"])
    pooled = torch.randn(3, 7, requires_grad=True)
    out = detached(pooled)
    torch.testing.assert_close(out, plain(pooled))  # the same values
    out.sum().backward()
    grad_user, grad_hour, grad_item, grad_genre = pooled.grad.split(widths, dim=1)
    item, genre = pooled.detach()[:, 3:5], pooled.detach()[:, 5:7]
    assert torch.equal(grad_user, torch.zeros(3, 2))  # neither its columns nor <user, item> pass it
    assert torch.equal(grad_hour, torch.ones(3, 1))
    torch.testing.assert_close(grad_item, 1 + genre)  # its own columns and <item, genre>
    torch.testing.assert_close(grad_genre, 1 + item)
    with pytest.raises(ValueError, match=r"detached features \['nope'\] are not embedded"):
        DotInteraction(widths, names, pairs, detached=["nope"])
    blocks = ["user", "item", "h@0", "h@1"]
    attention = TargetAttention([2] * 4, blocks, "item", ["h@0", "h@1"])
    with pytest.raises(ValueError, match="cannot be detached after an inner arch"):
        DotInteraction([2] * 4, blocks, [("user", "item")], attention, detached=["user"])


def test_dot_logits_add_the_products_to_the_chosen_tasks_logits_which_pass_their_gradient_at_full_strength():
    """DotLogits computes its interaction's products from the pooled embeddings; a chosen task's
    logit adds each times its scale (1 at the start, so d logit / d <u, v> = 1 and the gradient
    reaches u and v at full strength, as in matrix factorisation), the others add 0 and keep 0
    however the scales are trained; in MultiTaskModel the offset joins the output unit before
    the head's sigmoid."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.datasets.utils import Batch

    from engagerec.config import TaskConfig
    from engagerec.model import MultiTaskModel
    from engagerec.towers import build_tower

    torch.manual_seed(0)
    names, widths = ["user", "hour", "item", "genre"], [2, 1, 2, 2]
    interaction = DotInteraction(widths, names, [("user", "item"), ("item", "genre")])
    logits = DotLogits(interaction, num_tasks=3, tasks=[0, 2])
    pooled = torch.randn(4, 7, requires_grad=True)
    out = logits(pooled)
    user, hour, item, genre = pooled.split(widths, dim=1)
    products = (user * item).sum(1) + (item * genre).sum(1)
    torch.testing.assert_close(out, torch.stack([products, torch.zeros(4), products], dim=1))
    out[:, 0].sum().backward()
    grad_user, grad_hour, grad_item, grad_genre = pooled.grad.split(widths, dim=1)
    torch.testing.assert_close(grad_user, item.detach())
    torch.testing.assert_close(grad_item, (user + genre).detach())
    assert torch.equal(grad_hour, torch.zeros(4, 1))
    optimiser = torch.optim.Adam(logits.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        logits(pooled.detach()).sum().backward()
        optimiser.step()
    # the unchosen task's scale never moves (its gradient is masked) and its logit stays 0
    assert torch.equal(logits.scale[:, 1], torch.zeros(2)) and not torch.equal(
        logits.scale[:, 0], torch.ones(2)
    )
    assert torch.equal(logits(pooled.detach())[:, 1], torch.zeros(4))
    for bad in ([], [3]):
        with pytest.raises(ValueError, match="dot logits"):
            DotLogits(interaction, num_tasks=3, tasks=bad)

    # in the model: the head's output unit plus <user, item>, then the regression head's sigmoid
    tables = [
        EmbeddingBagConfig(name=f"t_{name}", num_embeddings=5, embedding_dim=2, feature_names=[name])
        for name in ("user", "item")
    ]
    tasks = [TaskConfig("watch_ratio", "watch_ratio"), TaskConfig("skip", "skip", kind="binary")]
    model = MultiTaskModel(
        EmbeddingBagCollection(tables=tables),
        dense_in_features=1,
        tower=build_tower("mmoe", 4 + 1 + 1, 2, num_experts=2, expert_sizes=[4]),
        tasks=tasks,
        input_arch=DotInteraction([2, 2], ["user", "item"], [("user", "item")]),
        logit_offsets=DotLogits(DotInteraction([2, 2], ["user", "item"], [("user", "item")]), 2, [0]),
    )
    ids = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"],
        values=torch.tensor([1, 2, 3, 4, 0, 1]),
        lengths=torch.ones(6, dtype=torch.int32),
    )
    batch = Batch(torch.randn(3, 1), ids, torch.tensor([[0.2, 1.0], [0.9, 0.0], [0.5, 0.0]]))
    _, (_, predictions, _, _) = model(batch)
    user, item = model.tower_input(batch)[:, :4].detach().split(2, dim=1)
    representations = model.tower(model.tower_input(batch))
    unit = [model.heads[i].out(representations[i]).squeeze(-1) for i in range(2)]
    torch.testing.assert_close(predictions["watch_ratio"], torch.sigmoid(unit[0] + (user * item).sum(1)))
    torch.testing.assert_close(predictions["skip"], torch.sigmoid(unit[1]))


def test_first_order_features_add_a_learned_linear_term_whose_gradient_reaches_their_columns():
    """With first-order features a chosen task's logit adds <w_t, e_f> beside the products, so
    a detached row learns a per-id bias along w_t: d logit / d e_f = w_t. Unchosen tasks add 0,
    however the weights are trained; a model without first-order features has no such weight."""
    torch.manual_seed(0)
    names, widths = ["user", "hour", "item"], [2, 1, 2]
    interaction = DotInteraction(widths, names, [("user", "item")], detached=["user", "item"])
    logits = DotLogits(interaction, num_tasks=2, tasks=[1], first_order=["item", "user"])
    assert logits.linear.shape == (4, 2)  # the item's 2 columns, then the user's 2
    pooled = torch.randn(5, 5, requires_grad=True)
    user, _, item = pooled.split(widths, dim=1)
    w_item, w_user = logits.linear.detach()[:, 1].clone().split(2)
    expected = (user * item).sum(1) + item @ w_item + user @ w_user
    out = logits(pooled)
    torch.testing.assert_close(out, torch.stack([torch.zeros(5), expected], dim=1))
    out[:, 1].sum().backward()
    grad_user, grad_hour, grad_item = pooled.grad.split(widths, dim=1)
    torch.testing.assert_close(grad_item, user.detach() + w_item)
    torch.testing.assert_close(grad_user, item.detach() + w_user)
    assert torch.equal(grad_hour, torch.zeros(5, 1))
    untrained = logits.linear.detach()[:, 0].clone()
    assert torch.equal(untrained, torch.zeros(4))  # an unchosen task's weights are 0 from the start
    optimiser = torch.optim.Adam(logits.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        logits(pooled.detach()).sum().backward()
        optimiser.step()
    assert torch.equal(logits.linear[:, 0], untrained) and torch.equal(logits(pooled)[:, 0], torch.zeros(5))
    assert not torch.equal(logits.linear[:, 1].detach(), torch.cat([w_item, w_user]))
    assert DotLogits(interaction, 2, [1]).linear is None
    assert "linear" not in DotLogits(interaction, 2, [1]).state_dict()
    for bad in (["nope"], ["item", "item"]):
        with pytest.raises(ValueError, match="first-order features"):
            DotLogits(interaction, 2, [1], first_order=bad)


def test_a_pair_of_unknown_or_unequal_features_a_repeat_or_not_a_pair_is_a_config_error_naming_it(tmp_path):
    cfg = load_config("synthetic_study", SMALL)
    prepare(cfg.data, tmp_path / "data")
    schema = DatasetSchema.load(tmp_path / "data")
    bad = {
        "[[user_id, nope]]": r"features \['nope'\] are not embedded",
        "[[user, content_id]]": r"features \['user'\] are not embedded .*; did you mean 'user_id'\?",
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
    for sets, message in (
        (["model.dot_logits.tasks=[watch_ratio]"], "it needs model.dot_interactions"),
        (
            [DOTS, "model.dot_logits.tasks=[watch]"],
            r"\['watch'\], expected distinct task names of \['watch_ratio'",
        ),
        ([DOTS, "model.dot_logits.tasks=[skip, skip]"], "expected distinct task names"),
        (
            [DOTS, "model.dot_logits.detached=[user_id]"],
            "without dot_logits.tasks their tables learn nothing",
        ),
        (
            [DOTS, "model.dot_logits={tasks: [skip], detached: [nope]}"],
            r"detached: \['nope'\] are not embedded",
        ),
        (
            [DOTS, "model.dot_logits={tasks: [skip], detached: [user_id]}", ATTENTION],
            "cannot be combined with model.target_attention",
        ),
        (
            [DOTS, "model.dot_logits={tasks: [skip], detached: [gender]}"],
            r"detached: \['gender'\] are in no pair of model.dot_interactions",
        ),
        (
            [DOTS, "model.dot_logits={tasks: [skip], first_order: [nope]}"],
            r"first_order: \['nope'\] are not embedded",
        ),
        (
            [DOTS, "model.dot_logits={tasks: [skip], first_order: [user_id, user_id]}"],
            r"first_order: \['user_id', 'user_id'\] names a feature twice",
        ),
        ([DOTS, "model.dot_logits.first_order=[user_id]"], "without dot_logits.tasks there is no logit"),
    ):
        with pytest.raises(ConfigError, match=r"model\.dot_logits.*" + message):
            build_model(schema, load_config("synthetic_study", SMALL + sets).model)
    # (init_scale, beside: a table's start is set by its id space, which a history shares)
    with pytest.raises(
        ConfigError, match=r"init_scale.history: not an id space \(its table is id space 'content_id'\)"
    ):
        build_model(
            schema,
            load_config("synthetic_study", SMALL + ["model.embeddings.init_scale={history: 0.1}"]).model,
        )


@pytest.mark.slow
def test_a_model_with_dot_interactions_and_dot_logits_trains_exports_and_predicts_what_it_exported(tmp_path):
    from engagerec.export import export_run
    from engagerec.predict import predict
    from engagerec.runs import open_run
    from engagerec.train import train

    data = tmp_path / "data"
    cfg = load_config(
        "synthetic_study",
        SMALL
        + [
            DOTS,
            "model.dot_logits={tasks: [watch_ratio], detached: [user_id], first_order: [user_id]}",
            f"train.data_dir={data}",
        ],
    )
    prepare(cfg.data, data)
    run = tmp_path / "run"
    results = train(cfg, run)
    test = results["test"]
    assert test["watch_ratio/mse"] < 0.9 * test["watch_ratio/baseline_mse_train_mean"]
    assert test["skip/auc"] > 0.65
    model = build_model(DatasetSchema.load(data), cfg.model)
    assert isinstance(model.input_arch, DotInteraction)
    assert model.input_arch.output_dim == model.sparse_dim + 3
    # the watch ratio's logit adds the 3 products, each scale trained away from its start at 1
    with open_run(run, "best", device="cpu") as opened:
        scale = opened.model.logit_offsets.scale.detach()
        linear = opened.model.logit_offsets.linear.detach()
    assert scale.shape == (3, 2) and torch.equal(scale[:, 1], torch.zeros(3))
    assert float((scale[:, 0] - 1).abs().min()) > 1e-4
    # and the user's first-order weights, one per user column, for the watch ratio alone: the
    # skip's column starts at 0 and stays there through training
    assert linear.shape == (model.input_arch.blocks["user_id"][1], 2) and linear[:, 0].abs().min() > 0
    assert torch.equal(linear[:, 1], torch.zeros(len(linear)))
    record = export_run(run, tmp_path / "export")
    assert record["max_abs_difference_fp32_vs_eager"] < 1e-5  # the program computes the products too
    summary = predict(run, data, tmp_path / "preds.parquet")
    preds = pq.read_table(tmp_path / "preds.parquet").column("watch_ratio").to_numpy()
    labels = pq.read_table(data / "test").column("watch_ratio").to_numpy()
    assert summary["rows_scored"] == len(labels) == test["rows"]
    assert float(((preds - labels) ** 2).mean()) == pytest.approx(test["watch_ratio/mse"], rel=1e-5)
    saved = json.loads((run / "config.json").read_text())["model"]["dot_interactions"]
    assert saved[0] == ["user_id", "content_id"]
