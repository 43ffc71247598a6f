"""The CUDA path: marked ``gpu``, collected everywhere, skipped where torch sees no GPU
(tests/conftest.py). ``benchmarks/gpu_check.sh`` runs them on a GPU machine. The refusals a
CPU machine must give come first and run everywhere."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import EQUAL_METRICS, study_run_config, torchrun, write_study_config
from engagerec.config import load_config
from engagerec.distributed import Runtime, _constraints, shard_model
from engagerec.errors import ConfigError
from engagerec.model_builder import build_model
from engagerec.runs import evaluate_run
from engagerec.train import train

CPU = Runtime(rank=0, world_size=1, device=torch.device("cpu"), owns_group=False)


def _meta_model(data_dir):
    from engagerec.data.schema import DatasetSchema

    cfg = study_run_config(data_dir)
    return build_model(DatasetSchema.load(data_dir), cfg.model, device=torch.device("meta"))


def test_row_wise_sharding_is_refused_on_cpu_with_the_alternatives(study_data):
    model = _meta_model(study_data)
    for kind in ("row_wise", "table_row_wise"):
        with pytest.raises(ConfigError, match=f"train.sharding.\\*: {kind} sharding needs CUDA.*table_wise"):
            _constraints(model, {"*": ["table_wise", kind]}, world_size=1, device_type="cpu")
    assert _constraints(model, {"*": ["row_wise"]}, world_size=1, device_type="cuda")  # offered on CUDA


def test_gpu_only_sparse_optimizers_are_refused_on_cpu(study_data):
    for name in ("adam", "lamb", "partial_rowwise_adam"):
        with pytest.raises(ConfigError, match=f"'{name}' \\(it needs CUDA.*rowwise_adagrad"):
            shard_model(_meta_model(study_data), CPU, 256, {}, name, 0.01)
    with pytest.raises(ConfigError, match="'adamw'; on cpu expected one of adagrad, rowwise_adagrad, sgd"):
        shard_model(_meta_model(study_data), CPU, 256, {}, "adamw", 0.01)


def test_train_device_is_checked_when_the_config_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"device": "gpu"}}))
    with pytest.raises(ConfigError, match="train.device: expected one of auto, cpu, cuda, got 'gpu'"):
        load_config(path)
    path.write_text(yaml.safe_dump({"train": {"monitor_mode": "maximum"}}))
    with pytest.raises(ConfigError, match="train.monitor_mode: expected one of min, max"):
        load_config(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(study_data, tmp_path):
    with pytest.raises(ConfigError, match="train.device is cuda, but torch sees no CUDA device"):
        train(study_run_config(study_data, device="cuda"), tmp_path / "run")


def test_a_run_with_cuda_only_settings_evaluates_on_cpu(study_data, tmp_path):
    """A run whose recorded config holds CUDA-only settings (fused Adam, row-wise tables, device
    cuda) evaluates on CPU: evaluation builds its model with CPU settings in their place. The run
    itself is trained on CPU and its config.json edited, so this proves the settings are stood in
    for, not that tables trained on a GPU load on CPU: that is
    test_a_gpu_run_with_fused_adam_and_row_wise_tables_evaluates_on_cpu (marked gpu)."""
    run = tmp_path / "run"
    results = train(study_run_config(study_data, epochs=1), run)
    raw = json.loads((run / "config.json").read_text())
    raw["train"].update(sparse_optimizer="adam", sharding={"*": ["row_wise"]}, device="cuda")
    (run / "config.json").write_text(json.dumps(raw))  # as a GPU run would have written it
    on_cpu = evaluate_run(run, "test", device="cpu")
    for key in EQUAL_METRICS:
        assert on_cpu[key] == pytest.approx(results["test"][key], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------- on a GPU


def _gpu_run(data_dir, out, **train_changes):
    cfg = study_run_config(data_dir, device="cuda", epochs=2, **train_changes)
    return train(cfg, out, resume=False)


@pytest.mark.gpu
def test_one_gpu_trains_and_its_checkpoint_evaluates_on_cpu_alike(study_data, tmp_path):
    results = _gpu_run(study_data, tmp_path / "run")
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert all(t["compute_kernel"] == "fused" for t in plan.values())
    assert results["test"]["skip/auc"] > 0.7  # it learned (CPU runs of this config reach ~0.8)
    on_cpu = evaluate_run(tmp_path / "run", "test", device="cpu")
    for key in EQUAL_METRICS:  # the same checkpoint: GPU and CPU kernels agree to float32 noise
        assert on_cpu[key] == pytest.approx(results["test"][key], rel=1e-3, abs=1e-4), key


@pytest.mark.gpu
def test_fused_adam_and_lamb_train_on_gpu(study_data, tmp_path):
    for name in ("adam", "lamb"):
        results = _gpu_run(study_data, tmp_path / name, sparse_optimizer=name, sparse_lr=0.01)
        first, last = results["history"][0]["loss"], results["history"][-1]["loss"]
        assert last <= first and results["test"]["skip/auc"] > 0.7, name


@pytest.mark.gpu
def test_a_bf16_tower_trains_on_gpu_and_evaluates_on_cpu_alike(study_data, tmp_path):
    """train.tower_precision=bf16 on CUDA: the tower computes in bf16 while training; the
    checkpoint holds float32 weights that evaluate on CPU to the GPU's own test metrics."""
    results = _gpu_run(study_data, tmp_path / "run", tower_precision="bf16")
    plain = _gpu_run(study_data, tmp_path / "fp32")
    assert results["test"]["watch_ratio/mse"] != plain["test"]["watch_ratio/mse"]  # it did compute in bf16
    assert results["test"]["watch_ratio/mse"] == pytest.approx(plain["test"]["watch_ratio/mse"], rel=0.02)
    assert results["test"]["skip/auc"] > 0.7
    on_cpu = evaluate_run(tmp_path / "run", "test", device="cpu")
    for key in EQUAL_METRICS:  # evaluation is float32 on both
        assert on_cpu[key] == pytest.approx(results["test"][key], rel=1e-3, abs=1e-4), key


