"""Where `engagerec prepare`'s time goes, query by query: every DuckDB statement it runs, timed.

    .venv/bin/python benchmarks/prepare_queries.py --data generated/kuairand_1k \\
        --out /tmp/prepared [--config configs/kuairand_1k.yaml] [--set KEY=VALUE ...] \\
        [--top 12] [--section prepare_queries]

Prepares the KuaiRand-layout files under ``--data`` (an `engagerec synthesize --shape kuairand-1k`
output, or the real download's data/ files under those names) with ``--config`` and its
``--set`` overrides (e.g. ``data.memory_limit=4GB``), as `engagerec prepare` does, in this
process, with its DuckDB connection wrapped so that each ``execute`` is timed. The writer's
streamed read of each split goes through a cursor and is not timed here: its time is in the
stage "encode, shuffle, write shards" (schema.json's summary) beside the ``encoded`` statement.
Writes the stages, the process's peak RSS (VmHWM) and the ``--top`` costliest statements (the
first 150 characters of each) to the section ``--section`` of benchmarks/RESULTS.md. Compare
the same section at two scales to find what grows faster than the rows.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results import hwm_kb, record_section  # noqa: E402


class TimedConnection:
    """A DuckDB connection whose ``execute`` calls are timed into ``log`` as (seconds, SQL)."""

    def __init__(self, connection, log: List[Tuple[float, str]]) -> None:
        self._connection, self._log = connection, log

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def execute(self, sql, *args, **kwargs):
        """Run ``sql`` as DuckDB does, logging its seconds."""
        start = time.perf_counter()
        result = self._connection.execute(sql, *args, **kwargs)
        self._log.append((time.perf_counter() - start, " ".join(str(sql).split())))
        return result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._connection.__exit__(*exc)


def kuairand_sources(data: str) -> List[str]:
    """The overrides that point a config's ``data.source`` at KuaiRand-layout files in ``data``."""
    return [
        f"data.source.interactions={data}/log_standard_*.csv",  # not log_random_*, as the config
        f"data.source.users={data}/user_features_1k.csv",
        f"data.source.content={data}/video_features_basic_1k.csv",
    ]


def add_prepare_arguments(parser: argparse.ArgumentParser, out_help: str, section: str) -> None:
    """The options every prepare benchmark takes: the files, the output, the config and its
    overrides, and the RESULTS.md section."""
    parser.add_argument("--data", default="generated/kuairand_1k")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--config", default="configs/kuairand_1k.yaml")
    parser.add_argument("--set", action="append", default=[], help="a config override, KEY=VALUE")
    parser.add_argument("--section", default=section)


def timed_prepare(config: str, data: str, out: str, sets: List[str]) -> Tuple[dict, List[Tuple[float, str]]]:
    """Prepare ``data`` into ``out`` with ``config`` and ``sets``; returns (the summary, the timed
    statements, costliest first)."""
    from engagerec.config import load_config

    prepare_module = importlib.import_module("engagerec.data.prepare")  # the name is shadowed
    log: List[Tuple[float, str]] = []
    connect = prepare_module.connect
    prepare_module.connect = lambda *args, **kwargs: TimedConnection(connect(*args, **kwargs), log)
    try:
        summary = prepare_module.prepare(load_config(config, kuairand_sources(data) + sets).data, out)
    finally:
        prepare_module.connect = connect
    return summary, sorted(log, reverse=True)


def main() -> None:
    """Prepare once with every statement timed, then write the section."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_prepare_arguments(parser, "the preparation's directory (written)", "prepare_queries")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    started = time.perf_counter()
    summary, statements = timed_prepare(args.config, args.data, args.out, args.set)
    seconds = time.perf_counter() - started
    rows = sum(summary["split"][name]["rows"] for name in ("train", "val", "test"))
    lines = [
        f"`engagerec prepare` of `{args.data}` ({rows:,} kept rows) with `{args.config}`"
        + (f" and {', '.join(f'`{s}`' for s in args.set)}" if args.set else "")
        + f", in one process: {seconds:.1f} s, peak RSS {hwm_kb() / 2**20:.2f} GiB, DuckDB memory limit "
        + f"{summary.get('memory_limit', 'not recorded')}.",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {stage} | {value:.1f} |" for stage, value in summary["seconds"].items()),
        "",
        f"The {args.top} costliest of its {len(statements)} DuckDB statements run through `execute` "
        "(the writer's streamed reads of the splits are in its stage only):",
        "",
        "| seconds | statement (its start) |",
        "|---:|---|",
        *(f"| {value:.1f} | `{sql[:150].replace('|', '/')}` |" for value, sql in statements[: args.top]),
    ]
    record_section(args.section, lines)


if __name__ == "__main__":
    main()
