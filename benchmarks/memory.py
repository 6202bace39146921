"""Peak extra resident memory of a call, for benchmarks on Linux.

Writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM), so the
peak during one call minus the RSS before it is the memory the call added, whoever
allocated it (torch, faiss, BLAS). Coarse (pages, not bytes) but honest.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn) -> float:
    """Run ``fn()`` once; return its peak RSS above the RSS before the call, in MiB.

    Freed heap is handed back to the OS first (malloc_trim): otherwise memory left resident
    by earlier cases would be reused silently and the call would look free."""
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def bench_once(benchmark, fn, rounds: int = 1) -> None:
    """Time ``fn`` with pytest-benchmark and record its peak extra memory (measured in the
    timed calls: the /proc reads cost microseconds). ``rounds > 1`` adds a warm-up call."""
    peaks = []
    benchmark.pedantic(lambda: peaks.append(peak_extra_mib(fn)), rounds=rounds, iterations=1,
                       warmup_rounds=1 if rounds > 1 else 0)
    benchmark.extra_info["peak_extra_mib"] = round(max(peaks), 1)
