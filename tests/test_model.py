"""MultiTaskModel on real TorchRec modules: tables, tracing, gradients and learning."""

import sys
import textwrap

import pytest
import torch
from test_towers import SMALL
from torchrec.distributed.train_pipeline.tracing import Tracer
from torchrec.modules.embedding_configs import PoolingType

from conftest import prepare_synthetic, synthetic_mmoe_config, video_and_history_schema
from engagerec.batch import Batch
from engagerec.config import EmbeddingConfig, ModelConfig, TaskConfig, TowerConfig
from engagerec.data.prepare import prepare
from engagerec.data.reader import ShardReader
from engagerec.errors import ConfigError
from engagerec.features import FeatureSpec
from engagerec.model import MultiTaskModel, task_labels
from engagerec.model_builder import build_model
from engagerec.towers import TOWERS, build_tower, register_tower


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def mmoe_data(tmp_path_factory):
    """configs/synthetic_mmoe.yaml, smaller: 24,000 rows of 16 inputs, through prepare()."""
    out = tmp_path_factory.mktemp("mmoe")
    prepare(synthetic_mmoe_config(out, num_rows=24_000, input_dim=16).data, out)
    return out


def _model(schema, tower="mmoe", tasks=None, **embeddings):
    cfg = ModelConfig(
        embeddings=EmbeddingConfig(dim=8, **embeddings), tower=TowerConfig(tower, SMALL.get(tower, {}))
    )
    if tasks is not None:
        cfg.tasks = tasks
    return build_model(schema, cfg)


def test_one_table_per_id_space_with_its_vocabulary_size(study_data):
    schema = ShardReader(study_data, "train").schema
    spec = FeatureSpec.from_schema(schema, EmbeddingConfig(dim=8, dims={"user_id": 4}))
    tables = {t.name: t for t in spec.tables}
    assert tables["t_user_id"].num_embeddings == schema.num_embeddings("user_id")
    assert tables["t_user_id"].embedding_dim == 4
    assert tables["t_genres"].feature_names == ["genres"] and tables["t_genres"].pooling == PoolingType.SUM
    assert spec.input_dim == 4 + 8 * (len(schema.sparse) - 1) + len(schema.dense)


def test_features_sharing_an_id_space_share_one_table():
    spec = FeatureSpec.from_schema(video_and_history_schema(), EmbeddingConfig())
    assert len(spec.tables) == 1 and spec.tables[0].feature_names == ["content_id", "history"]
    assert spec.tables[0].pooling == PoolingType.MEAN  # history's default; a single id is unaffected
    assert spec.input_dim == 2 * 16