@pytest.mark.gpu
def test_auto_precision_on_gpu_is_bf16_from_compute_capability_8():
    """tower_precision auto on CUDA: bf16 on Ampere and later (native bf16 matmuls), float32 on
    older cards, which only emulate bf16."""
    from engagerec.runs import tower_autocast

    native = torch.cuda.get_device_capability()[0] >= 8
    assert tower_autocast("auto", torch.device("cuda")) == (torch.bfloat16 if native else None)


@pytest.mark.gpu
def test_row_wise_sharding_trains_on_gpu(study_data, tmp_path):
    results = _gpu_run(study_data, tmp_path / "run", sharding={"*": ["row_wise"]})
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert {t["sharding_type"] for t in plan.values()} == {"row_wise"}
    assert results["test"]["skip/auc"] > 0.7


@pytest.mark.gpu
def test_a_gpu_run_with_fused_adam_and_row_wise_tables_evaluates_on_cpu(study_data, tmp_path):
    """Trained on CUDA with fused Adam and row-wise tables, its checkpoint evaluates on CPU (no
    optimiser state loaded, the tables resharded for CPU) to the GPU's own test metrics."""
    run = tmp_path / "run"
    results = _gpu_run(study_data, run, sparse_optimizer="adam", sparse_lr=0.01, sharding={"*": ["row_wise"]})
    plan = json.loads((run / "plan.json").read_text())
    assert {(t["sharding_type"], t["compute_kernel"]) for t in plan.values()} == {("row_wise", "fused")}
    recorded = json.loads((run / "config.json").read_text())["train"]
    assert (recorded["device"], recorded["sparse_optimizer"]) == ("cuda", "adam")
    assert results["test"]["skip/auc"] > 0.7  # it learned (test_fused_adam_and_lamb_train_on_gpu's bar)
    on_cpu = evaluate_run(run, "test", device="cpu")
    for key in EQUAL_METRICS:  # the same checkpoint: GPU and CPU kernels agree to float32 noise
        assert on_cpu[key] == pytest.approx(results["test"][key], rel=1e-3, abs=1e-4), key


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_train_under_torchrun_like_one_evaluates(study_data, tmp_path):
    config = write_study_config(tmp_path / "run.yaml", study_data, device="cuda", epochs=2)
    command = [*torchrun(2), "-m", "engagerec", "train", "--config", str(config)]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["test"]["skip/auc"] > 0.7
    one = evaluate_run(tmp_path / "run", "test", device="cuda")
    for key in EQUAL_METRICS:
        assert one[key] == pytest.approx(results["test"][key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without CUDA does")
def test_gpu_check_script_is_a_dry_run_without_cuda(repo, tmp_path):
    """benchmarks/gpu_check.sh installs nothing, records the machine and says no CUDA device is present."""
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert f"torch {torch.__version__}" in report and "cuda devices: 0" in report
    assert "No CUDA device is present (torch sees none): dry run, nothing was run." in report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_check.md"
    ]  # nothing installed or run
