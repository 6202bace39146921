"""Peak extra resident memory of a call, and timing kept apart from measuring it.

Writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM), so the
peak during one call minus the RSS before it is the memory the call added, whoever
allocated it (torch, faiss, BLAS). Coarse (pages, not bytes) but honest.

The peak is only honest if freed memory goes back to the OS at once: glibc is told to
serve every allocation of 128 KiB and more with mmap and to trim the heap above 128 KiB,
so a call cannot hide an allocation inside memory the process already held. That setting
makes every large allocation fault its pages in afresh (several milliseconds per call at
the small sizes, profiled), which is not how a process runs in a loop: glibc's own dynamic
thresholds grow to 32 MiB after the first frees. So the timed calls run with those
steady-state thresholds, and the memory is measured in a separate untimed call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _allocator(exact_rss: bool) -> None:
    """exact_rss: freed memory returns to the OS at once (for peak RSS). Otherwise the
    thresholds glibc's dynamic rule reaches in a long-running loop (for timing)."""
    mmap_threshold = 128 * 1024 if exact_rss else 32 * 1024 * 1024
    _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, mmap_threshold if exact_rss else 2 * mmap_threshold)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn) -> float:
    """Run ``fn()`` once; return its peak RSS above the RSS before the call, in MiB.

    Runs with the exact-RSS allocator settings (see the module docstring) and frees the
    heap's unused memory first (malloc_trim), so memory left resident by earlier cases is
    not reused silently and the call cannot look free."""
    _allocator(exact_rss=True)
    try:
        _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    finally:
        _allocator(exact_rss=False)


def bench_once(benchmark, fn, rounds: int = 1) -> None:
    """Time ``fn`` with pytest-benchmark and record its peak extra memory.

    rounds > 1: one untimed warm-up call, then one untimed call that measures the memory,
    then ``rounds`` timed calls with the steady-state allocator. The warm-up keeps one-time
    costs of the process out of the case that happens to run first: measured without it,
    max_relative's extension read 40 MiB at N = 256 (the process's first backward pass) and
    4 MiB with it. rounds == 1 (the cases that take seconds):
    one call, timed and measured together, so the big cases do not run twice; the exact-RSS
    allocator costs them well under 1% there."""
    if rounds > 1:
        fn()
        benchmark.extra_info["peak_extra_mib"] = round(peak_extra_mib(fn), 1)  # restores steady state
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        return
    peaks = []
    benchmark.pedantic(lambda: peaks.append(peak_extra_mib(fn)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["peak_extra_mib"] = round(peaks[0], 1)