def test_a_feature_named_in_own_table_reads_a_table_of_its_own_with_its_spaces_rows():
    """own_table: the history gets a table of the video space's rows and width, read by it
    alone; the video's table no longer serves it, so changing that table leaves the history's
    pooled embedding as it was."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    spec = FeatureSpec.from_schema(
        video_and_history_schema(), EmbeddingConfig(dim=4, dims={"content_id": 6}, own_table=["history"])
    )
    assert [(t.name, t.num_embeddings, t.embedding_dim, t.feature_names) for t in spec.tables] == [
        ("t_content_id", 11, 6, ["content_id"]),
        ("t_content_id__history", 11, 6, ["history"]),
    ]
    assert spec.spaces == {"t_content_id": "content_id", "t_content_id__history": "content_id"}
    assert spec.tables[1].pooling == PoolingType.MEAN and spec.input_dim == 12
    tables = EmbeddingBagCollection(tables=spec.tables)
    batch = KeyedJaggedTensor.from_lengths_sync(
        keys=["content_id", "history"],
        values=torch.tensor([3, 5, 3, 7, 1]),
        lengths=torch.tensor([1, 1, 2, 1]),  # two rows: videos 3 and 5; histories [3, 7] and [1]
    )
    own = tables.embedding_bags["t_content_id__history"].weight
    before = tables(batch).to_dict()["history"].detach().clone()
    assert torch.allclose(before[0], own[[3, 7]].mean(0)) and torch.allclose(before[1], own[1])
    with torch.no_grad():
        tables.embedding_bags["t_content_id"].weight.zero_()
    after = tables(batch).to_dict()
    assert torch.equal(after["history"], before) and not after["content_id"].any()


def test_own_table_refuses_what_it_cannot_give_a_table():
    from engagerec.data.schema import DatasetSchema, SparseFeature

    def schema(*pairs):  # (name, id space), one id per row
        features = [{"name": name, "kind": "categorical"} for name, _ in pairs]
        sparse = [SparseFeature(name, space, False) for name, space in pairs]
        return DatasetSchema(features, sparse, [], [], vocab_sizes={space: 4 for _, space in pairs})

    video, history = ("content_id", "content_id"), ("history", "content_id")
    refused = [
        (video_and_history_schema(), ["history", "history"], "names a feature twice"),
        (
            video_and_history_schema(),
            ["recent_views"],
            "'recent_views' is no sparse feature of the prepared data",
        ),
        (
            video_and_history_schema(managed={"content_id": {"rows": 8}}),
            ["history"],
            "assigned while training \\(managed_collisions\\)",
        ),
        (schema(video, ("history@0", "content_id")), ["history"], "is a history with positions"),
        (
            schema(video, history, ("x", "content_id__history")),
            ["history"],
            "would read as another id space's",
        ),
    ]
    for prepared, own_table, expected in refused:
        with pytest.raises(ConfigError, match=expected):
            FeatureSpec.from_schema(prepared, EmbeddingConfig(own_table=own_table))
    # alone in its space (a derived config dropped the features it shared it with): its table is
    # its own already, and keeps the space's name
    alone = FeatureSpec.from_schema(
        schema(video, ("user_id", "user_id")), EmbeddingConfig(own_table=["user_id"])
    )
    assert [t.name for t in alone.tables] == ["t_content_id", "t_user_id"]


def test_forward_shapes_and_study_loss(study_data):
    reader = ShardReader(study_data, "train", batch_size=64)
    model = _model(reader.schema)
    batch = next(iter(reader))
    loss, (task_losses, predictions, labels, weights) = model(batch)
    assert task_losses.shape == (2,) and torch.isclose(loss, task_losses.sum())
    assert set(predictions) == {"watch_ratio", "skip"} and predictions["skip"].shape == (64,)
    assert ((predictions["watch_ratio"] >= 0) & (predictions["watch_ratio"] <= 1)).all()
    assert ((predictions["skip"] >= 0) & (predictions["skip"] <= 1)).all()
    assert torch.equal(labels["skip"], batch.labels["skip"])
    assert torch.equal(weights["skip"], batch.label_weights["skip"]) and bool((weights["skip"] == 1).all())


def test_default_tasks_are_one_per_label_of_the_prepared_data(study_data, mmoe_data):
    """ModelConfig.tasks empty: a task per label of schema.json, a sigmoid only for a label in [0, 1]."""
    study = _model(ShardReader(study_data, "train").schema)
    assert [(t.name, t.label, t.kind) for t in study.tasks] == [
        ("watch_ratio", "watch_ratio", "regression"),
        ("skip", "skip", "binary"),
    ]
    assert study.heads[0].transform == "sigmoid" and study.heads[1].transform == "identity"  # skip: a logit
    mmoe = build_model(ShardReader(mmoe_data, "train").schema, ModelConfig())
    assert [(t.name, t.kind) for t in mmoe.tasks] == [("y1", "regression"), ("y2", "regression")]
    assert [h.transform for h in mmoe.heads] == ["identity", "identity"]  # y is not a ratio


def test_a_missing_label_weighs_nothing_in_its_tasks_loss(study_data):
    """Rows whose label is missing (NaN in the shard -> label_weights 0) count for nothing in that
    task's loss, whatever their label value, and leave the other task's loss as it was."""
    from engagerec.tasks import Task

    torch.manual_seed(0)
    output, label = torch.rand(10), torch.rand(10)
    weight = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    present = weight > 0
    regression = Task(TaskConfig("r", "r"))
    torch.testing.assert_close(
        regression.loss(output, label, weight), ((output - label)[present] ** 2).mean()
    )
    binary, logit, bit = Task(TaskConfig("b", "b", kind="binary")), torch.randn(10), (label > 0.5).float()
    torch.testing.assert_close(
        binary.loss(logit, bit, weight),
        torch.nn.functional.binary_cross_entropy_with_logits(logit[present], bit[present]),
    )
    assert regression.loss(output, label, torch.zeros(10)) == 0  # a batch without the label: no loss

    reader = ShardReader(study_data, "train", batch_size=64)
    model = _model(reader.schema).eval()
    batch = next(iter(reader))
    missing = torch.arange(64) % 3 == 0
    labels = dict(batch.labels, watch_ratio=torch.where(missing, 7.0, batch.labels["watch_ratio"]))
    label_weights = dict(batch.label_weights, watch_ratio=torch.where(missing, 0.0, batch.weights))
    holed = Batch(batch.dense_features, batch.sparse_features, labels, batch.weights, label_weights)
    with torch.no_grad():
        _, (full, _, _, _) = model(batch)
        _, (task_losses, predictions, _, weights) = model(holed)
    expected = ((predictions["watch_ratio"] - batch.labels["watch_ratio"])[~missing] ** 2).mean()
    torch.testing.assert_close(task_losses[0], expected)
    assert not torch.isclose(task_losses[0], full[0])  # with their labels present, those rows do count
    assert torch.equal(task_losses[1], full[1]) and torch.equal(
        weights["watch_ratio"], label_weights["watch_ratio"]
    )


def test_a_third_task_is_config(study_data):
    reader = ShardReader(study_data, "train", batch_size=32)
    tasks = [
        TaskConfig("watch_ratio", "watch_ratio"),
        TaskConfig("skip", "skip", kind="binary", weight=2.0),
        TaskConfig("raw_ratio", "watch_ratio", output="identity", head_sizes=[8]),
    ]
    model = _model(reader.schema, "ple", tasks=tasks)
    loss, (task_losses, predictions, _, _) = model(next(iter(reader)))
    assert len(model.heads) == 3 and set(predictions) == {"watch_ratio", "skip", "raw_ratio"}
    torch.testing.assert_close(loss, task_losses[0] + 2 * task_losses[1] + task_losses[2])
    with pytest.raises(ConfigError, match=r"model.tasks: labels \['like'\] are not in the prepared data"):
        _model(reader.schema, tasks=[TaskConfig("like", "like", kind="binary")])


@pytest.mark.parametrize("tower", sorted(SMALL))
def test_gradients_reach_experts_gates_and_embedding_tables(study_data, tower):
    reader = ShardReader(study_data, "train", batch_size=256)
    # seeded: about 1 initialisation in 200 leaves every ReLU of one small PLE expert dead on this
    # batch (its gradient exactly 0), which depends on what ran before in the test process
    torch.manual_seed(0)
    model = _model(reader.schema, tower)
    loss, _ = model(next(iter(reader)))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    embedding_grads = [n for n, _ in model.named_parameters() if n.startswith("sparse_arch.")]
    assert len(embedding_grads) == len(model.tables)


@pytest.mark.parametrize("tower", ["mmoe", "ple", "cross_stitch", "shared_bottom"])
def test_train_autocast_runs_the_tower_in_bf16_while_training_and_float32_otherwise(study_data, tower):
    """train_autocast=bf16: in training mode the tower's matmuls run in bf16 while its weights,
    their gradients, the heads and the loss stay float32; in eval mode nothing changes."""
    reader = ShardReader(study_data, "train", batch_size=256)
    batch = next(iter(reader))
    torch.manual_seed(0)
    plain = _model(reader.schema, tower)
    torch.manual_seed(0)
    mixed = _model(reader.schema, tower)
    mixed.train_autocast = torch.bfloat16
    seen = []
    from engagerec.towers.common import ExpertGroup

    matmuls = [m for m in mixed.tower.modules() if isinstance(m, (torch.nn.Linear, ExpertGroup))]
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in matmuls]
    loss, (_, predictions, _, _) = mixed(batch)
    reference, (_, expected, _, _) = plain(batch)
    assert matmuls and set(seen) == {torch.bfloat16}  # every tower matmul in bf16
    assert loss.dtype == torch.float32 and all(p.dtype == torch.float32 for p in predictions.values())
    # bf16 rounding moves the predictions (the loss, a mean over the batch, can round back to
    # float32's own value) and no more
    assert any(not torch.equal(predictions[name], expected[name]) for name in expected)
    assert torch.isclose(loss, reference, rtol=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mixed.tower.parameters())
    # the tower's input is cast once, so its readers' gradients add in bf16: the embedding
    # gradients still point where float32's do
    reference.backward()
    for table, plain_table in zip(
        mixed.embedding_bag_collection.embedding_bags.values(),
        plain.embedding_bag_collection.embedding_bags.values(),
        strict=True,
    ):
        got, want = table.weight.grad.flatten(), plain_table.weight.grad.flatten()
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99, table
    seen.clear()
    mixed.eval()
    plain.eval()
    with torch.no_grad():
        _, (_, evaluated, _, _) = mixed(batch)
        _, (_, expected, _, _) = plain(batch)
    assert set(seen) == {torch.float32}
    for name in expected:  # evaluation, predict and export see the float32 model
        assert torch.equal(evaluated[name], expected[name])
    for hook in hooks:
        hook.remove()


def test_forward_fx_traces_with_the_kjt_going_straight_into_the_embeddings(study_data):
    reader = ShardReader(study_data, "train", batch_size=16)
    model = _model(reader.schema, "ple")
    heads = [f"heads.{i}" for i in range(model.num_tasks)]
    # the pipeline's own tracer, with the modules it takes as leaves (no ShardedModule inside):
    # the embedding module, the column order, the tower and the heads (task_labels is fx.wrap-ped)
    graph = Tracer(leaf_modules=["sparse_arch", "pooled_by_name", "tower", *heads]).trace(model)
    lookups = [n for n in graph.nodes if n.op == "call_module" and n.target == "sparse_arch"]
    assert len(lookups) == 1
    (kjt,) = lookups[0].args
    assert kjt.op == "call_function" and kjt.args[0].op == "placeholder" and kjt.args[1] == "sparse_features"
    assert len(kjt.users) == 1  # nothing else reads the KJT before the lookup
    # the labels are read by one wrapped call, whatever the tracer takes as leaves (with every
    # table data-parallel, TorchRec's pipeline takes none and traces the whole forward)
    assert [n.target for n in graph.nodes if n.op == "call_function"].count(task_labels) == 1
    traced = torch.fx.GraphModule(model, graph)
    batch = next(iter(reader))
    torch.testing.assert_close(traced(batch)[0], model(batch)[0])


def _train(model, data, steps, lr=3e-3, batch_size=256):
    reader = ShardReader(data, "train", batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    done, epoch = 0, 0
    while done < steps:
        reader.set_epoch(epoch)
        for batch in reader:
            loss, _ = model(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
        epoch += 1


def _test_losses(model, data):
    """(task losses on the whole test split, each label's variance = a constant predictor's MSE)."""
    batch = next(iter(ShardReader(data, "test", batch_size=100_000)))
    with torch.no_grad():
        _, (task_losses, _, labels, _) = model(batch)
    constant = torch.stack([labels[t.name].var(unbiased=False) for t in model.tasks])
    return task_losses, constant


MMOE_BENCHMARK_TOWERS = {
    "single_task": {"layer_sizes": [64, 32]},
    "shared_bottom": {"layer_sizes": [64, 32]},
    "cross_stitch": {"layer_sizes": [64, 32], "alpha_init": "near_identity"},
    "mmoe": {"num_experts": 4, "expert_sizes": [64, 32]},
    "cgc": {"num_shared": 2, "num_specific": 1, "expert_sizes": [64, 32]},
    "ple": {"num_levels": 2, "num_shared": 2, "num_specific": 1, "expert_sizes": [32]},
}


@pytest.mark.parametrize("tower", sorted(MMOE_BENCHMARK_TOWERS))
def test_every_tower_learns_the_mmoe_benchmark(mmoe_data, tower):
    """Ma et al.'s synthetic tasks: within 400 steps both test losses fall below a tenth of a
    constant predictor's (about 2% was seen on this data when written)."""
    torch.manual_seed(0)
    tasks = [TaskConfig("y1", "y1", output="identity"), TaskConfig("y2", "y2", output="identity")]
    reader = ShardReader(mmoe_data, "train")
    cfg = ModelConfig(tower=TowerConfig(tower, MMOE_BENCHMARK_TOWERS[tower]), tasks=tasks)
    model = build_model(reader.schema, cfg)
    _train(model, mmoe_data, steps=400)
    task_losses, constant = _test_losses(model, mmoe_data)
    assert (task_losses < 0.1 * constant).all(), (task_losses, constant)


