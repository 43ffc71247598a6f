"""Exact XAUC against counting every pair, GAUC against scikit-learn, NE, calibration and log loss
against their formulas, and the training metrics' cost guard."""

import itertools

import numpy as np
import pytest
import torch

from engagerec.config import TaskConfig
from engagerec.metrics import (
    ExactXAUC,
    TaskMetrics,
    build_metric_module,
    exact_xauc,
    grouped_auc,
    metric_inputs,
    readable,
)
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


def _xauc_by_kendall(predictions, labels) -> float:
    """The earlier implementation's route, through scipy's Kendall tau-b: an independent oracle."""
    from scipy.stats import kendalltau

    x, y = np.asarray(predictions, float), np.asarray(labels, float)
    n = len(x)

    def tied(values):
        counts = np.unique(values, return_counts=True, axis=0)[1].astype(float)
        return float((counts * (counts - 1) / 2).sum())

    total, tied_x, tied_y = n * (n - 1) / 2, tied(x), tied(y)
    tied_both = tied(np.stack([x, y], axis=1))
    tau = kendalltau(x, y, variant="b").statistic
    concordant = (
        total - tied_x - tied_y + tied_both + tau * np.sqrt((total - tied_x) * (total - tied_y))
    ) / 2
    return (concordant + 0.5 * (tied_x - tied_both)) / (total - tied_y)


@pytest.mark.parametrize("n", [2, 3, 1000, 40_001])
def test_exact_xauc_without_scipy_equals_the_kendall_route(n):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 21, n) / 20
    predictions = np.round(labels * 0.5 + rng.random(n), 3).astype(np.float32)
    if len(set(labels)) > 1:
        assert exact_xauc(predictions, labels) == pytest.approx(
            _xauc_by_kendall(predictions, labels), abs=1e-9
        )


def _gauc_by_groups(groups, scores, labels) -> float:
    from sklearn.metrics import roc_auc_score

    total = weighted = 0.0
    for group in np.unique(groups):
        mine = groups == group
        if len(set(labels[mine])) == 2:
            weighted += mine.sum() * roc_auc_score(labels[mine], scores[mine])
            total += mine.sum()
    return weighted / total


@pytest.mark.parametrize("seed", range(4))
def test_grouped_auc_equals_scikit_learn_per_group_weighted_by_rows(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 40, 3000) * 1_000_003  # sparse, large ids
    labels = (rng.random(3000) < 0.3 + 0.4 * (groups % 3 == 0)).astype(float)
    scores = np.round(labels * 0.3 + rng.random(3000), 2)  # ties inside groups
    assert grouped_auc(groups, scores, labels) == pytest.approx(
        _gauc_by_groups(groups, scores, labels), abs=1e-12
    )
    assert np.isnan(grouped_auc(np.arange(5), np.zeros(5), np.ones(5)))  # no group holds both classes


def test_task_metrics_names_values_by_task_and_groups_by_a_sparse_feature():
    from torchrec import KeyedJaggedTensor

    tasks = [TaskConfig("dwell", "dwell", output="identity"), TaskConfig("click", "click", kind="binary")]
    metrics = TaskMetrics(tasks, batch_size=6, gauc_group="user")
    rng = np.random.default_rng(0)
    users = torch.tensor([5, 5, 5, 8, 8, 8])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "history"],
        torch.cat([users, torch.tensor([1, 2, 3])]),
        torch.tensor([1] * 6 + [1, 0, 2, 0, 0, 0]),
    )
    p = {"dwell": torch.tensor(rng.random(6)).float(), "click": torch.tensor([0.9, 0.2, 0.6, 0.1, 0.7, 0.4])}
    y = {"dwell": torch.tensor(rng.random(6)).float(), "click": torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])}
    w = {"dwell": torch.ones(6), "click": torch.tensor([1.0, 1, 1, 1, 1, 0])}  # the last click label missing
    metrics.update(p, y, w, groups=kjt)
    values = metrics.compute()
    assert {
        "dwell/mse",
        "dwell/mae",
        "dwell/xauc",
        "click/auc",
        "click/accuracy",
        "click/ne",
        "click/gauc",
    } <= set(values)
    assert values["dwell/mse"] == pytest.approx(float(((p["dwell"] - y["dwell"]) ** 2).mean()), rel=1e-6)
    # user 5: AUC 1 over 3 rows; user 8 (its last row unlabelled): AUC 1 over 2 rows
    assert values["click/gauc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one id per row"):
        TaskMetrics(tasks, batch_size=6, gauc_group="history").update(p, y, w, groups=kjt)
    with pytest.raises(ValueError, match="pass groups="):
        metrics.update(p, y, w)


