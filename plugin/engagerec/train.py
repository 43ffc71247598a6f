"""The training job: DMP + planner + TrainPipelineSparseDist + RecMetricModule, with
validation each epoch, early stopping, the best checkpoint kept, sharded atomic
checkpoints and exact resume, and one final test evaluation.

Prepared data without validation rows (``split.val_fraction: 0``) trains the configured
epochs and keeps the last: the refit on training and validation rows together, with an epoch
count chosen beforehand on validation.

The same function runs in one process or under ``torchrun --nproc-per-node N``.

Run directory::

    config.json  plan.json  log.csv  events.out.tfevents.*  results.json
    checkpoints/step-<n>/  checkpoints/best-step-<n>/
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from engagerec import checkpoint
from engagerec.backward_overlap import overlap_if_used
from engagerec.config import (
    ExperimentConfig,
    check_config,
    check_monitor,
    config_changes,
    normalised_config,
    prepared_dir,
)
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
from engagerec.distributed import (
    any_rank,
    build_optimizer,
    close_runtime,
    init_runtime,
    is_rank_zero,
    plan_table,
)
from engagerec.embedding_backward import loop_features, loop_keys
from engagerec.errors import CheckpointError, ConfigError, TrainingError
from engagerec.evaluate import evaluate, groups_gauc, train_label_means
from engagerec.extras import missing_extra
from engagerec.lr_schedule import LearningRateSchedule, run_progress
from engagerec.managed_ids import check_world_size
from engagerec.metrics import TaskMetrics
from engagerec.preemption import Preemption
from engagerec.profiling import METRICS, StepProfiler, labelled_batches
from engagerec.runs import sharded_model
from engagerec.warm_start import WarmStartPlan, apply_warm_start, plan_warm_start, record_vocabularies

TRAIN_METRIC_WINDOW = 100_000  # rows in the moving window of the training metrics


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunLog:
    """CSV rows, and TensorBoard scalars when the tensorboard extra is installed (else a line
    says so once), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.rows = []
        self.tensorboard = None
        if enabled:
            self.csv_path = run_dir / "log.csv"
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # torch raises its own message when tensorboard is missing
                print(
                    missing_extra(
                        ModuleNotFoundError(str(err), name="tensorboard"), "TensorBoard event files"
                    )
                )
            else:
                self.tensorboard = SummaryWriter(str(run_dir))

    def write(self, step: int, phase: str, values: Dict[str, float]) -> None:
        """Log ``values`` for ``step`` and ``phase`` (train, val, test) as ``<phase>/<key>`` scalars and
        a row of log.csv, which is rewritten whole because a later row may bring new columns."""
        if not self.enabled:
            return
        row = {"step": step, "phase": phase, **{k: round(float(v), 6) for k, v in values.items()}}
        self.rows.append(row)
        for key, value in values.items() if self.tensorboard is not None else ():
            self.tensorboard.add_scalar(f"{phase}/{key}", value, step)
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k not in ("step", "phase"), k))
        with open(self.csv_path, "w", newline="") as handle:  # rewritten whole: columns may grow
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.tensorboard is not None:
            self.tensorboard.close()


