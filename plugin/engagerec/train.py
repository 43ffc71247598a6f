"""The training job: DMP + planner + TrainPipelineSparseDist + RecMetricModule, with
validation each epoch, early stopping, the best checkpoint kept, sharded atomic
checkpoints and exact resume, and one final test evaluation.

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
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from engagerec import checkpoint
from engagerec.config import ConfigError, ExperimentConfig, config_changes, prepared_dir
from engagerec.data.reader import ShardReader, make_loader
from engagerec.distributed import (
    any_rank,
    build_optimizer,
    close_runtime,
    init_runtime,
    plan_table,
    sharded_model_from_config,
)
from engagerec.errors import CheckpointError, TrainingError
from engagerec.evaluate import evaluate, train_label_means
from engagerec.metrics import build_metric_module, metric_inputs, readable
from engagerec.preemption import Preemption
from engagerec.profiling import METRICS, StepProfiler, labelled_batches

TRAIN_METRIC_WINDOW = 100_000  # rows in the moving window of the training metrics


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunLog:
    """CSV rows and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.rows = []
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir))
            self.csv_path = run_dir / "log.csv"

    def write(self, step: int, phase: str, values: Dict[str, float]) -> None:
        """Log ``values`` for ``step`` and ``phase`` (train, val, test) as ``<phase>/<key>`` scalars and
        a row of log.csv, which is rewritten whole because a later row may bring new columns."""
        if not self.enabled:
            return
        row = {"step": step, "phase": phase, **{k: round(float(v), 6) for k, v in values.items()}}
        self.rows.append(row)
        for key, value in values.items():
            self.tensorboard.add_scalar(f"{phase}/{key}", value, step)
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k not in ("step", "phase"), k))
        with open(self.csv_path, "w", newline="") as handle:  # rewritten whole: columns may grow
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.enabled:
            self.tensorboard.close()


