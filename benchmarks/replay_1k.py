"""The day-by-day retraining replay (engagerec_study.sections.replay) on KuaiRand-1K-shaped data
whose catalogue grows: the generator uploads a share of its videos during the log
(``--video-arrival``), so every day brings videos no earlier day had; with ``--user-arrival`` (0
by default) a share of its users joins during the log too.

    .venv/bin/python benchmarks/replay_1k.py [--scale 0.1] [--video-arrival 0.3] [--user-arrival 0]
        [--seeds 0 1 2 3 4] [--first-days 7] [--last-day 14] [--work DIR]

Generates the data (configs/kuairand_1k.yaml's layout) under ``--work``, cuts it into days, and
runs the replay's three lines (frozen, a daily warm start, a daily retrain from scratch) with
configs/kuairand_1k.yaml's model, in batches of 256 for up to 5 epochs (early stopping): its own
batch of 4096 and single epoch would give a day's window a handful of steps, and the comparison
would measure steps, not staleness. Writes the section ``replay_1k`` of benchmarks/RESULTS.md and
benchmarks/replay_1k.png (``replay_1k_users`` and its plot when users join).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import FLOAT32, machine_block, write_section  # noqa: E402

CONFIG = REPO / "configs" / "kuairand_1k.yaml"
TRAINING = ["train.batch_size=256", "train.eval_batch_size=4096", "train.epochs=5", FLOAT32]


def main() -> None:
    from engagerec.data.kuairand_generator import write_kuairand_1k
    from engagerec_study.sections import replay

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--video-arrival", type=float, default=0.3)
    # 0 as in the recorded run; 0.3 gives new users most days too (not run yet)
    parser.add_argument("--user-arrival", type=float, default=0.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--first-days", type=int, default=7)
    parser.add_argument("--last-day", type=int, default=14)
    parser.add_argument("--work", help="where the data, preparations and runs go (kept; resumed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="replay_1k-"))
    raw = work / "raw"
    if not (raw / "noise_floor.json").is_file():
        write_kuairand_1k(
            raw, scale=args.scale, seed=0, video_arrival=args.video_arrival, user_arrival=args.user_arrival
        )
    made = json.loads((raw / "noise_floor.json").read_text())
    asked = (args.scale, args.video_arrival, args.user_arrival)
    if (made["scale"], made.get("video_arrival", 0.0), made.get("user_arrival", 0.0)) != asked:
        raise SystemExit(
            f"{args.work} holds data of another --scale, --video-arrival or --user-arrival: "
            "give another --work"
        )
    sources = [
        f"data.source.interactions={raw / 'log_standard_*.csv'}",
        f"data.source.users={raw / 'user_features_1k.csv'}",
        f"data.source.content={raw / 'video_features_basic_1k.csv'}",
    ]
    section = replay.section(
        str(CONFIG), sources + TRAINING, first_days=args.first_days, last_day=args.last_day
    )
    data = section.compute(section.spec(args.seeds), work / "replay")
    figures = work / "figures"
    figures.mkdir(exist_ok=True)
    text = section.render(data, {}, figures)
    # the run with users joining keeps its own section and plot beside the one without
    name = "replay_1k" if args.user_arrival == 0 else "replay_1k_users"
    plot = Path(__file__).with_name(f"{name}.png")
    shutil.copyfile(figures / "replay.png", plot)
    command = (
        f".venv/bin/python benchmarks/replay_1k.py --scale {args.scale:g} "
        f"--video-arrival {args.video_arrival:g} --user-arrival {args.user_arrival:g} "
        f"--seeds {' '.join(map(str, args.seeds))} "
        f"--first-days {args.first_days} --last-day {args.last_day}"
    )
    body = "\n".join(
        [
            machine_block(command),
            "",
            f"KuaiRand-1K-shaped data at scale {args.scale:g} (`write_kuairand_1k`, seed 0), "
            f"{args.video_arrival:.0%} of the videos uploaded and {args.user_arrival:.0%} of the users "
            "joining during the log; configs/kuairand_1k.yaml's "
            f"model and features with {', '.join(TRAINING)}, and the replay's overrides "
            "(engagerec_study.sections.replay).",
            "",
            text.replace("figures/replay.png", plot.name),
        ]
    )
    write_section(name, body)
    print(body)


if __name__ == "__main__":
    main()