def test_a_user_defined_tower_trains_through_the_normal_path(study_data):
    @register_tower("test_two_layer_linear")
    class TwoLayerLinear(torch.nn.Module):
        def __init__(self, input_dim, num_tasks, width=8):
            super().__init__()
            self.shared = torch.nn.Linear(input_dim, width)
            self.output_dims = [width] * num_tasks
            self.num_tasks = num_tasks

        def forward(self, x):
            h = torch.relu(self.shared(x))
            return [h for _ in range(self.num_tasks)]

    try:
        torch.manual_seed(0)
        reader = ShardReader(study_data, "train")
        model = _model(reader.schema, "test_two_layer_linear")
        before, _ = _test_losses(model, study_data)
        _train(model, study_data, steps=150)
        after, constant = _test_losses(model, study_data)
        assert isinstance(model.tower, TwoLayerLinear)
        assert after[0] < before[0] and after[0] < constant[0]  # watch-ratio MSE
    finally:
        TOWERS.pop("test_two_layer_linear")


def test_a_tower_from_another_package_is_found_by_entry_point(tmp_path, monkeypatch):
    package = tmp_path / "thirdparty_towers"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent("""
        import torch

        class Bilinear(torch.nn.Module):
            def __init__(self, input_dim, num_tasks, width=4):
                super().__init__()
                self.proj = torch.nn.Linear(input_dim, width)
                self.output_dims = [width] * num_tasks
                self.num_tasks = num_tasks

            def forward(self, x):
                h = self.proj(x)
                return [h * h for _ in range(self.num_tasks)]
    """)
    )
    dist = tmp_path / "thirdparty_towers-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-towers\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[engagerec.towers]\nbilinear_test = thirdparty_towers:Bilinear\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from engagerec.towers import build_tower

    try:
        tower = build_tower("bilinear_test", 6, 2, width=3)
        assert type(tower).__module__ == "thirdparty_towers" and tower.output_dims == [3, 3]
        assert len(tower(torch.randn(2, 6))) == 2
    finally:
        TOWERS.pop("bilinear_test", None)
        sys.modules.pop("thirdparty_towers", None)


