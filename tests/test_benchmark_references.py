"""The plain-PyTorch reference that benchmarks/train_throughput.py and benchmarks/scale.py time
against engagerec: it must be the same model (features, order, tower, heads, loss), or their
ratios compare different work."""

import sys
from pathlib import Path

import torch

from conftest import study_run_config
from engagerec.data.reader import ShardReader
from engagerec.model_builder import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from train_throughput import PlainEmbeddingBagModel  # noqa: E402


def test_the_plain_reference_computes_engagerecs_loss_from_the_same_weights(study_data):
    reader = ShardReader(study_data, "train", batch_size=64)
    batch = next(iter(reader))
    torch.manual_seed(0)
    model = build_model(reader.schema, study_run_config(study_data).model).eval()
    plain = PlainEmbeddingBagModel(model).eval()
    with torch.no_grad():  # the reference's tables start where engagerec's do
        for name, bag in plain.tables.items():
            bag.weight.copy_(model.sparse_arch.embedding_bags[name].weight)
        expected, _ = model(batch)
        assert torch.allclose(plain(batch), expected, rtol=1e-5, atol=1e-6)
        # a feature read from the wrong table or in the wrong order moves the loss
        plain.features = plain.features[::-1]
        assert not torch.allclose(plain(batch), expected, rtol=1e-5, atol=1e-6)
