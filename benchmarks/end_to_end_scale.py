"""KuaiRand-1K-shaped data end to end at several scales, as a user runs it: generate, prepare,
then `engagerec train` for one epoch with its validation and test evaluation.

    .venv/bin/python benchmarks/end_to_end_scale.py --scales 0.1 1 5 [--keep DIR]

For each scale S (1 = KuaiRand-1K: 11.7M views, 4.37M videos):

1. `engagerec synthesize --shape kuairand-1k --scale S` (engagerec.data.kuairand_generator);
2. `prepare` with configs/kuairand_1k.yaml: seconds and the process's peak RSS (VmHWM);
3. `engagerec train --config configs/kuairand_1k.yaml` on it, one epoch, metrics on, with the
   validation and test evaluation it runs: wall time, the seconds spent training (results.json),
   samples/s (the median of log.csv's windows), and the peak RSS of the whole process tree
   sampled every second (the RSS over time is plotted);
4. the disk used by the generated files, the preparation and the run;
5. test quality after that one epoch: watch-ratio MSE beside the train-mean constant and the
   generator's noise floor, and the share of the explainable variance recovered,
   (constant - model) / (constant - floor); skip AUC.

Each step runs in a fresh process. Writes the section ``end_to_end_scale`` of
benchmarks/RESULTS.md and benchmarks/end_to_end_scale.png (RSS over time per scale; stage seconds
against rows).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from prepare_scale import GENERATE, PREPARE  # noqa: E402
from results import machine_block, run_child, write_section  # noqa: E402

CONFIG = REPO / "configs" / "kuairand_1k.yaml"


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process below it (torchrun ranks, loader workers)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            for line in open(f"/proc/{current}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_sampled(command: List[str], every: float = 1.0) -> Tuple[float, int, List[Tuple[float, int]]]:
    """Run ``command`` (it must succeed); returns (wall seconds, peak tree RSS, [(t, RSS)])."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline: List[Tuple[float, int]] = []
    output: List[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        timeline.append((time.perf_counter() - start, tree_rss(process.pid)))
        time.sleep(every)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{''.join(output[-40:])}")
    return time.perf_counter() - start, max(rss for _, rss in timeline), timeline


def disk_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def one_scale(scale: float, tmp: Path) -> Dict:
    raw, prepared, run = tmp / f"raw_{scale:g}", tmp / f"prepared_{scale:g}", tmp / f"run_{scale:g}"
    generated = run_child(GENERATE, str(raw), str(scale), cwd=REPO)
    done = run_child(PREPARE, str(raw), str(prepared), str(CONFIG), cwd=REPO)
    train = [
        sys.executable, "-m", "engagerec", "train", "--config", str(CONFIG), "--out", str(run), "--no-resume",
        "--set", f"train.data_dir={prepared}", "--set", "train.progress_bar=false", "--set", "train.epochs=1",
    ]  # fmt: skip
    wall, peak, timeline = run_sampled(train)
    results = json.loads((run / "results.json").read_text())
    rows = [r for r in csv.DictReader(open(run / "log.csv")) if r["phase"] == "train"]
    summary, floors = done["summary"], generated["floors"]
    # the first window holds the warm-up; a run too short to log one: rows over training seconds
    rates = [float(r["samples_per_s"]) for r in rows[1:]] or [
        summary["split"]["train"]["rows"] / results["train_seconds"]
    ]
    constant = summary["baselines_on_test"]["watch_ratio"]["mse_train_mean"]
    model = results["test"]["watch_ratio/mse"]
    return {
        "scale": scale,
        "rows": floors["rows"],
        "videos": floors["videos"],
        "split": {k: summary["split"][k]["rows"] for k in ("train", "val", "test")},
        "generate_s": generated["seconds"],
        "prepare_s": done["seconds"],
        "prepare_peak": done["peak_rss_kb"] * 1024,
        "train_wall_s": wall,
        "train_s": results["train_seconds"],
        "samples_per_s": statistics.median(rates),
        "train_peak": peak,
        "timeline": timeline,
        "disk": {"generated": disk_bytes(raw), "prepared": disk_bytes(prepared), "run": disk_bytes(run)},
        "mse": model,
        "constant_mse": constant,
        "floor_mse": floors["watch_ratio"]["mse"],
        "explained": (constant - model) / (constant - floors["watch_ratio"]["mse"]),
        "skip_auc": results["test"]["skip/auc"],
    }


def _plot(found: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in found:
        times, rss = zip(*row["timeline"], strict=True)
        left.plot(times, [r / 2**30 for r in rss], label=f"scale {row['scale']:g}")
    left.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="1.5 GiB")
    left.set(xlabel="seconds since `engagerec train` started", ylabel="RSS of the process tree (GiB)")
    left.set_title("engagerec train, one epoch + evaluation")
    left.legend()
    rows = [row["rows"] for row in found]
    stages = (("prepare_s", "prepare"), ("train_s", "training epoch"), ("train_wall_s", "train command"))
    for key, label in stages:
        right.loglog(rows, [row[key] for row in found], marker="o", label=label)
    right.loglog(rows, [found[0]["train_wall_s"] * r / rows[0] for r in rows], "k:", label="linear in rows")
    right.set(xlabel="log rows", ylabel="seconds")
    right.set_title("time against rows")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0, 5.0])
    parser.add_argument("--keep", help="keep the generated data, preparations and runs under this directory")
    args = parser.parse_args()
    scales = " ".join(f"{s:g}" for s in args.scales)
    command = f".venv/bin/python benchmarks/end_to_end_scale.py --scales {scales}"
    found: List[Dict] = []
    failed: List[Tuple[float, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep) if args.keep else Path(scratch)  # --keep: left there afterwards
        work.mkdir(parents=True, exist_ok=True)
        for scale in args.scales:
            try:
                row = one_scale(scale, work)
            except (subprocess.CalledProcessError, RuntimeError) as err:  # recorded, not lost
                output = getattr(err, "stderr", None) or str(err)
                failed.append((scale, output.strip().splitlines()[-1][:300]))
                print(f"scale {scale:g} failed:\n{output[-3000:]}", flush=True)
                continue
            found.append(row)
            print(
                f"scale {scale:g}: prepare {row['prepare_s']:.0f} s, train {row['train_wall_s']:.0f} s "
                f"({row['samples_per_s']:,.0f} samples/s), peak {row['train_peak'] / 2**30:.2f} GiB",
                flush=True,
            )
    plot = Path(__file__).with_name("end_to_end_scale.png")
    if found:
        _plot(found, plot)
    gib = 2**30
    lines = [
        machine_block(command),
        "",
        "`engagerec synthesize --shape kuairand-1k --scale S`, `engagerec prepare` and `engagerec train` "
        "(configs/kuairand_1k.yaml: MMoE, batch 4096, one epoch, metrics on, then validation and test "
        "evaluation), each in a fresh process. Train peak: the RSS of the whole process tree, sampled "
        f"every second (over time: {plot.name}).",
        "",
        "| scale | log rows | train / val / test rows | generate s | prepare s | prepare peak GiB "
        "| train command s (training s) | samples/s (median of log windows) | train peak GiB "
        "| disk GB: generated / prepared / run |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in found:
        split, disk = row["split"], row["disk"]
        lines.append(
            f"| {row['scale']:g} | {row['rows']:,} "
            f"| {split['train']:,} / {split['val']:,} / {split['test']:,} "
            f"| {row['generate_s']:.0f} | {row['prepare_s']:.0f} | {row['prepare_peak'] / gib:.2f} "
            f"| {row['train_wall_s']:.0f} ({row['train_s']:.0f}) | {row['samples_per_s']:,.0f} "
            f"| {row['train_peak'] / gib:.2f} "
            f"| {disk['generated'] / 1e9:.2f} / {disk['prepared'] / 1e9:.2f} / {disk['run'] / 1e9:.3f} |"
        )
    for scale, reason in failed:
        lines.append(f"| {scale:g} | failed: {reason.replace('|', '/')} |" + " |" * 8)
    lines += [
        "",
        "Test quality after that one epoch (watch ratio: the share of the explainable variance "
        "recovered is (constant - model) / (constant - noise floor)):",
        "",
        "| scale | watch-ratio MSE | train-mean constant | noise floor "
        "| explainable variance recovered | skip AUC |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in found:
        lines.append(
            f"| {row['scale']:g} | {row['mse']:.4f} | {row['constant_mse']:.4f} | {row['floor_mse']:.4f} "
            f"| {row['explained']:.1%} | {row['skip_auc']:.4f} |"
        )
    write_section("end_to_end_scale", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
