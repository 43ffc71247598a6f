"""What machine and package versions a measurement ran on, for results files (light: no torch)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Iterable


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says: for results files.

    Example::

        >>> isinstance(cpu_name(), str) and len(cpu_name()) > 0
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(packages: Iterable[str]) -> str:
    """``"name version, ..."`` of installed packages (``absent`` for a missing one).

    Example::

        >>> package_versions(["numpy", "no-such-package"]).endswith("no-such-package absent")
        True
    """

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "absent"

    return ", ".join(f"{p} {version(p)}" for p in packages)
