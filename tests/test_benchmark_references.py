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