def _improved(value: float, best: Optional[float], mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


@dataclass
class TrainState:
    """
    Where a run stands: what each checkpoint saves (plain JSON-able values, so checkpoints load
    with ``weights_only``) and a resume continues from.

    Args:
        config (Dict[str, Any]): the run's config (``dataclasses.asdict``): what a resume is
            checked against.
        world_size (int): the ranks that wrote the state.
        epoch (int): epochs finished.
        batch_in_epoch (int): batches of the current epoch done (per rank).
        samples_in_epoch (int): the same position in samples, whatever the world size.
        step (int): optimiser steps in all.
        best (Optional[float]): the best ``train.monitor`` value so far (None without
            validation rows).
        best_epoch (Optional[int]): the epoch that reached it (the newest, without validation rows).
        bad_epochs (int): epochs since it last improved (early stopping).
        history (List[Dict[str, float]]): each finished epoch's number, step and validation
            metrics (none without validation rows).
        done (bool): the run has finished (epochs, early stop, max_steps or preemption).
        train_seconds (float): time spent in training steps, checkpoints and evaluation left out.
        init_from (Dict[str, Any]): what a warm start loaded (``warm_start.apply_warm_start``;
            empty: a fresh start).
        tower_precision (str): what ``train.tower_precision`` resolved to, ``"fp32"`` or
            ``"bf16"`` (``auto`` resolves by the machine); empty in checkpoints written before.

    Example::

        >>> from engagerec.train import TrainState
        >>> state = TrainState(config={}, world_size=2, step=10)
        >>> TrainState.restore(dataclasses.asdict(state)) == state
        True
    """

    config: Dict[str, Any]
    world_size: int
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_in_epoch: int = 0
    step: int = 0
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    bad_epochs: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    done: bool = False
    train_seconds: float = 0.0
    init_from: Dict[str, Any] = field(default_factory=dict)
    tower_precision: str = ""

    @classmethod
    def restore(cls, saved: Dict[str, Any]) -> "TrainState":
        """The state a checkpoint saved (``checkpoint.load``'s progress)."""
        names = [f.name for f in dataclasses.fields(cls)]
        added_since = ("init_from", "tower_precision")
        missing = [name for name in names if name not in saved and name not in added_since]
        if missing:
            raise CheckpointError(f"the checkpoint's progress lacks {missing}: written by another version")
        return cls(**{name: saved[name] for name in names if name in saved})


def train(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    resume: bool = True,
    allow_config_change: bool = False,
    on_epoch: Optional[Callable[[TrainState, Dict[str, float]], None]] = None,
) -> Dict[str, Any]:
    """
    Train ``cfg`` into ``run_dir``; returns (and writes to results.json) the final metrics.

    With ``resume``, the newest checkpoint in ``run_dir`` that checks out is continued; one
    written under another config (beyond ``config.RESUMABLE_CHANGES``) is refused unless
    ``allow_config_change``. SIGTERM stops the run after the current step with a checkpoint
    (the results then say ``"preempted": True``).

    Args:
        cfg (ExperimentConfig): the experiment; its prepared data must exist.
        run_dir (str | Path): where the run's files go (see the module docstring).
        resume (bool): continue the newest good checkpoint in ``run_dir``; False removes them.
        allow_config_change (bool): resume even under a changed config.
        on_epoch (Optional[Callable]): called on rank 0 after each epoch's validation and checkpoint,
            with the state and the validation metrics (``engagerec compare``'s progress bars;
            empty when the data has no validation rows).

    Raises:
        ConfigError: resuming under a changed config; a monitor the tasks do not report.
        CheckpointError: resuming mid-epoch on another world size; a checkpoint write failed.
        TrainingError: a task's loss became NaN or infinite.

    Example::

        >>> import tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> tmp = Path(tempfile.mkdtemp())
        >>> cfg = load_config("kuairand_mmoe", ["train.max_steps=3", "train.progress_bar=false",
        ...                                     f"train.data_dir={tmp / 'data'}"])
        >>> _ = prepare(cfg.data, cfg.train.data_dir)
        >>> results = train(cfg, tmp / "run")  # doctest: +ELLIPSIS
        sharding plan (1 rank(s)):...
        >>> results["steps"], "test" in results  # stopped mid-epoch: no test yet, resumable
        (3, False)
        >>> sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir())
        ['step-3']
    """
    runtime = init_runtime(cfg.train.device)
    try:
        with Preemption() as preemption:
            trainer = Trainer(cfg, Path(run_dir), runtime, preemption, resume, allow_config_change)
            trainer.on_epoch = on_epoch
            return trainer.run()
    finally:
        close_runtime(runtime)


class Trainer:
    """
    One training run, read top down: ``run`` trains epoch by epoch (``train_epoch``), validates
    after each (``validate``, ``end_epoch``: early stopping and the best checkpoint), and
    ``finish`` evaluates the best checkpoint on test. Its ``state`` is what checkpoints hold.
    Without validation rows every epoch's model counts as the best: the last is evaluated.

    Building it shards the model (DMP and the planner), restores the newest good checkpoint
    when resuming (refusing one that would not continue the same run), and writes the run's
    config.json and plan.json. ``train()`` wraps it with the process group and SIGTERM handling.

    Args:
        cfg (ExperimentConfig): the experiment.
        run_dir (Path): the run directory.
        runtime: the process group and device (``engagerec.distributed.init_runtime``).
        preemption (Preemption): whether SIGTERM arrived.
        resume (bool): continue the newest good checkpoint; False removes the run's checkpoints.
        allow_config_change (bool): resume even under a changed config.

    Example::

        >>> # as train() does:
        >>> # with Preemption() as preemption:
        >>> #     results = Trainer(cfg, run_dir, init_runtime("cpu"), preemption).run()
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        runtime,
        preemption: Preemption,
        resume: bool = True,
        allow_config_change: bool = False,
    ) -> None:
        self.cfg, self.tc = check_config(cfg), cfg.train  # configs built in code skip load_config
        self.run_dir, self.ckpt_root = run_dir, run_dir / "checkpoints"
        self.runtime, self.preemption = runtime, preemption
        self.data_dir = prepared_dir(cfg)
        self.warm_plan = self._plan_warm_start(resume)  # checked before anything is built or written
        seed_everything(self.tc.seed)
        self.dmp, self.model = sharded_model(cfg, runtime)
        # what train.tower_precision picked here
        self.precision = "fp32" if self.model.train_autocast is None else "bf16"
        # what train.embedding_backward picked here: FBGEMM's loop for these features' tables
        self.loop_features = loop_features(self.model.tables)
        check_world_size(self.model, runtime.world_size)
        self.tasks = self.model.tasks
        # the tasks are known now (from schema.json when the config names none): check before training
        check_monitor(self.tc.monitor, self.tc.monitor_mode, {t.name: t.kind for t in self.tasks})
        schema = DatasetSchema.load(self.data_dir)
        if self.tc.monitor.endswith("/gauc") and not groups_gauc(schema, self.tc.gauc_group):
            raise ConfigError(
                f"train.monitor '{self.tc.monitor}': GAUC groups by train.gauc_group "
                f"'{self.tc.gauc_group}', which is not a sparse feature (one id per row) of the prepared data"
            )
        # train.embedding_backward_thread: the fused tables' backward on a worker thread, or None
        self.overlap = overlap_if_used(
            self.dmp, self.tc.embedding_backward_thread, runtime.device, bool(self.loop_features)
        )
        self.optimizer = build_optimizer(self.dmp, self.tc.dense_lr)
        # its base rates are the config's, taken before a resume or a warm start loads anything
        self.rates = LearningRateSchedule(self.optimizer, self.tc.lr_schedule, self.tc.lr_final)
        self.state = self._start(resume, allow_config_change)
        if is_rank_zero():  # after the resume check: a refused resume leaves the run's files alone
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
            (run_dir / "plan.json").write_text(json.dumps(plan_table(self.dmp), indent=1))
            record_vocabularies(run_dir, self.data_dir)  # what a later warm start from this run matches
            print(f"sharding plan ({runtime.world_size} rank(s)):\n{self.dmp.plan}", flush=True)
            if self.loop_features:
                print(f"embedding backward: FBGEMM's loop for the tables of {self.loop_features}", flush=True)
            if self.overlap is not None:
                print("embedding backward: on a worker thread, beside the rest of the step", flush=True)
        self.means = train_label_means(self.data_dir, [t.label for t in self.tasks])
        # no validation rows (a refit on train + val): no early stopping, the last epoch is kept;
        # no test rows (every row trains a model to ship): no test metrics
        self.validating = ShardReader(self.data_dir, "val").total_rows > 0
        self.testing = ShardReader(self.data_dir, "test").total_rows > 0
        self.log = RunLog(run_dir, is_rank_zero())
        self.reader = ShardReader(
            self.data_dir,
            "train",
            batch_size=self.tc.batch_size,
            shuffle=True,
            seed=self.tc.seed,
            drop_last=True,
            empty_keys=loop_keys(self.model.tables),
        )
        self.rates.apply(self._progress())  # a resume continues the schedule where it was
        self.pipeline = TrainPipelineSparseDist(
            self.dmp, self.optimizer, runtime.device, execute_all_batches=True
        )
        # windowed and cheap per step: the exact rank metrics are evaluation's
        self.train_metrics = TaskMetrics(
            self.tasks, self.tc.batch_size, runtime.device, TRAIN_METRIC_WINDOW, exact=False
        )
        self.profiler = StepProfiler(
            self.model,
            run_dir,
            self.tc.profile_start_step,
            self.tc.profile_steps,
            is_rank_zero(),
            worker_seconds=None if self.overlap is None else lambda: self.overlap.worker_seconds,
        )
        self.preempted = False
        self.bar = None  # the current epoch's progress bar (rank 0, train.progress_bar)
        self.on_epoch: Optional[Callable[[TrainState, Dict[str, float]], None]] = None  # rank 0 only
        self._clock = self._window_started = 0.0  # perf_counter at the last (re)start
        self._window_rows = 0  # samples/s per logged window, not since the epoch began

    # ----------------------------------------------------------------- the run

    def run(self) -> Dict[str, Any]:
        """Train until the epochs, early stopping, ``max_steps`` or SIGTERM end it; then ``finish``."""
        try:
            stopped = self.state.done
            while not stopped and self.state.epoch < self.tc.epochs:
                stopped = self.train_epoch()
                if stopped and self.state.batch_in_epoch < self.reader.num_batches():
                    self.checkpoint()  # stopped mid-epoch (max_steps, SIGTERM): resumable from here
                    break
                stopped = self.end_epoch(self.validate() if self.validating else {})
            return self.finish()
        finally:
            if self.overlap is not None:  # an error too: the hooks off the model, the worker stopped
                self.overlap.close()

    def train_epoch(self) -> bool:
        """Train on the rest of the current epoch; True when the run must stop before its end
        (``max_steps`` reached, or SIGTERM agreed by every rank)."""
        state, tc = self.state, self.tc
        self.reader.set_epoch(state.epoch)
        self.reader.start_batch = state.batch_in_epoch
        loader = make_loader(self.reader, tc.num_workers, pin_memory=self.runtime.device.type == "cuda")
        batches = labelled_batches(iter(loader))
        self.bar = _progress_bar(tc.progress_bar and is_rank_zero(), len(self.reader), state.epoch)
        self.dmp.train()
        self._restart_clock()
        try:
            while True:
                self.profiler.before_step(state.step + 1)
                try:
                    task_losses, predictions, labels, weights = self.pipeline.progress(batches)
                except StopIteration:
                    return False
                if self._after_step(task_losses, predictions, labels, weights):
                    return True
        finally:
            try:
                self._embedding_backward_done()  # the epoch's last update, before anything reads the tables
            finally:
                self._stop_clock()
                if self.bar is not None:
                    self.bar.close()

    def validate(self) -> Dict[str, float]:
        """The model's metrics on the val split (every row once), logged."""
        self.pipeline.detach()  # evaluation runs the model's own forward
        tc = self.tc
        val = evaluate(
            self.dmp, self.tasks, self.data_dir, "val", tc.eval_batch_size, self.runtime.device, self.means,
            tc.num_workers, tc.gauc_group,
        )  # fmt: skip
        self.log.write(self.state.step, "val", val)
        return val

    def end_epoch(self, val: Dict[str, float]) -> bool:
        """Close the epoch on its validation metrics (empty without validation rows: then the
        newest epoch is kept, its best checkpoint written once as the run ends): keep the best
        checkpoint, count epochs without improvement, checkpoint the step; True when the run
        must stop."""
        state, tc = self.state, self.tc
        state.history.append({"epoch": state.epoch, "step": state.step, **val})
        state.epoch += 1
        state.batch_in_epoch = state.samples_in_epoch = 0
        if not val:  # no validation rows: the newest epoch is the one kept
            state.best_epoch = state.epoch - 1
        elif _improved(val[tc.monitor], state.best, tc.monitor_mode):
            state.best, state.best_epoch, state.bad_epochs = val[tc.monitor], state.epoch - 1, 0
            self.checkpoint(best=True)
        else:
            state.bad_epochs += 1
        if is_rank_zero():
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "rows")
            print(
                f"epoch {state.epoch - 1}: " + (f"val {metrics}" if val else "no validation rows"), flush=True
            )
        stopped = self.preempted or state.bad_epochs >= tc.patience or self._at_max_steps()
        state.done = state.epoch >= tc.epochs or stopped
        if not val and state.done:  # written once, as the run ends, not every epoch
            self.checkpoint(best=True)
        self.checkpoint()
        if self.on_epoch is not None and is_rank_zero():
            self.on_epoch(state, val)
        return stopped

    def checkpoint(self, best: bool = False) -> Path:
        """Save the model, optimiser and ``state`` as ``step-<n>`` (the newest two kept), or as
        ``best-step-<n>`` (only the newest kept)."""
        self._embedding_backward_done()
        if best:
            name, keep, keep_last = f"best-step-{self.state.step}", checkpoint.BEST_PATTERN, 1
        else:
            name, keep, keep_last = f"step-{self.state.step}", checkpoint.STEP_PATTERN, 2
        state = dataclasses.asdict(self.state)
        return checkpoint.save(self.ckpt_root, name, self.dmp, self.optimizer, state, keep, keep_last)

    def finish(self) -> Dict[str, Any]:
        """The run's results (written to results.json); a finished run's best checkpoint is
        evaluated on the test split (when it has rows)."""
        state, tc = self.state, self.tc
        # resumed with fewer epochs than it has run: nothing left to train, so it is finished
        state.done = state.done or (state.epoch >= tc.epochs and not self.preempted)
        results: Dict[str, Any] = {
            "name": self.cfg.name,
            "tower": self.cfg.model.tower.name,
            "seed": tc.seed,
            "world_size": self.runtime.world_size,
            "tower_precision": self.precision,  # what it resolved to (auto depends on the machine)
            "embedding_backward": "loop" if self.loop_features else "kernel",  # as tower_precision
            "embedding_backward_thread": "main" if self.overlap is None else "worker",
            "steps": state.step,
            "train_seconds": state.train_seconds,
            "history": state.history,
            "preempted": self.preempted,
        }
        if state.init_from:
            results["init_from"] = state.init_from
        best = checkpoint.latest(self.ckpt_root, checkpoint.BEST_PATTERN) if state.done else None
        if best is not None:
            checkpoint.load(best, self.dmp, restore_rng=False, checked=True)  # latest has just verified it
            self.pipeline.detach()
            results["best_epoch"] = state.best_epoch
            results["val"] = state.history[state.best_epoch]
            if self.testing:
                results["test"] = evaluate(
                    self.dmp, self.tasks, self.data_dir, "test", tc.eval_batch_size, self.runtime.device,
                    self.means, tc.num_workers, tc.gauc_group,
                )  # fmt: skip
                self.log.write(state.step, "test", results["test"])
        if is_rank_zero():
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        self.log.close()
        if dist.is_initialized():
            dist.barrier()
        return results

    # ----------------------------------------------------------------- helpers

    def _start(self, resume: bool, allow_change: bool) -> TrainState:
        """A fresh state (removing an older run's checkpoints), or the newest good checkpoint's."""
        runtime, tc = self.runtime, self.tc
        if is_rank_zero():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh start: an older run's checkpoints must not be taken as this run's
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()  # every rank sees the cleared checkpoint directory
        config = dataclasses.asdict(self.cfg)
        last = checkpoint.latest(self.ckpt_root) if resume else None
        if resume and last is None and checkpoint.latest(self.ckpt_root, checked=False) is not None:
            raise CheckpointError(  # never start over silently over a run's damaged checkpoints
                f"no checkpoint under {self.ckpt_root} checks out (see above); start a new run with "
                "--no-resume (it removes them) or another --out"
            )
        if last is None:
            state = TrainState(config=config, world_size=runtime.world_size, tower_precision=self.precision)
            if self.warm_plan is not None:
                state.init_from = apply_warm_start(self.warm_plan, self.dmp, self.optimizer)
                if is_rank_zero():
                    print(_warm_start_line(state.init_from), flush=True)
            return state
        progress = checkpoint.read_progress(last)
        _check_resume(last, progress, self.cfg, runtime, allow_change, self.precision)  # before loading
        state = TrainState.restore(checkpoint.load(last, self.dmp, self.optimizer, checked=True))
        state.world_size, state.config, state.tower_precision = runtime.world_size, config, self.precision
        # a run that ended at its epoch count goes on when resumed with more epochs (not one that
        # stopped early, or at max_steps)
        more = state.epoch < tc.epochs and not self._at_max_steps(state)
        if state.done and more and state.bad_epochs < tc.patience:
            state.done = False
        if is_rank_zero():
            print(f"resumed from {last} (epoch {state.epoch}, step {state.step})", flush=True)
        return state

    def _plan_warm_start(self, resume: bool) -> Optional[WarmStartPlan]:
        """``train.init_from``'s checked plan; None without one, or when the run resumes its own
        checkpoint (a resume continues the run, whatever it started from)."""
        if not self.tc.init_from:
            return None
        if resume and checkpoint.latest(self.ckpt_root, checked=False) is not None:
            if is_rank_zero():
                print(
                    f"train.init_from {self.tc.init_from} is not loaded: the run resumes its own checkpoint",
                    flush=True,
                )
            return None
        return plan_warm_start(self.tc.init_from, self.cfg, self.run_dir)

    def _after_step(self, task_losses, predictions, labels, weights) -> bool:
        """Count, check, measure, log and checkpoint one step; True when the run must stop."""
        state, tc, world = self.state, self.tc, self.runtime.world_size
        state.step += 1
        state.batch_in_epoch += 1
        self.rates.apply(self._progress())  # the next step's
        state.samples_in_epoch += tc.batch_size * world
        self._window_rows += tc.batch_size * world
        at_log_step = state.step % tc.log_every_steps == 0
        saving = bool(tc.checkpoint_every_steps) and state.step % tc.checkpoint_every_steps == 0
        # the loss is checked where every rank is (log steps, before a step checkpoint, the last
        # step) and agreed by all ranks; on one CPU process, every step (free there)
        one_cpu = world == 1 and self.runtime.device.type == "cpu"
        if one_cpu or at_log_step or saving or self._at_max_steps():
            _stop_if_not_finite(self.tasks, task_losses, state.step, self.ckpt_root)
        if state.step % tc.train_metrics_every_steps == 0:
            with record_function(METRICS):
                self.train_metrics.update(predictions, labels, weights)
        self.profiler.after_step(state.step)
        if at_log_step:
            self._log_train(task_losses)
        if self.bar is not None:
            self.bar.update(1)
        if self._at_max_steps():
            return True
        # SIGTERM: with several ranks asking is a collective, so only at log steps (all ranks)
        if (world == 1 or at_log_step) and self.preemption.agreed():
            self.preempted = True
            return True
        if saving:
            self._embedding_backward_done()  # the step's own time: its update counts before the clock stops
            self._stop_clock()
            self.checkpoint()
            self._restart_clock()
        return False

    def _log_train(self, task_losses: torch.Tensor) -> None:
        """The training losses, windowed metrics, loss weights and samples/s of this window."""
        values = {f"{t.name}/loss": float(task_losses[i]) for i, t in enumerate(self.tasks)}
        values.update(self.train_metrics.compute())
        weights_now = self.model.loss_weighting.current_weights()  # moves under uncertainty / GradNorm
        values.update({f"{t.name}/loss_weight": float(weights_now[i]) for i, t in enumerate(self.tasks)})
        values["samples_per_s"] = self._window_rows / (time.perf_counter() - self._window_started)
        values["lr_factor"] = self.rates.factor  # train.lr_schedule's, on both learning rates
        self.log.write(self.state.step, "train", values)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in values.items() if k.endswith(("loss", "/auc", "per_s"))}
            self.bar.set_postfix(shown)
        self._window_started, self._window_rows = time.perf_counter(), 0  # the log's writing counts next

    def _embedding_backward_done(self) -> None:
        """Wait for the fused tables' backward when it runs on a worker thread."""
        if self.overlap is not None:
            self.overlap.wait()

    def _progress(self) -> float:
        """The share of the run done, which train.lr_schedule follows (``run_progress``)."""
        state = self.state
        return run_progress(state.epoch, state.batch_in_epoch, self.reader.num_batches(), self.tc.epochs)

    def _at_max_steps(self, state: Optional[TrainState] = None) -> bool:
        state = state or self.state
        return bool(self.tc.max_steps) and state.step >= self.tc.max_steps

    def _restart_clock(self) -> None:
        self._clock = self._window_started = time.perf_counter()
        self._window_rows = 0

    def _stop_clock(self) -> None:
        state = self.state
        state.train_seconds += time.perf_counter() - self._clock