def test_auto_dim_sizes_small_tables_down(study_data):
    from engagerec.features import auto_dim

    assert [auto_dim(r, 16) for r in (2, 3, 25, 300, 100_000)] == [8, 8, 12, 16, 16]
    schema = ShardReader(study_data, "train").schema
    spec = FeatureSpec.from_schema(schema, EmbeddingConfig(dim=16, auto_dim=True, dims={"gender": 4}))
    dims = {t.name: t.embedding_dim for t in spec.tables}
    assert (
        dims["t_gender"] == 4
        and dims["t_user_id"] == 16
        and dims["t_duration_bucket"] == auto_dim(schema.num_embeddings("duration_bucket"), 16)
    )


def _user_tables():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=20, feature_names=["user"]),
        EmbeddingBagConfig(
            name="t_item",
            embedding_dim=6,
            num_embeddings=30,
            feature_names=["item", "seen"],
            pooling=PoolingType.MEAN,
        ),
    ]
    return EmbeddingBagCollection(tables=tables)


def _torchrec_batch(labels, rows=5):
    from torchrec import KeyedJaggedTensor
    from torchrec.datasets.utils import Batch as TorchRecBatch

    ids = torch.arange(3 * rows) % 20
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "item", "seen"], ids, torch.ones(3 * rows, dtype=torch.int32)
    )
    return TorchRecBatch(dense_features=torch.randn(rows, 2), sparse_features=kjt, labels=labels)


