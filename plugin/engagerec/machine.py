"""What machine and package versions a measurement ran on, for results files (light: no torch)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import FrozenSet, Iterable, Optional


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


def cpu_flags(cpuinfo: Optional[str] = None) -> Optional[FrozenSet[str]]:
    r"""The CPU's feature flags (/proc/cpuinfo's ``flags`` line, as Linux on x86 writes it), or
    None where they are unknown: off Linux, or on ARM (whose ``Features`` line this does not
    read), so bf16 is then never assumed.

    Args:
        cpuinfo (Optional[str]): the text of /proc/cpuinfo. Default: read it.

    Returns:
        Optional[FrozenSet[str]]: the flags, e.g. ``{"avx2", "avx512f", "amx_bf16", ...}``.

    Example::

        >>> sorted(cpu_flags("flags\t\t: fpu avx2 avx512_bf16\n"))
        ['avx2', 'avx512_bf16', 'fpu']
        >>> cpu_flags("processor\t: 0\n") is None
        True
    """
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return None if line is None else frozenset(line.split(":", 1)[1].split())


def cpu_has_bf16_matmuls(cpuinfo: Optional[str] = None) -> bool:
    r"""Whether the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX-BF16), where
    oneDNN's bf16 matmuls run at about twice float32's rate; elsewhere they are emulated and
    slower than float32.

    Args:
        cpuinfo (Optional[str]): the text of /proc/cpuinfo. Default: read it.

    Returns:
        bool: True with ``avx512_bf16`` or ``amx_bf16`` among the flags.

    Example::

        >>> cpu_has_bf16_matmuls("flags\t\t: avx2 avx512f avx512_bf16\n")
        True
        >>> cpu_has_bf16_matmuls("flags\t\t: avx2 avx512f\n")
        False
    """
    flags = cpu_flags(cpuinfo) or frozenset()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


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
