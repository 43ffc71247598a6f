"""What every benchmark shares: benchmarks/RESULTS.md (one section per benchmark, each with the
machine, versions and command), and measuring a step in a fresh process (its peak RSS)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from engagerec.machine import cpu_name, package_versions

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PACKAGES = ("torch", "fbgemm-gpu-cpu", "torchrec", "pyarrow", "numpy")


def machine_block(command: str) -> str:
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, Python {platform.python_version()}",
            f"- versions: {package_versions(PACKAGES)}",
            f"- command: `{command}`",
        ]
    )


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or add) the section ``name`` of ``path`` (RESULTS.md), leaving the others as they are."""
    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmark results\n\nWritten by the scripts in benchmarks/; do not edit by hand.\n"
    )
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n## {name}\n\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


# Peak RSS is read from /proc/self/status (VmHWM, this process's own high-water mark):
# getrusage's ru_maxrss would carry over the parent's peak across fork+exec on Linux.
PEAK_RSS = r"""
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""


def run_child(code: str, *args: str, **options) -> dict:
    """Run ``code`` (a program that prints one JSON object on its last line; prefix it with
    ``PEAK_RSS`` to report ``hwm_kb()``) with ``args`` in a fresh interpreter, and parse that line.
    ``options`` go to subprocess.run (``env``, ``cwd``)."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, **options
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