def test_the_model_uses_the_callers_own_tables_and_any_stated_subset_of_their_features():
    torch.manual_seed(0)
    ebc = _user_tables()
    before = ebc.embedding_bags["t_item"].weight.detach().clone()
    tasks = [TaskConfig("click", "click", kind="binary")]
    tower = build_tower("shared_bottom", 6 + 4 + 2, 1, layer_sizes=[8])  # item, then user: as stated
    model = MultiTaskModel(ebc, dense_in_features=2, tower=tower, tasks=tasks, feature_names=["item", "user"])
    assert model.embedding_bag_collection is ebc  # kept, not rebuilt: the caller's options stay
    assert torch.equal(model.embedding_bag_collection.embedding_bags["t_item"].weight, before)
    assert model.feature_names == ["item", "user"] and model.sparse_dim == 10
    batch = _torchrec_batch(torch.tensor([1, 0, 1, 1, 0]))  # int 0/1 labels [B] for one binary task
    pooled = ebc(batch.sparse_features).to_dict()
    expected = torch.cat([pooled["item"], pooled["user"], batch.dense_features], dim=1)
    torch.testing.assert_close(model.tower_input(batch), expected)  # "seen" left out, order as stated
    loss, (_, predictions, labels, weights) = model(batch)
    assert labels["click"].dtype == torch.float32 and torch.equal(weights["click"], torch.ones(5))
    with pytest.raises(
        ValueError, match=r"feature_names \['genre'\] are not features of the embedding module"
    ):
        MultiTaskModel(_user_tables(), 2, tower, tasks, feature_names=["genre"])