def test_gauc_keeps_64_bit_group_ids_apart():
    """Hashed ids use all 64 bits: two users 1 apart above 2^53 (equal as float64) stay two groups."""
    metrics = TaskMetrics(
        [TaskConfig("click", "click", kind="binary")], batch_size=4, exact=False, gauc_group="u"
    )
    users = torch.tensor([2**60, 2**60, 2**60 + 1, 2**60 + 1])
    scores, labels = torch.tensor([0.9, 0.1, 0.2, 0.8]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    metrics.update({"click": scores}, {"click": labels}, {"click": torch.ones(4)}, groups=users)
    assert metrics.compute()["click/gauc"] == 0.5  # AUC 1 and AUC 0; merged into one group: 0.75


def test_ne_calibration_log_loss_and_accuracy_equal_their_formulas_with_row_weights():
    """The binary metrics against numpy written here, with fractional row weights (0 for some rows)
    over three batches: NE is the weighted log loss over the entropy of the weighted base rate,
    calibration the weighted sum of predictions over that of labels."""
    from engagerec.metrics import LossAndBaselines

    tasks = [
        Task(TaskConfig("dwell", "dwell", output="identity")),
        Task(TaskConfig("click", "click", "binary")),
    ]
    metrics = TaskMetrics(tasks, batch_size=100)
    sums = LossAndBaselines(tasks, {"dwell": 0.4, "click": 0.3}, torch.device("cpu"))
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.3).astype(float)
    p = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.2, 300), 0.02, 0.98)  # informative, too high
    d, t = rng.random(300), rng.random(300)  # dwell predictions and labels
    w = rng.uniform(0, 2, 300) * (rng.random(300) > 0.1)  # a tenth of the rows weigh 0
    p[::50] = 0.5  # on the threshold: counts as predicting 1
    for part in (slice(0, 100), slice(100, 200), slice(200, 300)):
        predictions = {"dwell": torch.tensor(d[part]), "click": torch.tensor(p[part])}
        labels = {"dwell": torch.tensor(t[part]), "click": torch.tensor(y[part])}
        weights = {"dwell": torch.tensor(w[part]), "click": torch.tensor(w[part])}
        metrics.update(predictions, labels, weights)
        sums.update(predictions, labels, weights)
    values = {**metrics.compute(), **sums.compute()}

    log_loss = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum()
    base = (w * y).sum() / w.sum()
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    expected = {
        "click/log_loss": log_loss,
        "click/ne": log_loss / entropy,
        "click/calibration": (w * p).sum() / (w * y).sum(),
        "click/accuracy": (w * ((p >= 0.5) == y)).sum() / w.sum(),
        "click/baseline_accuracy_majority": (w * (y == 0)).sum() / w.sum(),  # train mean 0.3: predict 0
        "dwell/mse": (w * (d - t) ** 2).sum() / w.sum(),
        "dwell/mae": (w * abs(d - t)).sum() / w.sum(),
        "dwell/mse_loss": (w * (d - t) ** 2).sum() / w.sum(),
        "dwell/baseline_mse_train_mean": (w * (t - 0.4) ** 2).sum() / w.sum(),
    }
    expected["loss"] = expected["click/log_loss"] + expected["dwell/mse_loss"]  # task weights 1
    assert expected["click/ne"] < 0.9 and expected["click/calibration"] > 1.1  # no value is trivial
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize("seed", range(3))
def test_exact_auc_equals_scikit_learn_with_ties_weights_and_blocks(seed, monkeypatch):
    """The AUC kernel against scikit-learn: rounded scores (many ties), fractional weights, and
    blocks of 7 rows, so runs of equal scores and groups cross block ends."""
    from sklearn.metrics import roc_auc_score

    import engagerec.metrics as metrics

    rng = np.random.default_rng(seed)
    labels = (rng.random(2000) < 0.35).astype(np.float32)
    scores = np.round(0.3 * labels + rng.random(2000), 2).astype(np.float32)
    weights = rng.uniform(0.1, 3.0, 2000)
    expected = roc_auc_score(labels, scores, sample_weight=weights)
    assert metrics.binary_auc(scores, labels, weights) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(metrics, "AUC_BLOCK_ROWS", 7)
    assert metrics.binary_auc(scores, labels, weights) == pytest.approx(expected, abs=1e-12)
    assert metrics.binary_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    groups = rng.integers(0, 30, 2000) * 1_000_003
    assert metrics.grouped_auc(groups, scores, labels) == pytest.approx(
        _gauc_by_groups(groups, scores, labels), abs=1e-12
    )
    assert metrics.grouped_auc(-groups - 1, scores, labels) == pytest.approx(  # ids that need codes
        _gauc_by_groups(groups, scores, labels), abs=1e-12
    )


