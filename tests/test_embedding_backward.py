"""train.embedding_backward: FBGEMM's loop instead of its JIT kernel for the large tables that
one feature reads, by an empty companion feature. It must be the same training, evaluation and
scoring: only the path of the backward changes."""

import dataclasses
import json

import pytest
import torch

import engagerec.embedding_backward
from conftest import EQUAL_METRICS, study_run_config
from engagerec.data.reader import ShardReader
from engagerec.embedding_backward import LOOP_SUFFIX, uses_loop
from engagerec.export import export_run
from engagerec.runs import evaluate_run, open_run
from engagerec.train import train


def test_the_loop_trains_evaluates_and_scores_as_the_kernel_does(study_data, tmp_path, monkeypatch):
    monkeypatch.setattr(engagerec.embedding_backward, "MIN_ROWS", 1)  # the study's tables are small
    cfg = study_run_config(study_data, epochs=1)
    runs = {}
    for path in ("kernel", "loop"):
        changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, embedding_backward=path))
        runs[path] = train(changed, tmp_path / path)
        assert runs[path]["embedding_backward"] == path
    for key in EQUAL_METRICS:  # the validation during training and the test after it
        for split, metrics in (("val", runs["kernel"]["history"][-1]), ("test", runs["kernel"]["test"])):
            found = (runs["loop"]["history"][-1] if split == "val" else runs["loop"]["test"])[key]
            assert found == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), (split, key)
    weights = {}
    for path in runs:
        with open_run(tmp_path / path, "best", device="cpu") as run:
            companions = [n for t in run.model.tables for n in t.feature_names if n.endswith(LOOP_SUFFIX)]
            assert not companions  # opened to evaluate or score: no backward, no companions
            weights[path] = {
                k: _local(v).clone() for k, v in run.dmp.state_dict().items() if "embedding_bags" in k
            }
        # the run's own evaluation and scoring read the companions' keys too
        again = evaluate_run(tmp_path / path, "test")
        assert again["skip/auc"] == pytest.approx(runs[path]["test"]["skip/auc"], rel=1e-6)
    # the exported program is the model's own: no companions, the same test metrics
    exported = export_run(tmp_path / "loop", tmp_path / "export")["programs"]["fp32"]["test"]
    assert exported["skip/auc"] == pytest.approx(runs["loop"]["test"]["skip/auc"], rel=1e-4)
    assert weights["loop"].keys() == weights["kernel"].keys() and weights["loop"]
    for name, tensor in weights["kernel"].items():
        torch.testing.assert_close(weights["loop"][name], tensor, rtol=1e-5, atol=1e-6)


def _local(value):
    """A state-dict value as a plain tensor (one process: a sharded table's one shard)."""
    return value.local_shards()[0].tensor if hasattr(value, "local_shards") else value


def test_a_reader_adds_the_empty_keys_after_the_datas_own(study_data):
    plain = next(iter(ShardReader(study_data, "val", batch_size=64)))
    extended = next(iter(ShardReader(study_data, "val", batch_size=64, empty_keys=["a__loop", "b__loop"])))
    features = extended.sparse_features
    assert features.keys() == plain.sparse_features.keys() + ["a__loop", "b__loop"]
    assert features["a__loop"].lengths().tolist() == [0] * 64 and features["b__loop"].values().numel() == 0
    for key in plain.sparse_features.keys():
        assert torch.equal(features[key].values(), plain.sparse_features[key].values())


def test_the_setting_picks_the_path_on_cpu_only(monkeypatch):
    monkeypatch.setattr(engagerec.embedding_backward, "loop_is_faster", lambda: True)
    assert uses_loop("auto", torch.device("cpu")) and not uses_loop("auto", torch.device("cuda"))
    assert not uses_loop("kernel", torch.device("cpu"))
    monkeypatch.setattr(engagerec.embedding_backward, "loop_is_faster", lambda: False)
    assert not uses_loop("auto", torch.device("cpu")) and uses_loop("loop", torch.device("cpu"))
    with pytest.raises(ValueError, match="embedding_backward"):
        uses_loop("fast", torch.device("cpu"))


def test_results_record_what_auto_picked(study_data, tmp_path, monkeypatch):
    monkeypatch.setattr(engagerec.embedding_backward, "MIN_ROWS", 1)
    monkeypatch.setattr(engagerec.embedding_backward, "loop_is_faster", lambda: True)
    cfg = study_run_config(study_data, epochs=1, max_steps=3, embedding_backward="auto")
    train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["embedding_backward"] == "loop"


@pytest.mark.parametrize(("loop_seconds", "taken"), [(0.5, True), (0.9, False), (2.0, False)])
def test_auto_takes_the_loop_only_when_clearly_faster(monkeypatch, loop_seconds, taken):
    """Under LOOP_MARGIN of the kernel's time: a close timing keeps FBGEMM's own choice."""
    monkeypatch.setattr(
        engagerec.embedding_backward, "backward_seconds", lambda: {"kernel": 1.0, "loop": loop_seconds}
    )
    engagerec.embedding_backward.loop_is_faster.cache_clear()
    try:
        assert engagerec.embedding_backward.loop_is_faster() is taken
    finally:
        engagerec.embedding_backward.loop_is_faster.cache_clear()  # other tests time this machine


def test_a_feature_named_like_a_companion_is_refused():
    from engagerec.config import EmbeddingConfig
    from engagerec.data.schema import DatasetSchema, LabelSpec, SparseFeature
    from engagerec.errors import ConfigError
    from engagerec.features import FeatureSpec

    schema = DatasetSchema(
        features=[],
        sparse=[SparseFeature("video__loop", "video", multi=False)],
        dense=[],
        labels=[LabelSpec("skip", "binary")],
        vocab_sizes={"video": 10},
    )
    with pytest.raises(ConfigError, match="reserved"):
        FeatureSpec.from_schema(schema, EmbeddingConfig())