@pytest.mark.parametrize(
    "names",
    [["seen", "item", "user"], ["item", "seen", "user"], ["item", "user"], ["seen"], ["user", "user"]],
)
def test_pooled_by_name_orders_columns_and_appends_dense_with_autograds_gradient(names):
    """A reordering of every feature and a subset (one copy each way, zeros for the unread
    columns' gradient) give the values and the embedding gradients of indexing the pooled dict
    by name; a feature read twice takes the plain gather."""
    from engagerec.model import PooledByName

    torch.manual_seed(0)
    ebc = _user_tables()
    batch = _torchrec_batch(torch.tensor([1, 0, 1, 1, 0]))
    pooled = ebc(batch.sparse_features)
    dense = batch.dense_features
    made = PooledByName(names)(pooled, dense)
    by_name = pooled.to_dict()
    expected = torch.cat([*(by_name[n] for n in names), dense], dim=1)
    torch.testing.assert_close(made, expected, rtol=0, atol=0)
    once = len(set(names)) == len(names)
    assert (type(made.grad_fn).__name__ == "_PermuteColumnsBackward") == once
    weights = [t.weight for t in ebc.embedding_bags.values()]
    upstream = torch.randn_like(made)
    got = torch.autograd.grad(made, weights, upstream, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(expected, weights, upstream, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
    with torch.no_grad():  # no gradient wanted: the plain gather, same values
        torch.testing.assert_close(PooledByName(names)(pooled, dense), expected, rtol=0, atol=0)
    # dense features that want a gradient get it, through the plain gather
    wanting = dense.clone().requires_grad_()
    (dense_grad,) = torch.autograd.grad(PooledByName(names)(pooled, wanting), wanting, upstream)
    torch.testing.assert_close(dense_grad, upstream[:, -dense.shape[1] :], rtol=0, atol=0)


def test_embedding_l2_adds_the_pooled_features_squared_norms_while_training_only():
    """The penalty is embedding_l2 x the batch mean of each row's squared pooled norm (the chosen
    features only; a bag's pooled mean, not its rows one by one), so a one-id feature's row gets
    2 x embedding_l2 x its value / B more gradient; in eval mode the loss is the task losses'."""
    from torchrec import KeyedJaggedTensor
    from torchrec.datasets.utils import Batch as TorchRecBatch

    tasks = [TaskConfig("click", "click", kind="binary")]
    # user: one id per row; item: a bag of two ids per row (t_item pools by mean); seen: unused
    lengths = torch.tensor([1] * 5 + [2] * 5 + [1] * 5, dtype=torch.int32)
    ids = torch.cat([torch.arange(5), torch.arange(10) % 7 + 5, torch.arange(5)])
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item", "seen"], ids, lengths)
    batch = TorchRecBatch(torch.randn(5, 2), kjt, torch.tensor([1, 0, 1, 1, 0]))

    def model_with(l2):
        torch.manual_seed(0)
        tower = build_tower("shared_bottom", 6 + 4 + 2, 1, layer_sizes=[8])
        return MultiTaskModel(
            _user_tables(), 2, tower, tasks, feature_names=["item", "user"], embedding_l2=l2
        )

    plain, penalised = model_with(0.0), model_with(0.5)
    pooled = plain.embedding_bag_collection(batch.sparse_features).to_dict()
    squared = (pooled["item"].square().sum(1) + pooled["user"].square().sum(1)).mean()  # not "seen"
    reference, _ = plain(batch)
    loss, _ = penalised(batch)
    torch.testing.assert_close(loss, reference + 0.5 * squared)
    reference.backward()
    loss.backward()
    user_rows = batch.sparse_features["user"].values()  # each user id once in this batch
    weights, unpenalised = (
        m.embedding_bag_collection.embedding_bags["t_user"].weight for m in (penalised, plain)
    )
    extra = weights.grad[user_rows] - unpenalised.grad[user_rows]
    torch.testing.assert_close(extra, 2 * 0.5 * weights.detach()[user_rows] / 5)
    penalised.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(penalised(batch)[0], plain(batch)[0])
    with pytest.raises(ValueError, match="embedding_l2 must be 0 or more"):
        model_with(-0.1)


def test_torchrec_batch_labels_that_do_not_fit_the_tasks_are_refused_naming_the_task():
    tasks = [TaskConfig("dwell", "dwell", output="identity"), TaskConfig("click", "click", kind="binary")]
    tower = build_tower("shared_bottom", 16 + 2, 2, layer_sizes=[8])
    for labels, label_columns, message in [
        (torch.rand(5), None, r"task 'dwell': labels of shape \[5\] hold one task's labels; 2 tasks need"),
        (torch.rand(5, 1), None, r"task 'click': reads label column 1, but the labels have 1 columns"),
        (torch.rand(4, 2), None, r"task 'dwell': labels of shape \[4\], expected \[5\]"),
        (torch.randint(0, 2, (5, 2)), None, r"task 'dwell' \(regression\): labels of dtype torch.int64"),
        (torch.rand(5, 3), {"dwell": 2}, r"tasks without one \['click'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            MultiTaskModel(_user_tables(), 2, tower, tasks, label_columns=label_columns)(
                _torchrec_batch(labels)
            )


def test_label_columns_map_tasks_to_columns_of_a_torchrec_batch():
    tasks = [TaskConfig("dwell", "dwell", output="identity"), TaskConfig("click", "click", kind="binary")]
    tower = build_tower("shared_bottom", 16 + 2, 2, layer_sizes=[8])
    model = MultiTaskModel(_user_tables(), 2, tower, tasks, label_columns={"dwell": 2, "click": 0})
    labels = torch.tensor(
        [[1.0, 9.0, 30.0], [0.0, 9.0, 12.0], [1.0, 9.0, 7.0], [0.0, 9.0, 1.0], [0.0, 9.0, 2.0]]
    )
    _, (_, _, read, _) = model(_torchrec_batch(labels))
    assert torch.equal(read["dwell"], labels[:, 2]) and torch.equal(read["click"], labels[:, 0])
