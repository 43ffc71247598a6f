"""`train.profile_steps`: the profiled window's breakdown adds up and names the parts."""

import json

import pytest
from conftest import study_run_config

from engagerec.train import train


def test_a_profiled_run_writes_a_breakdown_whose_parts_add_up_to_the_step(study_data, tmp_path):
    cfg = study_run_config(study_data, epochs=1, profile_steps=4, profile_start_step=2)
    train(cfg, tmp_path / "run")
    found = json.loads((tmp_path / "run" / "profile.json").read_text())
    parts = found["ms_per_step"]
    assert found["steps"] == 4
    expected = {"step", "reader", "input_dist", "embedding_lookup", "tower_forward", "heads_forward",
                "embedding_backward_and_fused_optimizer", "backward_dense", "dense_optimizer",
                "train_metrics", "other"}  # fmt: skip
    assert set(parts) == expected
    for part in ("reader", "embedding_lookup", "tower_forward", "embedding_backward_and_fused_optimizer"):
        assert parts[part] > 0, part  # each scope was found in the trace
    named = sum(v for k, v in parts.items() if k not in ("step", "other"))
    assert named <= parts["step"] * 1.01  # no part counted twice (nested scopes)
    assert named >= 0.2 * parts["step"]  # the scopes cover a real share (a tiny model: Python overhead)
    assert named + parts["other"] == pytest.approx(parts["step"], rel=0.01)
    assert (tmp_path / "run" / "profile_trace.json").stat().st_size > 0
    assert "Self CPU" in (tmp_path / "run" / "profile_ops.txt").read_text()
