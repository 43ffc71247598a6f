"""Whether two preparations of the same files are the same bytes: `engagerec prepare` twice.

    .venv/bin/python benchmarks/prepare_twice.py --data generated/kuairand_1k --out /tmp/twice \\
        [--config configs/kuairand_1k.yaml] [--set KEY=VALUE ...] [--section prepare_twice]

Runs the shipped command twice on the KuaiRand-layout files under ``--data`` into
``--out``/run0 and ``--out``/run1, each in a fresh process, then compares the two manifests
(every file's bytes and CRC-32) and the two schema.json files less their stage timings. A
preparation is a function of its files and config only if nothing differs: DuckDB's float sums
depend on the order of the rows, which follows its parallel statements, so only sums that are
exact in any order (engagerec.data.exact_sums) give that. Writes the files that differ and each
run's seconds to the section ``--section`` of benchmarks/RESULTS.md; ``--keep`` keeps the runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from prepare_queries import add_prepare_arguments, kuairand_sources  # noqa: E402
from results import record_section  # noqa: E402


def prepare_once(config: str, data: str, out: Path, sets: list[str]) -> float:
    """`engagerec prepare` of ``data`` into ``out`` in a fresh process; returns its seconds."""
    command = [sys.executable, "-m", "engagerec", "prepare", "--config", config, "--out", str(out)]
    for override in kuairand_sources(data) + sets:
        command += ["--set", override]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def differences(first: Path, second: Path) -> list[str]:
    """The files of two preparations that differ (schema.json: anything but its stage timings)."""
    manifests = [json.loads((run / "manifest.json").read_text())["files"] for run in (first, second)]
    differ = sorted(
        name
        for name in set(manifests[0]) | set(manifests[1])
        if name != "schema.json" and manifests[0].get(name) != manifests[1].get(name)
    )
    schemas = [json.loads((run / "schema.json").read_text()) for run in (first, second)]
    for schema in schemas:
        schema["meta"]["summary"].pop("seconds", None)
    return differ + (["schema.json (less its timings)"] if schemas[0] != schemas[1] else [])


def main() -> None:
    """Prepare twice, compare, write the section."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prepare_arguments(parser, "a directory for the two preparations (written)", "prepare_twice")
    parser.add_argument("--keep", action="store_true", help="keep the two preparations")
    args = parser.parse_args()
    out = Path(args.out)
    runs = [out / "run0", out / "run1"]
    for run in runs:
        shutil.rmtree(run, ignore_errors=True)
    seconds = [prepare_once(args.config, args.data, run, args.set) for run in runs]
    files = len(json.loads((runs[0] / "manifest.json").read_text())["files"])
    differ = differences(*runs)
    rows = json.loads((runs[0] / "schema.json").read_text())["meta"]["summary"]["rows_kept"]
    lines = [
        f"`engagerec prepare` of `{args.data}` ({rows:,} kept rows) with `{args.config}`"
        + (f" and {', '.join(f'`{s}`' for s in args.set)}" if args.set else "")
        + ", twice, each in a fresh process; the manifests' files (bytes and CRC-32) and schema.json"
        " less its stage timings compared.",
        "",
        "| files | differing | seconds (run 1 / run 2) |",
        "|---:|---|---|",
        f"| {files} | {', '.join(differ) if differ else 'none'} | {seconds[0]:.1f} / {seconds[1]:.1f} |",
    ]
    record_section(args.section, lines)
    if not args.keep:
        for run in runs:
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
