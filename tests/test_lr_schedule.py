"""train.lr_schedule: the factor on every learning rate by the run's progress in epochs, and a run
whose Adam groups and FBGEMM's fused embedding kernels follow it, resume included."""

import csv
import dataclasses
import math

import pytest

from conftest import study_run_config
from engagerec.errors import ConfigError
from engagerec.lr_schedule import lr_multiplier


def test_linear_and_cosine_decay_from_one_to_the_final_factor_and_stay_there():
    assert [lr_multiplier("linear", p, final=0.2) for p in (0.0, 0.5, 1.0, 1.5)] == pytest.approx(
        [1.0, 0.6, 0.2, 0.2]
    )
    cosine = [lr_multiplier("cosine", s / 10) for s in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(cosine[:-1], cosine[1:], strict=True))  # falls at every step
    assert cosine[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_multiplier("constant", 0.7) == 1.0
    with pytest.raises(ValueError, match="schedule 'step', expected one of constant, linear, cosine"):
        lr_multiplier("step", 0.0)


def _fused_rates(optimizer):
    """The learning rate inside each FBGEMM kernel under a torchrec (combined) optimiser."""
    if hasattr(optimizer, "_emb_module"):
        return [optimizer._emb_module.get_learning_rate()]
    return [rate for _, inner in getattr(optimizer, "optimizers", []) for rate in _fused_rates(inner)]


def _trainer_after(cfg, run_dir, resume=False):
    """A Trainer over ``cfg`` run until ``train.max_steps``: its step when it started, its dense
    (Adam) rates then and at the end, its fused kernels' rates at the end, and the trainer."""
    from engagerec.distributed import close_runtime, init_runtime
    from engagerec.preemption import Preemption
    from engagerec.train import Trainer

    runtime = init_runtime("cpu")
    try:
        with Preemption() as preemption:
            trainer = Trainer(cfg, run_dir, runtime, preemption, resume=resume)
            dense = trainer.optimizer.optimizers[-1][1]  # build_optimizer: [fused sparse, dense]
            started, dense_at_start = trainer.state.step, [g["lr"] for g in dense.param_groups]
            trainer.run()
            dense_now = [g["lr"] for g in dense.param_groups]
            return started, dense_at_start, dense_now, _fused_rates(trainer.dmp.fused_optimizer), trainer
    finally:
        close_runtime(runtime)


def test_a_linear_schedule_reaches_adam_and_the_fused_kernels_and_a_resume_continues_it(study_data, tmp_path):
    """Both rates follow the schedule over the run's epochs; after a step the Adam groups hold
    the next step's rate and the fused kernels the rate they trained with (TrainPipelineSparseDist's
    zero_grad() hands the group's rate over before each step); a resume continues at its saved
    progress, and changing train.epochs, which sets the schedule's length, is refused."""
    from engagerec.train import train

    cfg = study_run_config(
        study_data, epochs=2, lr_schedule="linear", lr_final=0.1, dense_lr=0.001, sparse_lr=0.05,
        max_steps=20, progress_bar=False,
    )  # fmt: skip

    def factor(step):
        return lr_multiplier("linear", step / total, 0.1)

    started, _, dense, fused, trainer = _trainer_after(cfg, tmp_path / "run")
    total = 2 * trainer.reader.num_batches()
    assert started == 0 and trainer.state.step == 20 and total > 40
    assert dense and all(rate == pytest.approx(0.001 * factor(20)) for rate in dense)
    assert fused and all(rate == pytest.approx(0.05 * factor(19)) for rate in fused)
    logged = [r for r in csv.DictReader(open(tmp_path / "run" / "log.csv")) if r["phase"] == "train"]
    assert float(logged[-1]["lr_factor"]) == pytest.approx(factor(20))
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=30))
    started, dense_at_start, dense, fused, _ = _trainer_after(longer, tmp_path / "run", resume=True)
    assert started == 20 and dense_at_start  # resumed, at the saved progress's rate, not the base one
    assert all(rate == pytest.approx(0.001 * factor(20)) for rate in dense_at_start)
    assert all(rate == pytest.approx(0.001 * factor(30)) for rate in dense)
    assert fused and all(rate == pytest.approx(0.05 * factor(29)) for rate in fused)
    three = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, max_steps=40))
    with pytest.raises(
        ConfigError, match=r"train.epochs: 2 -> 3 \(it sets the length of train.lr_schedule\)"
    ):
        train(three, tmp_path / "run")


def test_progress_is_counted_in_epochs_so_a_resume_on_other_ranks_keeps_its_place():
    """The factor depends on the share of the epochs done, not on steps: one rank's 50 of 100
    batches and two ranks' 25 of 50 are the same place; the cosine reaches its final factor."""
    import torch

    from engagerec.lr_schedule import LearningRateSchedule, run_progress

    assert run_progress(1, 50, 100, 4) == run_progress(1, 25, 50, 4) == pytest.approx(1.5 / 4)
    assert run_progress(0, 0, 100, 4) == 0.0 and run_progress(4, 0, 100, 4) == 1.0
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    schedule = LearningRateSchedule(adam, "cosine", final=0.5)
    schedule.apply(run_progress(4, 0, 100, 4))
    assert adam.param_groups[0]["lr"] == pytest.approx(0.01) and schedule.factor == pytest.approx(0.5)


def test_a_final_factor_outside_zero_to_one_or_without_a_schedule_is_refused():
    from engagerec.config import load_config

    with pytest.raises(ConfigError, match="train.lr_final 1.5, expected 0 to 1"):
        load_config("synthetic_study", ["train.lr_schedule=linear", "train.lr_final=1.5"])
    with pytest.raises(
        ConfigError, match=r"train.lr_final 0.1 decays nothing under train.lr_schedule: constant"
    ):
        load_config("synthetic_study", ["train.lr_final=0.1"])
