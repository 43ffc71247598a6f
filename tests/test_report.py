"""Comparison reports: 95% intervals over seeds and paired tests against the reference."""

import json

import numpy as np
import pytest
from scipy import stats

from engagerec.errors import ConfigError
from engagerec_study.report import GBDT, ci95, paired_comparisons, write_report


def _runs():
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(5):
        shared = rng.normal(0, 0.003)  # what a seed does to every model on one split
        for model, mse, auc in (("mmoe", 0.095, 0.815), ("ple", 0.0952, 0.814), (GBDT, 0.0948, 0.806)):
            noise = rng.normal(0, 0.0005)
            runs.append({"tower": model, "seed": seed,
                         "test": {"watch_ratio/mse": mse + shared + noise, "skip/auc": auc - shared + noise,
                                  "watch_ratio/baseline_mse_train_mean": 0.146}})  # fmt: skip
    return runs


def test_the_interval_is_students_t_over_seeds():
    values = np.array([0.094, 0.095, 0.097, 0.093, 0.096])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert ci95(values) == pytest.approx((high - low) / 2, rel=1e-9)
    assert ci95(values[:1]) == 0.0


def test_paired_comparisons_test_the_per_seed_differences():
    runs = _runs()
    rows = {(r["model"], r["metric"]): r for r in paired_comparisons(runs, GBDT)}
    assert set(rows) == {(m, k) for m in ("mmoe", "ple") for k in ("watch_ratio/mse", "skip/auc")}
    mmoe = np.array([r["test"]["skip/auc"] for r in runs if r["tower"] == "mmoe"])
    gbdt = np.array([r["test"]["skip/auc"] for r in runs if r["tower"] == GBDT])
    row = rows[("mmoe", "skip/auc")]
    assert row["difference"] == pytest.approx((mmoe - gbdt).mean())
    assert row["p_value"] == pytest.approx(stats.ttest_1samp(mmoe - gbdt, 0.0).pvalue)
    # the seed effect shared by both models cancels in the pairs: an unpaired test misses it
    assert row["p_value"] < stats.ttest_ind(mmoe, gbdt).pvalue / 100


def test_the_report_writes_intervals_and_the_paired_table(tmp_path):
    table = write_report(_runs(), tmp_path, "test")
    assert "| mmoe | 0.09" in table and "± 0.00" in table
    text = (tmp_path / "compare.md").read_text()
    assert "95% confidence interval" in text and f"| model - {GBDT} |" in text and "(p=" in text
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["paired"]["reference"] == GBDT and len(report["paired"]["rows"]) == 4
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_the_reference_can_be_any_model_and_an_unknown_one_is_refused(tmp_path):
    write_report(_runs(), tmp_path, "test", reference="mmoe")
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["paired"]["reference"] == "mmoe"
    assert {row["model"] for row in report["paired"]["rows"]} == {"ple", GBDT}
    with pytest.raises(ConfigError, match="compare --reference 'mmo' is none of the models"):
        write_report(_runs(), tmp_path, "test", reference="mmo")