def test_exact_auc_orders_negative_scores_and_signed_zeros_as_numbers():
    """Scores are compared through their float32 bits: negative scores (logits) sort below positive
    ones, and -0.0 ties with 0.0."""
    scores = np.array([-2.5, -0.0, 0.0, 1.5, -7.0, 3.0], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    # positives -0.0, 1.5, 3.0 against negatives -2.5, 0.0, -7.0: 8 wins and one tie of 9 pairs
    assert float(np.float32(8.5 / 9)) == pytest.approx(8.5 / 9)
    from engagerec.metrics import binary_auc

    assert binary_auc(scores, labels) == pytest.approx(8.5 / 9, abs=1e-12)
    assert binary_auc(scores.astype(np.float64), labels) == pytest.approx(8.5 / 9, abs=1e-12)


def test_evaluation_auc_equals_torchrecs_window_auc():
    """Evaluation's exact AUC (compact columns) equals what torchrec's AUC gives with a window as
    large as the rows (the earlier route), on distinct scores, over several batches."""
    tasks = [TaskConfig("click", "click", kind="binary")]
    rng = np.random.default_rng(3)
    exact = TaskMetrics(tasks, batch_size=500)
    windowed = TaskMetrics(tasks, batch_size=500, window_size=5000, exact=False)
    for _ in range(6):
        y = torch.tensor(rng.random(500) < 0.3).float()
        p = torch.tensor(rng.permutation(10**6)[:500] / 10**6 * 0.7 + 0.3 * y.numpy()).float()
        w = torch.tensor(rng.random(500) > 0.1).float()  # padding and missing labels weigh 0
        for metrics in (exact, windowed):
            metrics.update({"click": p}, {"click": y}, {"click": w})
    assert exact.compute()["click/auc"] == pytest.approx(windowed.compute()["click/auc"], abs=2e-6)


def test_exact_xauc_in_blocks_equals_one_block(monkeypatch):
    import engagerec.xauc as xauc

    rng = np.random.default_rng(11)
    labels = rng.integers(0, 21, 5000) / 20
    predictions = np.round(labels * 0.5 + rng.random(5000), 2).astype(np.float32)
    whole = xauc.exact_xauc(predictions, labels)
    monkeypatch.setattr(xauc, "BLOCK_ROWS", 13)  # 16 blocks at least: 313 rows each
    assert xauc.exact_xauc(predictions, labels) == pytest.approx(whole, abs=1e-15)
    assert whole == pytest.approx(_xauc_by_kendall(predictions, labels), abs=1e-9)


def test_gauc_widens_group_ids_that_stop_fitting_int32_midway():
    metrics = TaskMetrics([TaskConfig("click", "click", kind="binary")], batch_size=4, gauc_group="u")
    scores, labels = torch.tensor([0.9, 0.1, 0.2, 0.8]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    ones = {"click": torch.ones(4)}
    metrics.update({"click": scores}, {"click": labels}, ones, groups=torch.tensor([1, 1, 2, 2]))
    metrics.update({"click": scores}, {"click": labels}, ones, groups=torch.tensor([1, 1, 2**40, 2**40]))
    # user 1: AUC 1 over 4 rows; users 2 and 2^40: AUC 0 over 2 rows each (merged, they would be 0)
    assert metrics.compute()["click/gauc"] == pytest.approx(0.5)


def test_evaluation_metrics_hold_a_few_bytes_a_row(monkeypatch):
    """The memory guard: evaluation's TaskMetrics (exact) holds no torchrec AUC window (the sums
    it keeps are O(1)), and its numpy columns are 8 bytes a row for a regression task and 9 for a
    binary task with GAUC (traced allocations: exact, not the allocator's RSS; the RSS figures
    are benchmarks/eval_memory.py's)."""
    import tracemalloc

    import engagerec.metrics as metrics_module

    monkeypatch.setattr(metrics_module._Column, "BLOCK", 1 << 16)
    tasks = [
        TaskConfig("ratio", "ratio"),
        TaskConfig("skip", "skip", "binary"),
        TaskConfig("click", "click", "binary"),
    ]
    metrics = TaskMetrics(tasks, batch_size=8192, gauc_group="user")
    from torchrec.metrics.auc import AUCMetric

    assert not [m for m in metrics.module.rec_metrics.rec_metrics if isinstance(m, AUCMetric)]
    rows, names = 1 << 18, ("ratio", "skip", "click")  # whole column blocks: what is held is used
    tracemalloc.start()
    for _ in range(rows // 8192):
        p, y, w = torch.rand(8192), (torch.rand(8192) < 0.5).float(), torch.ones(8192)
        predictions, labels, weights = (dict.fromkeys(names, t) for t in (p, y, w))
        metrics.xauc.update(predictions, labels, weights)  # the row stores; the sums are O(1)
        metrics.auc.update(predictions, labels, weights, torch.randint(0, 100, (8192,)))
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held / rows < 8 + 2 * 9 + 1, f"{held / rows:.1f} bytes a row"
