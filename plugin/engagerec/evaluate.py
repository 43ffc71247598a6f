"""Evaluation without gradients: every row of a split exactly once, on any number of ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from engagerec.data.errors import DataError
from engagerec.data.reader import ShardReader, make_loader
from engagerec.data.schema import DatasetSchema
from engagerec.metrics import ExactXAUC, LossAndBaselines, build_metric_module, metric_inputs, readable
from engagerec.runs import open_run
from engagerec.tasks import Task


def train_label_means(data_dir: str | Path, labels: List[str]) -> Dict[str, float]:
    """Means of the label columns over the train split (missing labels left out): what the
    constant baselines predict. prepare() computed them into schema.json."""
    stats = DatasetSchema.load(data_dir).meta["summary"]["split"]["train"]["labels"]
    missing = [name for name in labels if stats.get(name, {}).get("mean") is None]
    if missing:
        raise DataError(
            f"labels {missing} have no train values (schema.json's train summary)", file=str(data_dir)
        )
    return {name: float(stats[name]["mean"]) for name in labels}


def evaluate(
    model: torch.nn.Module,
    tasks: List[Task],
    data_dir: str | Path,
    split: str,
    batch_size: int,
    device: torch.device,
    train_means: Dict[str, float],
    num_workers: int = 0,
) -> Dict[str, float]:
    """``model`` is the (DMP-wrapped) MultiTaskModel; returns metrics, losses and baselines."""
    reader = ShardReader(data_dir, split, batch_size=batch_size, even_batches=True)
    world, rank = reader.world_size, reader.rank
    metrics = build_metric_module(
        tasks,
        batch_size,
        window_size=reader.total_rows + world * batch_size,
        device=device,
        world_size=world,
        rank=rank,
    )
    sums = LossAndBaselines(tasks, train_means, device)
    xauc = ExactXAUC(tasks)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cuda = device.type == "cuda"
        for batch in make_loader(reader, num_workers=num_workers, pin_memory=cuda):
            batch = batch.to(device, non_blocking=cuda)
            _, (_, predictions, labels, weights) = model(batch)
            metrics.update(metric_inputs(tasks, predictions, labels, weights))
            sums.update(predictions, labels, weights)
            xauc.update(predictions, labels, weights)
    model.train(was_training)
    out = readable(metrics.compute())
    out.update(sums.compute())
    out.update(xauc.compute())
    return out


def evaluate_run(
    run_dir: str | Path, split: str = "test", checkpoint_name: str = "best", device: Optional[str] = None
) -> Dict[str, float]:
    """Evaluate a finished (or interrupted) run's best checkpoint (``checkpoint_name="latest"``
    for the newest step) on ``split``, on however many ranks this process group has, on the
    run's ``train.device`` or on ``device`` (``cpu`` evaluates a GPU-trained run on CPU)."""
    with open_run(run_dir, checkpoint_name, device) as run:
        means = train_label_means(run.data_dir, [t.label for t in run.model.tasks])
        metrics = evaluate(
            run.dmp,
            run.model.tasks,
            run.data_dir,
            split,
            run.cfg.train.eval_batch_size,
            run.runtime.device,
            means,
        )
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done before any tears the group down
        return metrics


@dataclass
class SplitOutputs:
    """What a model says about every row of a split: per task its predictions (probabilities
    for binary tasks), labels and label weights (0 where the label is missing), each [N]; and
    per gate of the tower (``gate_weights``, e.g. MMoE's ``"task0"``, PLE's
    ``"level0/task1"``) the mean weight of each expert [E] and the mean per-row entropy in
    nats (0: one expert; log E: all alike)."""

    predictions: Dict[str, np.ndarray]
    labels: Dict[str, np.ndarray]
    weights: Dict[str, np.ndarray]
    gate_means: Dict[str, np.ndarray] = field(default_factory=dict)
    gate_entropy: Dict[str, float] = field(default_factory=dict)


def split_outputs(run_dir: str | Path, split: str = "test", checkpoint_name: str = "best") -> SplitOutputs:
    """
    Every row of ``split`` through a run's best checkpoint on one CPU process: the predictions
    beside the labels (for metrics evaluate does not compute, e.g. a skip read off the
    watch-ratio head) and the tower's gates, averaged over the rows.

    Args:
        run_dir: a directory written by ``engagerec train``.
        split: "train", "val" or "test".
        checkpoint_name: "best" or "latest" (see ``runs.open_run``).

    Returns:
        SplitOutputs, rows in the split's stored order.

    Example::

        >>> import contextlib, io, tempfile
        >>> from engagerec.config import load_config
        >>> from engagerec.data.prepare import prepare
        >>> from engagerec.train import train
        >>> cfg = load_config("synthetic_study", [
        ...     "data.source.synthetic.num_rows=3000", f"train.data_dir={tempfile.mkdtemp()}",
        ...     "train.epochs=1", "train.progress_bar=false"])
        >>> _ = prepare(cfg.data, cfg.train.data_dir)
        >>> run = tempfile.mkdtemp()
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the sharding plan, the epoch line
        ...     _ = train(cfg, run)
        >>> out = split_outputs(run, "test")
        >>> sorted(out.predictions), out.predictions["skip"].shape == out.labels["skip"].shape
        (['skip', 'watch_ratio'], True)
        >>> gates = out.gate_means["task1"]  # MMoE's skip gate over its 4 experts
        >>> gates.shape, round(float(gates.sum()), 4)
        ((4,), 1.0)
    """
    import torch.distributed as dist

    outputs: Dict[str, Dict[str, List[np.ndarray]]] = {"predictions": {}, "labels": {}, "weights": {}}
    gate_sums: Dict[str, torch.Tensor] = {}
    entropy_sums: Dict[str, float] = {}
    rows = 0
    with open_run(run_dir, checkpoint_name, device="cpu") as run:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("split_outputs runs on one process (it returns every row of the split)")
        reader = ShardReader(run.data_dir, split, batch_size=run.cfg.train.eval_batch_size)
        gates = getattr(run.model.tower, "gate_weights", None)
        with torch.no_grad():
            for batch in make_loader(reader, num_workers=0, pin_memory=False):
                _, (_, predictions, labels, weights) = run.dmp(batch)
                for key, values in (("predictions", predictions), ("labels", labels), ("weights", weights)):
                    for task, tensor in values.items():
                        outputs[key].setdefault(task, []).append(tensor.reshape(-1).double().numpy())
                rows += len(batch.labels[run.model.tasks[0].label])
                for name, weight in (gates or {}).items():
                    weight = weight.double()
                    gate_sums[name] = gate_sums.get(name, 0) + weight.sum(dim=0)
                    row_entropy = -(weight * weight.clamp_min(1e-12).log()).sum(dim=1)
                    entropy_sums[name] = entropy_sums.get(name, 0.0) + float(row_entropy.sum())
    joined = {key: {t: np.concatenate(parts) for t, parts in v.items()} for key, v in outputs.items()}
    return SplitOutputs(
        **joined,
        gate_means={name: (total / rows).numpy() for name, total in gate_sums.items()},
        gate_entropy={name: total / rows for name, total in entropy_sums.items()},
    )
