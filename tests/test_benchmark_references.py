"""The plain-PyTorch reference that benchmarks/train_throughput.py and benchmarks/scale.py time
against engagerec: it must be the same model (features, order, tables, tower, heads, loss), or
their ratios compare different work."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import study_run_config
from engagerec.config import load_config
from engagerec.data.reader import ShardReader
from engagerec.model_builder import build_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # train_throughput.py adds it too, for its own imports

from synthetic_tables import SyntheticSource  # noqa: E402
from train_throughput import PlainEmbeddingBagModel  # noqa: E402


def _study(study_data):
    reader = ShardReader(study_data, "train", batch_size=64)
    return reader.schema, study_run_config(study_data).model, next(iter(reader))


def _scale(history_table):
    """scale.py's input: the history sharing the video table (or in its own), its model."""
    source = SyntheticSource(rows=300, batch_size=64, count=1, history_table=history_table)
    config = load_config(BENCHMARKS.parent / "configs" / "kuairand_random.yaml")
    return source.schema, config.model, source.prebuilt[0]


@pytest.mark.parametrize("case", ["study", "scale, shared history table", "scale, own history table"])
def test_the_plain_reference_computes_engagerecs_loss_from_the_same_weights(study_data, case):
    schema, model_config, batch = (
        _study(study_data) if case == "study" else _scale(history_table=case.endswith("own history table"))
    )
    torch.manual_seed(0)
    model = build_model(schema, model_config).eval()
    plain = PlainEmbeddingBagModel(model).eval()
    shared = [t.name for t in model.tables if len(t.feature_names) > 1]
    assert (shared == ["t_content_id"]) == (case == "scale, shared history table")
    with torch.no_grad():  # the reference's tables start where engagerec's do
        for name, bag in plain.tables.items():
            bag.weight.copy_(model.sparse_arch.embedding_bags[name].weight)
        expected, _ = model(batch)
        assert torch.allclose(plain(batch), expected, rtol=1e-5, atol=1e-6)
        # a feature read in the wrong place moves the loss
        plain.features = plain.features[::-1]
        assert not torch.allclose(plain(batch), expected, rtol=1e-5, atol=1e-6)


def test_embedding_backwards_two_fbgemm_paths_make_the_same_update():
    """benchmarks/backward_paths.py times FBGEMM's JIT kernel against its loop on one table:
    the loop's empty second feature must leave the update as it is, or it times other work."""
    from backward_paths import JIT, LOOP, LOOP_FP16, VARIANTS, batch_of, make_variant

    torch.manual_seed(0)
    rows, dim, bag = 50, 8, 4
    tables = {name: make_variant(name, rows, dim, learning_rate=0.5) for name in VARIANTS}
    start = torch.rand(rows, dim) - 0.5  # FBGEMM's tables start at zero, where this loss has no gradient
    for table in tables.values():
        table.split_embedding_weights()[0].detach().copy_(start)
    ids = torch.randint(0, rows // 2, (16 * bag,))  # rows 25-49 never read
    for name, table in tables.items():
        indices, offsets = batch_of(name, ids, bag)
        pooled = table(indices, offsets)
        assert pooled.shape == (16, dim * (2 if name == LOOP else 1))
        (pooled[:, :dim] ** 2).sum().backward()
    after = {name: table.split_embedding_weights()[0].detach().float() for name, table in tables.items()}
    read = torch.unique(ids)
    assert not torch.allclose(after[JIT][read], start[read], atol=1e-3)  # an update happened
    assert torch.equal(after[JIT][rows // 2 :], start[rows // 2 :])  # rows not read stay
    torch.testing.assert_close(after[LOOP], after[JIT], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[LOOP_FP16], after[JIT], rtol=0, atol=2e-2)  # fp16 storage
