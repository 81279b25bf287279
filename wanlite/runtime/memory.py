"""Peak-memory measurement per phase, and a call's bookkeeping (``CallMeter``).

On CUDA: ``torch.cuda.max_memory_allocated`` (reset at each phase start).  On CPU: the process's
peak resident set (``VmHWM`` in /proc/self/status), reset at each phase start by writing ``5``
to /proc/self/clear_refs (Linux >= 4.0).  Where neither is available the peak is reported as
the current RSS high-water mark without reset (``resettable`` is False then).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import torch


def _read_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_peak_bytes() -> int:
    hwm = _read_status("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_current_bytes() -> int:
    return _read_status("VmRSS") or 0


class PeakMeter:
    """Records the peak memory of named phases: ``with meter.phase("denoise"): ...``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_cpu_peak()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = cpu_peak_bytes()
            self.peaks[name] = max(peak, self.peaks.get(name, 0))


class CallMeter:
    """One call's bookkeeping: seconds and peak memory per phase, and the seconds its
    components (``runtime.lifecycle``) spent reading weights and prefetching, from their
    running totals at the start of the call."""

    def __init__(self, components: dict, device: torch.device):
        self.components, self.meter, self.timings = components, PeakMeter(device), {}
        self.loading, self.prefetch = self._weight_seconds(), self._prefetch_seconds()

    def _weight_seconds(self) -> float:
        return sum(c.load_seconds for c in self.components.values())

    def _prefetch_seconds(self) -> tuple[float, float]:
        pairs = [c.prefetch_seconds() for c in self.components.values()]
        return sum(r for r, _ in pairs), sum(w for _, w in pairs)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.meter.phase(name):
            yield
        self.timings[name] = time.perf_counter() - t0

    def finish(self, video, stats: dict):
        """Fill ``video``'s (a ``wanlite.video.Video``) timings, peaks and counts; return it."""
        video.timings = self.timings
        video.weights_seconds = self._weight_seconds() - self.loading
        (read, wait), (read0, wait0) = self._prefetch_seconds(), self.prefetch
        video.prefetch_seconds, video.prefetch_wait_seconds = read - read0, wait - wait0
        video.stats = dict(stats)
        video.peak_memory = dict(self.meter.peaks)
        return video


def fmt_bytes(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def trim() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``).

    Large weights freed between phases can stay in the process's heap when smaller live
    allocations sit between them (fragmentation); ``malloc_trim`` returns every free page,
    including those in the middle of the heap.  A no-op where glibc is not the allocator."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None
