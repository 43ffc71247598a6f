"""KuaiRand-1K-shaped data end to end at several scales, as a user runs it: generate, prepare,
then `engagerec train` for one epoch with its validation and test evaluation.

    .venv/bin/python benchmarks/end_to_end_scale.py --scales 0.1 1 5 [--keep DIR]
    .venv/bin/python benchmarks/end_to_end_scale.py --scales 1 --skews 1.3 1.05 0.65   # data shapes
    .venv/bin/python benchmarks/end_to_end_scale.py --scales 5 --prepare-set data.memory_limit=4GB \
        --section end_to_end_scale_4gb   # prepare with config overrides, into its own section

For each scale S (1 = KuaiRand-1K: 11.7M views, 4.37M videos):

1. `engagerec synthesize --shape kuairand-1k --scale S` (engagerec.data.kuairand_generator);
2. `prepare` with configs/kuairand_1k.yaml: seconds and the process's peak RSS (VmHWM);
3. `engagerec train --config configs/kuairand_1k.yaml` on it as shipped (its tower precision
   ``auto``: bf16 where the CPU has AVX512-BF16 or AMX; the section says which), one epoch,
   metrics on, with the validation and test evaluation it runs: wall time, the seconds spent
   training (results.json), samples/s (the median of log.csv's windows), and the peak RSS of
   the whole process tree sampled every second (the RSS over time is plotted);
4. the disk used by the generated files, the preparation and the run;
5. test quality after that one epoch: watch-ratio MSE beside the train-mean constant and the
   generator's noise floor, and the share of the explainable variance recovered,
   (constant - model) / (constant - floor); skip AUC.

Each step runs in a fresh process. Writes the section ``end_to_end_scale`` of
benchmarks/RESULTS.md and benchmarks/end_to_end_scale.png (RSS over time per scale; stage seconds
against rows). With ``--skews``, each scale runs once per popularity skew of the generator (the
power law's exponent: 1.3 a strong head, about 1.1M distinct videos at scale 1; 1.05 the default,
1.9M; 0.65 flat, 3.2M) into the section ``data_shapes`` and data_shapes.png instead.
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
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from prepare_scale import GENERATE, PREPARE  # noqa: E402
from results import machine_block, run_child, write_section  # noqa: E402

CONFIG = REPO / "configs" / "kuairand_1k.yaml"
# KuaiRand-27K's interactions as its release counts them (Gao et al., CIKM 2022; 32M videos, 27,285 users)
KUAIRAND_27K_ROWS = 322_278_385


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


def one_scale(
    scale: float, tmp: Path, skew: Optional[float] = None, prepare_sets: Sequence[str] = ()
) -> Dict:
    """Generate, prepare (with the config overrides ``prepare_sets``) and train at ``scale``
    (and popularity ``skew``) under ``tmp``; returns what was measured."""
    name = f"{scale:g}" + ("" if skew is None else f"_skew{skew:g}")
    raw, prepared, run = tmp / f"raw_{name}", tmp / f"prepared_{name}", tmp / f"run_{name}"
    shape = [] if skew is None else [str(skew)]
    generated = run_child(GENERATE, str(raw), str(scale), *shape, cwd=REPO)
    done = run_child(PREPARE, str(raw), str(prepared), str(CONFIG), *prepare_sets, cwd=REPO)
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
        "skew": floors["popularity_skew"],
        "rows": floors["rows"],
        "videos": floors["videos"],
        "train_videos": summary["split"]["train"]["items"],
        "split": {k: summary["split"][k]["rows"] for k in ("train", "val", "test")},
        "generate_s": generated["seconds"],
        "prepare_s": done["seconds"],
        "prepare_peak": done["peak_rss_kb"] * 1024,
        "train_wall_s": wall,
        "train_s": results["train_seconds"],
        "precision": results["tower_precision"],
        # FBGEMM's backward path and its thread, as the run resolved them (older runs: neither)
        "backward": (
            results.get("embedding_backward", "?"),
            results.get("embedding_backward_thread", "main"),
        ),
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
        left.plot(times, [r / 2**30 for r in rss], label=_label(row))
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


def _label(row: Dict) -> str:
    return f"scale {row['scale']:g}" + (f", skew {row['skew']:g}" if row.get("shaped") else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0, 5.0])
    parser.add_argument(
        "--skews", type=float, nargs="+", help="run each scale once per popularity skew (section data_shapes)"
    )
    parser.add_argument("--keep", help="keep the generated data, preparations and runs under this directory")
    parser.add_argument(
        "--prepare-set", action="append", default=[], help="a config override for prepare, KEY=VALUE"
    )
    parser.add_argument("--section", help="the RESULTS.md section (default: end_to_end_scale or data_shapes)")
    args = parser.parse_args()
    scales = " ".join(f"{s:g}" for s in args.scales)
    command = f".venv/bin/python benchmarks/end_to_end_scale.py --scales {scales}"
    if args.skews:
        command += " --skews " + " ".join(f"{s:g}" for s in args.skews)
    command += "".join(f" --prepare-set {kv}" for kv in args.prepare_set)
    section = args.section or ("data_shapes" if args.skews else "end_to_end_scale")
    if args.section:
        command += f" --section {args.section}"
    found: List[Dict] = []
    failed: List[Tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep) if args.keep else Path(scratch)  # --keep: left there afterwards
        work.mkdir(parents=True, exist_ok=True)
        for scale in args.scales:
            for skew in args.skews or [None]:
                what = f"scale {scale:g}" + ("" if skew is None else f", skew {skew:g}")
                try:
                    row = one_scale(scale, work, skew, args.prepare_set)
                except (subprocess.CalledProcessError, RuntimeError) as err:  # recorded, not lost
                    output = getattr(err, "stderr", None) or str(err)
                    failed.append((what, output.strip().splitlines()[-1][:300]))
                    print(f"{what} failed:\n{output[-3000:]}", flush=True)
                    continue
                row["shaped"] = skew is not None
                found.append(row)
                print(
                    f"{what}: prepare {row['prepare_s']:.0f} s, train {row['train_wall_s']:.0f} s "
                    f"({row['samples_per_s']:,.0f} samples/s), peak {row['train_peak'] / 2**30:.2f} GiB",
                    flush=True,
                )
    plot = Path(__file__).with_name(f"{section}.png")
    if found:
        _plot(found, plot)
    gib = 2**30
    lines = [
        machine_block(command),
        "",
        "`engagerec synthesize --shape kuairand-1k --scale S`, `engagerec prepare`"
        + "".join(f" `--set {kv}`" for kv in args.prepare_set)
        + " and `engagerec train` (configs/kuairand_1k.yaml as shipped: MMoE, batch 4096, one epoch, "
        "metrics on, then validation "
        f"and test evaluation; the tower in {', '.join(sorted({row['precision'] for row in found}))} "
        "here; the large tables' embedding backward: "
        + ", ".join(
            sorted({f"{path}, on the {thread} thread" for path, thread in (r["backward"] for r in found)})
        )
        + "), each in a fresh process. Train peak: the RSS of the whole process tree, sampled "
        f"every second (over time: {plot.name}).",
        "",
        "| scale | popularity skew | log rows | distinct train videos | train / val / test rows | generate s "
        "| prepare s | prepare peak GiB | train command s (training s) | samples/s (median of log windows) "
        "| train peak GiB | disk GB: generated / prepared / run |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in found:
        split, disk = row["split"], row["disk"]
        lines.append(
            f"| {row['scale']:g} | {row['skew']:g} | {row['rows']:,} | {row['train_videos']:,} "
            f"| {split['train']:,} / {split['val']:,} / {split['test']:,} "
            f"| {row['generate_s']:.0f} | {row['prepare_s']:.0f} | {row['prepare_peak'] / gib:.2f} "
            f"| {row['train_wall_s']:.0f} ({row['train_s']:.0f}) | {row['samples_per_s']:,.0f} "
            f"| {row['train_peak'] / gib:.2f} "
            f"| {disk['generated'] / 1e9:.2f} / {disk['prepared'] / 1e9:.2f} / {disk['run'] / 1e9:.3f} |"
        )
    for what, reason in failed:
        lines.append(f"| {what} | failed: {reason.replace('|', '/')} |" + " |" * 10)
    lines += [
        "",
        "Test quality after that one epoch (watch ratio: the share of the explainable variance "
        "recovered is (constant - model) / (constant - noise floor)):",
        "",
        "| scale | popularity skew | watch-ratio MSE | train-mean constant | noise floor "
        "| explainable variance recovered | skip AUC |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in found:
        lines.append(
            f"| {row['scale']:g} | {row['skew']:g} | {row['mse']:.4f} | {row['constant_mse']:.4f} "
            f"| {row['floor_mse']:.4f} "
            f"| {row['explained']:.1%} | {row['skip_auc']:.4f} |"
        )
    if not args.skews:
        lines += _extrapolation(found)
    write_section(section, "\n".join(lines))
    print("\n".join(lines))


def _extrapolation(found: List[Dict]) -> List[str]:
    """Each stage's cost per million rows at every scale (flat when it grows linearly), and a
    least-squares line in rows through the scales, read at KuaiRand-27K's rows."""
    if len(found) < 2:
        return []
    import numpy as np

    rows = np.array([row["rows"] for row in found], dtype=float)
    stages = {
        "prepare s": [row["prepare_s"] for row in found],
        "train command s": [row["train_wall_s"] for row in found],
        "prepare peak GiB": [row["prepare_peak"] / 2**30 for row in found],
        "train peak GiB": [row["train_peak"] / 2**30 for row in found],
        "disk GB (generated + prepared + run)": [sum(row["disk"].values()) / 1e9 for row in found],
    }
    lines = [
        "",
        f"Growth in rows, and a line read at KuaiRand-27K's {KUAIRAND_27K_ROWS:,} rows (a least-squares "
        "line in rows through the scales above; one process on this machine, the generator's catalogue "
        "growing with the rows, where 27K's 32M videos grow slower: docs/ARCHITECTURE.md's KuaiRand-27K "
        "plan says what changes there):",
        "",
        "| stage | per million rows at scale "
        + " / ".join(f"{row['scale']:g}" for row in found)
        + " | the line at 27K's rows |",
        "|---|---|---:|",
    ]
    for stage, values in stages.items():
        slope, intercept = np.polyfit(rows, np.array(values), 1)
        per_million = " / ".join(f"{v / r * 1e6:.3g}" for v, r in zip(values, rows, strict=True))
        lines.append(f"| {stage} | {per_million} | {intercept + slope * KUAIRAND_27K_ROWS:,.1f} |")
    return lines


if __name__ == "__main__":
    main()