def _improved(value: float, best: Optional[float], mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


def train(
    cfg: ExperimentConfig, run_dir: str | Path, resume: bool = True, allow_config_change: bool = False
) -> Dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns (and writes to results.json) the final metrics.

    With ``resume``, the newest checkpoint in ``run_dir`` that checks out is continued; one
    written under another config (beyond ``config.RESUMABLE_CHANGES``) is refused unless
    ``allow_config_change``. SIGTERM stops the run after the current step with a checkpoint
    (the results then say ``"preempted": True``).

    Raises:
        ConfigError: resuming under a changed config.
        CheckpointError: resuming mid-epoch on another world size; a checkpoint write failed.
        TrainingError: a task's loss became NaN or infinite.
    """
    runtime = init_runtime(cfg.train.device)
    try:
        with Preemption() as preemption:
            return _train(cfg, Path(run_dir), resume, runtime, preemption, allow_config_change)
    finally:
        close_runtime(runtime)


def _check_resume(
    last: Path, progress: Dict[str, Any], cfg: ExperimentConfig, runtime, allow_change: bool
) -> None:
    """Refuse a resume that would not continue the same run: another config, or another world
    size in the middle of an epoch (each rank reads a contiguous share of the epoch's rows, so
    the rest of the epoch would be other rows)."""
    changes = config_changes(progress["config"], dataclasses.asdict(cfg))
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


def _train(
    cfg: ExperimentConfig, run_dir: Path, resume: bool, runtime, preemption: Preemption, allow_change: bool
) -> Dict[str, Any]:
    tc = cfg.train
    if not 1 <= tc.train_metrics_every_steps <= tc.log_every_steps:
        raise ConfigError(
            f"train.train_metrics_every_steps {tc.train_metrics_every_steps}, expected 1 to "
            f"train.log_every_steps ({tc.log_every_steps}): each logged window needs batches"
        )
    data_dir = prepared_dir(cfg)
    seed_everything(tc.seed)
    dmp, model = sharded_model_from_config(cfg, runtime)
    optimizer = build_optimizer(dmp, tc.dense_lr)
    tasks = model.tasks
    ckpt_root = run_dir / "checkpoints"
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh start: an older run's checkpoints must not be taken as this run's
            shutil.rmtree(ckpt_root, ignore_errors=True)

    progress: Dict[str, Any] = {
        "epoch": 0,
        "batch_in_epoch": 0,
        "step": 0,
        "best": None,
        "best_epoch": None,
        "bad_epochs": 0,
        "history": [],
        "done": False,
        "train_seconds": 0.0,
        "world_size": runtime.world_size,
        "samples_in_epoch": 0,  # the data position in samples, whatever the world size
        "config": dataclasses.asdict(cfg),  # what a resume is checked against
    }
    if dist.is_initialized():
        dist.barrier()  # every rank sees the cleared checkpoint directory
    last = checkpoint.latest(ckpt_root) if resume else None
    if resume and last is None and checkpoint.latest(ckpt_root, checked=False) is not None:
        raise CheckpointError(  # never start over silently over a run's damaged checkpoints
            f"no checkpoint under {ckpt_root} checks out (see above); start a new run with --no-resume "
            "(it removes them) or another --out"
        )
    if last is not None:
        _check_resume(last, checkpoint.read_progress(last), cfg, runtime, allow_change)  # before loading
        progress = checkpoint.load(last, dmp, optimizer, checked=True)
        progress.update(world_size=runtime.world_size, config=dataclasses.asdict(cfg))
        # a run that ended at its epoch count goes on when resumed with more epochs (not one that
        # stopped early, or at max_steps)
        more = progress["epoch"] < tc.epochs and not (tc.max_steps and progress["step"] >= tc.max_steps)
        if progress["done"] and more and progress["bad_epochs"] < tc.patience:
            progress["done"] = False
        if runtime.is_main:
            print(f"resumed from {last} (epoch {progress['epoch']}, step {progress['step']})", flush=True)
    if runtime.is_main:  # after the resume check: a refused resume leaves the run's files alone
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        (run_dir / "plan.json").write_text(json.dumps(plan_table(dmp), indent=1))
        print(f"sharding plan ({runtime.world_size} rank(s)):\n{dmp.plan}", flush=True)

    means = train_label_means(data_dir, [t.label for t in tasks])
    log = RunLog(run_dir, runtime.is_main)
    reader = ShardReader(
        data_dir, "train", batch_size=tc.batch_size, shuffle=True, seed=tc.seed, drop_last=True
    )
    pipeline = TrainPipelineSparseDist(dmp, optimizer, runtime.device, execute_all_batches=True)
    train_metrics = build_metric_module(
        tasks, tc.batch_size, TRAIN_METRIC_WINDOW, runtime.device, runtime.world_size, runtime.rank
    )

    def save_step() -> None:
        checkpoint.save(
            ckpt_root, f"step-{progress['step']}", dmp, optimizer, progress, keep=checkpoint.STEP_PATTERN
        )

    profiler = StepProfiler(model, run_dir, tc.profile_start_step, tc.profile_steps, runtime.is_main)
    stopped, preempted = progress["done"], False
    while not stopped and progress["epoch"] < tc.epochs:
        reader.set_epoch(progress["epoch"])
        reader.start_batch = progress["batch_in_epoch"]
        loader = make_loader(reader, tc.num_workers, pin_memory=runtime.device.type == "cuda")
        batches = labelled_batches(iter(loader))
        bar = _progress_bar(tc.progress_bar and runtime.is_main, len(reader), progress["epoch"])
        dmp.train()
        started = time.perf_counter()
        window_started, window_rows = started, 0  # samples/s per logged window, not since the epoch began
        while True:
            profiler.before_step(progress["step"] + 1)
            try:
                task_losses, predictions, labels, weights = pipeline.progress(batches)
            except StopIteration:
                break
            progress["step"] += 1
            progress["batch_in_epoch"] += 1
            progress["samples_in_epoch"] += tc.batch_size * runtime.world_size
            window_rows += tc.batch_size * runtime.world_size
            # the loss is checked where every rank is (log steps, before a step checkpoint, the last
            # step) and agreed by all ranks; on one CPU process, every step (free there)
            at_log_step = progress["step"] % tc.log_every_steps == 0
            saving = bool(tc.checkpoint_every_steps) and progress["step"] % tc.checkpoint_every_steps == 0
            last_step = bool(tc.max_steps) and progress["step"] >= tc.max_steps
            one_cpu = runtime.world_size == 1 and runtime.device.type == "cpu"
            if one_cpu or at_log_step or saving or last_step:
                _stop_if_not_finite(tasks, task_losses, progress["step"], ckpt_root)
            if progress["step"] % tc.train_metrics_every_steps == 0:
                with record_function(METRICS):
                    train_metrics.update(metric_inputs(tasks, predictions, labels, weights))
            profiler.after_step(progress["step"])
            if progress["step"] % tc.log_every_steps == 0:
                values = {f"{t.name}/loss": float(task_losses[i]) for i, t in enumerate(tasks)}
                values.update(readable(train_metrics.compute()))
                weights_now = model.loss_weighting.current_weights()  # moves under uncertainty / GradNorm
                values.update({f"{t.name}/loss_weight": float(weights_now[i]) for i, t in enumerate(tasks)})
                values["samples_per_s"] = window_rows / (time.perf_counter() - window_started)
                window_started, window_rows = time.perf_counter(), 0  # the log's own writing counts next
                log.write(progress["step"], "train", values)
                if bar is not None:
                    bar.set_postfix(
                        {k: f"{v:.4g}" for k, v in values.items() if k.endswith(("loss", "/auc", "per_s"))}
                    )
            if bar is not None:
                bar.update(1)
            if tc.max_steps and progress["step"] >= tc.max_steps:
                stopped = True
                break
            # SIGTERM: with several ranks asking is a collective, so only at log steps (all ranks)
            if (runtime.world_size == 1 or at_log_step) and preemption.agreed():
                stopped = preempted = True
                break
            if tc.checkpoint_every_steps and progress["step"] % tc.checkpoint_every_steps == 0:
                progress["train_seconds"] += time.perf_counter() - started
                save_step()
                started = window_started = time.perf_counter()
                window_rows = 0
        progress["train_seconds"] += time.perf_counter() - started
        if bar is not None:
            bar.close()
        if stopped and progress["batch_in_epoch"] < reader.num_batches():
            save_step()  # stopped mid-epoch (max_steps, SIGTERM): resumable from here
            break
        pipeline.detach()  # evaluation runs the model's own forward
        val = evaluate(dmp, tasks, data_dir, "val", tc.eval_batch_size, runtime.device, means, tc.num_workers)
        log.write(progress["step"], "val", val)
        if tc.monitor not in val:
            raise ConfigError(f"train.monitor '{tc.monitor}' is not a reported metric ({sorted(val)})")
        progress["history"].append({"epoch": progress["epoch"], "step": progress["step"], **val})
        progress["epoch"] += 1
        progress["batch_in_epoch"] = progress["samples_in_epoch"] = 0
        if _improved(val[tc.monitor], progress["best"], tc.monitor_mode):
            progress.update(best=val[tc.monitor], best_epoch=progress["epoch"] - 1, bad_epochs=0)
            checkpoint.save(
                ckpt_root,
                f"best-step-{progress['step']}",
                dmp,
                optimizer,
                progress,
                keep=checkpoint.BEST_PATTERN,
                keep_last=1,
            )
        else:
            progress["bad_epochs"] += 1
        if runtime.is_main:
            print(
                f"epoch {progress['epoch'] - 1}: val "
                + ", ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "rows"),
                flush=True,
            )
        stopped = (
            preempted
            or progress["bad_epochs"] >= tc.patience
            or bool(tc.max_steps and progress["step"] >= tc.max_steps)
        )
        progress["done"] = progress["epoch"] >= tc.epochs or bool(stopped)
        save_step()

    # resumed with fewer epochs than it has run: nothing left to train, so it is finished
    progress["done"] = progress["done"] or (progress["epoch"] >= tc.epochs and not preempted)
    results: Dict[str, Any] = {
        "name": cfg.name,
        "tower": cfg.model.tower.name,
        "seed": tc.seed,
        "world_size": runtime.world_size,
        "steps": progress["step"],
        "train_seconds": progress["train_seconds"],
        "history": progress["history"],
        "preempted": preempted,
    }
    best = checkpoint.latest(ckpt_root, checkpoint.BEST_PATTERN) if progress["done"] else None
    if best is not None:
        checkpoint.load(best, dmp, restore_rng=False, checked=True)  # latest has just verified it
        pipeline.detach()
        results["best_epoch"] = progress["best_epoch"]
        results["val"] = progress["history"][progress["best_epoch"]]
        results["test"] = evaluate(
            dmp, tasks, data_dir, "test", tc.eval_batch_size, runtime.device, means, tc.num_workers
        )
        log.write(progress["step"], "test", results["test"])
    if runtime.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    log.close()
    if dist.is_initialized():
        dist.barrier()
    return results


def _progress_bar(enabled: bool, total: int, epoch: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", unit="batch", leave=False)
