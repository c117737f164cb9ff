"""Peak memory of a whole simulation: this process and every process it started, sampled in the background.

An embedded Ray (`ray.init` from this driver) starts its GCS, raylet, object store and worker processes as
descendants of the driver, so they are all counted; on an existing cluster only this machine's driver is. Each
process counts its proportional set size (PSS: shared pages split among the processes mapping them), so the
object store's shared memory and the libraries every worker maps are counted once, not once per process.
"""

from __future__ import annotations

import threading
import time

import psutil

MIB = 1024 * 1024
MAX_OVERHEAD = 50  # wait at least this many times as long as a sample took


def tree_memory_mb(root: psutil.Process) -> float:
    """PSS (RSS where PSS is unavailable) summed over `root` and its live descendants, in MiB."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # exited between listing and reading, or not ours to read
    return total / MIB


class MemoryMonitor:
    """Samples `tree_memory_mb` of this process every `interval_s` on a daemon thread (reading PSS walks a
    process's page tables, ~1 ms per GiB, so sampling is kept sparse: never more than 1/`MAX_OVERHEAD` of the
    time, so a 10^6-device run's ~12 GiB of processes are sampled every few seconds, not every second).

    `take_peak()` returns the highest sample since the previous call (or the start) and begins a new interval,
    so a caller gets per-phase peaks; use it as a context manager around what it measures."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._root = psutil.Process()
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="memory-monitor", daemon=True)

    def __enter__(self) -> MemoryMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def take_peak(self) -> float:
        """The peak in MiB since the last call; the next interval starts from the current usage."""
        current = self._sample()
        with self._lock:
            peak, self._peak = self._peak, current
        return peak

    def _sample(self) -> float:
        current = tree_memory_mb(self._root)
        with self._lock:
            self._peak = max(self._peak, current)
        return current

    def _sample_until_stopped(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            tic = time.perf_counter()
            self._sample()
            wait = max(self.interval_s, (time.perf_counter() - tic) * MAX_OVERHEAD)
