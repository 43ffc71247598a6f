"""Evaluation's memory against the rows of a split: each row count in a fresh process.

``TaskMetrics`` as ``evaluate`` builds it (KuaiRand-1K's tasks: watch ratio + three binary
tasks, GAUC by user over 1,000 users), fed synthetic batches of 8,192 rows, then computed. Per
row count: the RSS held by the metrics after the last update, the peak while computing (both
above the RSS after imports) and bytes per row; the same with the code of another git revision
(``--before REV``: its ``plugin/`` exported to a temporary directory), for before/after.

With ``--run-dir`` (a run trained on prepared data) it also evaluates that run's test split as
``engagerec train`` does at its end, in a fresh process: the peak RSS above the RSS after the
model is loaded.

    .venv/bin/python benchmarks/eval_memory.py --rows 100000 1000000 10000000 --before cced79e
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from results import PEAK_RSS, exported, machine_block, run_child, write_section

ROOT = Path(__file__).resolve().parent.parent

METRICS_CHILD = (
    PEAK_RSS
    + r"""
import gc, inspect, json, sys, time
import torch
from engagerec.config import TaskConfig
from engagerec.metrics import TaskMetrics, build_metric_module

def reset_peak():  # VmHWM from here on (Linux: clear_refs 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

rows, batch = int(sys.argv[1]), 8192
torch.set_num_threads(1)
tasks = [TaskConfig("watch_ratio", "watch_ratio"), TaskConfig("skip", "skip", "binary"),
         TaskConfig("long_view", "long_view", "binary"), TaskConfig("click", "click", "binary")]
# as the evaluate() of the code measured builds it: the earlier code (no auc= switch) passed a
# torchrec window as large as the split; this one keeps torchrec's default window
if "auc" in inspect.signature(build_metric_module).parameters:
    metrics = TaskMetrics(tasks, batch, gauc_group="user_id")
else:
    metrics = TaskMetrics(tasks, batch, window_size=rows + batch, gauc_group="user_id")
g = torch.Generator().manual_seed(0)
gc.collect()
base = rss()
reset_peak()
for lo in range(0, rows, batch):
    n = min(batch, rows - lo)
    labels = {t.name: (torch.rand(n, generator=g) < 0.4).float() for t in tasks}
    predictions = {t.name: (0.3 * labels[t.name] + 0.7 * torch.rand(n, generator=g)) for t in tasks}
    weights = {t.name: torch.ones(n) for t in tasks}
    metrics.update(predictions, labels, weights, groups=torch.randint(0, 1000, (n,), generator=g))
gc.collect()
held = rss() - base
start = time.perf_counter()
values = metrics.compute()
seconds = time.perf_counter() - start
peak = hwm_kb() * 1024 - base
print(json.dumps({"held": held, "peak": peak, "compute_s": seconds, "skip_auc": values["skip/auc"]}))
"""
)

EVALUATE_CHILD = (
    PEAK_RSS
    + r"""
import json, sys, time
from engagerec.evaluate import evaluate, train_label_means
from engagerec.runs import open_run

with open_run(sys.argv[1], "best", "cpu") as run:
    tc = run.cfg.train
    means = train_label_means(run.data_dir, [t.label for t in run.model.tasks])
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    values = evaluate(run.dmp, run.model.tasks, run.data_dir, "test", tc.eval_batch_size,
                      run.runtime.device, means, 0, tc.gauc_group)
    seconds = time.perf_counter() - start
    peak = hwm_kb() * 1024 - base
print(json.dumps({"base": base, "peak": peak, "rows": values["rows"], "seconds": seconds,
                  "skip_auc": values["skip/auc"], "watch_ratio_xauc": values["watch_ratio/xauc"]}))
"""
)


def child_env(plugin: Path | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if plugin is not None:  # the exported revision shadows the editable install
        env["PYTHONPATH"] = str(plugin)
    return env


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def metrics_table(rows_list: list[int], versions: dict) -> list[str]:
    lines = [
        "| code | rows | held after updates (MiB) | bytes/row held | peak while computing (MiB) "
        "| bytes/row at peak | compute (s) | skip AUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, plugin in versions.items():
        for rows in rows_list:
            r = run_child(METRICS_CHILD, str(rows), env=child_env(plugin), cwd=str(ROOT))
            lines.append(
                f"| {name} | {rows:,} | {mib(r['held'])} | {r['held'] / rows:.1f} | {mib(r['peak'])} "
                f"| {r['peak'] / rows:.1f} | {r['compute_s']:.1f} | {r['skip_auc']:.6f} |"
            )
            print(lines[-1], flush=True)
    return lines


def evaluate_table(run_dir: str, versions: dict) -> list[str]:
    lines = [
        "| code | test rows | RSS with the model loaded (MiB) | evaluation's peak above it (MiB) "
        "| bytes/row | wall (s) | skip AUC | watch-ratio XAUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, plugin in versions.items():
        r = run_child(EVALUATE_CHILD, run_dir, env=child_env(plugin), cwd=str(ROOT))
        per_row = r["peak"] / r["rows"]
        lines.append(
            f"| {name} | {r['rows']:,.0f} | {mib(r['base'])} | {mib(r['peak'])} | {per_row:.1f} "
            f"| {r['seconds']:.0f} | {r['skip_auc']:.6f} | {r['watch_ratio_xauc']:.6f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--before", help="a git revision whose evaluation code is measured too")
    parser.add_argument("--run-dir", help="a trained run: also evaluate its test split end to end")
    parser.add_argument("--section", default="eval_memory")
    args = parser.parse_args()
    command = "python benchmarks/eval_memory.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as scratch:
        versions = {"this checkout": None}
        if args.before:
            versions = {f"before ({args.before})": exported(args.before, Path(scratch)), **versions}
        lines = metrics_table(args.rows, versions)
        if args.run_dir:
            lines += ["", f"The whole `evaluate` of the test split of `{args.run_dir}`:", ""]
            lines += evaluate_table(args.run_dir, versions)
    body = "\n".join(
        [
            machine_block(command),
            "",
            "`TaskMetrics` as `evaluate` builds it: KuaiRand-1K's four tasks (watch ratio; skip, "
            "long_view, click binary), GAUC by user (1,000 users), batches of 8,192, each row count "
            "in a fresh process; memory above the RSS after imports (held: after the last update; "
            "peak: the high-water mark through `compute`).",
            "",
            *lines,
        ]
    )
    write_section(args.section, body)


if __name__ == "__main__":
    main()
