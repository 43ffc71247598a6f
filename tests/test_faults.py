"""Faults during training and resume: damaged checkpoints, a full disk, a changed config, a
non-finite loss, preemption by SIGTERM. Each ends in a clear message or a clean stop, never a
silently wrong run."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import study_run_config, write_study_config
from engagerec import checkpoint
from engagerec.errors import CheckpointError, ConfigError, TrainingError
from engagerec.train import train


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _largest_file(checkpoint_dir):
    """The checkpoint's largest file (a tensor shard): the one to damage."""
    return max((p for p in checkpoint_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_one_before(study_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(study_run_config(study_data, max_steps=10, checkpoint_every_steps=5), run)
    assert _steps(run) == ["step-10", "step-5"]
    newest = run / "checkpoints" / "step-10"
    largest = _largest_file(newest)
    data = largest.read_bytes()
    largest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk or a killed copy
    with pytest.raises(CheckpointError, match=f"{largest.name} has .* bytes, expected .* \\(truncated\\?\\)"):
        checkpoint.verify(newest)
    largest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(CheckpointError, match=f"{largest.name} does not match its checksum"):
        checkpoint.verify(newest)
    capsys.readouterr()
    resumed = train(study_run_config(study_data, max_steps=15, checkpoint_every_steps=5), run)
    said = capsys.readouterr()
    assert (
        f"does not match its checksum (damaged); falling back to {run / 'checkpoints' / 'step-5'}" in said.err
    )
    assert f"resumed from {run / 'checkpoints' / 'step-5'} " in said.out and resumed["steps"] == 15


def test_when_no_checkpoint_checks_out_resume_stops_rather_than_starting_over(study_data, tmp_path, capsys):
    from engagerec.cli import main

    config = str(write_study_config(tmp_path / "run.yaml", study_data, max_steps=4, checkpoint_every_steps=2))
    run = tmp_path / "run"
    assert main(["train", "--config", config, "--out", str(run)]) == 0
    assert _steps(run) == ["step-2", "step-4"]
    for name in _steps(run):  # both damaged: the newest truncated, the older one bit-flipped
        largest = _largest_file(run / "checkpoints" / name)
        data = largest.read_bytes()
        largest.write_bytes(data[: len(data) // 2] if name == "step-4" else data[:-1] + bytes([data[-1] ^ 1]))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--config", config, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"error: no checkpoint under {run / 'checkpoints'} checks out (see above); start a new run" in err
    assert "(truncated?); no earlier checkpoint checks out" in err  # step-4's reason, then step-2's
    assert "does not match its checksum (damaged); no earlier checkpoint checks out" in err
    assert "Traceback" not in err
    # nothing trained from scratch over them: every file of the run as it was, no new checkpoint
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # the way out the message names
    assert main(["train", "--config", config, "--out", str(run), "--no-resume"]) == 0
    assert _steps(run) == ["step-2", "step-4"] and "resumed from" not in capsys.readouterr().out
    checkpoint.verify(run / "checkpoints" / "step-4")


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(study_data, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    real_write, calls = FileSystemWriter.write_data, []

    def full_disk(self, *args, **kwargs):  # DCP's own file writer runs out of space on the 2nd save
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="step-10 failed .*No space left on device.*step-5 is intact"):
        train(study_run_config(study_data, max_steps=10, checkpoint_every_steps=5), run)
    assert _steps(run) == ["step-5"]  # no half-written .tmp- directory left behind
    checkpoint.verify(run / "checkpoints" / "step-5")
    monkeypatch.setattr(FileSystemWriter, "write_data", real_write)
    assert train(study_run_config(study_data, max_steps=10, checkpoint_every_steps=5), run)["steps"] == 10


def test_resuming_under_a_changed_config_is_refused_naming_the_keys(study_data, tmp_path):
    run = tmp_path / "run"
    train(study_run_config(study_data, max_steps=5), run)
    written = (run / "config.json").read_text()
    changed = study_run_config(study_data, max_steps=10, dense_lr=0.01, batch_size=128)
    with pytest.raises(
        ConfigError, match=r"train.batch_size: 256 -> 128; train.dense_lr: 0.003 -> 0.01\. Start"
    ):
        train(changed, run)
    assert (run / "config.json").read_text() == written  # a refused resume leaves the run alone
    # run length and logging may change; the rest only when asked
    assert train(study_run_config(study_data, max_steps=8, log_every_steps=4), run)["steps"] == 8
    assert train(changed, run, allow_config_change=True)["steps"] == 10


def test_a_nan_loss_stops_the_run_naming_step_task_and_checkpoint(study_data, tmp_path, monkeypatch):
    from nan_injection import pipeline_with_nan_at

    import engagerec.train as training

    monkeypatch.setattr(training, "TrainPipelineSparseDist", pipeline_with_nan_at(7))
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 7: non-finite loss \(skip=nan\).*checkpoint is .*step-5"):
        train(study_run_config(study_data, checkpoint_every_steps=5), run)


@pytest.mark.slow
def test_sigterm_stops_after_a_step_with_a_checkpoint_and_the_run_resumes(study_data, tmp_path):
    config = write_study_config(tmp_path / "run.yaml", study_data, epochs=50, log_every_steps=5)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "engagerec", "train", "--config", str(config), "--out", str(run)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "log.csv").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)  # training has logged its first steps
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 75, err[-2000:]  # EX_TEMPFAIL: not finished, run again
    assert "stopped by SIGTERM after step" in out
    last = checkpoint.latest(run / "checkpoints")
    checkpoint.verify(last)
    assert json.loads((run / "results.json").read_text())["preempted"] is True
    stopped_in = torch.load(last / "rank0.pt", weights_only=True)["progress"]["epoch"]
    resumed = train(study_run_config(study_data, epochs=stopped_in + 1, log_every_steps=5), run)
    assert resumed["preempted"] is False and resumed["steps"] > int(last.name.split("-")[1])
    assert resumed["test"]["skip/auc"] > 0.7  # finished the epoch it was stopped in, then tested


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_preemption_restores_the_previous_sigterm_handler():
    from engagerec.preemption import Preemption

    before = signal.getsignal(signal.SIGTERM)
    with Preemption():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
