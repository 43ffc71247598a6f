"""train.lr_schedule: the factor on every learning rate by step, and a run whose Adam groups and
FBGEMM's fused embedding kernels follow it, resume included."""

import dataclasses
import math

import pytest

from conftest import study_run_config
from engagerec.errors import ConfigError
from engagerec.lr_schedule import lr_multiplier


def test_linear_and_cosine_decay_from_one_to_the_final_factor_and_stay_there():
    assert [lr_multiplier("linear", s, 10, final=0.2) for s in (0, 5, 10, 15)] == pytest.approx(
        [1.0, 0.6, 0.2, 0.2]
    )
    cosine = [lr_multiplier("cosine", s, 10) for s in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(cosine[:-1], cosine[1:], strict=True))  # falls at every step
    assert cosine[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_multiplier("constant", 7, 10) == 1.0
    with pytest.raises(ValueError, match="schedule 'step', expected one of constant, linear, cosine"):
        lr_multiplier("step", 0, 10)


def _fused_rates(optimizer):
    """The learning rate inside each FBGEMM kernel under a torchrec (combined) optimiser."""
    if hasattr(optimizer, "_emb_module"):
        return [optimizer._emb_module.get_learning_rate()]
    return [rate for _, inner in getattr(optimizer, "optimizers", []) for rate in _fused_rates(inner)]


def _trainer_after(cfg, run_dir, resume=False):
    """A Trainer over ``cfg`` after ``run()`` (it stops at ``train.max_steps``): its dense rates and
    its fused kernels' rates, and its step."""
    from engagerec.distributed import close_runtime, init_runtime
    from engagerec.preemption import Preemption
    from engagerec.train import Trainer

    runtime = init_runtime("cpu")
    try:
        with Preemption() as preemption:
            trainer = Trainer(cfg, run_dir, runtime, preemption, resume=resume)
            started = trainer.state.step
            dense_at_start = [g["lr"] for g in trainer.optimizer.param_groups if g["lr"] < 0.01]
            trainer.run()
            dense = [g["lr"] for g in trainer.optimizer.param_groups if g["lr"] < 0.01]
            return started, dense_at_start, dense, _fused_rates(trainer.dmp.fused_optimizer), trainer
    finally:
        close_runtime(runtime)


def test_a_linear_schedule_reaches_adam_and_the_fused_kernels_and_a_resume_continues_it(study_data, tmp_path):
    """Both rates follow the schedule over epochs x batches; the fused kernels get each step's rate
    one step late (a fused optimiser hands it over in step()); a resume continues at its saved step,
    and changing train.epochs, which sets the schedule's length, is refused."""
    from engagerec.train import train

    cfg = study_run_config(
        study_data, epochs=2, lr_schedule="linear", lr_final=0.1, dense_lr=0.001, sparse_lr=0.05,
        max_steps=20, progress_bar=False,
    )  # fmt: skip
    started, _, dense, fused, trainer = _trainer_after(cfg, tmp_path / "run")
    total = 2 * trainer.reader.num_batches()
    assert started == 0 and trainer.state.step == 20 and total > 40
    assert dense and all(
        rate == pytest.approx(0.001 * lr_multiplier("linear", 20, total, 0.1)) for rate in dense
    )
    assert fused and all(
        rate == pytest.approx(0.05 * lr_multiplier("linear", 19, total, 0.1)) for rate in fused
    )
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=30))
    started, dense_at_start, dense, _, _ = _trainer_after(longer, tmp_path / "run", resume=True)
    assert started == 20  # resumed, and at the saved step's rate, not the base one
    assert all(
        rate == pytest.approx(0.001 * lr_multiplier("linear", 20, total, 0.1)) for rate in dense_at_start
    )
    assert all(rate == pytest.approx(0.001 * lr_multiplier("linear", 30, total, 0.1)) for rate in dense)
    three = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, max_steps=40))
    with pytest.raises(
        ConfigError, match=r"train.epochs: 2 -> 3 \(it sets the length of train.lr_schedule\)"
    ):
        train(three, tmp_path / "run")


def test_a_final_factor_outside_zero_to_one_is_refused():
    from engagerec.config import load_config

    with pytest.raises(ConfigError, match="train.lr_final 1.5, expected 0 to 1"):
        load_config("synthetic_study", ["train.lr_schedule=linear", "train.lr_final=1.5"])
