"""A run that early-stops: it stops ``train.patience`` epochs after its validation metric last
improved, the test split is evaluated with the best epoch's model (not the last one's), and
evaluating that model does not depend on the evaluation batch size."""

import pytest

from conftest import EQUAL_METRICS, study_run_config
from engagerec.evaluate import evaluate, train_label_means
from engagerec.runs import open_run
from engagerec.train import train

EPOCHS, PATIENCE = 6, 1


@pytest.fixture(scope="module")
def stopped_run(study_data, tmp_path_factory):
    """The small MMoE run with room for 6 epochs and patience 1: its validation loss is best after
    the 2nd epoch and worse after the 3rd (it starts to overfit the 400 users' ids), so it stops
    after 3 epochs. (run directory, results)"""
    run = tmp_path_factory.mktemp("stopped") / "run"
    return run, train(study_run_config(study_data, epochs=EPOCHS, patience=PATIENCE), run)


def _evaluate(run_dir, checkpoint_name, splits, batch_sizes=(None,)):
    """{(split, batch size): metrics} of one checkpoint of ``run_dir``, opened once."""
    out = {}
    with open_run(run_dir, checkpoint_name) as opened:
        means = train_label_means(opened.data_dir, [t.label for t in opened.model.tasks])
        for split in splits:
            for size in batch_sizes:
                out[split, size] = evaluate(
                    opened.dmp, opened.model.tasks, opened.data_dir, split,
                    size or opened.cfg.train.eval_batch_size, opened.runtime.device, means,
                    gauc_group=opened.cfg.train.gauc_group,
                )  # fmt: skip
    return out


def test_early_stopping_stops_patience_epochs_after_the_best_and_tests_the_best_epochs_model(stopped_run):
    run, results = stopped_run
    history = results["history"]
    losses = [epoch["loss"] for epoch in history]
    best = results["best_epoch"]
    # the settings make it stop early, and after exactly `patience` epochs without improvement
    assert len(history) < EPOCHS, losses
    assert best == losses.index(min(losses)) and best > 0, losses  # not simply the first epoch
    assert len(history) == best + PATIENCE + 1, losses
    assert all(later >= losses[best] for later in losses[best + 1 :]), losses
    assert results["val"] == history[best]
    best_step = history[best]["step"]
    assert [p.name for p in (run / "checkpoints").glob("best-step-*")] == [f"best-step-{best_step}"]

    # the best checkpoint holds the best epoch's model: it scores validation as that epoch did
    best_model = _evaluate(run, "best", ("val", "test"))
    for key in EQUAL_METRICS:
        assert best_model["val", None][key] == pytest.approx(history[best][key], rel=1e-5, abs=1e-6), key
    # and the reported test metrics are that model's, not the last epoch's (a worse model)
    last_model = _evaluate(run, "latest", ("test",))
    assert results["steps"] == history[-1]["step"] > best_step
    for key in EQUAL_METRICS:
        assert results["test"][key] == pytest.approx(best_model["test", None][key], rel=1e-5, abs=1e-6), key
    assert results["test"]["loss"] != pytest.approx(last_model["test", None]["loss"], rel=1e-4)


def test_evaluation_metrics_do_not_depend_on_the_batch_size(stopped_run):
    """Every metric of the test split (torchrec's windowed ones, NE, calibration and log loss too,
    not only the exact XAUC and GAUC) is the same in one batch, in the configured 1,024-row
    batches, and in 97-row batches whose last one is short."""
    run, results = stopped_run
    sizes = (4096, 1024, 97)
    metrics = _evaluate(run, "best", ("test",), sizes)
    keys = (*EQUAL_METRICS, "skip/calibration", "skip/log_loss", "watch_ratio/mse_loss")
    one_batch = metrics["test", 4096]
    assert one_batch["rows"] == results["test"]["rows"] == 3600
    for size in sizes[1:]:
        assert metrics["test", size]["rows"] == one_batch["rows"]
        for key in keys:
            # a row's score can differ in its last bits between batch sizes (the matmuls block
            # differently), which can flip a near-tie of two scores: a rank metric (AUC, XAUC)
            # may then move by one pair's share, some 1e-4 here (seen on a 2-core AMD EPYC), and
            # a per-user GAUC more, as a user holds few pairs (2.5e-4 seen on another AMD EPYC);
            # "rows" above and the non-rank metrics at 1e-5 catch a dropped or double-counted row
            if key.endswith("gauc"):
                close = dict(abs=1e-3)
            else:
                close = dict(abs=2e-4) if key.endswith("auc") else dict(rel=1e-5, abs=1e-6)
            assert metrics["test", size][key] == pytest.approx(one_batch[key], **close), (size, key)
