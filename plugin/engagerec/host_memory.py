"""Keep freed host memory in the process: glibc's malloc settings for CPU training.

A CPU training step allocates and frees tens of MB of activations and gradients. By default
glibc serves blocks above its mmap threshold with fresh mmaps and trims the heap top back to
the kernel, so every step page-faults its working memory in again (costly on virtual
machines). Raising the mmap threshold to its maximum (32 MiB), never trimming, and padding heap
growth keeps that memory resident. Measured here at 10^7-row tables (benchmarks/RESULTS.md,
sections scale_10m_*): on pre-built batches engagerec's step went from 188,379 to 216,478
samples/s (+15%) and the plain sparse reference from 97,809 to 104,346 (+7%); end to end from
shards no gain shows (218,277 without, 213,870 with: within this machine's noise), as the
reader's own allocations keep the heap in use. It is the remedy that PyTorch's CPU performance
guides get from preloading tcmalloc or jemalloc, without a preload. The cost: the process keeps
its peak heap instead of returning it.

The `engagerec` command applies it at start; a pipeline that embeds engagerec can call
``keep_freed_memory()`` itself, or set ``ENGAGEREC_MALLOC_TUNING=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit machines
TOP_PAD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """
    Set glibc's malloc to keep freed blocks of up to 32 MiB resident (see the module docstring).

    Returns:
        bool: whether the settings were applied: False off glibc (macOS, musl), or when
        ``ENGAGEREC_MALLOC_TUNING=0``.

    Example::

        >>> import os, platform
        >>> from unittest import mock
        >>> from engagerec.host_memory import keep_freed_memory
        >>> with mock.patch.dict(os.environ, {"ENGAGEREC_MALLOC_TUNING": "0"}):  # left alone
        ...     keep_freed_memory()
        False
        >>> with mock.patch.dict(os.environ, {"ENGAGEREC_MALLOC_TUNING": "1"}):  # applied on glibc
        ...     keep_freed_memory() == (platform.libc_ver()[0] == "glibc")
        True
    """
    if os.environ.get("ENGAGEREC_MALLOC_TUNING", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = ctypes.c_int(2**31 - 1).value  # the largest an int setting holds: never trim
    return all(
        libc.mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
            (M_TRIM_THRESHOLD, trim),
            (M_TOP_PAD, TOP_PAD),
        )
    )
