"""Exact XAUC against counting every pair, and the training metrics' cost guard."""

import itertools

import numpy as np
import pytest
import torch

from engagerec.config import TaskConfig
from engagerec.metrics import ExactXAUC, build_metric_module, exact_xauc, metric_inputs, readable
from engagerec.tasks import Task


def _by_pairs(predictions, labels) -> float:
    score = pairs = 0.0
    for i, j in itertools.combinations(range(len(labels)), 2):
        if labels[i] == labels[j]:
            continue
        pairs += 1
        same_order = (predictions[i] - predictions[j]) * (labels[i] - labels[j])
        score += 1.0 if same_order > 0 else 0.5 if same_order == 0 else 0.0
    return score / pairs


@pytest.mark.parametrize("seed", range(6))
def test_exact_xauc_equals_counting_every_pair_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.integers(0, 6, n) / 5  # many ties, as clipped watch ratios have
    predictions = np.round(labels + rng.normal(0, 0.3, n), 1)  # ties in predictions too
    assert exact_xauc(predictions, labels) == pytest.approx(_by_pairs(predictions, labels), abs=1e-12)
    assert exact_xauc(-predictions, labels) == pytest.approx(1 - _by_pairs(predictions, labels), abs=1e-12)
    assert exact_xauc(np.zeros(n), labels) == 0.5


def test_exact_xauc_over_batches_does_not_depend_on_the_batch_size():
    task = Task(TaskConfig(name="watch_ratio", label="watch_ratio"))
    rng = np.random.default_rng(0)
    p, y = torch.tensor(rng.random(1000)), torch.tensor(rng.integers(0, 4, 1000) / 3.0)
    w = torch.ones(1000)
    w[::7] = 0  # padding or missing labels: left out
    values = []
    for size in (1000, 64, 7):
        metric = ExactXAUC([task])
        for lo in range(0, 1000, size):
            part = slice(lo, lo + size)
            metric.update({"watch_ratio": p[part]}, {"watch_ratio": y[part]}, {"watch_ratio": w[part]})
        values.append(metric.compute()["watch_ratio/xauc"])
    keep = (w > 0).numpy()
    assert values == pytest.approx([_by_pairs(p.numpy()[keep], y.numpy()[keep])] * 3, abs=1e-12)


def test_training_metrics_leave_the_quadratic_xauc_out():
    tasks = [
        Task(TaskConfig(name="watch_ratio", label="watch_ratio")),
        Task(TaskConfig(name="skip", label="skip", kind="binary")),
    ]
    module = build_metric_module(tasks, batch_size=64, window_size=1000, device=torch.device("cpu"))
    p = {"watch_ratio": torch.rand(64), "skip": torch.rand(64)}
    y = {"watch_ratio": torch.rand(64), "skip": (torch.rand(64) > 0.5).float()}
    module.update(metric_inputs(tasks, p, y, {name: torch.ones(64) for name in p}))
    names = set(readable(module.compute()))
    assert {"watch_ratio/mse", "watch_ratio/mae", "skip/auc"} <= names
    assert not [name for name in names if "xauc" in name]