def _warm_start_line(loaded: Dict[str, Any]) -> str:
    """What a warm start loaded, in one line: the checkpoint, the tables whose ids moved, and
    the optimiser state that starts fresh."""
    parts = [f"warm start from {loaded['checkpoint']}"]
    for table, moved in loaded["moved"].items():
        old, new = moved["rows"]
        parts.append(f"{table}: {moved['kept']:,} of {new:,} rows kept from {old:,} (new ids start fresh)")
    if loaded["fresh_optimizer_state"]:
        parts.append(f"optimiser state starts fresh for {len(loaded['fresh_optimizer_state'])} tensor(s)")
    return "; ".join(parts)


def _check_resume(
    last: Path, progress: Dict[str, Any], cfg: ExperimentConfig, runtime, allow_change: bool, precision: str
) -> None:
    """Refuse a resume that would not continue the same run: another config, a tower precision
    that resolves otherwise here (``precision``), or another world size in the middle of an
    epoch (each rank reads a contiguous share of the epoch's rows, so the rest of the epoch would
    be other rows)."""
    # the saved config with this release's defaults: a key added since is not a change
    saved = normalised_config(progress["config"])
    changes = config_changes(saved, dataclasses.asdict(cfg))
    # the precision compares by what it resolved to (config_changes leaves the setting out): auto
    # may resolve otherwise on another machine, and fp32 -> auto is no change where it gives fp32
    trained_in = progress.get("tower_precision") or saved["train"]["tower_precision"]  # older: fp32/bf16
    if trained_in != precision:
        changes.append(
            f"train.tower_precision: trained in {trained_in}, here {precision} (auto picks by device)"
        )
    if cfg.train.lr_schedule != "constant" and saved["train"]["epochs"] != cfg.train.epochs:
        changes.append(
            f"train.epochs: {saved['train']['epochs']} -> {cfg.train.epochs} (it sets the length of "
            "train.lr_schedule)"
        )
    if changes and not allow_change:
        raise ConfigError(
            f"resuming from {last} with a config that differs from the one it was written under: "
            + "; ".join(changes)
            + ". Start a new run (--no-resume, or another --out), or pass --allow-config-change"
        )
    saved_world = progress["world_size"]
    if saved_world != runtime.world_size and progress["batch_in_epoch"] > 0:
        raise CheckpointError(
            f"{last} stopped mid-epoch (batch {progress['batch_in_epoch']} of epoch {progress['epoch']}, "
            f"{progress['samples_in_epoch']:,} samples) on {saved_world} rank(s); on {runtime.world_size} "
            f"rank(s) the rest of the epoch would read other rows. Resume on {saved_world} rank(s), or "
            "from a checkpoint at an epoch's end (tables reshard on any world size)"
        )


def _stop_if_not_finite(tasks, task_losses: torch.Tensor, step: int, ckpt_root: Path) -> None:
    """Raise TrainingError on every rank if any rank's loss is NaN or infinite (a collective)."""
    finite = torch.isfinite(task_losses)
    bad = (
        None
        if bool(finite.all())
        else ", ".join(f"{t.name}={float(task_losses[i])}" for i, t in enumerate(tasks) if not finite[i])
    )
    if any_rank(bad is not None):
        good = checkpoint.latest(ckpt_root)
        raise TrainingError(
            f"step {step}: non-finite loss ({bad or 'on another rank'}); training stopped. The last good "
            f"checkpoint is {good or 'none (none written yet)'}: resume from it with a lower learning rate, "
            "or look for extreme labels or features"
        )


def _progress_bar(enabled: bool, total: int, epoch: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="batch", leave=False)
