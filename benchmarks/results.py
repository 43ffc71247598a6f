"""What every benchmark shares: benchmarks/RESULTS.md (one section per benchmark, each with the
machine, versions and command), and measuring a step in a fresh process (its peak RSS)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

from engagerec.machine import cpu_flags, cpu_name, package_versions

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parent.parent
PACKAGES = ("torch", "fbgemm-gpu-cpu", "torchrec", "pyarrow", "numpy")
# the tower in float32 whatever the config's tower_precision (configs/kuairand_1k.yaml: auto): the
# quality, replay and end-to-end figures were measured so; train_levers.py checks bf16 apart
FLOAT32 = "train.tower_precision=fp32"


# the instruction sets that decide CPU kernels here (/proc/cpuinfo flag -> the name we print):
# FBGEMM and oneDNN pick AVX2 or AVX-512 paths; bf16 matmuls want AVX512-BF16 or AMX
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
}


def cpu_isa(cpuinfo: str | None = None) -> str:
    r"""
    The CPU's relevant instruction sets, from /proc/cpuinfo's flags (``ISA_FLAGS``): e.g.
    ``"AVX2, AVX-512, AVX512-BF16, AMX"``; ``"none of AVX2/AVX-512/AMX"`` when it has none of them,
    ``"ISA unknown"`` off Linux.

    Args:
        cpuinfo (str | None): the text of /proc/cpuinfo. Default: read it.

    Returns:
        str: the names, comma-separated.

    Example::

        >>> cpu_isa("flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
        'AVX2, AVX-512, AVX512-BF16, AMX'
        >>> cpu_isa("flags\t\t: fpu sse\n")
        'none of AVX2/AVX-512/AMX'
    """
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return "ISA unknown"
    found = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    return ", ".join(found) if found else "none of AVX2/AVX-512/AMX"


def machine_block(command: str) -> str:
    """The lines every section starts with: date, machine (CPU model, ISA, cores), versions, command."""
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machine: {cpu_name()} ({cpu_isa()}), {os.cpu_count()} logical cores, "
            f"Python {platform.python_version()}",
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


def record_section(name: str, lines: list[str]) -> str:
    """Write ``lines`` as the section ``name`` of RESULTS.md under the machine block, with the
    command that ran (this script and its arguments), print it and return it."""
    command = f".venv/bin/python benchmarks/{Path(sys.argv[0]).name} " + shlex.join(sys.argv[1:])
    text = "\n".join([machine_block(command.strip()), "", *lines])
    write_section(name, text)
    print(text)
    return text


def other_settings(run_dir: Path, wanted, ignored: tuple[str, ...] = ()) -> list[str]:
    """
    What a finished run's model and training settings differ in from the config ``wanted``
    (both with every default filled in, so a run written before a setting existed compares by
    that setting's default): what a benchmark checks before it reads a run back instead of
    training it again. ``train.data_dir`` is compared resolved (the same data may be reached by
    another path).

    Args:
        run_dir (Path): the run directory (its config.json).
        wanted (ExperimentConfig): the config the benchmark would train, its data_dir and seed set.
        ignored (tuple[str, ...]): ``train`` keys allowed to differ (e.g. ``"epochs"``).

    Returns:
        list[str]: the differing keys as ``section.key``; empty when the run is the one wanted.

    Example::

        >>> # other_settings(Path("runs/x/seed0"), load_config("configs/kuairand_1k.yaml"), ("epochs",))
    """
    import dataclasses

    from engagerec.runs import run_config

    done, want = dataclasses.asdict(run_config(run_dir)), dataclasses.asdict(wanted)
    for config in (done, want):
        config["train"]["data_dir"] = str(Path(config["train"]["data_dir"] or "").resolve())
    skip = {("train", key) for key in ignored}
    return [
        f"{section}.{key}"
        for section in ("model", "train")
        for key in want[section]
        if (section, key) not in skip and done[section][key] != want[section][key]
    ]


# Peak RSS is read from /proc/self/status (VmHWM, this process's own high-water mark):
# getrusage's ru_maxrss would carry over the parent's peak across fork+exec on Linux.
PEAK_RSS = r"""
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def rss():  # resident bytes now
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
"""
exec(PEAK_RSS)  # the same hwm_kb() and rss() for a benchmark that measures its own process


def run_child(code: str, *args: str, **options) -> dict:
    """Run ``code`` (a program that prints one JSON object on its last line; prefix it with
    ``PEAK_RSS`` to report ``hwm_kb()``) with ``args`` in a fresh interpreter, and parse that line.
    ``options`` go to subprocess.run (``env``, ``cwd``)."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, **options
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def exported(revision: str, into: Path) -> Path:
    """``plugin/`` of git ``revision`` written under ``into``; returns the directory to import
    from (on ``PYTHONPATH`` it shadows the editable install): a before/after in one run."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "plugin"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "plugin"
